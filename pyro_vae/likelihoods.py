"""The observation model p(x | z): a registry of per-pixel likelihoods.

A likelihood turns the decoder's raw outputs into a Pyro distribution over pixels. It
declares

- ``num_params``: how many decoder outputs it needs per pixel;
- ``support``: the values it scores (a :mod:`torch.distributions.constraints` object);
- ``build(*params, **options)``: the distribution, from ``num_params`` tensors of shape
  ``(..., D)`` with unconstrained values, with batch shape ``(..., D)``;
- ``binary``: whether it scores binary pixels only (its data is then binarized by
  default), and ``relaxed``: the likelihood used instead when such a likelihood is asked
  to score gray-scale pixels;
- ``normalized``: whether ``log_prob`` is a normalized log density or log mass;

The mean of the distribution (``Distribution.mean``) is what pictures show: for the
continuous Bernoulli it differs from its parameter (Loaiza-Ganem & Cunningham, 2019).
Add one with :func:`register_likelihood`. This module builds distributions only;
``pyro.sample`` lives in :mod:`pyro_vae.model`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch.distributions import constraints

from .distributions import (
    AffineBeta,
    Bernoulli,
    ContinuousBernoulli,
    OpenInterval,
    UnnormalizedBernoulli,
)
from .errors import ConfigError, DataError
from .registry import Registry

__all__ = [
    "Likelihood",
    "available_likelihoods",
    "get_likelihood",
    "describe_support",
    "likelihood_module",
    "register_likelihood",
]


@dataclass(frozen=True)
class Likelihood:
    """A named per-pixel observation model (see the module docstring)."""

    name: str
    build: Callable[..., dist.Distribution]
    num_params: int = 1
    support: constraints.Constraint = constraints.unit_interval
    binary: bool = False
    relaxed: str | None = None
    normalized: bool = True
    description: str = ""

    def distribution(self, raw: torch.Tensor, **options) -> dist.Distribution:
        """The distribution for decoder outputs ``raw`` of shape ``(..., num_params, D)``.

        Returns a distribution with batch shape ``(..., D)``.
        """
        return self.build(*raw.unbind(-2), **options)

    def options(self) -> dict[str, object]:
        """The builder's keyword options and their defaults (``inspect.Parameter.empty``
        for a required one)."""
        params = list(inspect.signature(self.build).parameters.values())[self.num_params :]
        return {p.name: p.default for p in params}

    def summary(self) -> str:
        """What ``pyro-vae likelihoods`` shows of it: description, outputs, support,
        whether it is normalized, options."""
        options = ", ".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k} (required)"
                            for k, v in self.options().items()) or "none"
        return "\n".join([
            self.name, "  " + self.description.replace("``", ""),
            f"  {self.num_params} decoder output(s) per pixel; scores "
            f"{describe_support(self.support)}; "
            f"{'normalized' if self.normalized else 'NOT normalized (not a likelihood)'}"
            f"{'; binary pixels only' if self.binary else ''}", f"  options: {options}"])

    def check_options(self, options: dict) -> None:
        """Raise :class:`ConfigError` for an option the builder rejects, by name or value."""
        accepted = list(inspect.signature(self.build).parameters)[self.num_params :]
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            hint = ", ".join(accepted) if accepted else "none"
            raise ConfigError(
                f"likelihood '{self.name}' has no option {', '.join(unknown)}; "
                f"its options ({{model.likelihood_options}}) are: {hint}"
            )
        if not options:
            return
        try:  # build once on dummy parameters so that bad values fail before training
            self.build(*[torch.zeros(1)] * self.num_params, **options)
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"likelihood '{self.name}' rejects options {options}: {e}") from None

    def check_support(self, x: torch.Tensor, what: str = "data") -> None:
        """Raise :class:`DataError` if ``x`` lies outside the support.

        Called once per data set (not per step), so training stays free of host syncs.
        """
        if bool(self.support.check(x).all()):
            return
        lo, hi = float(x.min()), float(x.max())
        if self.binary:
            fix = "binarize it ({data.binarize=dynamic} or static)"
        else:
            fix = "choose a likelihood whose support holds it"
        raise DataError(
            f"{what} has values in [{lo:g}, {hi:g}], outside the support of likelihood "
            f"'{self.name}' ({describe_support(self.support)}); {fix}"
        )


_REGISTRY: Registry[Likelihood] = Registry("likelihood", "model.likelihood")


def register_likelihood(
    name: str,
    *,
    num_params: int = 1,
    support: constraints.Constraint = constraints.unit_interval,
    binary: bool = False,
    relaxed: str | None = None,
    normalized: bool = True,
    overwrite: bool = False,
):
    """Decorator registering ``build(*params, **options) -> Distribution`` under ``name``.

    ``build`` receives ``num_params`` unconstrained tensors of shape ``(..., D)`` and
    returns a distribution with batch shape ``(..., D)``; keyword options after the
    parameters become the likelihood's settings (e.g. a fixed scale). Returns ``build``
    unchanged, so the function stays usable on its own.

    Define it in a module (not a notebook cell or ``__main__``) to use its runs from other
    processes: a run records the module, and ``pyro-vae --import MODULE`` loads it.
    Registering the same function again (a re-run cell) is allowed; another function under
    a taken name needs ``overwrite=True``.
    """

    def decorator(build):
        if num_params < 1:
            raise ConfigError(f"num_params must be at least 1, got {num_params}")
        _REGISTRY.add(name, Likelihood(
            name=name,
            build=build,
            num_params=num_params,
            support=support,
            binary=binary,
            relaxed=relaxed,
            normalized=normalized,
            description=(inspect.getdoc(build) or "").split("\n")[0],
        ), build, overwrite=overwrite)
        return build

    return decorator


available_likelihoods = _REGISTRY.names  # sorted names, entry points' included
get_likelihood = _REGISTRY.get  # (name, module recorded by a run) -> Likelihood
likelihood_module = _REGISTRY.module_of  # None for pyro-vae's own


def describe_support(support: constraints.Constraint) -> str:
    if support is constraints.boolean:
        return "{0, 1}"
    if support is constraints.real:
        return "all reals"
    if isinstance(support, OpenInterval):
        return f"({support.lower_bound:.4g}, {support.upper_bound:.4g})"
    if isinstance(support, constraints.interval):
        return f"[{support.lower_bound:g}, {support.upper_bound:g}]"
    return repr(support)


# ---------------------------------------------------------------------------
# Built-in likelihoods.

_MIN_SCALE = 1e-3  # keeps learned scales and concentrations away from 0


@register_likelihood("bernoulli", support=constraints.boolean, binary=True,
                     relaxed="bernoulli-relaxed")
def bernoulli(logits):
    """Bernoulli on binary pixels, logits parameterization."""
    return Bernoulli(logits=logits)


@register_likelihood("bernoulli-relaxed", normalized=False)
def bernoulli_relaxed(logits):
    """Bernoulli formula on gray-scale pixels, as in the PyTorch example (not normalized)."""
    return UnnormalizedBernoulli(logits=logits)


@register_likelihood("continuous-bernoulli")
def continuous_bernoulli(logits):
    """Continuous Bernoulli on [0, 1] (Loaiza-Ganem & Cunningham, 2019), exact for all logits."""
    return ContinuousBernoulli(logits=logits)


@register_likelihood("normal", num_params=2, support=constraints.real)
def normal(loc, raw_scale, min_scale: float = _MIN_SCALE):
    """Normal with a per-pixel scale learned by the decoder (softplus + min_scale)."""
    if not 0 <= min_scale < math.inf:
        raise ConfigError(f"normal needs a finite min_scale >= 0, got {min_scale}")
    return dist.Normal(loc, F.softplus(raw_scale) + min_scale)


@register_likelihood("normal-fixed", support=constraints.real)
def normal_fixed(loc, scale: float = 0.1):
    """Normal with one fixed scale for every pixel (option ``scale``, default 0.1)."""
    if not 0 < scale < math.inf:
        raise ConfigError(f"normal-fixed needs a finite scale > 0, got {scale}")
    return dist.Normal(loc, torch.full_like(loc, scale))


# pixels 0, 1/255, ..., 1 are the centres of 256 equal bins of (0, 1) under y = a x + b
_BIN_SCALE, _BIN_SHIFT = 255.0 / 256.0, 1.0 / 512.0


@register_likelihood("beta", num_params=2,
                     support=OpenInterval(-_BIN_SHIFT / _BIN_SCALE,
                                          (1 - _BIN_SHIFT) / _BIN_SCALE))
def beta(raw_concentration1, raw_concentration0):
    """Beta on y = x * 255/256 + 1/512 in (0, 1), as a density of the pixel x (Jacobian in)."""
    return AffineBeta(F.softplus(raw_concentration1) + _MIN_SCALE,
                      F.softplus(raw_concentration0) + _MIN_SCALE,
                      scale=_BIN_SCALE, shift=_BIN_SHIFT)
