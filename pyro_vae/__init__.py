"""pyro-vae: variational autoencoders as Pyro model/guide functions, trained with SVI.

The names below are imported on first use (PEP 562), so ``import pyro_vae`` -- and the
``pyro-vae`` command's start, before it can answer a Ctrl-C -- does not wait for torch.
"""

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# the public names, by the module that defines each
_MODULES = {
    "commands": "calibrate diagnose_run evaluate evaluate_run read_evaluations sample "
                "write_figures",
    "config": "DataConfig ModelConfig RunConfig TrainConfig",
    "data": "Dataset load_dataset",
    "errors": "CheckpointError ConfigError DataError PyroVAEError RunDirError TrainingDiverged",
    "estimators": "elbo_terms importance_log_likelihood log_weights",
    "export": "to_inference_data",
    "likelihoods": "Likelihood available_likelihoods get_likelihood register_likelihood",
    "model": "VAE TwoLayerVAE",
    "models": "available_models register_model",
    "networks": "available_networks register_network",
    "objective": "Objective SyncFreeTrace_ELBO SyncFreeTraceEnum_ELBO "
                 "SyncFreeTraceMeanField_ELBO make_elbo",
    "plots": "figures_for_run",
    "runner.resolve": "build_vae",
    "runner.rundir": "Run load_run",
    "runner.step": "Trainer",
    "runner.train": "train",
    "semisupervised": "M2",
}
_WHERE = {name: module for module, names in _MODULES.items() for name in names.split()}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'pyro_vae' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})


if TYPE_CHECKING:  # what the names are, for type checkers and editors
    from .commands import (
        calibrate,
        diagnose_run,
        evaluate,
        evaluate_run,
        read_evaluations,
        sample,
        write_figures,
    )
    from .config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from .data import Dataset, load_dataset
    from .errors import (
        CheckpointError,
        ConfigError,
        DataError,
        PyroVAEError,
        RunDirError,
        TrainingDiverged,
    )
    from .estimators import elbo_terms, importance_log_likelihood, log_weights
    from .export import to_inference_data
    from .likelihoods import Likelihood, available_likelihoods, get_likelihood, register_likelihood
    from .model import VAE, TwoLayerVAE
    from .models import available_models, register_model
    from .networks import available_networks, register_network
    from .objective import (
        Objective,
        SyncFreeTrace_ELBO,
        SyncFreeTraceEnum_ELBO,
        SyncFreeTraceMeanField_ELBO,
        make_elbo,
    )
    from .plots import figures_for_run
    from .runner.resolve import build_vae
    from .runner.rundir import Run, load_run
    from .runner.step import Trainer
    from .runner.train import train
    from .semisupervised import M2

__all__ = [
    "VAE", "TwoLayerVAE", "M2", "Run", "RunConfig", "ModelConfig", "DataConfig",
    "TrainConfig", "Dataset", "Likelihood", "Objective", "Trainer", "SyncFreeTrace_ELBO",
    "SyncFreeTraceMeanField_ELBO", "SyncFreeTraceEnum_ELBO",
    "PyroVAEError", "ConfigError", "DataError", "CheckpointError", "RunDirError",
    "TrainingDiverged",
    "available_likelihoods", "available_models", "available_networks", "build_vae",
    "calibrate", "diagnose_run", "elbo_terms", "evaluate", "evaluate_run", "figures_for_run",
    "get_likelihood", "importance_log_likelihood", "load_dataset", "load_run", "log_weights",
    "make_elbo", "read_evaluations", "register_likelihood", "register_model",
    "register_network", "sample", "to_inference_data", "train", "write_figures",
]
