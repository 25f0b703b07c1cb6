"""Posterior diagnostics: how close is the amortized guide q(z | x) to p(z | x)?

For chosen images ``x`` and the trained decoder (frozen):

- draws from the guide q(z | x), and a reference posterior from NUTS on
  p(z | x) proportional to p(z) p(x | z) (several chains), both as ArviZ data with named
  dimensions ``image`` and ``latent``;
- NUTS convergence per image: R-hat, bulk and tail ESS, divergences (R-hat belongs to
  MCMC draws; guide draws are independent and need none);
- guide against NUTS moments;
- Pareto k-hat of the importance weights p(x, z) / q(z | x), z ~ q (PSIS; Vehtari et al.
  2015/2024): how well q serves as a proposal (k < 0.5 good, 0.5-0.7 usable, > 0.7 bad);
- the inference-gap decomposition of Cremer, Li & Duvenaud (2018)::

      log p(x) - ELBO(q amortized) = [log p(x) - ELBO(q*)]        approximation gap
                                    + [ELBO(q*) - ELBO(q amortized)] amortization gap

  with q* a Gaussian optimized for each image separately by SVI, starting from the
  encoder's output, and log p(x) importance-sampled with q* as the proposal.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import pyro
import torch
import torch.nn.functional as F
from pyro.infer import MCMC, NUTS, Trace_ELBO

from .arviz_compat import ess, rhat, to_arviz
from .evaluate import fixed_noise, log_weights
from .model import VAE

log = logging.getLogger(__name__)


# -- PSIS ----------------------------------------------------------------------------------


def _gpd_fit(x: np.ndarray) -> tuple[float, float]:
    """Generalized Pareto fit of exceedances ``x`` (Zhang & Stephens 2009), with the
    weakly informative prior on k of Vehtari et al.; returns (k, sigma)."""
    x = np.sort(x)
    n = len(x)
    prior_bs, prior_k = 3, 10
    m = 30 + int(np.sqrt(n))
    bs = 1 - np.sqrt(m / (np.arange(1, m + 1) - 0.5))
    bs /= prior_bs * x[int(n / 4 + 0.5) - 1]
    bs += 1 / x[-1]
    ks = np.log1p(-bs[:, None] * x).mean(axis=1)
    len_scale = n * (np.log(-(bs / ks)) - ks - 1)
    weights = 1 / np.exp(len_scale - len_scale[:, None]).sum(axis=1)
    keep = weights >= 10 * np.finfo(float).eps
    bs, weights = bs[keep], weights[keep] / weights[keep].sum()
    b_post = (bs * weights).sum()
    k_post = np.log1p(-b_post * x).mean()
    sigma = -k_post / b_post
    return (n * k_post + prior_k * 0.5) / (n + prior_k), sigma


def pareto_khat(log_weights: np.ndarray) -> float:
    """Pareto k-hat of the upper tail of importance weights given by their logarithms.

    The tail holds the largest ``ceil(min(0.2 S, 3 sqrt(S)))`` of ``S`` weights, as in
    PSIS (``arviz.psislw`` with ``reff=1``).
    """
    lw = np.sort(np.asarray(log_weights, dtype=float).ravel())
    lw = lw - lw[-1]
    n = len(lw)
    m = int(np.ceil(min(0.2 * n, 3 * np.sqrt(n))))
    if m < 5:
        raise ValueError(f"PSIS needs more importance weights than {n}")
    exceedances = np.exp(lw[-m:]) - np.exp(lw[-m - 1])
    if not np.any(exceedances > 0):
        return -np.inf  # all tail weights equal: no tail at all
    return float(_gpd_fit(exceedances)[0])


# -- Reference posterior by NUTS --------------------------------------------------------


@contextlib.contextmanager
def frozen(vae: VAE):
    """The VAE's parameters without gradients (restored afterwards), in eval mode."""
    flags = [p.requires_grad for p in vae.parameters()]
    was_training = vae.training
    vae.requires_grad_(False).eval()
    try:
        yield vae
    finally:
        for p, flag in zip(vae.parameters(), flags):
            p.requires_grad_(flag)
        vae.train(was_training)


def nuts_posterior(vae: VAE, x: torch.Tensor, num_samples: int = 500, num_warmup: int = 500,
                   num_chains: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """NUTS draws of p(z | x) for one image ``x`` of shape ``(x_dim,)``, decoder frozen.

    Chains run one after another (each from its own random start), so no process pool is
    needed. Returns ``(draws (chain, draw, z_dim), diverging (chain, draw))``.
    """
    x = x.reshape(1, -1)
    draws, diverging = [], []
    with frozen(vae):
        for chain in range(num_chains):
            pyro.set_rng_seed(seed + chain)
            mcmc = MCMC(NUTS(vae.model), num_samples=num_samples, warmup_steps=num_warmup,
                        disable_progbar=True)
            mcmc.run(x)
            draws.append(mcmc.get_samples()["z"].reshape(num_samples, -1).cpu().numpy())
            mask = np.zeros(num_samples, dtype=bool)
            mask[mcmc.diagnostics()["divergences"]["chain 0"]] = True
            diverging.append(mask)
    return np.stack(draws), np.stack(diverging)


# -- Inference gaps ------------------------------------------------------------------------


def optimal_gaussian(vae: VAE, x: torch.Tensor, steps: int = 500, num_particles: int = 16,
                     lr: float = 0.02) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image Gaussian q*(z | x) maximizing the ELBO, by SVI from the encoder's output.

    Returns ``(loc, scale)``, each ``(B, z_dim)``. The decoder stays fixed.
    """
    with frozen(vae), torch.no_grad():
        loc0, scale0 = vae.encoder(x)
    loc = loc0.clone().requires_grad_()
    raw = torch.log(torch.expm1(scale0)).clone().requires_grad_()  # softplus^-1
    elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1)
    optimizer = torch.optim.Adam([loc, raw], lr=lr)

    def guide(x):
        vae.gaussian_guide(x, loc, F.softplus(raw))

    with frozen(vae):
        for _ in range(steps):
            loss = elbo.differentiable_loss(vae.model, guide, x)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return loc.detach(), F.softplus(raw).detach()


def _log_mean_exp(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    return t.logsumexp(dim) - math.log(t.shape[dim])


@torch.no_grad()
def inference_gaps(vae: VAE, x: torch.Tensor, num_samples: int = 2000,
                   iwae_samples: int = 5000, steps: int = 500, seed: int = 0,
                   posterior_draws: np.ndarray | None = None) -> dict:
    """Per-image ELBOs, log p(x) and the two gaps of Cremer et al. (2018), as tensors (B,).

    ``log p(x)`` is importance-sampled with ``iwae_samples`` draws from a proposal: q* by
    default, or — better where the posterior is correlated, which a diagonal q* cannot
    follow — a full-covariance Gaussian fitted to ``posterior_draws`` ``(B, n, z_dim)``
    (e.g. NUTS draws) with its scale widened by 1.2 for safer tails. Also returns the
    amortized guide's importance log-weights ``(num_samples, B)`` for PSIS.
    """
    with torch.enable_grad():
        loc, scale = optimal_gaussian(vae, x, steps=steps)

    def q_star(x):
        vae.gaussian_guide(x, loc, scale)

    proposal = q_star
    if posterior_draws is not None:
        draws = torch.as_tensor(posterior_draws, dtype=x.dtype, device=x.device)
        centred = draws - draws.mean(1, keepdim=True)
        cov = centred.transpose(1, 2) @ centred / (draws.shape[1] - 1)  # (B, z, z)
        cov = cov + 1e-6 * torch.eye(vae.z_dim, dtype=x.dtype, device=x.device)
        tril = 1.2 * torch.linalg.cholesky(cov)
        mean = draws.mean(1)

        def proposal(x):
            vae.full_covariance_guide(x, mean, tril)

    with fixed_noise(seed, x.device), frozen(vae):
        amortized = log_weights(vae, x, num_samples).log_weight  # (S, B)
        star = log_weights(vae, x, num_samples, guide=q_star).log_weight
        chunks = [log_weights(vae, x, min(1000, iwae_samples - i), guide=proposal).log_weight
                  for i in range(0, iwae_samples, 1000)]
    log_px = _log_mean_exp(torch.cat(chunks))
    elbo_amortized, elbo_star = amortized.mean(0), star.mean(0)
    return {
        "log_px": log_px, "elbo_amortized": elbo_amortized, "elbo_optimal": elbo_star,
        "approximation_gap": log_px - elbo_star,
        "amortization_gap": elbo_star - elbo_amortized,
        "elbo_se": amortized.std(0) / math.sqrt(num_samples),
        "log_weights": amortized, "optimal_loc": loc, "optimal_scale": scale,
    }


# -- Everything for a set of images ------------------------------------------------------


@dataclass
class Diagnosis:
    """Diagnostics of chosen images: ArviZ data, per-image numbers, and raw draws."""

    guide: object  # ArviZ data: guide draws, posterior group (chain=1, draw, image, latent)
    nuts: object  # ArviZ data: NUTS draws and divergences
    per_image: list[dict] = field(default_factory=list)
    guide_draws: np.ndarray | None = None  # (image, draw, latent)
    nuts_draws: np.ndarray | None = None  # (image, chain, draw, latent)


def diagnose(vae: VAE, x: torch.Tensor, num_samples: int = 500, num_warmup: int = 500,
             num_chains: int = 2, gap_samples: int = 2000, iwae_samples: int = 5000,
             gap_steps: int = 500, seed: int = 0, labels=None) -> Diagnosis:
    """Guide against NUTS, PSIS k-hat and inference gaps for each image in ``x`` ``(B, D)``."""
    vae.eval()
    with fixed_noise(seed, x.device), torch.no_grad():
        guide_draws = vae.encode(x).sample((num_samples,)).permute(1, 0, 2).cpu().numpy()
    nuts, divergent = [], []
    for i in range(len(x)):
        log.info("NUTS for image %d of %d", i + 1, len(x))
        draws, div = nuts_posterior(vae, x[i], num_samples, num_warmup, num_chains, seed + 10 * i)
        nuts.append(draws)
        divergent.append(div)
    nuts_draws = np.stack(nuts)  # (image, chain, draw, latent)
    gaps = inference_gaps(vae, x, gap_samples, iwae_samples, gap_steps, seed,
                          posterior_draws=nuts_draws.reshape(len(x), -1, vae.z_dim))
    dims = {"z": ["image", "latent"]}
    coords = {"image": np.arange(len(x)), "latent": np.arange(vae.z_dim)}
    guide_data = to_arviz({"z": guide_draws.transpose(1, 0, 2)[None]}, dims=dims, coords=coords)
    nuts_data = to_arviz({"z": nuts_draws.transpose(1, 2, 0, 3)},
                         {"diverging": np.stack(divergent).any(0)}, dims=dims, coords=coords)
    per_image = []
    for i in range(len(x)):
        chains = nuts_draws[i]  # (chain, draw, latent)
        flat = chains.reshape(-1, vae.z_dim)
        row = {
            "image": i,
            "label": None if labels is None else int(labels[i]),
            "rhat_max": float(np.max(rhat(chains))),
            "ess_bulk_min": float(np.min(ess(chains, "bulk"))),
            "ess_tail_min": float(np.min(ess(chains, "tail"))),
            "divergences": int(divergent[i].sum()),
            "nuts_mean": flat.mean(0).tolist(), "nuts_sd": flat.std(0, ddof=1).tolist(),
            "guide_mean": guide_draws[i].mean(0).tolist(),
            "guide_sd": guide_draws[i].std(0, ddof=1).tolist(),
            "k_hat": pareto_khat(gaps["log_weights"][:, i].cpu().numpy()),
        }
        for key in ("log_px", "elbo_amortized", "elbo_optimal", "approximation_gap",
                    "amortization_gap"):
            row[key] = float(gaps[key][i])
        per_image.append(row)
    return Diagnosis(guide_data, nuts_data, per_image, guide_draws, nuts_draws)
