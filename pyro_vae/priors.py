"""Learned priors p(z): the VampPrior (Tomczak & Welling, 2018).

The VampPrior is the guide's own mixture at ``K`` learned *pseudo-inputs* ``u_k``::

    p(z) = (1 / K) sum_k q(z | u_k) = (1 / K) sum_k N(z; mu(u_k), diag(sigma(u_k))^2)

so prior and posterior share the encoder, and the prior moves to where the posteriors
are. The model keeps one Pyro sample site ``"z"`` whose distribution is a
:class:`GaussianMixture`; every ELBO (its KL term is Monte Carlo), the IWAE bound, the
fast step and the importance-sampled ``log p(x)`` use it unchanged.

Pseudo-inputs live in pixel space, ``u = hardtanh(w, 0, 1)`` of free weights ``w``
started at ``N(0.05, 0.01)``, as the authors' code does for binary MNIST.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import constraints

__all__ = ["GaussianMixture", "VampPrior"]


class GaussianMixture(dist.TorchDistribution):
    """A mixture of ``K`` diagonal Gaussians on ``R^D``: weights ``softmax(logits)`` (K,),
    means ``loc`` and standard deviations ``scale`` (K, D); batch shape ``batch_shape``
    (the same mixture for every element), event shape ``(D,)``.

    It equals ``MixtureSameFamily(Categorical(logits), Normal(loc, scale).to_event(1))``
    (tested), with a ``log_prob`` that scores ``N`` points against ``K`` components as two
    matrix products instead of an ``(N, K, D)`` intermediate: the quadratic forms
    ``sum_d (z_d - mu_kd)^2 / sigma_kd^2`` are expanded and summed in float64, so the
    expansion loses nothing to cancellation where ``z`` is close to a far-out narrow
    component; the result has the value's dtype. Not reparameterizable (the component is
    discrete); the model scores the guide's draws, it never samples its prior in training.
    """

    arg_constraints = {"logits": constraints.real_vector, "loc": constraints.real,
                       "scale": constraints.positive}
    support = constraints.real_vector
    has_rsample = False

    def __init__(self, logits: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor,
                 batch_shape: torch.Size | tuple = (), validate_args=None):
        if loc.dim() != 2 or loc.shape != scale.shape or logits.shape != loc.shape[:1]:
            raise ValueError(f"expected logits (K,), loc and scale (K, D); got "
                             f"{tuple(logits.shape)}, {tuple(loc.shape)}, {tuple(scale.shape)}")
        self.logits, self.loc, self.scale = logits, loc, scale
        super().__init__(torch.Size(batch_shape), loc.shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        return GaussianMixture(self.logits, self.loc, self.scale, batch_shape,
                               validate_args=self._validate_args if _instance is None else None)

    @property
    def weights(self) -> torch.Tensor:
        """The mixture weights ``(K,)``."""
        return torch.softmax(self.logits, -1)

    def component_log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """``log N(value; mu_k, sigma_k)`` for every component: ``(..., K)`` of ``(..., D)``."""
        z = value.double()
        precision = self.scale.double().pow(-2)  # (K, D)
        centre = self.loc.double() * precision
        quadratic = ((z * z) @ precision.T - 2 * (z @ centre.T)
                     + (self.loc.double() * centre).sum(-1))  # (..., K)
        norm = self.scale.double().log().sum(-1) + 0.5 * self.loc.shape[-1] * math.log(2 * math.pi)
        return (-0.5 * quadratic.clamp(min=0) - norm).to(value.dtype)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        mixed = torch.logsumexp(self.component_log_prob(value)
                                + torch.log_softmax(self.logits, -1), -1)  # (...,)
        return mixed.expand(torch.broadcast_shapes(mixed.shape, self.batch_shape))

    def sample(self, sample_shape=()) -> torch.Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))[:-1]  # sample + batch
        with torch.no_grad():
            k = torch.distributions.Categorical(logits=self.logits).sample(shape)
            return self.loc[k] + self.scale[k] * torch.randn_like(self.loc[k])

    @property
    def mean(self) -> torch.Tensor:
        m = self.weights @ self.loc  # (D,)
        return m.expand(self.batch_shape + self.event_shape)

    @property
    def variance(self) -> torch.Tensor:
        second = self.weights @ (self.scale**2 + self.loc**2)
        return (second - (self.weights @ self.loc) ** 2).expand(self.batch_shape
                                                                + self.event_shape)


class VampPrior(nn.Module):
    """``K`` learned pseudo-inputs of ``x_dim`` pixels; :meth:`distribution` is the
    mixture of an encoder's Gaussians at them (see the module docstring)."""

    def __init__(self, num_pseudo_inputs: int, x_dim: int, init_mean: float = 0.05,
                 init_std: float = 0.01):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_pseudo_inputs, x_dim).normal_(init_mean,
                                                                                 init_std))

    def pseudo_inputs(self) -> torch.Tensor:
        """The pseudo-inputs ``(K, x_dim)``, in ``[0, 1]`` like the images."""
        return F.hardtanh(self.weight, 0.0, 1.0)

    def distribution(self, encoder: nn.Module) -> GaussianMixture:
        """p(z) = (1/K) sum_k q(z | u_k), batch shape ``()``; ``encoder(x) -> (loc, scale)``."""
        loc, scale = encoder(self.pseudo_inputs())  # (K, z_dim) each
        return GaussianMixture(loc.new_zeros(loc.shape[:1]), loc, scale)
