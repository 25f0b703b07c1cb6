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
- ``prepare``: an optional, documented map of pixels in [0, 1] into the support.

The mean of the distribution (``Distribution.mean``) is what pictures show: for the
continuous Bernoulli it differs from its parameter (Loaiza-Ganem & Cunningham, 2019).

Add a likelihood without touching the model::

    import torch.nn.functional as F
    import pyro.distributions as dist
    from torch.distributions import constraints
    from pyro_vae import register_likelihood

    @register_likelihood("laplace", num_params=2, support=constraints.real)
    def laplace(loc, raw_scale):
        return dist.Laplace(loc, F.softplus(raw_scale) + 1e-3)

This module builds distributions only; ``pyro.sample`` lives in :mod:`pyro_vae.model`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch.distributions import constraints

from .errors import ConfigError, DataError

__all__ = [
    "Likelihood",
    "OpenInterval",
    "UnnormalizedBernoulli",
    "available_likelihoods",
    "get_likelihood",
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
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None
    description: str = ""

    def distribution(self, raw: torch.Tensor, **options) -> dist.Distribution:
        """The distribution for decoder outputs ``raw`` of shape ``(..., num_params, D)``.

        Returns a distribution with batch shape ``(..., D)``.
        """
        return self.build(*raw.unbind(-2), **options)

    def prepare_data(self, x: torch.Tensor) -> torch.Tensor:
        """Map pixels in [0, 1] into the support (identity unless ``prepare`` is set)."""
        return x if self.prepare is None else self.prepare(x)

    def check_options(self, options: dict) -> None:
        """Raise :class:`ConfigError` for an option the builder rejects, by name or value."""
        accepted = list(inspect.signature(self.build).parameters)[self.num_params :]
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            hint = ", ".join(accepted) if accepted else "none"
            raise ConfigError(
                f"likelihood '{self.name}' has no option {', '.join(unknown)}; "
                f"its options (ModelConfig.likelihood_options) are: {hint}"
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
        """Raise :class:`DataError` if prepared ``x`` lies outside the support.

        Called once per data set (not per step), so training stays free of host syncs.
        """
        y = self.prepare_data(x)
        if bool(self.support.check(y).all()):
            return
        lo, hi = float(x.min()), float(x.max())
        if self.binary:
            fix = "binarize it (DataConfig.binarize = 'dynamic' or 'static')"
        else:
            fix = "choose a likelihood whose support holds it"
        raise DataError(
            f"{what} has values in [{lo:g}, {hi:g}], outside the support of likelihood "
            f"'{self.name}' ({_describe(self.support)}); {fix}"
        )


_REGISTRY: dict[str, Likelihood] = {}


def register_likelihood(
    name: str,
    *,
    num_params: int = 1,
    support: constraints.Constraint = constraints.unit_interval,
    binary: bool = False,
    relaxed: str | None = None,
    normalized: bool = True,
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
    overwrite: bool = False,
):
    """Decorator registering ``build(*params, **options) -> Distribution`` under ``name``.

    ``build`` receives ``num_params`` unconstrained tensors of shape ``(..., D)`` and
    returns a distribution with batch shape ``(..., D)``; keyword options after the
    parameters become the likelihood's settings (e.g. a fixed scale). Returns ``build``
    unchanged, so the function stays usable on its own.
    """

    def decorator(build):
        if name in _REGISTRY and not overwrite:
            raise ConfigError(
                f"a likelihood named '{name}' is registered already; "
                "pass overwrite=True to replace it"
            )
        if num_params < 1:
            raise ConfigError(f"num_params must be at least 1, got {num_params}")
        _REGISTRY[name] = Likelihood(
            name=name,
            build=build,
            num_params=num_params,
            support=support,
            binary=binary,
            relaxed=relaxed,
            normalized=normalized,
            prepare=prepare,
            description=(inspect.getdoc(build) or "").split("\n")[0],
        )
        return build

    return decorator


def available_likelihoods() -> list[str]:
    """Names of all registered likelihoods, sorted."""
    return sorted(_REGISTRY)


def get_likelihood(name: str) -> Likelihood:
    """The likelihood registered under ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown likelihood '{name}'; ModelConfig.likelihood must be one of: "
            f"{', '.join(available_likelihoods())}"
        ) from None


class OpenInterval(constraints.Constraint):
    """The open interval (lower, upper); torch's Beta claims the closed unit interval."""

    def __init__(self, lower_bound: float, upper_bound: float):
        super().__init__()
        self.lower_bound, self.upper_bound = lower_bound, upper_bound

    def check(self, value):
        return (value > self.lower_bound) & (value < self.upper_bound)

    def __repr__(self):
        return f"OpenInterval({self.lower_bound:g}, {self.upper_bound:g})"


def _describe(support: constraints.Constraint) -> str:
    if support is constraints.boolean:
        return "{0, 1}"
    if support is constraints.real:
        return "all reals"
    if isinstance(support, OpenInterval):
        return f"({support.lower_bound:g}, {support.upper_bound:g})"
    if isinstance(support, constraints.interval):
        return f"[{support.lower_bound:g}, {support.upper_bound:g}]"
    return repr(support)


# ---------------------------------------------------------------------------
# Distributions that torch does not provide.


class UnnormalizedBernoulli(dist.ContinuousBernoulli):
    r"""The Bernoulli formula applied to values in [0, 1]: NOT a normalized density.

    ``log_prob(x) = x log(lambda) + (1 - x) log(1 - lambda)``, i.e. minus the binary
    cross-entropy that the PyTorch VAE example uses on gray-scale pixels. Integrated over
    [0, 1] its exponential is ``1 / C(lambda) <= 1``, where ``C`` is the continuous
    Bernoulli's normalizer (Loaiza-Ganem & Cunningham, 2019), so an ELBO built on it is
    not a bound on a log-likelihood. It has no samples; its ``mean`` is ``lambda``, the
    value such models display.
    """

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        logits, value = torch.broadcast_tensors(self.logits, value)
        return -F.binary_cross_entropy_with_logits(logits, value, reduction="none")

    @property
    def mean(self):
        return self.probs

    def log_normalizer(self):
        """``log C(lambda)`` per pixel: what :meth:`log_prob` leaves out."""
        return self._cont_bern_log_norm()

    def sample(self, sample_shape=()):
        raise NotImplementedError(
            "the relaxed Bernoulli is not a distribution and has no samples; "
            "show its mean, or use the continuous Bernoulli"
        )

    rsample = sample


# ---------------------------------------------------------------------------
# Built-in likelihoods.

_MIN_SCALE = 1e-3  # keeps learned scales and concentrations away from 0


@register_likelihood("bernoulli", support=constraints.boolean, binary=True,
                     relaxed="bernoulli-relaxed")
def bernoulli(logits):
    """Bernoulli on binary pixels, logits parameterization."""
    return dist.Bernoulli(logits=logits)


@register_likelihood("bernoulli-relaxed", normalized=False)
def bernoulli_relaxed(logits):
    """Bernoulli formula on gray-scale pixels, as in the PyTorch example (not normalized)."""
    return UnnormalizedBernoulli(logits=logits)


@register_likelihood("continuous-bernoulli")
def continuous_bernoulli(logits):
    """Continuous Bernoulli on [0, 1] (Loaiza-Ganem & Cunningham, 2019)."""
    return dist.ContinuousBernoulli(logits=logits)


@register_likelihood("normal", num_params=2, support=constraints.real)
def normal(loc, raw_scale, min_scale: float = _MIN_SCALE):
    """Normal with a per-pixel scale learned by the decoder (softplus + min_scale)."""
    return dist.Normal(loc, F.softplus(raw_scale) + min_scale)


@register_likelihood("normal-fixed", support=constraints.real)
def normal_fixed(loc, scale: float = 0.1):
    """Normal with one fixed scale for every pixel (option ``scale``, default 0.1)."""
    if not scale > 0:
        raise ConfigError(f"normal-fixed needs scale > 0, got {scale}")
    return dist.Normal(loc, torch.full_like(loc, scale))


def _to_bin_centres(x: torch.Tensor) -> torch.Tensor:
    # 0, 1/255, ..., 1  ->  1/512, ..., 511/512: the centres of 256 equal bins of [0, 1]
    return x * (255.0 / 256.0) + 1.0 / 512.0


@register_likelihood("beta", num_params=2, support=OpenInterval(0.0, 1.0),
                     prepare=_to_bin_centres)
def beta(raw_concentration1, raw_concentration0):
    """Beta on (0, 1); pixels are moved to bin centres x * 255/256 + 1/512 first."""
    return dist.Beta(
        F.softplus(raw_concentration1) + _MIN_SCALE,
        F.softplus(raw_concentration0) + _MIN_SCALE,
    )
