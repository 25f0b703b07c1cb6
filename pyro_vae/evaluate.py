"""Evaluating a trained run: the ELBO and its terms, and the importance-sampled log p(x).

All quantities are in nats per image (higher is better), from
:mod:`pyro_vae.estimators`; binarized data sets are binarized once with the run's fixed
seed, so results repeat on every device.
"""

from __future__ import annotations

import math
import time

import torch

from . import seeds
from .data import binarize
from .errors import ConfigError
from .estimators import elbo_terms, importance_log_likelihood
from .runner.rundir import Run


def evaluate_run(
    run: Run,
    split: str = "test",
    num_samples: int = 5000,
    batch_size: int = 100,
    progress: bool | None = False,
) -> dict:
    """ELBO terms and importance-sampled ``log p(x)`` of a trained run on one split.

    Returns means over images (nats per image) with their standard errors; bits per
    dimension where the likelihood is a probability mass function of the data it scores.
    ``progress``: ``None`` -- a bar on a terminal, log lines with the time left elsewhere;
    ``False`` -- silent. :func:`pyro_vae.evaluate` also keeps the result in the run folder.
    """
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    if num_samples < 1 or batch_size < 1:
        raise ConfigError("num_samples and batch_size must be positive integers")
    vae, config, splits = run.vae, run.config, run.data
    x = splits.test_x
    if split == "train":
        x = splits.train_x
        if config.data.binarize == "dynamic":
            x = binarize(x, seeds.train_eval_binarization(config.data.binarize_seed))
    start = time.perf_counter()
    terms = elbo_terms(vae, x, batch_size=max(batch_size, 1000),
                       seed=seeds.elbo_noise(config.train.seed))
    log_px = importance_log_likelihood(vae, x, num_samples, batch_size,
                                       seed=seeds.importance_noise(config.train.seed),
                                       progress=progress)
    seconds = time.perf_counter() - start
    n = len(x)

    def mean_se(t: torch.Tensor) -> tuple[float, float]:
        return t.mean().item(), (t.std() / math.sqrt(n)).item() if n > 1 else float("nan")

    lik = vae.likelihood
    result = {"split": split, "num_images": n, "iwae_samples": num_samples,
              "likelihood": lik.name, "normalized": lik.normalized, "epoch": run.epoch,
              "partial_step": run.partial_step}
    for name, values in [("elbo", terms.elbo), ("log_likelihood_term", terms.log_likelihood),
                         ("kl", terms.kl), ("log_px", log_px),
                         ("gap", log_px - terms.elbo)]:
        result[name], result[f"{name}_se"] = mean_se(values)
    # bits/dim is the usual figure for a probability mass function on binary pixels; a
    # density of 8-bit pixels is not one without dequantization, so none is given then
    result["bits_per_dim"] = (-result["log_px"] / (vae.x_dim * math.log(2))
                              if lik.binary else None)
    result["seconds"] = seconds
    return result
