"""Distributions that torch does not provide, or not exactly enough.

- :class:`ContinuousBernoulli`: the continuous Bernoulli (Loaiza-Ganem & Cunningham, 2019)
  exact in float32 over the whole real line of logits. torch's computes the log normalizer
  and the mean from ``probs`` clamped to ``[1.19e-7, 1 - 1.19e-7]`` while ``log_prob``'s
  cross-entropy uses the unclamped logit: beyond ``|logit|`` of about 16 its density no
  longer integrates to 1 (0.53 at a logit of -30), and trained decoders live there.
- :class:`UnnormalizedBernoulli`: the Bernoulli formula on gray-scale pixels, which the
  PyTorch VAE example uses; not a density, and it says so.
- :class:`AffineBeta`: a Beta on ``y = a x + b`` reported as the density of ``x`` itself,
  the Jacobian ``log a`` included.
- :class:`Bernoulli`: torch's Bernoulli, whose ``log_prob`` is computed from vectorized
  operations, in training (with its exact derivative ``x - sigmoid(l)``) and evaluation:
  torch's goes through ``log_sigmoid``, whose CPU kernel is not vectorized (about 6 ns an
  element on the project's CPU, against 2 ns here; see :func:`softplus`), and at batch
  1024 that one kernel took an eighth of a traced training step (``torch.profiler``).

Everything is written in the logit ``l``, with ``lambda = sigmoid(l)``:

.. math::

    \\log C(l) = \\log \\frac{l}{\\tanh(l / 2)}, \\qquad
    E[x] = \\frac{1}{1 - e^{-l}} - \\frac{1}{l}, \\qquad
    \\mathrm{Var}[x] = \\frac{1}{l^2} - \\frac{1}{4 \\sinh^2(l / 2)}, \\qquad
    F^{-1}(u) = \\frac{\\log(1 + u\\,(e^{l} - 1))}{l},

each replaced by its Taylor series near ``l = 0`` (limits ``log 2``, ``1/2``, ``1/12``, ``u``)
where the closed form cancels. A candidate for upstream (torch.distributions); pyro-vae
does not wait for it.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch.distributions import constraints

__all__ = ["AffineBeta", "Bernoulli", "ContinuousBernoulli", "OpenInterval",
           "UnnormalizedBernoulli", "softplus"]

# below these |logit|s the closed forms lose digits to cancellation; the series are exact
# to float32 there (their first omitted terms are below 1e-9, 1e-9, 1e-8 and 1e-9)
_LOG_NORM_SERIES, _MEAN_SERIES, _VAR_SERIES, _ICDF_SERIES = 0.1, 0.5, 1.0, 1e-3
# AffineBeta draws stay this many machine epsilons inside (0, 1)
_BOUNDARY_STEPS = 4


def _safe(logit: torch.Tensor, small: torch.Tensor) -> torch.Tensor:
    # the logit where the closed form is used, 1 elsewhere: no 0/0 in the branch that
    # torch.where discards, whose gradient would otherwise be NaN
    return torch.where(small, torch.ones_like(logit), logit)


def cb_log_norm(logit: torch.Tensor) -> torch.Tensor:
    """``log C(logit)`` of the continuous Bernoulli with logit ``logit``; even in ``logit``."""
    a = logit.abs()
    small = a < _LOG_NORM_SERIES
    s = _safe(a, small)
    closed = torch.log(s) - torch.log(torch.tanh(s / 2))
    a2 = a * a
    series = math.log(2.0) + a2 / 12 - 7 * a2 * a2 / 1440 + 31 * a2 * a2 * a2 / 90720
    return torch.where(small, series, closed)


def _one_over_one_minus_exp_neg(logit: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # 1 / (1 - e^-logit) from t = -|logit| < 0, so that no exp overflows (nor its gradient)
    e = torch.expm1(t)  # in (-1, 0)
    return torch.where(logit > 0, -1 / e, torch.exp(t) / e)


def cb_mean(logit: torch.Tensor) -> torch.Tensor:
    """``E[x]`` of the continuous Bernoulli with logit ``logit``."""
    small = logit.abs() < _MEAN_SERIES
    s = _safe(logit, small)
    closed = _one_over_one_minus_exp_neg(s, -s.abs()) - 1 / s
    l2 = logit * logit
    l4 = l2 * l2
    series = 0.5 + logit / 12 - logit * l2 / 720 + logit * l4 / 30240 - logit * l2 * l4 / 1209600 \
        + logit * l4 * l4 / 47900160
    return torch.where(small, series, closed)


def cb_variance(logit: torch.Tensor) -> torch.Tensor:
    """``Var[x]`` of the continuous Bernoulli with logit ``logit``; even in ``logit``."""
    a = logit.abs()
    small = a < _VAR_SERIES
    s = _safe(a, small)
    # 1 / (4 sinh^2(s / 2)) = e^-s / (1 - e^-s)^2, which neither overflows nor cancels
    closed = 1 / (s * s) - torch.exp(-s) / torch.expm1(-s).square()
    a2 = a * a
    a4 = a2 * a2
    series = 1 / 12 - a2 / 240 + a4 / 6048 - a4 * a2 / 172800 + a4 * a4 / 5322240
    return torch.where(small, series, closed)


def cb_icdf(logit: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The quantile ``F^{-1}(u)``; for ``logit > 0`` through the mirror image
    ``1 - F^{-1}_{-logit}(1 - u)``, so ``e^logit`` never overflows."""
    positive = logit > 0
    m = torch.where(positive, -logit, logit)  # m <= 0
    v = torch.where(positive, 1 - u, u)
    small = m.abs() < _ICDF_SERIES
    s = _safe(m, small)
    closed = torch.log1p(v * torch.expm1(s)) / s
    series = v + m * v * (1 - v) / 2 + m * m * v * (1 - v) * (1 - 2 * v) / 6
    x = torch.where(small, series, closed)
    return torch.where(positive, 1 - x, x).clamp(0, 1)


def cb_cdf(logit: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``F(x) = expm1(logit x) / expm1(logit)``, evaluated as its mirror image for ``logit > 0``."""
    positive = logit > 0
    m = torch.where(positive, -logit, logit)
    y = torch.where(positive, 1 - x, x)
    small = m.abs() < _ICDF_SERIES
    s = _safe(m, small)
    closed = torch.expm1(s * y) / torch.expm1(s)
    series = y + m * y * (y - 1) / 2
    c = torch.where(small, series, closed)
    return torch.where(positive, 1 - c, c).clamp(0, 1)


def softplus(x: torch.Tensor) -> torch.Tensor:
    """``log(1 + exp(x))`` from vectorized operations only, without gradients.

    ``max(x, 0) + log1p(exp(-|x|))``, where ``log1p(y)`` is ``log(u) - ((u - 1) - y)``
    with ``u = 1 + y``: the rounding of ``1 + y`` corrected to first order (the textbook
    form divides the correction by ``u``; that changes it by a factor ``1 - 1/u``, less
    than ``y``, so by under ``6e-8 y``: float32 rounding of ``log1p(y)`` for every ``y``
    in ``(0, 1]``, and exactly ``y`` where ``1 + y`` rounds to 1). torch's ``log1p`` and
    ``softplus`` CPU kernels are scalar loops, ``exp`` and ``log`` vectorized. The
    derivative of this form is wrong at ``x = 0`` (autograd sees the kinks of ``abs`` and
    ``max``): use it where nothing is differentiated.
    """
    return _minus_log1p_exp(x.abs().neg_()).sub_(x.clamp_min(0)).neg_()


def _minus_log1p_exp(t: torch.Tensor) -> torch.Tensor:
    """``-log1p(exp(t))`` for ``t <= 0``, in place of ``t`` (see :func:`softplus`)."""
    y = t.exp_()
    u = 1 + y
    return (u - 1).sub_(y).sub_(u.log_())


class _BernoulliLogProb(torch.autograd.Function):
    """``-softplus(sign * l)``, the Bernoulli's ``log p(x | l)`` with ``sign = 1 - 2x``,
    from vectorized operations; its derivative in ``l`` is ``-sign * sigmoid(sign * l)``,
    that is ``x - sigmoid(l)``, exact in both tails and at ``l = 0`` (autograd through the
    ``abs`` and ``max`` of the forward formula would get ``l = 0`` wrong, and a decoder
    whose output layer starts at zero sits there)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logits, sign):
        # -softplus(s) = -log1p(exp(-|l|)) - max(s, 0), with s = sign * l and |s| = |l|
        return torch.sub(_minus_log1p_exp(logits.abs().neg_()), (logits * sign).clamp_min_(0))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        logits, sign = ctx.saved_tensors
        return (grad * sign * torch.sigmoid(logits * sign)).neg_().sum_to_size(logits.shape), \
            None


class Bernoulli(dist.Bernoulli):
    """Pyro's (torch's) Bernoulli whose ``log_prob`` is computed from vectorized operations
    (:func:`softplus`): the same value to float32 rounding and the same derivative in the
    logits, without torch's scalar ``log_sigmoid`` kernel.

    ``x l - softplus(l)`` would cancel for ``x = 1`` and a large logit (``100 - 100``
    where the answer is ``-e^-100``); written as ``-softplus(l)`` for ``x = 0`` and
    ``-softplus(-l)`` for ``x = 1`` it is exact in both tails. That form holds on the
    support, ``{0, 1}`` (values elsewhere are refused by validation, and data are checked
    against the support when loaded); the sign is computed before the value is broadcast
    over samples. A value that itself requires gradients goes through torch's formula.
    """

    def log_prob(self, value):
        if torch.is_tensor(value) and value.requires_grad:
            return super().log_prob(value)
        if self._validate_args:
            self._validate_sample(value)
        value = torch.as_tensor(value, dtype=self.logits.dtype, device=self.logits.device)
        sign = 1 - 2 * (value > 0.5).to(value.dtype)  # x = 0: l; x = 1: -l
        return _BernoulliLogProb.apply(self.logits, sign)


class ContinuousBernoulli(dist.ContinuousBernoulli):
    """The continuous Bernoulli, exact in float32 for every logit (see the module docstring).

    Same parameters and support as :class:`torch.distributions.ContinuousBernoulli`
    (``logits`` or ``probs``); its ``log_prob``, ``mean``, ``variance``, ``cdf``, ``icdf``,
    ``rsample`` / ``sample`` and ``entropy`` are computed from the logit without clamping.
    """

    def _cont_bern_log_norm(self):
        return cb_log_norm(self.logits)

    @property
    def mean(self):
        return cb_mean(self.logits)

    @property
    def variance(self):
        return cb_variance(self.logits)

    def cdf(self, value):
        if self._validate_args:
            self._validate_sample(value)
        return cb_cdf(self.logits, value)

    def icdf(self, value):
        return cb_icdf(self.logits, value)

    def rsample(self, sample_shape=()):
        shape = self._extended_shape(sample_shape)
        u = torch.rand(shape, dtype=self.logits.dtype, device=self.logits.device)
        return self.icdf(u)

    def entropy(self):
        # -E[log p(x)] = -log C - E[x] l + softplus(l)
        return -self._cont_bern_log_norm() - self.mean * self.logits + F.softplus(self.logits)


class UnnormalizedBernoulli(ContinuousBernoulli):
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

    @property
    def variance(self):
        raise NotImplementedError("the relaxed Bernoulli is not a distribution")

    def log_normalizer(self):
        """``log C(lambda)`` per pixel: what :meth:`log_prob` leaves out (exact)."""
        return self._cont_bern_log_norm()

    def sample(self, sample_shape=()):
        raise NotImplementedError(
            "the relaxed Bernoulli is not a distribution and has no samples; "
            "show its mean, or use the continuous Bernoulli"
        )

    rsample = sample


class OpenInterval(constraints.Constraint):
    """The open interval (lower, upper); torch's Beta claims the closed unit interval."""

    def __init__(self, lower_bound: float, upper_bound: float):
        super().__init__()
        self.lower_bound, self.upper_bound = lower_bound, upper_bound

    def check(self, value):
        return (value > self.lower_bound) & (value < self.upper_bound)

    def __repr__(self):
        return f"OpenInterval({self.lower_bound:g}, {self.upper_bound:g})"


class AffineBeta(dist.TransformedDistribution):
    """``x = (y - shift) / scale`` with ``y ~ Beta(concentration1, concentration0)``.

    The density of ``x`` itself: ``log p(x) = log Beta(scale x + shift) + log scale``.
    With ``scale = 255/256`` and ``shift = 1/512``, the 256 pixel values 0, 1/255, ..., 1
    sit at the centres of 256 equal bins of (0, 1), so exact 0 and 1 have a density.
    """

    arg_constraints = {"concentration1": constraints.positive,
                       "concentration0": constraints.positive}

    def __init__(self, concentration1, concentration0, scale: float, shift: float,
                 validate_args=None):
        self.scale, self.shift = scale, shift
        base = dist.Beta(concentration1, concentration0, validate_args=validate_args)
        to_x = dist.transforms.AffineTransform(-shift / scale, 1 / scale)
        super().__init__(base, to_x, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(AffineBeta, _instance)
        new.scale, new.shift = self.scale, self.shift
        return super().expand(batch_shape, _instance=new)

    @property
    def concentration1(self):
        return self.base_dist.concentration1

    @property
    def concentration0(self):
        return self.base_dist.concentration0

    @constraints.dependent_property(is_discrete=False, event_dim=0)
    def support(self):
        return OpenInterval(-self.shift / self.scale, (1 - self.shift) / self.scale)

    def rsample(self, sample_shape=()):
        # torch's Beta draws land on exactly 0 or 1 at small concentrations (the gamma
        # ratio underflows), whose density is infinite or zero; keep y a few float steps
        # inside (0, 1), so the map to x and back never rounds onto the boundary
        y = self.base_dist.rsample(sample_shape)
        margin = _BOUNDARY_STEPS * torch.finfo(y.dtype).eps
        return (y.clamp(margin, 1 - margin) - self.shift) / self.scale

    def sample(self, sample_shape=()):
        with torch.no_grad():
            return self.rsample(sample_shape)

    @property
    def mean(self):
        return (self.base_dist.mean - self.shift) / self.scale

    @property
    def variance(self):
        return self.base_dist.variance / self.scale**2
