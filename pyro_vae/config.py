"""Settings for a run: model, data and training, as dataclasses that round-trip to JSON.

``RunConfig.to_dict()`` is what ``RUN_DIR/config.json`` holds: everything needed to
rebuild the model and the data of a run.

Errors name the field the way Python code spells it (``TrainConfig.lr must be positive``);
the command-line tool rewrites those names into its flags (``--lr``). Checks that need the
likelihood registry (a likelihood's name and options) live in
:func:`pyro_vae.runner.resolve.check_config`, one step further down the data path.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

log = logging.getLogger(__name__)

BINARIZE_MODES = ("none", "dynamic", "static")
ELBOS = ("trace", "meanfield")
OBJECTIVES = ("elbo", "iwae")
LR_SCHEDULES = ("constant", "burda")
DEVICES = ("auto", "cpu", "cuda")
NAN_POLICIES = ("stop", "skip")
MAX_SEED = 2**32 - 1  # numpy's seed range, which pyro.set_rng_seed passes seeds to


@dataclass
class ModelConfig:
    likelihood: str = "bernoulli"  # a name from pyro_vae.available_likelihoods()
    likelihood_options: dict[str, float] = field(default_factory=dict)  # e.g. {"scale": 0.1}
    likelihood_module: str | None = None  # module that registered it; None: built in (set)
    z_dim: int = 20  # latent dimensions (of the top layer)
    hidden_dims: tuple[int, ...] = (400,)  # encoder hidden sizes; the decoder mirrors them
    activation: str = "relu"  # relu | softplus | tanh | elu
    network: str = "mlp"  # mlp | conv | a registered name: builds encoder and decoder
    network_module: str | None = None  # module that registered it; None: built in (set)
    stochastic_layers: int = 1  # 1, or 2: z2 -> z1 -> x (Burda et al., 2015)
    z1_dim: int = 100  # two layers: dimensions of the lower latent layer z1
    top_hidden_dims: tuple[int, ...] = (50, 50)  # two layers: hidden sizes between z1, z2
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
    epochs: int = 10  # total epochs; a resume continues up to this number
    batch_size: int = 128
    lr: float = 1e-3  # Adam learning rate
    lr_schedule: str = "constant"  # constant | burda: lr * 10^(-i/7) for 3^i epochs, i = 0..7
    adam_eps: float = 1e-8  # Adam's epsilon (Burda et al.: 1e-4)
    elbo: str = "trace"  # trace (Trace_ELBO) | meanfield (TraceMeanField_ELBO, analytic KL)
    num_particles: int = 1  # ELBO particles, vectorized; K of the IWAE bound
    objective: str = "elbo"  # elbo | iwae (Burda et al.: K = num_particles)
    dreg: bool = False  # iwae: doubly reparameterized gradients (Tucker et al., 2019)
    kl_warmup: int = 0  # epochs of linear KL warm-up (Sønderby et al., 2016); 0: none
    beta: float = 1.0  # weight of the KL term (Higgins et al., 2017)
    fast_step: bool = True  # replay the step as a traced graph (CPU) or a CUDA graph
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    eval_batch_size: int = 1000  # images per batch when computing the test ELBO
    nan_policy: str = "stop"  # stop: fail on a non-finite loss; skip: skip such steps
    tensorboard: bool = False  # also write TensorBoard events to RUN_DIR/tensorboard/


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"]["hidden_dims"] = list(self.model.hidden_dims)
        d["model"]["top_hidden_dims"] = list(self.model.top_hidden_dims)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """The settings in ``d`` (as ``to_dict`` writes them); unknown keys are errors."""
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(d).__name__}")
        sections = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
        unknown = sorted(set(d) - set(sections))
        if unknown:
            raise ConfigError(f"config has unknown sections {', '.join(unknown)}; "
                              f"expected {', '.join(sections)}")
        parts = {}
        for name, cls_ in sections.items():
            values = d.get(name, {})
            if not isinstance(values, dict):
                raise ConfigError(f"config section '{name}' must be an object")
            values = dict(values)
            if name == "train" and "jit" in values:  # written before the fast step existed
                if values.pop("jit"):
                    log.info("TrainConfig.jit is gone: the fast step replaces Pyro's JIT")
            known = {f.name for f in dataclasses.fields(cls_)}
            extra = sorted(set(values) - known)
            if extra:
                raise ConfigError(f"{cls_.__name__} has no field {', '.join(extra)}; "
                                  f"its fields are: {', '.join(sorted(known))}")
            parts[name] = cls_(**values)
        model = parts["model"]
        for name in ("hidden_dims", "top_hidden_dims"):
            if isinstance(getattr(model, name), (list, tuple)):
                setattr(model, name, tuple(getattr(model, name)))
        return cls(**parts)

    @classmethod
    def read(cls, path: str | os.PathLike) -> RunConfig:
        """The settings in a JSON file with the schema of a run's ``config.json`` (sections
        and fields left out keep their defaults)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read it ({getattr(e, 'strerror', None) or e})"
                              ) from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None
        try:
            return cls.from_dict(data)
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{path}: {e}") from None

    def validate(self) -> RunConfig:
        """Raise :class:`ConfigError` on the first invalid value; return self."""
        m, d, t = self.model, self.data, self.train
        _positive("ModelConfig.z_dim", m.z_dim)
        if not isinstance(m.hidden_dims, tuple) or not m.hidden_dims:
            raise ConfigError("ModelConfig.hidden_dims needs at least one size, e.g. (400,)")
        for h in m.hidden_dims:
            _positive("ModelConfig.hidden_dims", h)
        _positive("ModelConfig.x_dim", m.x_dim)
        if m.stochastic_layers not in (1, 2) or isinstance(m.stochastic_layers, bool):
            raise ConfigError(f"ModelConfig.stochastic_layers must be 1 or 2, "
                              f"got {m.stochastic_layers!r}")
        _positive("ModelConfig.z1_dim", m.z1_dim)
        if not isinstance(m.top_hidden_dims, tuple):
            raise ConfigError("ModelConfig.top_hidden_dims must be a list of sizes, e.g. "
                              "(50, 50)")
        for h in m.top_hidden_dims:
            _positive("ModelConfig.top_hidden_dims", h)
        if not isinstance(m.network, str) or not m.network:
            raise ConfigError(f"ModelConfig.network must be a name, got {m.network!r}")
        if not isinstance(m.likelihood_options, dict):
            raise ConfigError("ModelConfig.likelihood_options must be a dict of numbers")
        _choice("DataConfig.binarize", d.binarize, BINARIZE_MODES, allow_none=True)
        for name, value in [("DataConfig.train_limit", d.train_limit),
                            ("DataConfig.test_limit", d.test_limit)]:
            if value is not None:
                _positive(name, value)
        _seed("DataConfig.binarize_seed", d.binarize_seed)
        _positive("TrainConfig.epochs", t.epochs)
        _positive("TrainConfig.batch_size", t.batch_size)
        _positive("TrainConfig.num_particles", t.num_particles)
        _positive("TrainConfig.eval_batch_size", t.eval_batch_size)
        if isinstance(t.lr, bool) or not isinstance(t.lr, (int, float)) or not 0 < t.lr < float(
                "inf"):
            raise ConfigError(f"TrainConfig.lr must be a positive finite number, got {t.lr!r}")
        _seed("TrainConfig.seed", t.seed)
        _choice("TrainConfig.elbo", t.elbo, ELBOS)
        _choice("TrainConfig.objective", t.objective, OBJECTIVES)
        _choice("TrainConfig.lr_schedule", t.lr_schedule, LR_SCHEDULES)
        if isinstance(t.adam_eps, bool) or not isinstance(t.adam_eps, (int, float)) or \
                not 0 < t.adam_eps < 1:
            raise ConfigError(f"TrainConfig.adam_eps must be a number in (0, 1), "
                              f"got {t.adam_eps!r}")
        if not isinstance(t.kl_warmup, int) or isinstance(t.kl_warmup, bool) or t.kl_warmup < 0:
            raise ConfigError(f"TrainConfig.kl_warmup must be a whole number of epochs >= 0, "
                              f"got {t.kl_warmup!r}")
        if isinstance(t.beta, bool) or not isinstance(t.beta, (int, float)) or \
                not 0 < t.beta < float("inf"):
            raise ConfigError(f"TrainConfig.beta must be a positive finite number, "
                              f"got {t.beta!r}")
        if t.dreg and t.objective != "iwae":
            raise ConfigError("TrainConfig.dreg is a gradient of the IWAE bound; set "
                              "TrainConfig.objective = 'iwae'")
        if t.objective == "iwae" and (t.kl_warmup or t.beta != 1):
            raise ConfigError("TrainConfig.kl_warmup and TrainConfig.beta weight the ELBO's KL "
                              "term; use them with TrainConfig.objective = 'elbo'")
        if t.dreg and m.stochastic_layers == 2:
            raise ConfigError("TrainConfig.dreg stops each guide site's parameters, which is "
                              "exact for one stochastic layer only; set ModelConfig."
                              "stochastic_layers to 1, or train two layers without it")
        if t.objective == "iwae" and t.elbo != "trace":
            raise ConfigError("TrainConfig.elbo = 'meanfield' (analytic KL) has no IWAE "
                              "counterpart; leave TrainConfig.elbo at 'trace'")
        _choice("TrainConfig.device", t.device, DEVICES)
        _choice("TrainConfig.nan_policy", t.nan_policy, NAN_POLICIES)
        for name in ("fast_step", "tensorboard", "dreg"):
            if not isinstance(getattr(t, name), bool):
                raise ConfigError(f"TrainConfig.{name} must be true or false, "
                                  f"got {getattr(t, name)!r}")
        return self


def _positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _seed(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SEED:
        raise ConfigError(f"{name} must be an integer in [0, {MAX_SEED}], got {value!r}")


def _choice(name: str, value, choices, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
