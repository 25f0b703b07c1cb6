"""Posterior diagnostics: how close is the amortized guide q(z | x) to p(z | x)?

For chosen images ``x`` and the trained decoder (frozen):

- draws from the guide q(z | x), and a reference posterior from NUTS on
  p(z | x) proportional to p(z) p(x | z) (several chains), both as ArviZ data with named
  dimensions ``image`` and ``latent``;
- NUTS convergence per image: R-hat, bulk and tail ESS, divergences (R-hat belongs to
  MCMC draws; guide draws are independent and need none);
- guide against NUTS moments;
- Pareto k-hat of the importance weights p(x, z) / q(z | x), z ~ q (PSIS; Vehtari et al.
  2015/2024, computed by ArviZ): how well q serves as a proposal (k < 0.5 good, 0.5-0.7
  usable, > 0.7 bad);
- the inference-gap decomposition of Cremer, Li & Duvenaud (2018)::

      log p(x) - ELBO(q amortized) = [log p(x) - ELBO(q*)]        approximation gap
                                    + [ELBO(q*) - ELBO(q amortized)] amortization gap

  with q* a Gaussian optimized for each image separately by SVI, starting from the
  encoder's output, and log p(x) importance-sampled with q* as the proposal.

  For a flow guide (``ModelConfig.guide = "iaf"``) the amortized ELBO is the flow's and q*
  stays the best *Gaussian* per image: the approximation gap is that of the Gaussian
  family, and a negative "amortization gap" says the amortized flow beats every Gaussian,
  i.e. the flow closed more than the gap the Gaussian family leaves. The total
  ``log p(x) - ELBO`` is the flow's own either way.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import pyro
import torch
import torch.nn.functional as F
from pyro.infer import MCMC, NUTS
from torch import nn

from .arviz_compat import ess, pareto_khat, rhat, to_arviz
from .errors import get_logger
from .estimators import fixed_noise, log_mean_exp, log_weights
from .model import VAE, evaluating
from .objective import Objective, SyncFreeTrace_ELBO
from .progress import Progress, duration
from .runner.step import Trainer

log = get_logger(__name__)


def nuts_posterior(vae: VAE, x: torch.Tensor, num_samples: int = 500, num_warmup: int = 500,
                   num_chains: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """NUTS draws of p(z | x) for one image ``x`` of shape ``(x_dim,)``, decoder frozen.

    Chains run one after another (each from its own random start), so no process pool is
    needed. Returns ``(draws (chain, draw, z_dim), diverging (chain, draw))``.
    """
    x = x.reshape(1, -1)
    draws, diverging = [], []
    with evaluating(vae, frozen=True):
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


class _GaussianPerImage(nn.Module):
    """Free ``loc`` and ``scale`` (softplus of ``raw``) per image: the parameters of q*."""

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.loc = nn.Parameter(loc.clone())
        self.raw = nn.Parameter(torch.log(torch.expm1(scale)))  # softplus^-1

    @property
    def scale(self) -> torch.Tensor:
        return F.softplus(self.raw)


def optimal_gaussian(vae: VAE, x: torch.Tensor, steps: int = 500, num_particles: int = 16,
                     lr: float = 0.02) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image Gaussian q*(z | x) maximizing the ELBO, by SVI from the encoder's output.

    Returns ``(loc, scale)``, each ``(B, z_dim)``. The decoder stays fixed; the fit runs
    :meth:`~pyro_vae.runner.step.Trainer.step`, like training.
    """
    with evaluating(vae, frozen=True), torch.no_grad():
        q = _GaussianPerImage(*vae.encoder(x))

    def guide(x):
        vae.gaussian_guide(x, q.loc, q.scale)

    elbo = SyncFreeTrace_ELBO(num_particles=num_particles, vectorize_particles=True,
                              max_plate_nesting=1)
    # frozen before the trainer is built: it optimizes what requires gradients
    with evaluating(vae, frozen=True):
        trainer = Trainer(Objective(vae, elbo, guide=guide, extra=q), lr)
        for _ in range(steps):
            trainer.step(x)
    return q.loc.detach(), q.scale.detach()


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

    with fixed_noise(seed, x.device), evaluating(vae, frozen=True):
        amortized = log_weights(vae, x, num_samples).log_weight  # (S, B)
        star = log_weights(vae, x, num_samples, guide=q_star).log_weight
        chunks = [log_weights(vae, x, min(1000, iwae_samples - i), guide=proposal).log_weight
                  for i in range(0, iwae_samples, 1000)]
    log_px = log_mean_exp(torch.cat(chunks))
    elbo_amortized, elbo_star = amortized.mean(0), star.mean(0)
    return {
        "log_px": log_px, "elbo_amortized": elbo_amortized, "elbo_optimal": elbo_star,
        "approximation_gap": log_px - elbo_star,
        "amortization_gap": elbo_star - elbo_amortized,
        "elbo_se": amortized.std(0) / math.sqrt(num_samples),
        "log_weights": amortized, "optimal_loc": loc, "optimal_scale": scale,
    }


@dataclass
class Diagnosis:
    """Diagnostics of chosen images: ArviZ data, per-image numbers, and raw draws."""

    guide: object  # ArviZ data: guide draws, posterior group (chain=1, draw, image, latent)
    nuts: object  # ArviZ data: NUTS draws and divergences
    per_image: list[dict] = field(default_factory=list)
    guide_draws: np.ndarray | None = None  # (image, draw, latent)
    nuts_draws: np.ndarray | None = None  # (image, chain, draw, latent)
    nuts_diverging: np.ndarray | None = None  # (image, chain, draw)

    def table(self) -> str:
        """The per-image numbers as the table ``pyro-vae diagnose`` prints."""
        lines = [f"{'image':>5} {'label':>5} {'R-hat':>6} {'ESS bulk':>8} {'div':>4} "
                 f"{'k-hat':>6} {'log p(x)':>9} {'approx gap':>10} {'amort gap':>9}"]
        lines += [f"{r['image']:>5} {r['label']:>5} {r['rhat_max']:6.3f} "
                  f"{r['ess_bulk_min']:8.0f} {r['divergences']:>4} {r['k_hat']:6.2f} "
                  f"{r['log_px']:9.2f} {r['approximation_gap']:10.2f} "
                  f"{r['amortization_gap']:9.2f}" for r in self.per_image]
        return "\n".join(lines)


PILOT_ITERATIONS = 100  # NUTS iterations timed to estimate the cost of a diagnosis (40 ran
# too fast: the first warm-up steps are cheaper than the rest)


def estimate_seconds(vae: VAE, x: torch.Tensor, num_samples: int = 500, num_warmup: int = 500,
                     num_chains: int = 2, seed: int = 0, gap_steps: int = 500) -> float:
    """Seconds that :func:`diagnose` of the images ``x`` will take, roughly.

    NUTS dominates: a short pilot chain on the first image (half warm-up, half draws) is
    timed and scaled to ``num_chains * (num_warmup + num_samples)`` iterations per image.
    The per-image fit of q* is timed over a few steps (the difference of 25 and 5 steps,
    so the one-off tracing does not count) and scaled to ``gap_steps``. The pace of NUTS
    varies with each posterior's geometry, so this is a guide, not a promise;
    :func:`diagnose` reports the time left after every image.
    """
    half = PILOT_ITERATIONS // 2
    with fixed_noise(seed, x.device):
        start = time.perf_counter()
        nuts_posterior(vae, x[0], half, half, 1, seed)
        per_iteration = (time.perf_counter() - start) / PILOT_ITERATIONS
        fits = []
        for steps in (5, 25):
            start = time.perf_counter()
            optimal_gaussian(vae, x, steps=steps)
            fits.append(time.perf_counter() - start)
    per_fit_step = max(fits[1] - fits[0], 0.0) / 20
    return (per_iteration * num_chains * (num_warmup + num_samples) * len(x)
            + per_fit_step * gap_steps)


def diagnose(vae: VAE, x: torch.Tensor, num_samples: int = 500, num_warmup: int = 500,
             num_chains: int = 2, gap_samples: int = 2000, iwae_samples: int = 5000,
             gap_steps: int = 500, seed: int = 0, labels=None,
             progress: bool | None = None) -> Diagnosis:
    """Guide against NUTS, PSIS k-hat and inference gaps for each image in ``x`` ``(B, D)``.

    ``progress``: ``None`` -- a bar on a terminal, else a log line per image with the time
    left; ``False`` -- silent.
    """
    vae.eval()
    with fixed_noise(seed, x.device), torch.no_grad():
        guide_draws = vae.posterior(x).sample((num_samples,)).permute(1, 0, 2).cpu().numpy()
    nuts, divergent = [], []
    started = time.perf_counter()
    with Progress(len(x), "NUTS", unit="image", show=progress, every=1 / len(x)) as bar:
        for i in range(len(x)):
            draws, div = nuts_posterior(vae, x[i], num_samples, num_warmup, num_chains,
                                        seed + 10 * i)
            nuts.append(draws)
            divergent.append(div)
            bar.update()
    log.debug("NUTS took %s", duration(time.perf_counter() - started))
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
    return Diagnosis(guide_data, nuts_data, per_image, guide_draws, nuts_draws,
                     np.stack(divergent))
