"""Estimators over Pyro traces: ELBO terms, importance weights, log p(x).

Tensors in, tensors out, in nats per image. Every quantity comes from a trace of the guide
and the model replayed on its samples, so any guide with the same sites works (the
amortized one, a per-image optimal Gaussian, a full-covariance proposal):

``ELBO(x) = E_q[log p(x | z)] - KL(q(z | x) || p(z)) <= log p(x)``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from .model import VAE, evaluating
from .progress import Progress


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


def log_mean_exp(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``log(mean(exp(t)))`` along ``dim``, computed stably."""
    return t.logsumexp(dim) - math.log(t.shape[dim])


@dataclass
class LogWeights:
    """Per-sample terms of ``log p(x, z_k) - log q(z_k | x)``, each of shape ``(K, B)``."""

    log_likelihood: torch.Tensor  # log p(x | z_k)
    log_prior: torch.Tensor  # log p(z_k)
    log_guide: torch.Tensor  # log q(z_k | x)

    @property
    def log_weight(self) -> torch.Tensor:
        return self.log_likelihood + self.log_prior - self.log_guide

    @classmethod
    def of(cls, model_trace, guide_trace, shape) -> LogWeights:
        """The terms of a guide trace and the model replayed on it, broadcast to ``shape``.

        Each sums the *unscaled* log densities of its sites (any number of latent sites:
        two stochastic layers give ``log p(z1 | z2) + log p(z2)``): an image's weight
        never depends on how the batch is scaled (``N / B``) or the KL weighted.
        """
        model_trace.compute_log_prob()
        guide_trace.compute_log_prob()

        def total(trace, observed: bool) -> torch.Tensor:
            return sum(site["unscaled_log_prob"] for site in trace.nodes.values()
                       if site["type"] == "sample" and not site_is_subsample(site)
                       and site["is_observed"] == observed).expand(shape)

        return cls(total(model_trace, True), total(model_trace, False),
                   total(guide_trace, False))


@torch.no_grad()
def log_weights(vae: VAE, x: torch.Tensor, num_samples: int = 1, guide=None) -> LogWeights:
    """Trace the guide (``num_samples`` draws per image) and replay the model on them.

    ``guide`` defaults to the VAE's amortized guide; any guide ``guide(x)`` whose latent
    sites sit inside the ``"data"`` plate works (e.g. a per-image optimized Gaussian).
    """
    with pyro.plate("samples", num_samples, dim=-2):
        guide_trace = poutine.trace(guide or vae.guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    return LogWeights.of(model_trace, guide_trace, (num_samples, x.shape[0]))


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
    with evaluating(vae), fixed_noise(seed, x.device):
        parts = [log_weights(vae, xb) for xb in x.split(batch_size)]
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
    progress: bool | str | None = False,
) -> torch.Tensor:
    r"""Importance-sampled estimate of ``log p(x)`` per image (Burda et al., 2015).

    .. math:: \log p(x) \approx \log \frac{1}{K} \sum_{k=1}^K
              \frac{p(x, z_k)}{q(z_k \mid x)}, \qquad z_k \sim q(z \mid x)

    A lower bound in expectation that tightens as ``K = num_samples`` grows; with ``K = 1``
    it is the ELBO. Samples are drawn in chunks of at most ``max_elements`` decoder
    outputs at once, so memory stays bounded for any ``K``; the running sum is kept in
    log space. Returns a tensor of shape ``(N,)`` on ``x.device``. ``progress``: as
    ``show`` of :class:`~pyro_vae.progress.Progress` (``False``: silent).
    """
    per_sample = batch_size * vae.x_dim * vae.likelihood.num_params
    chunk = max(1, min(num_samples, max_elements // per_sample))
    out = []
    batches = x.split(batch_size)
    bar = Progress(len(x), f"log p(x), K={num_samples}", unit="image", show=progress)
    with evaluating(vae), fixed_noise(seed, x.device), bar:
        for xb in batches:
            total = xb.new_full((xb.shape[0],), -math.inf)  # log sum_k w_k so far, (B,)
            for start in range(0, num_samples, chunk):
                k = min(chunk, num_samples - start)
                log_w = log_weights(vae, xb, k).log_weight  # (k, B)
                total = torch.logaddexp(total, log_w.logsumexp(0))
            out.append(total - math.log(num_samples))
            bar.update(len(xb))
    return torch.cat(out)
