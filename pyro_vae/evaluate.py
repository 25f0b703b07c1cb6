"""Evaluation: the ELBO and its terms, and importance-sampled log-likelihoods.

All quantities are in nats per image, computed from Pyro traces of the guide and the
model replayed on its samples. The ELBO is reported as itself (higher is better):
``ELBO(x) = E_q[log p(x | z)] - KL(q(z | x) || p(z)) <= log p(x)``.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from tqdm.auto import tqdm

from .config import RunConfig
from .errors import ConfigError
from .model import VAE


@contextlib.contextmanager
def fixed_noise(seed: int | None, device: torch.device):
    """Draw from a forked torch RNG seeded with ``seed`` (no-op for ``None``).

    Evaluations repeat exactly, and the caller's random stream is left untouched.
    """
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        yield


@dataclass
class LogWeights:
    """Per-sample terms of ``log p(x, z_k) - log q(z_k | x)``, each of shape ``(K, B)``."""

    log_likelihood: torch.Tensor  # log p(x | z_k)
    log_prior: torch.Tensor  # log p(z_k)
    log_guide: torch.Tensor  # log q(z_k | x)

    @property
    def log_weight(self) -> torch.Tensor:
        return self.log_likelihood + self.log_prior - self.log_guide


@torch.no_grad()
def log_weights(vae: VAE, x: torch.Tensor, num_samples: int = 1, guide=None) -> LogWeights:
    """Trace the guide (``num_samples`` draws per image) and replay the model on them.

    ``guide`` defaults to the VAE's amortized guide; any guide ``guide(x)`` with a site
    ``"z"`` inside the ``"data"`` plate works (e.g. a per-image optimized Gaussian).
    """
    with pyro.plate("samples", num_samples, dim=-2):
        guide_trace = poutine.trace(guide or vae.guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    shape = (num_samples, x.shape[0])
    return LogWeights(
        log_likelihood=model_trace.nodes["x"]["log_prob"].expand(shape),
        log_prior=model_trace.nodes["z"]["log_prob"].expand(shape),
        log_guide=guide_trace.nodes["z"]["log_prob"].expand(shape),
    )


@dataclass
class ElboTerms:
    """Per-image ELBO terms (one Monte-Carlo sample each), shape ``(N,)``."""

    elbo: torch.Tensor
    log_likelihood: torch.Tensor  # E_q log p(x | z), the reconstruction term
    kl: torch.Tensor  # log q(z | x) - log p(z), a one-sample estimate of KL(q || p)

    def mean(self) -> dict[str, float]:
        return {"elbo": self.elbo.mean().item(),
                "log_likelihood": self.log_likelihood.mean().item(),
                "kl": self.kl.mean().item()}


@torch.no_grad()
def elbo_terms(vae: VAE, x: torch.Tensor, batch_size: int = 1000, seed: int | None = 0
               ) -> ElboTerms:
    """One-sample ELBO of every image in ``x`` (``(N, D)``), in batches.

    With a ``seed`` the result repeats exactly (see :func:`fixed_noise`).
    """
    was_training = vae.training
    vae.eval()
    with fixed_noise(seed, x.device):
        parts = [log_weights(vae, xb) for xb in x.split(batch_size)]
    vae.train(was_training)
    log_lik = torch.cat([p.log_likelihood[0] for p in parts])
    kl = torch.cat([(p.log_guide - p.log_prior)[0] for p in parts])
    return ElboTerms(elbo=log_lik - kl, log_likelihood=log_lik, kl=kl)


@torch.no_grad()
def importance_log_likelihood(
    vae: VAE,
    x: torch.Tensor,
    num_samples: int = 5000,
    batch_size: int = 100,
    max_elements: int = 2**24,
    seed: int | None = 0,
    progress: bool = False,
) -> torch.Tensor:
    r"""Importance-sampled estimate of ``log p(x)`` per image (Burda et al., 2015).

    .. math:: \log p(x) \approx \log \frac{1}{K} \sum_{k=1}^K
              \frac{p(x, z_k)}{q(z_k \mid x)}, \qquad z_k \sim q(z \mid x)

    A lower bound in expectation that tightens as ``K = num_samples`` grows; with ``K = 1``
    it is the ELBO. Samples are drawn in chunks of at most ``max_elements`` decoder
    outputs at once, so memory stays bounded for any ``K``; the running sum is kept in
    log space. Returns a tensor of shape ``(N,)`` on ``x.device``.
    """
    was_training = vae.training
    vae.eval()
    per_sample = batch_size * vae.x_dim * vae.likelihood.num_params
    chunk = max(1, min(num_samples, max_elements // per_sample))
    out = []
    batches = x.split(batch_size)
    bar = tqdm(batches, desc=f"log p(x), K={num_samples}", unit="batch", disable=not progress)
    with fixed_noise(seed, x.device):
        for xb in bar:
            total = xb.new_full((xb.shape[0],), -math.inf)  # log sum_k w_k so far, (B,)
            for start in range(0, num_samples, chunk):
                k = min(chunk, num_samples - start)
                log_w = log_weights(vae, xb, k).log_weight  # (k, B)
                total = torch.logaddexp(total, log_w.logsumexp(0))
            out.append(total - math.log(num_samples))
    vae.train(was_training)
    return torch.cat(out)


def evaluate_run(
    vae: VAE,
    config: RunConfig,
    split: str = "test",
    num_samples: int = 5000,
    batch_size: int = 100,
    progress: bool = False,
) -> dict:
    """ELBO terms and importance-sampled ``log p(x)`` of a trained run on one split.

    Binarized data sets are binarized once with the run's fixed seed, so results repeat.
    Returns means over images (nats per image) with their standard errors; bits per
    dimension where the likelihood is a probability mass function of the data it scores.
    """
    from .data import binarize, prepare_splits

    if split not in ("train", "test"):
        raise ConfigError(f"--split must be train or test, got {split!r}")
    if num_samples < 1 or batch_size < 1:
        raise ConfigError("--iwae-samples and --batch-size must be positive integers")
    device = next(vae.parameters()).device
    _, train_x, test_x = prepare_splits(config, device)
    x = test_x
    if split == "train":
        dynamic = config.data.binarize == "dynamic"
        x = binarize(train_x, config.data.binarize_seed + 2) if dynamic else train_x
    start = time.perf_counter()
    terms = elbo_terms(vae, x, batch_size=max(batch_size, 1000), seed=config.train.seed)
    log_px = importance_log_likelihood(vae, x, num_samples, batch_size,
                                       seed=config.train.seed + 1, progress=progress)
    seconds = time.perf_counter() - start
    n = len(x)

    def mean_se(t: torch.Tensor) -> tuple[float, float]:
        return t.mean().item(), (t.std() / math.sqrt(n)).item() if n > 1 else float("nan")

    lik = vae.likelihood
    result = {"split": split, "num_images": n, "iwae_samples": num_samples,
              "likelihood": lik.name, "normalized": lik.normalized}
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


@torch.no_grad()
def knn_accuracy(train_z: torch.Tensor, train_y: torch.Tensor, test_z: torch.Tensor,
                 test_y: torch.Tensor, k: int = 5, batch_size: int = 1000) -> float:
    """Accuracy of a k-nearest-neighbour vote (Euclidean) of test points among train points.

    A measure of how well the latent space separates classes: use posterior means.
    """
    correct = 0
    for zb, yb in zip(test_z.split(batch_size), test_y.split(batch_size)):
        nearest = torch.cdist(zb, train_z).topk(k, largest=False).indices  # (b, k)
        votes = torch.nn.functional.one_hot(train_y[nearest], int(train_y.max()) + 1).sum(1)
        correct += (votes.argmax(-1) == yb).sum().item()
    return correct / len(test_y)


@torch.no_grad()
def missing_log_normalizer(vae: VAE, x: torch.Tensor, batch_size: int = 1000,
                           seed: int | None = 0) -> torch.Tensor | None:
    """E_q[sum over pixels of log C(lambda)] per image, for an unnormalized likelihood.

    For ``bernoulli-relaxed`` this is what its log-"likelihood" leaves out: adding it to
    the relaxed ELBO gives the ELBO of a continuous Bernoulli with the same decoder. Returns
    ``None`` for likelihoods without a ``log_normalizer`` (the normalized ones).
    """
    out = []
    with fixed_noise(seed, x.device):
        for xb in x.split(batch_size):
            z = vae.encode(xb).rsample()
            d = vae.decode(z)
            if not hasattr(d, "log_normalizer"):
                return None
            out.append(d.log_normalizer().sum(-1))
    return torch.cat(out)
