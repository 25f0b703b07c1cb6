"""A run's posteriors as ArviZ data: the guide's draws, and NUTS's where ``diagnose`` ran.

ArviZ converts MCMC output, not variational posteriors (its issue #498); here the amortized
guide ``q(z | x)`` of chosen images becomes an ``InferenceData`` (arviz 0.x) or a
``DataTree`` (arviz 1.x), so a notebook uses ``az.summary``, ``az.plot_posterior`` and
``az.plot_forest`` directly::

    import arviz as az
    from pyro_vae.export import to_inference_data

    guide = to_inference_data("runs/quickstart", images=4, num_samples=1000)
    nuts = to_inference_data("runs/quickstart", images=4, source="nuts")  # after diagnose
    az.plot_forest([guide, nuts], model_names=["guide", "NUTS"], var_names=["z"])

Every latent site of the guide becomes a variable of dimensions ``(chain, draw, image,
<site>_dim)`` (``latent`` for ``z``); guide draws are one "chain" of independent draws
(R-hat does not apply to them). Discrete sites (M2's class) are drawn, not enumerated.
NUTS draws are those ``pyro-vae diagnose`` kept in ``RUN_DIR/diagnostics_draws.npz``
(several chains, with ``diverging`` in ``sample_stats``).
"""

from __future__ import annotations

import io
import os

import numpy as np
import torch

from .arviz_compat import to_arviz
from .errors import ConfigError
from .estimators import fixed_noise, guide_draws
from .files import read_bytes
from .model import evaluating
from .runner.resolve import resolve_device
from .runner.rundir import Run, load_run

NUTS_DRAWS = "diagnostics_draws.npz"
SOURCES = ("guide", "nuts")


def _dim(site: str) -> str:
    return "latent" if site == "z" else f"{site}_dim"


def guide_arrays(model, x: torch.Tensor, num_samples: int = 1000, seed: int = 0) -> dict:
    """The keyword arguments of :func:`~pyro_vae.arviz_compat.to_arviz` for the guide's
    draws of the images ``x`` ``(B, x_dim)``: ``posterior`` ``{site: (1, S, B, ...)}``,
    ``dims`` and ``coords``; plain numpy, so any ArviZ builds them."""
    with fixed_noise(seed, x.device), evaluating(model):
        draws = guide_draws(model, x, num_samples)
    posterior = {name: v.reshape(num_samples, len(x), -1).cpu().numpy()[None]
                 for name, v in draws.items()}
    dims = {name: ["image", _dim(name)] for name in posterior}
    coords = {"image": np.arange(len(x)),
              **{_dim(name): np.arange(v.shape[-1]) for name, v in posterior.items()}}
    return {"posterior": posterior, "dims": dims, "coords": coords}


def nuts_arrays(path: str | os.PathLike, images: int | None = None) -> dict:
    """:func:`guide_arrays`' counterpart for the NUTS draws ``diagnose`` kept in ``path``
    (a run folder), of its first ``images`` images."""
    file = os.path.join(path, NUTS_DRAWS)
    if not os.path.exists(file):
        raise ConfigError(f"no NUTS draws in {path}: run pyro-vae diagnose on it first "
                          "(it keeps them in diagnostics_draws.npz)")
    with np.load(io.BytesIO(read_bytes(file)), allow_pickle=False) as saved:
        z, diverging = saved["z"], saved["diverging"]  # (image, chain, draw, latent)
    if images is not None:
        if images > len(z):
            raise ConfigError(f"diagnose kept NUTS draws of {len(z)} image(s); ask for at most "
                              f"that many, or diagnose more")
        z, diverging = z[:images], diverging[:images]
    return {"posterior": {"z": z.transpose(1, 2, 0, 3)},
            "sample_stats": {"diverging": diverging.any(0)},
            "dims": {"z": ["image", "latent"]},
            "coords": {"image": np.arange(len(z)), "latent": np.arange(z.shape[-1])}}


def to_inference_data(run: Run | str | os.PathLike, images: int | torch.Tensor = 4,
                      num_samples: int = 1000, seed: int = 0, source: str = "guide", *,
                      device: str = "cpu"):
    """ArviZ data of a run's posterior for ``images``: the first that many test images, or
    a tensor of images ``(B, x_dim)``; ``source`` ``guide`` (``num_samples`` draws of
    q(z | x), the same for the same ``seed``) or ``nuts`` (the draws ``diagnose`` kept)."""
    if source not in SOURCES:
        raise ConfigError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
    if source == "nuts":
        if not isinstance(images, int):
            raise ConfigError("NUTS draws exist for the test images diagnose ran on; give "
                              "their number, not images")
        return to_arviz(**nuts_arrays(run.path if isinstance(run, Run) else run, images))
    if not isinstance(run, Run):
        run = load_run(run, device=resolve_device(device))
    x = run.data.test_x[:images] if isinstance(images, int) else images.to(run.device)
    if x.dim() != 2 or x.shape[-1] != run.vae.x_dim or len(x) == 0:
        raise ConfigError(f"images must be (B, {run.vae.x_dim}) with B >= 1, got "
                          f"{tuple(x.shape)}")
    return to_arviz(**guide_arrays(run.vae, x.reshape(len(x), -1), num_samples, seed))
