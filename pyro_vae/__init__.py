"""pyro-vae: variational autoencoders as Pyro model/guide functions, trained with SVI."""

__version__ = "0.1.0"

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
from .evaluate import elbo_terms, log_weights
from .likelihoods import Likelihood, available_likelihoods, get_likelihood, register_likelihood
from .model import VAE, build_vae
from .rundir import Run, load_run
from .train import train

__all__ = [
    "VAE", "Run", "RunConfig", "ModelConfig", "DataConfig", "TrainConfig", "Dataset",
    "Likelihood", "PyroVAEError", "ConfigError", "DataError", "CheckpointError", "RunDirError",
    "TrainingDiverged",
    "available_likelihoods", "build_vae", "elbo_terms", "get_likelihood", "load_dataset",
    "load_run", "log_weights", "register_likelihood", "train",
]
