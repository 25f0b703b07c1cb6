"""Encoder and decoder networks: plain :class:`torch.nn.Module` multilayer perceptrons.

They know nothing of Pyro; :mod:`pyro_vae.model` wires them into ``model`` and ``guide``.
Leading dimensions pass through untouched, so a batch of particles ``(L, B, ...)`` works
like a batch ``(B, ...)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

ACTIVATIONS = {"relu": nn.ReLU, "softplus": nn.Softplus, "tanh": nn.Tanh, "elu": nn.ELU}


def mlp(sizes: Sequence[int], activation: str) -> nn.Sequential:
    """Linear layers of the given sizes with ``activation`` after every one of them."""
    try:
        act = ACTIVATIONS[activation]
    except KeyError:
        raise ConfigError(
            f"unknown activation '{activation}'; choose one of: {', '.join(ACTIVATIONS)}"
        ) from None
    layers: list[nn.Module] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(n_in, n_out), act()]
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """x -> (loc, scale) of the diagonal Gaussian q(z | x)."""

    def __init__(self, x_dim: int, hidden_dims: Sequence[int], z_dim: int, activation: str):
        super().__init__()
        self.body = mlp([x_dim, *hidden_dims], activation)
        self.head = nn.Linear(([x_dim, *hidden_dims])[-1], 2 * z_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)  # (..., H)
        loc, raw_scale = self.head(h).chunk(2, dim=-1)  # (..., z_dim) each
        return loc, F.softplus(raw_scale) + 1e-6


class Decoder(nn.Module):
    """z -> raw likelihood parameters, shape ``(..., num_params, x_dim)``."""

    def __init__(
        self, z_dim: int, hidden_dims: Sequence[int], x_dim: int, num_params: int, activation: str
    ):
        super().__init__()
        self.x_dim, self.num_params = x_dim, num_params
        self.body = mlp([z_dim, *hidden_dims], activation)
        self.head = nn.Linear(([z_dim, *hidden_dims])[-1], num_params * x_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.body(z)  # (..., H)
        return self.head(h).unflatten(-1, (self.num_params, self.x_dim))  # (..., P, D)
