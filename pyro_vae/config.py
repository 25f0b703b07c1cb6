"""Settings for a run: model, data and training, as dataclasses that round-trip to JSON.

``RunConfig.to_dict()`` is what ``RUN_DIR/config.json`` holds: everything needed to
rebuild the model and the data of a run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

BINARIZE_MODES = ("none", "dynamic", "static")
ELBOS = ("trace", "meanfield")
DEVICES = ("auto", "cpu", "cuda")
NAN_POLICIES = ("stop", "skip")


@dataclass
class ModelConfig:
    likelihood: str = "bernoulli"  # a name from pyro_vae.available_likelihoods()
    likelihood_options: dict[str, float] = field(default_factory=dict)  # e.g. {"scale": 0.1}
    z_dim: int = 20  # latent dimensions
    hidden_dims: tuple[int, ...] = (400,)  # encoder hidden sizes; the decoder mirrors them
    activation: str = "relu"  # relu | softplus | tanh | elu
    x_dim: int = 784  # pixels per image; set from the data


@dataclass
class DataConfig:
    dataset: str = "auto"  # auto | mnist | fashion-mnist | mnist-sample
    data_dir: str | None = None  # IDX files (flat or torchvision layout); None: the cache
    binarize: str | None = None  # none | dynamic | static; None: the likelihood's default
    binarize_seed: int = 0  # seed of static binarization (train) and of the test set's
    train_limit: int | None = None  # use only the first N training images (quick tests)
    test_limit: int | None = None  # use only the first N test images
    download: bool = True  # let torchvision download a missing data set


@dataclass
class TrainConfig:
    epochs: int = 10  # total epochs; --resume continues up to this number
    batch_size: int = 128
    lr: float = 1e-3  # Adam learning rate
    elbo: str = "trace"  # trace (Trace_ELBO) | meanfield (TraceMeanField_ELBO, analytic KL)
    num_particles: int = 1  # ELBO particles, vectorized
    jit: bool = False  # compile the ELBO with Pyro's JIT
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    eval_batch_size: int = 1000  # images per batch when computing the test ELBO
    nan_policy: str = "stop"  # stop: fail on a non-finite loss; skip: skip such steps


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"]["hidden_dims"] = list(self.model.hidden_dims)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        try:
            model = ModelConfig(**d.get("model", {}))
            model.hidden_dims = tuple(int(h) for h in model.hidden_dims)
            return cls(model=model, data=DataConfig(**d.get("data", {})),
                       train=TrainConfig(**d.get("train", {})))
        except TypeError as e:
            raise ConfigError(f"config does not match this version of pyro-vae: {e}") from None

    def validate(self) -> RunConfig:
        """Raise :class:`ConfigError` on the first invalid setting; return self."""
        from .likelihoods import get_likelihood  # here: config stays importable on its own

        m, d, t = self.model, self.data, self.train
        likelihood = get_likelihood(m.likelihood)
        likelihood.check_options(m.likelihood_options)
        _positive("--z-dim", m.z_dim)
        if not m.hidden_dims:
            raise ConfigError("--hidden-dims needs at least one size, e.g. --hidden-dims 400")
        for h in m.hidden_dims:
            _positive("--hidden-dims", h)
        _choice("--binarize", d.binarize, BINARIZE_MODES, allow_none=True)
        for name, value in [("--train-limit", d.train_limit), ("--test-limit", d.test_limit)]:
            if value is not None:
                _positive(name, value)
        _positive("--epochs", t.epochs)
        _positive("--batch-size", t.batch_size)
        _positive("--num-particles", t.num_particles)
        _positive("--eval-batch-size", t.eval_batch_size)
        if not t.lr > 0:
            raise ConfigError(f"--lr must be positive, got {t.lr}")
        _choice("--elbo", t.elbo, ELBOS)
        _choice("--device", t.device, DEVICES)
        _choice("--nan-policy", t.nan_policy, NAN_POLICIES)
        return self

    def binarize_mode(self) -> str:
        """The binarization in effect: the setting, or the likelihood's default."""
        if self.data.binarize is not None:
            return self.data.binarize
        from .likelihoods import get_likelihood

        return "dynamic" if get_likelihood(self.model.likelihood).binary else "none"


def _positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _choice(name: str, value, choices, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
