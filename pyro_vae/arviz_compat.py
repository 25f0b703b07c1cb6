"""The one place that knows which ArviZ is installed.

pip gives arviz 0.23.x on Python 3.11 (``from_dict(posterior=...)`` returns an
``InferenceData``) and arviz 1.x on Python 3.12+ (``from_dict`` takes one nested dict and
returns an ``xarray.DataTree``; statistics come from arviz-stats). Everything pyro-vae
does with ArviZ goes through these functions, so both work.

This module imports numpy and arviz only (not torch), so it can be tested in a light
environment; arrays follow ArviZ's convention: first dimension chain, second draw.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata

import numpy as np

__all__ = ["ARVIZ_MAJOR", "ess", "pareto_khat", "rhat", "summary", "to_arviz"]

try:  # the version without the import, which costs over a second
    ARVIZ_MAJOR = int(importlib.metadata.version("arviz").split(".")[0])
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - arviz is a dependency
    ARVIZ_MAJOR = 0


@functools.cache
def _az():
    """The arviz module, imported on first use (commands that need no ArviZ start faster)."""
    try:
        try:
            return importlib.import_module("arviz")
        except FileNotFoundError:
            # arviz 0.23 writes a once-a-day stamp when imported (its refactor warning),
            # through one temporary name for every process: when two processes import it
            # first on a new day (pytest's workers, torchrun's ranks), the slower one finds
            # the file already moved into place. The stamp is written then, so a second
            # import does not write it again.
            return importlib.import_module("arviz")
    except ImportError:  # pragma: no cover - arviz is a dependency; the message says what to do
        raise ImportError("ArviZ is not installed; pip install arviz") from None


def __getattr__(name: str):
    if name == "az":
        return _az()
    raise AttributeError(name)


def to_arviz(posterior: dict[str, np.ndarray], sample_stats: dict[str, np.ndarray] | None = None,
             dims: dict[str, list[str]] | None = None, coords: dict | None = None):
    """ArviZ data from ``{name: array (chain, draw, ...)}``.

    Returns an ``InferenceData`` (arviz 0.x) or a ``DataTree`` (arviz 1.x), each with a
    ``posterior`` group (and ``sample_stats`` if given).
    """
    az = _az()
    if ARVIZ_MAJOR >= 1:
        groups = {"posterior": posterior}
        if sample_stats is not None:
            groups["sample_stats"] = sample_stats
        return az.from_dict(groups, dims=dims, coords=coords)
    return az.from_dict(posterior=posterior, sample_stats=sample_stats, dims=dims, coords=coords)


def _per_component(fn, samples: np.ndarray) -> np.ndarray:
    samples = np.asarray(samples, dtype=float)
    if samples.ndim < 2:
        raise ValueError(f"expected (chain, draw, ...) samples, got shape {samples.shape}")
    if ARVIZ_MAJOR >= 1:
        return np.asarray(fn(samples), dtype=float)
    dataset = _az().convert_to_dataset(samples)  # one variable named "x"
    return np.asarray(fn(dataset)["x"].values, dtype=float)


def rhat(samples: np.ndarray) -> np.ndarray:
    """Rank-normalized split R-hat of ``(chain, draw, *shape)`` draws; shape ``shape``."""
    az = _az()
    return _per_component(az.rhat, samples)


def ess(samples: np.ndarray, method: str = "bulk") -> np.ndarray:
    """Bulk or tail effective sample size of ``(chain, draw, *shape)`` draws."""
    az = _az()
    if method == "tail" and ARVIZ_MAJOR >= 1:  # 1.x needs the tail quantiles on arrays
        return _per_component(lambda d: az.ess(d, method="tail", prob=(0.05, 0.95)), samples)
    return _per_component(lambda d: az.ess(d, method=method), samples)


def summary(data, ci_prob: float = 0.94, kind: str = "all"):
    """``az.summary`` with the same interval on both versions (0.x: HDI, 1.x: ETI);
    ``kind="stats"`` leaves out the MCMC diagnostics (for independent draws, such as a
    guide's: R-hat needs several chains)."""
    az = _az()
    if ARVIZ_MAJOR >= 1:
        return az.summary(data, ci_prob=ci_prob, kind=kind)
    return az.summary(data, hdi_prob=ci_prob, kind=kind)


def pareto_khat(log_weights: np.ndarray) -> float:
    """Pareto k-hat of importance weights given by their logarithms (PSIS, ``r_eff=1``).

    ArviZ's own PSIS: ``arviz.psislw`` (0.x) or arviz-stats' ``psislw`` (1.x); both fit
    the generalized Pareto to the largest ``ceil(min(0.2 S, 3 sqrt(S)))`` of ``S`` weights.
    """
    az = _az()
    lw = np.asarray(log_weights, dtype=float).ravel()
    if ARVIZ_MAJOR >= 1:  # arviz-stats takes log-likelihoods, as in LOO: weights 1 / p
        array_stats = importlib.import_module("arviz_stats.base.array").array_stats
        _, khat = array_stats.psislw(-lw, r_eff=1)
    else:
        _, khat = az.psislw(lw, reff=1.0)
    return float(np.asarray(khat))
