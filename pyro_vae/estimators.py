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
from .onednn import linear_products
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
    """Per-sample terms of ``log p(x, z_k) - log q(z_k | x)``, each of shape ``(K, B)``.

    A guide with discrete sites summed out by enumeration (``enumerated`` models) gives
    each term a leading dimension ``E`` over the enumerated values, ``(E, K, B)``, and
    ``log_enumerated``: ``log q`` of those values. Then ``z_k`` holds one draw of the
    continuous latents *per enumerated value* (stratified sampling), and each sum below
    runs over the values exactly instead of sampling them.
    """

    log_likelihood: torch.Tensor  # log p(x | z_k)
    log_prior: torch.Tensor  # log p(z_k) (the enumerated values' prior included)
    log_guide: torch.Tensor  # log q(z_k | x) of the sampled sites
    log_enumerated: torch.Tensor | None = None  # (E, K, B): log q of the enumerated values

    @property
    def log_weight(self) -> torch.Tensor:
        """``(K, B)``: ``log p(x, z_k) / q(z_k | x)``; with enumeration, the log of
        ``sum_e p(x, e, z_ek) / q(z_ek | x, e)``, also an unbiased estimate of ``p(x)``."""
        log_w = self.log_likelihood + self.log_prior - self.log_guide
        return log_w if self.log_enumerated is None else log_w.logsumexp(0)

    def elbo_terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(elbo, log_likelihood)``, each ``(K, B)``: one-sample estimates of the ELBO and
        of ``E_q log p(x | z)``; with enumeration, their exact expectations over the
        enumerated values, ``sum_e q(e | x) [...]`` (values of probability 0 dropped)."""
        log_w = self.log_likelihood + self.log_prior - self.log_guide
        if self.log_enumerated is None:
            return log_w, self.log_likelihood
        q = self.log_enumerated.exp()

        def expected(t: torch.Tensor) -> torch.Tensor:
            return (q * torch.where(q > 0, t, 0.0)).sum(0)

        return expected(log_w - self.log_enumerated), expected(self.log_likelihood)

    @classmethod
    def of(cls, model_trace, guide_trace, shape) -> LogWeights:
        """The terms of a guide trace and the model replayed on it, broadcast to ``shape``
        ``(K, B)`` (``(E, K, B)`` where guide sites were enumerated, ``E`` their joint
        values).

        Each sums the *unscaled* log densities of its sites (any number of latent sites:
        two stochastic layers give ``log p(z1 | z2) + log p(z2)``): an image's weight
        never depends on how the batch is scaled (``N / B``) or the KL weighted.
        """
        model_trace.compute_log_prob()
        guide_trace.compute_log_prob()

        def sites(trace, observed: bool, enumerated: bool | None = None):
            return [site["unscaled_log_prob"] for site in trace.nodes.values()
                    if site["type"] == "sample" and not site_is_subsample(site)
                    and site["is_observed"] == observed and (
                        enumerated is None or _is_enumerated(site) == enumerated)]

        enumerated = sites(guide_trace, False, True)
        parts = [sites(model_trace, True), sites(model_trace, False),
                 sites(guide_trace, False, False)]
        if not enumerated:
            return cls(*(sum(terms).expand(shape) for terms in parts))
        full = torch.broadcast_shapes(*(t.shape for t in (*enumerated, *sum(parts, []))),
                                      shape)
        totals = [sum(terms, torch.zeros(())).expand(full).reshape(-1, *shape)
                  for terms in (*parts, enumerated)]
        return cls(*totals)


def _is_enumerated(site) -> bool:
    return site["infer"].get("enumerate") == "parallel"


def _enumerates(vae, guide) -> bool:
    """Whether ``guide`` is ``vae``'s own guide and sums discrete sites by enumeration."""
    return guide is None and getattr(vae, "enumerated", False)


def _latent(trace) -> list[str]:
    return [name for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"]
            and not site_is_subsample(site)]


def latent_sites(model, x: torch.Tensor) -> list[str]:
    """The names of the guide's latent sample sites for a batch ``x`` (plates left out)."""
    return _latent(poutine.trace(model.guide).get_trace(x))


@torch.no_grad()
def guide_draws(model, x: torch.Tensor, num_draws: int) -> dict[str, torch.Tensor]:
    """``num_draws`` joint draws of every latent site of the guide for each image of ``x``
    ``(B, x_dim)``, vectorized (a plate at dim -2): ``{site: (num_draws, B, *event)}``.
    Discrete sites are drawn, not enumerated."""
    with pyro.plate("guide_draws", num_draws, dim=-2):
        trace = poutine.trace(model.guide).get_trace(x)
    return {name: trace.nodes[name]["value"] for name in _latent(trace)}


@torch.no_grad()
def log_weights(vae: VAE, x: torch.Tensor, num_samples: int = 1, guide=None) -> LogWeights:
    """Trace the guide (``num_samples`` draws per image) and replay the model on them.

    ``guide`` defaults to the VAE's amortized guide; any guide ``guide(x)`` whose latent
    sites sit inside the ``"data"`` plate works (e.g. a per-image optimized Gaussian).
    An ``enumerated`` model's own guide has its discrete sites enumerated, not sampled.
    """
    run_guide = guide or vae.guide
    if _enumerates(vae, guide):  # after the data plate (-1) and the samples plate (-2)
        run_guide = poutine.enum(run_guide, first_available_dim=-3)
    with pyro.plate("samples", num_samples, dim=-2):
        guide_trace = poutine.trace(run_guide).get_trace(x)
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
    with evaluating(vae), fixed_noise(seed, x.device), linear_products():
        parts = [log_weights(vae, xb).elbo_terms() for xb in x.split(batch_size)]
    elbo = torch.cat([p[0][0] for p in parts])
    log_lik = torch.cat([p[1][0] for p in parts])
    return ElboTerms(elbo=elbo, log_likelihood=log_lik, kl=log_lik - elbo)


@torch.no_grad()
def correct(vae, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """How many images of ``x`` a model's classifier (``vae.classify``, logits) labels as
    ``y``: a 0-dim tensor on the device (no host read)."""
    with evaluating(vae):
        hits = [(vae.classify(xb).argmax(-1) == yb).sum()
                for xb, yb in zip(x.split(batch_size), y.split(batch_size))]
    return torch.stack(hits).sum() if hits else x.new_zeros((), dtype=torch.long)


CHUNK_SAMPLES = 128  # samples per image in a chunk of importance_log_likelihood, at least


@torch.no_grad()
def importance_log_likelihood(
    vae: VAE,
    x: torch.Tensor,
    num_samples: int = 5000,
    batch_size: int = 100,
    max_elements: int = 2**20,
    seed: int | None = 0,
    progress: bool | str | None = False,
) -> torch.Tensor:
    r"""Importance-sampled estimate of ``log p(x)`` per image (Burda et al., 2015).

    .. math:: \log p(x) \approx \log \frac{1}{K} \sum_{k=1}^K
              \frac{p(x, z_k)}{q(z_k \mid x)}, \qquad z_k \sim q(z \mid x)

    A lower bound in expectation that tightens as ``K = num_samples`` grows; with ``K = 1``
    it is the ELBO. Samples are drawn in chunks of at most ``max_elements`` decoder
    outputs at once, so memory stays bounded for any ``K``; the running sum is kept in
    log space. The default, 2^20 outputs (4 MB a tensor), keeps a chunk's elementwise
    work in the processor's cache: on the project's CPU 1.5 times as many took 1.6 times
    as long per sample (docs/benchmarks.md, "Importance-sampled evaluation"). Pyro's
    validation checks the first chunk of each shape; the others repeat its computation.
    A chunk holds at most ``batch_size`` images, and fewer where that leaves room for at
    least :data:`CHUNK_SAMPLES` samples of each: the guide's encoder runs once a chunk, so
    few samples per chunk would spend a tenth of the time encoding the same images again.
    Linear layers run on oneDNN (:func:`~pyro_vae.onednn.linear_products`). Returns a
    tensor of shape ``(N,)`` on ``x.device``. ``progress``: as ``show`` of
    :class:`~pyro_vae.progress.Progress` (``False``: silent).
    """
    per_image = vae.x_dim * vae.likelihood.num_params * getattr(vae, "enumerated_values", 1)
    images = max(1, min(batch_size, max_elements // (CHUNK_SAMPLES * per_image)))
    chunk = max(1, min(num_samples, max_elements // (images * per_image)))
    out = []
    batches = x.split(images)
    bar = Progress(len(x), f"log p(x), K={num_samples}", unit="image", show=progress)
    validated = set()  # chunk shapes run once with Pyro's validation as it is set
    with evaluating(vae), fixed_noise(seed, x.device), linear_products(), bar:
        for xb in batches:
            total = xb.new_full((xb.shape[0],), -math.inf)  # log sum_k w_k so far, (B,)
            for start in range(0, num_samples, chunk):
                k = min(chunk, num_samples - start)
                # validation checks every distribution's arguments and every value of
                # every chunk (a pass over the expanded images each time): the first
                # chunk of each shape is checked, the rest repeat the same computation
                check = (k, *xb.shape) not in validated
                validated.add((k, *xb.shape))
                with contextlib.nullcontext() if check else pyro.validation_enabled(False):
                    log_w = log_weights(vae, xb, k).log_weight  # (k, B)
                total = torch.logaddexp(total, log_w.logsumexp(0))
            out.append(total - math.log(num_samples))
            bar.update(len(xb))
    return torch.cat(out)
