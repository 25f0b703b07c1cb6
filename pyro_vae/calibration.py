"""Simulation-based calibration of the amortized posterior q(z | x) (Talts et al., 2018).

If ``q(z | x)`` were the exact posterior, then for ``(z*, x*)`` drawn from the model's joint
``p(z) p(x | z)`` and ``L`` draws ``z_1..L ~ q(z | x*)``, the rank of each coordinate
``z*_d`` among the ``z_ld`` would be uniform on ``0..L``, whatever the model. So:

1. draw ``N`` pairs ``(z*, x*)`` from the trained model (its own prior and likelihood:
   ``poutine.uncondition`` of its ``model``), ``L`` draws from the guide for each ``x*``;
2. rank every latent coordinate, and a few scalar statistics (``||z||``), and turn ranks
   into PIT values ``u = (rank + V) / (L + 1)``, ``V ~ U(0, 1)`` (uniform on (0, 1) exactly
   under calibration, ties broken at random);
3. per coordinate: a chi-square test of the rank histogram (reported), and the ECDF of
   ``u`` against **simultaneous 95% bands** (Säilynoja, Bürkner & Vehtari, 2022: the band
   holds the *whole* ECDF with the stated probability, found by simulating uniform
   samples), at level ``alpha / 2`` with Bonferroni over the coordinates;
4. the data-averaged check: averaged over ``x*``, q must give back the prior. Per
   coordinate, ``E_q[z | x*] - z*`` and ``E_q[z^2 | x*] - z*^2`` have mean 0 under
   calibration; their t-statistics are tested at level ``alpha / 2`` (Bonferroni), so the
   check as a whole rejects a calibrated guide at most ``alpha`` (5%) of the time.

An over-confident guide (scales too small) turns the rank histogram into a U (the truth
falls in the tails), an under-confident one into a hump; both fail (tested on a model whose
posterior is known exactly, probabilistic PCA). The check is of the guide *given the
model*: it needs no data, and says nothing about how well the model fits the data. Also
reported: the guide's draws on the test images pooled ("aggregate posterior") against the
prior's moments, which is how far the encoder's use of latent space is from p(z) on real
data (information, not part of the verdict: a perfect guide of an imperfect model can
differ there).

Cost: ``N`` draws of ``x*`` and ``N * L`` guide draws (the guide is vectorized over the
``L`` draws): 1.6-2.4 s for ``N = 1000``, ``L = 100`` on the four full-MNIST models of
docs/priors-and-posteriors.md (784-300-300-40, Gaussian and IAF guides; 2-core CPU).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from pyro import poutine
from scipy import stats

from .errors import ConfigError, get_logger
from .estimators import fixed_noise, guide_draws
from .model import evaluating
from .progress import Progress

log = get_logger(__name__)

ALPHA = 0.05
BAND_SIMULATIONS = 2000  # uniform samples simulated to find the simultaneous band
BAND_SEED = 2022  # the band depends on n and alpha only: its own random stream, fixed


def ecdf_points(n: int) -> np.ndarray:
    """Where the ECDF of ``n`` PIT values is compared: ``min(n, 100) - 1`` inner points."""
    k = max(2, min(n, 100))
    return np.arange(1, k) / k


@functools.lru_cache(maxsize=16)
def simultaneous_band(n: int, alpha: float = ALPHA, seed: int = BAND_SEED
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(points, lower, upper)``: bounds of the ECDF of ``n`` uniform values at
    :func:`ecdf_points` that hold simultaneously with probability ``1 - alpha``.

    Säilynoja et al. (2022), the simulation method: for each of
    :data:`BAND_SIMULATIONS` uniform samples, the smallest two-sided binomial tail
    probability of its ECDF over the points; ``gamma`` is their ``alpha`` quantile, and the
    band is the pointwise ``Binomial(n, p)`` interval at level ``gamma``.
    """
    points = ecdf_points(n)
    rng = np.random.default_rng(seed)
    counts = np.stack([np.searchsorted(np.sort(rng.random(n)), points, side="right")
                       for _ in range(BAND_SIMULATIONS)])  # (S, P)
    tails = 2 * np.minimum(stats.binom.cdf(counts, n, points),
                           stats.binom.sf(counts - 1, n, points))
    gamma = np.quantile(tails.min(1), alpha)
    lower = stats.binom.ppf(gamma / 2, n, points) / n
    upper = stats.binom.ppf(1 - gamma / 2, n, points) / n
    return points, lower, upper


@dataclass
class Calibration:
    """The result of :func:`calibrate_model`; ``pit`` ``(N, P)`` has one column per name."""

    names: list[str]
    pit: np.ndarray
    draws: int
    chi2_p: np.ndarray  # (P,) p-values of the rank histograms' chi-square tests
    in_band: np.ndarray  # (P,) the ECDF stays inside its simultaneous band
    band: tuple[np.ndarray, np.ndarray, np.ndarray]  # points, lower, upper
    mean_z: np.ndarray  # (D,) t-statistics of mean(E_q[z | x*] - z*) per coordinate
    second_moment_z: np.ndarray  # (D,) the same for z^2
    aggregate: dict = field(default_factory=dict)  # on real images (information)
    alpha: float = ALPHA

    @property
    def moment_threshold(self) -> float:
        """|z| beyond which a moment check fails: Student's t with ``N - 1`` degrees of
        freedom, two-sided, Bonferroni over both moments and all coordinates at level
        ``alpha / 2`` (the other half is the ranks')."""
        return float(stats.t.isf(self.alpha / 2 / (4 * len(self.mean_z)), len(self.pit) - 1))

    @property
    def ranks_uniform(self) -> bool:
        return bool(self.in_band.all())

    @property
    def moments_match(self) -> bool:
        t = self.moment_threshold
        return bool((np.abs(self.mean_z) < t).all() and (np.abs(self.second_moment_z) < t).all())

    @property
    def passed(self) -> bool:
        """Calibrated at level ``alpha``: every ECDF in its band and the moments match."""
        return self.ranks_uniform and self.moments_match

    def shape_of(self, column: int) -> str:
        """``U-shaped`` (truth in the tails: over-confident), ``hump`` (under-confident),
        or ``flat``, from the share of PIT values in the outer fifths against 2/5."""
        u = self.pit[:, column]
        outer = np.mean((u < 0.2) | (u > 0.8))
        se = math.sqrt(0.4 * 0.6 / len(u))
        return "U-shaped" if outer > 0.4 + 3 * se else "hump" if outer < 0.4 - 3 * se else "flat"

    def table(self) -> str:
        """The lines ``pyro-vae calibrate`` prints."""
        n = len(self.pit)
        lines = [f"{n} simulations x {self.draws} guide draws; per coordinate: rank "
                 f"histogram chi-square p, ECDF in its simultaneous band "
                 f"(Bonferroni over {len(self.names)}), shape",
                 f"{'':>8} {'chi2 p':>8} {'in band':>8} {'shape':>9} {'mean z':>7} "
                 f"{'E z^2 z':>8}"]
        for j, name in enumerate(self.names):
            moments = (f"{self.mean_z[j]:7.2f} {self.second_moment_z[j]:8.2f}"
                       if j < len(self.mean_z) else f"{'':>7} {'':>8}")
            lines.append(f"{name:>8} {self.chi2_p[j]:8.3f} {'yes' if self.in_band[j] else 'NO':>8}"
                         f" {self.shape_of(j):>9} {moments}")
        verdict = "yes" if self.passed else "no"
        why = [] if self.passed else (
            ([f"{int((~self.in_band).sum())} ECDF(s) leave their band"]
             if not self.ranks_uniform else [])
            + ([f"moments differ (|z| > {self.moment_threshold:.2f})"]
               if not self.moments_match else []))
        lines.append(f"calibrated: {verdict}" + (f" ({'; '.join(why)})" if why else ""))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """What ``calibration.json`` holds (no per-simulation arrays)."""
        return {"simulations": len(self.pit), "draws": self.draws, "alpha": self.alpha,
                "passed": self.passed, "ranks_uniform": self.ranks_uniform,
                "moments_match": self.moments_match,
                "moment_threshold": self.moment_threshold,
                "per_coordinate": [
                    {"name": name, "chi2_p": float(self.chi2_p[j]),
                     "in_band": bool(self.in_band[j]), "shape": self.shape_of(j),
                     **({"mean_z": float(self.mean_z[j]),
                         "second_moment_z": float(self.second_moment_z[j])}
                        if j < len(self.mean_z) else {})}
                    for j, name in enumerate(self.names)],
                "aggregate_posterior_on_data": self.aggregate}


@dataclass
class Simulations:
    """Per simulation: the truth ``z*`` ``(N, D)``, the ranks of its coordinates and of
    ``||z*||`` among the guide's draws ``(N, D + 1)``, and the draws' first and second
    moments ``(N, D)`` each. The draws themselves are not kept (memory stays O(N D))."""

    names: list[str]
    truth: np.ndarray
    ranks: np.ndarray
    mean: np.ndarray
    second_moment: np.ndarray


def _columns(values: dict[str, torch.Tensor], lead: int) -> torch.Tensor:
    """Latent sites flattened side by side: ``(*lead dims, D)`` in float64 on the CPU."""
    return torch.cat([v.reshape(*v.shape[:lead], -1) for v in values.values()], -1).cpu().double()


@torch.no_grad()
def simulate(model, num_simulations: int, draws: int, batch_size: int = 100,
             progress: bool | None = False) -> Simulations:
    """``num_simulations`` pairs ``(z*, x*)`` from the model's joint and ``draws`` guide
    draws for each ``x*``, summarized per batch (:class:`Simulations`). Each latent site is
    flattened into coordinates ``site[i]``; the noise is the torch RNG's (seed it, or use
    :func:`~pyro_vae.estimators.fixed_noise`)."""
    if getattr(model, "enumerated", False):
        raise ConfigError("calibrate ranks continuous latents; this model's guide has "
                          "discrete sites summed out by enumeration")
    device = next(model.parameters()).device
    parts: list[tuple[torch.Tensor, ...]] = []
    with evaluating(model), Progress(num_simulations, "simulations", unit="simulation",
                                     show=progress) as bar:
        for start in range(0, num_simulations, batch_size):
            b = min(batch_size, num_simulations - start)
            blank = torch.zeros(b, model.x_dim, device=device)  # sizes the plate only
            joint = poutine.trace(poutine.uncondition(model.model)).get_trace(blank)
            q = guide_draws(model, joint.nodes["x"]["value"], draws)  # x* ~ p(x | z*)
            if start == 0:
                names = [f"{s}[{i}]" for s, v in q.items() for i in range(v[0, 0].numel())]
            truth = _columns({s: joint.nodes[s]["value"] for s in q}, 1)  # (b, D)
            drawn = _columns(q, 2)  # (L, b, D)
            with_norm = lambda t: torch.cat([t, t.norm(dim=-1, keepdim=True)], -1)  # noqa: E731
            ranks = (with_norm(drawn) < with_norm(truth)).sum(0)  # (b, D + 1) in 0..L
            parts.append((truth, ranks, drawn.mean(0), drawn.square().mean(0)))
            bar.update(b)
    truth, ranks, mean, second = (torch.cat(column).numpy() for column in zip(*parts))
    return Simulations(names, truth, ranks, mean, second)


def check_sizes(num_simulations: int, draws: int) -> None:
    """A :class:`ConfigError` unless both are integers of at least 2."""
    for what, value in (("simulations", num_simulations), ("draws", draws)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 2:
            raise ConfigError(f"{{{what}}} must be an integer of at least 2, got {value!r}")


def calibrate_model(model, num_simulations: int = 1000, draws: int = 100, seed: int = 0,
                    data: torch.Tensor | None = None, alpha: float = ALPHA,
                    progress: bool | None = False) -> Calibration:
    """Simulation-based calibration of ``model``'s guide (see the module docstring).

    ``data``: real images whose pooled guide draws are compared with the prior's moments
    (information only). The same ``seed`` gives the same result.
    """
    check_sizes(num_simulations, draws)
    device = next(model.parameters()).device
    with fixed_noise(seed, device):
        sims = simulate(model, num_simulations, draws, progress=progress)
        aggregate = _aggregate_on_data(model, data, sims) if data is not None else {}
    rng = np.random.default_rng(seed)
    pit = (sims.ranks + rng.random(sims.ranks.shape)) / (draws + 1)  # ties broken at random
    bins = min(20, max(2, num_simulations // 5))
    counts = np.stack([np.histogram(column, bins=bins, range=(0, 1))[0] for column in pit.T])
    chi2_p = stats.chisquare(counts, axis=1).pvalue
    # level alpha / 2 for the ranks (Bonferroni over the columns), alpha / 2 for the moments
    band = simultaneous_band(num_simulations, alpha / 2 / pit.shape[1])
    points, lower, upper = band
    ecdf = np.stack([np.searchsorted(np.sort(column), points, side="right")
                     for column in pit.T]) / num_simulations  # (P, points)
    in_band = ((ecdf >= lower - 1e-12) & (ecdf <= upper + 1e-12)).all(1)
    # mean 0 under calibration: E_q[z | x*] - z* and E_q[z^2 | x*] - z*^2
    d, d2 = sims.mean - sims.truth, sims.second_moment - sims.truth**2
    tstat = lambda v: v.mean(0) / (v.std(0, ddof=1) / math.sqrt(len(v)))  # noqa: E731
    result = Calibration([*sims.names, "||z||"], pit, draws, chi2_p, in_band, band, tstat(d),
                         tstat(d2), aggregate, alpha)
    log.info("calibration: %s", "passed" if result.passed else "failed")
    return result


@torch.no_grad()
def _aggregate_on_data(model, data: torch.Tensor, sims: Simulations) -> dict:
    """Guide draws pooled over real images against the prior's moments (from ``z*``)."""
    with evaluating(model):
        pooled = torch.cat([_columns(guide_draws(model, xb, 1), 2)[0]
                            for xb in data.split(100)]).numpy()
    return {"images": len(pooled), "names": sims.names,
            "mean": pooled.mean(0).tolist(), "variance": pooled.var(0, ddof=1).tolist(),
            "prior_mean": sims.truth.mean(0).tolist(),
            "prior_variance": sims.truth.var(0, ddof=1).tolist()}
