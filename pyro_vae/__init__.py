"""pyro-vae: variational autoencoders as Pyro model/guide functions, trained with SVI."""

__version__ = "0.1.0"

from .commands import (
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
    "diagnose_run", "elbo_terms", "evaluate", "evaluate_run", "figures_for_run",
    "get_likelihood", "importance_log_likelihood", "load_dataset", "load_run", "log_weights",
    "make_elbo", "read_evaluations", "register_likelihood", "register_model",
    "register_network", "sample", "train", "write_figures",
]
