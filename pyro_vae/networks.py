"""Encoder and decoder networks: plain :class:`torch.nn.Module` s, chosen by name.

They know nothing of Pyro; :mod:`pyro_vae.model` wires them into ``model`` and ``guide``.
Leading dimensions pass through untouched, so a batch of particles ``(L, B, ...)`` works
like a batch ``(B, ...)``.

A *network* is a builder registered by name (``ModelConfig.network``)::

    build(x_dim, z_dim, hidden_dims, activation, num_params) -> (encoder, decoder)

where ``encoder(x)`` returns ``(loc, scale)`` of q(z | x), each ``(..., z_dim)``, and
``decoder(z)`` returns the likelihood's raw parameters ``(..., num_params, x_dim)``. A flow
guide (``ModelConfig.guide``) also needs the encoder's ``features(x) -> h``
``(..., feature_dim)`` and ``gaussian(h) -> (loc, scale)``, as the built-in encoders have.
Built in: ``mlp`` (multilayer perceptrons, ``hidden_dims`` per layer) and ``conv`` (a
small convolutional encoder and transposed-convolutional decoder for square images;
``hidden_dims[0]`` is its dense layer). Register your own with :func:`register_network`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .registry import Registry

ACTIVATIONS = {"relu": nn.ReLU, "softplus": nn.Softplus, "tanh": nn.Tanh, "elu": nn.ELU}


def _activation(activation: str) -> type[nn.Module]:
    try:
        return ACTIVATIONS[activation]
    except KeyError:
        raise ConfigError(
            f"unknown activation '{activation}'; choose one of: {', '.join(ACTIVATIONS)}"
        ) from None


def mlp(sizes: Sequence[int], activation: str) -> nn.Sequential:
    """Linear layers of the given sizes with ``activation`` after every one of them."""
    act = _activation(activation)
    layers: list[nn.Module] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(n_in, n_out), act()]
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """x -> (loc, scale) of the diagonal Gaussian q(z | x)."""

    def __init__(self, x_dim: int, hidden_dims: Sequence[int], z_dim: int, activation: str):
        super().__init__()
        self.body = mlp([x_dim, *hidden_dims], activation)
        self.feature_dim = ([x_dim, *hidden_dims])[-1]
        self.head = nn.Linear(self.feature_dim, 2 * z_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gaussian(self.features(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last hidden layer ``(..., feature_dim)``: the context of a flow guide."""
        return self.body(x)

    def gaussian(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)`` of q(z | x), each ``(..., z_dim)``, from the features ``h``."""
        loc, raw_scale = self.head(h).chunk(2, dim=-1)
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


def _side(x_dim: int) -> int:
    side = math.isqrt(x_dim)
    if side * side != x_dim or side % 4:
        raise ConfigError(f"the conv network needs square images with a side divisible by 4 "
                          f"(28 x 28 for MNIST), got {x_dim} pixels; use {{model.network=mlp}}")
    return side


def _flat_batch(net: nn.Module, t: torch.Tensor, *shape: int) -> torch.Tensor:
    """``net`` applied to ``t`` ``(..., *features)`` reshaped to ``(-1, *shape)``; the
    leading dimensions are restored on the way out."""
    lead = t.shape[: t.dim() - 1]
    out = net(t.reshape(-1, *shape))
    return out.reshape(*lead, *out.shape[1:])


class ConvEncoder(nn.Module):
    """x (side x side) -> two stride-2 convolutions (32, 64 channels) -> dense -> (loc, scale)."""

    def __init__(self, x_dim: int, hidden: int, z_dim: int, activation: str):
        super().__init__()
        self.side = side = _side(x_dim)
        act = _activation(activation)
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 4, stride=2, padding=1), act(),
            nn.Conv2d(32, 64, 4, stride=2, padding=1), act(),
            nn.Flatten(), nn.Linear(64 * (side // 4) ** 2, hidden), act())
        self.head = nn.Linear(hidden, 2 * z_dim)
        self.feature_dim = hidden

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return _flat_batch(self.body, x, 1, self.side, self.side)  # (..., hidden)

    forward, gaussian = Encoder.forward, Encoder.gaussian


class ConvDecoder(nn.Module):
    """z -> dense -> two stride-2 transposed convolutions -> ``(..., num_params, x_dim)``."""

    def __init__(self, z_dim: int, hidden: int, x_dim: int, num_params: int, activation: str):
        super().__init__()
        self.side = side = _side(x_dim)
        self.x_dim, self.num_params = x_dim, num_params
        act = _activation(activation)
        self.body = nn.Sequential(
            nn.Linear(z_dim, hidden), act(), nn.Linear(hidden, 64 * (side // 4) ** 2), act(),
            nn.Unflatten(1, (64, side // 4, side // 4)),
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), act(),
            nn.ConvTranspose2d(32, num_params, 4, stride=2, padding=1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = _flat_batch(self.body, z, z.shape[-1])  # (..., P, side, side)
        return out.flatten(-2)  # (..., P, x_dim)


@dataclass(frozen=True)
class Network:
    """A named builder of an encoder and a decoder (see the module docstring)."""

    name: str
    build: Callable[..., tuple[nn.Module, nn.Module]]
    description: str = ""


_REGISTRY: Registry[Network] = Registry("network", "model.network")


def register_network(name: str, *, overwrite: bool = False):
    """Decorator registering ``build(x_dim, z_dim, hidden_dims, activation, num_params)
    -> (encoder, decoder)`` under ``name``; the same rules as
    :func:`~pyro_vae.likelihoods.register_likelihood` (define it in a module to use its
    runs from other processes)."""

    def decorator(build):
        _REGISTRY.add(name, Network(name, build, (inspect.getdoc(build) or "").split("\n")[0]),
                      build, overwrite=overwrite)
        return build

    return decorator


available_networks, get_network, network_module = \
    _REGISTRY.names, _REGISTRY.get, _REGISTRY.module_of


@register_network("mlp")
def mlp_networks(x_dim, z_dim, hidden_dims, activation, num_params):
    """Multilayer perceptrons; the decoder mirrors the encoder's hidden sizes."""
    return (Encoder(x_dim, hidden_dims, z_dim, activation),
            Decoder(z_dim, tuple(reversed(hidden_dims)), x_dim, num_params, activation))


@register_network("conv")
def conv_networks(x_dim, z_dim, hidden_dims, activation, num_params):
    """Two stride-2 convolutions (32, 64 channels) and a dense layer of hidden_dims[0]; the
    decoder mirrors it with transposed convolutions (square images)."""
    return (ConvEncoder(x_dim, hidden_dims[0], z_dim, activation),
            ConvDecoder(z_dim, hidden_dims[0], x_dim, num_params, activation))
