"""Flow guides: inverse autoregressive flows on the amortized Gaussian (Kingma et al., 2016).

The encoder gives ``mu(x)``, ``sigma(x)`` and its last hidden layer ``h(x)``; the guide is
the Gaussian followed by ``T`` IAF steps, each conditioned on ``h``::

    z_0 = mu + sigma * eps,   z_t = s_t * z_{t-1} + (1 - s_t) * m_t,   t = 1..T
    (m_t, logit s_t) = MADE_t(z_{t-1}, h),  s_t = sigmoid(logit s_t + 2)
    log q(z_T | x) = log N(z_0; mu, sigma) - sum_t sum_d log s_td

the "numerically stable" update of the paper (its eq. 14), built from Pyro's own
:class:`~pyro.distributions.transforms.ConditionalAffineAutoregressive` with a
:class:`~pyro.nn.ConditionalAutoRegressiveNN` per step. The variable order is reversed
between steps (fixed permutations, no randomness), so two steps let every dimension depend
on every other. Sampling is one pass per step; ``log q`` of the guide's own draws is exact
and cheap, because each step keeps its input (Pyro's transform cache): the estimators never
invert a flow. Scoring an arbitrary ``z`` inverts each step dimension by dimension.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.distributions.transforms import ConditionalAffineAutoregressive
from pyro.nn import ConditionalAutoRegressiveNN
from torch import nn

__all__ = ["InverseAutoregressiveFlow"]


class InverseAutoregressiveFlow(nn.Module):
    """``steps`` IAF steps on ``z_dim`` dimensions, conditioned on a ``context_dim`` context;
    ``hidden`` units in each step's autoregressive network."""

    def __init__(self, z_dim: int, context_dim: int, steps: int = 2, hidden: int = 320):
        super().__init__()
        if z_dim < 2:
            raise ValueError("an autoregressive flow needs at least 2 latent dimensions")
        order = torch.arange(z_dim)
        self.steps = nn.ModuleList(
            ConditionalAffineAutoregressive(
                ConditionalAutoRegressiveNN(z_dim, context_dim, [hidden],
                                            permutation=order if t % 2 == 0 else order.flip(0)),
                stable=True)
            for t in range(steps))

    def distribution(self, base: dist.Distribution, context: torch.Tensor
                     ) -> dist.TransformedDistribution:
        """``base`` (event shape ``(z_dim,)``) pushed through the steps conditioned on
        ``context`` ``(..., context_dim)``."""
        return dist.TransformedDistribution(base, [s.condition(context) for s in self.steps])

    @staticmethod
    def push(d: dist.TransformedDistribution, z: torch.Tensor) -> torch.Tensor:
        """``z`` through the transforms of ``d`` (e.g. the base mean: a point estimate)."""
        for transform in d.transforms:
            z = transform(z)
        return z
