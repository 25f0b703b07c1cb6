"""Evaluation: the ELBO and its terms, per image, from Pyro traces of model and guide.

All quantities are in nats per image. The ELBO is reported as itself (higher is better):
``ELBO(x) = E_q[log p(x | z)] - KL(q(z | x) || p(z))``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine

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
def log_weights(vae: VAE, x: torch.Tensor, num_samples: int = 1) -> LogWeights:
    """Trace the guide (``num_samples`` draws per image) and replay the model on them."""
    with pyro.plate("samples", num_samples, dim=-2):
        guide_trace = poutine.trace(vae.guide).get_trace(x)
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
