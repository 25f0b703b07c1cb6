"""Shared test helpers: a tiny run configuration, IDX files, a linear-Gaussian VAE."""

from __future__ import annotations

import gzip
import signal
import struct
from pathlib import Path

import numpy as np
import torch

from pyro_vae import VAE, RunConfig, available_likelihoods, available_networks, get_likelihood
from pyro_vae.networks import network_module

# -- runs -------------------------------------------------------------------------------------


def tiny_config(**train_settings) -> RunConfig:
    """512 mnist-sample digits, a 784-64-4 network, 2 epochs of 8 steps."""
    config = RunConfig()
    config.data.dataset = "mnist-sample"
    config.data.train_limit, config.data.test_limit = 512, 200
    config.model.hidden_dims, config.model.z_dim = (64,), 4
    config.train.epochs, config.train.batch_size = 2, 64
    for key, value in train_settings.items():
        setattr(config.train, key, value)
    return config


def default_sigint() -> None:
    """``preexec_fn`` of a child that a test sends Ctrl-C: a suite started in the background
    (``nohup``, ``cmd &`` in a script) runs with SIGINT ignored, and children inherit that;
    the tool must get Ctrl-C as at a terminal, whoever started the tests."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def steps_agree(trainers, x, index, steps: int = 4, **tolerance) -> None:
    """Two trainers take ``steps`` steps each on the same batch and the same noise; their
    losses agree within ``tolerance`` (``torch.testing.assert_close``'s)."""
    for step in range(steps):
        losses = []
        for trainer in trainers:
            torch.manual_seed(step)
            losses.append(trainer.step(x, index)[0])
        torch.testing.assert_close(losses[0], losses[1], **tolerance)


def comparable(metrics):
    """Metrics without the timings, which differ from run to run."""
    return [{k: v for k, v in r.items()
             if k not in ("seconds", "images_per_second", "compile_seconds")}
            for r in metrics]


# -- likelihoods --------------------------------------------------------------------------------


def built_in_likelihoods() -> list[str]:
    """Every likelihood that pyro-vae itself registers (not those tests add)."""
    return [name for name in available_likelihoods()
            if get_likelihood(name).build.__module__ == "pyro_vae.likelihoods"]


def built_in_networks() -> list[str]:
    """Every network that pyro-vae itself registers."""
    return [name for name in available_networks() if network_module(name) is None]


def values_in_support(name, shape, generator):
    """Pixels in [0, 1] as the likelihood scores them (binary ones for binary likelihoods)."""
    u = torch.rand(shape, generator=generator)
    return (u > 0.5).float() if get_likelihood(name).binary else u


# -- IDX files ----------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    """Write ``array`` (uint8) as an IDX file the way LeCun's files are laid out."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


# -- a VAE with a closed-form marginal likelihood (probabilistic PCA) -----------------------------

D, Z, S = 6, 2, 0.5  # data and latent dimensions, the decoder's fixed noise scale


def linear_gaussian_vae(seed=0, loc_noise=0.02, scale_factor=1.5, orthogonal=False,
                        correlated=False):
    """A VAE with decoder ``x = W z + b + S eps`` and a linear encoder near (``loc_noise``,
    ``scale_factor``) the exact posterior; float64.

    ``orthogonal``: orthogonal columns of different lengths, so the exact posterior is
    diagonal; ``correlated``: nearly parallel columns, a strongly correlated posterior.
    Returns ``(vae, W, b, generator)``; the generator continues the seeded stream.
    """
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, Z, generator=g, dtype=torch.float64)
    if correlated:
        W[:, 1] = 0.9 * W[:, 0] + 0.3 * W[:, 1]
    if orthogonal:
        q, _ = torch.linalg.qr(W)
        W = q * torch.tensor([2.0, 1.0], dtype=torch.float64)
    b = torch.randn(D, generator=g, dtype=torch.float64)
    vae = VAE("normal-fixed", x_dim=D, z_dim=Z, hidden_dims=(),
              likelihood_options={"scale": S}).double()
    mean_map, cov = posterior_map(W)
    with torch.no_grad():
        vae.decoder.head.weight.copy_(W)
        vae.decoder.head.bias.copy_(b)
        head = vae.encoder.head  # outputs (loc, raw scale)
        head.weight.zero_()
        head.weight[:Z] = mean_map + loc_noise * torch.randn(Z, D, generator=g,
                                                             dtype=torch.float64)
        head.bias[:Z] = -(mean_map @ b)
        head.bias[Z:] = torch.log(torch.expm1(cov.diagonal().sqrt() * scale_factor))
    return vae, W, b, g


def posterior_map(W):
    """``(A, cov)``: the exact posterior is ``N(A (x - b), cov)``."""
    M = W.T @ W + S**2 * torch.eye(Z, dtype=W.dtype)
    return torch.linalg.solve(M, W.T), S**2 * torch.linalg.inv(M)


def exact_log_px(x, W, b):
    cov = W @ W.T + S**2 * torch.eye(D, dtype=W.dtype)
    return torch.distributions.MultivariateNormal(b, cov).log_prob(x)
