"""Experiment tracking with TensorBoard (``torch.utils.tensorboard``).

With ``TrainConfig.tensorboard`` a run writes ``RUN_DIR/tensorboard/``, one step per epoch:

- scalars: ``elbo/train``, ``elbo/test``, ``test/log_likelihood``, ``test/kl``,
  ``speed/images_per_second``, ``optim/lr``, ``optim/skipped_steps``; and
  ``eval/<split>/log_px_K<K>`` (with ``elbo``, ``kl``) whenever the run is evaluated;
- images: ``reconstructions`` (inputs above their reconstructions), ``samples`` (prior
  samples, the likelihood's mean), ``traversals`` (rows: the latent dimensions with the
  largest KL);
- histograms: ``posterior_mean/z_<d>``, the posterior means of test images per dimension.

View it with ``tensorboard --logdir RUN_DIR/tensorboard``. The ``tensorboard`` package
is imported only when a run asks for it.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path

import torch

from . import files
from .errors import ConfigError
from .estimators import fixed_noise
from .latents import kl_per_dimension, prior_quantiles, traversals
from .model import VAE, evaluating

FOLDER = "tensorboard"
MAX_HISTOGRAMS = 32  # latent dimensions with a histogram each


def _writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch raises ImportError naming the package when it is missing
        raise ConfigError("{train.tensorboard} needs the tensorboard package; install it "
                          "(pip install 'pyro-vae[tensorboard]') or leave it off"
                          ) from None
    return SummaryWriter


def check_available() -> None:
    """Raise :class:`ConfigError` now (before training) if TensorBoard cannot be written."""
    _writer_class()


def _grid(images: torch.Tensor) -> torch.Tensor:
    """``(R, C, D)`` images of ``D = H * H`` pixels -> one ``(1, R*H, C*H)`` picture."""
    from torchvision.utils import make_grid  # here: importing torchvision takes seconds

    rows, cols, pixels = images.shape
    side = math.isqrt(pixels)
    return make_grid(images.reshape(rows * cols, 1, side, side), nrow=cols, padding=0)[:1] \
        .clamp(0, 1)


class TensorBoard:
    """Writes one run's events to ``run_path/tensorboard``.

    ``purge_step``: on resume, the first epoch to be written again; events of that epoch
    and later (from an interrupted attempt) are dropped, as metrics lines are.
    """

    def __init__(self, run_path: str | Path, purge_step: int | None = None):
        self.folder = Path(run_path) / FOLDER
        with files.folder(self.folder, root=run_path, create=True):  # no link followed
            pass
        _quiet_writer_threads(True)
        self.writer = _writer_class()(str(self.folder), purge_step=purge_step)

    def epoch(self, record: dict, lr: float) -> None:
        """The scalars of one metrics line."""
        step = record["epoch"]
        for tag, key in [("elbo/train", "train_elbo"), ("elbo/test", "test_elbo"),
                         ("test/log_likelihood", "test_log_likelihood"), ("test/kl", "test_kl"),
                         ("speed/images_per_second", "images_per_second"),
                         ("optim/skipped_steps", "skipped_steps"),
                         ("objective/train", "train_objective"), ("test/iwae", "test_iwae"),
                         ("optim/kl_weight", "kl_weight"), ("test/accuracy", "test_accuracy"),
                         ("validation/elbo", "validation_elbo"),
                         ("validation/accuracy", "validation_accuracy")]:
            if record.get(key) is not None:
                self.writer.add_scalar(tag, record[key], step)
        self.writer.add_scalar("optim/lr", lr, step)

    @torch.no_grad()
    def pictures(self, vae: VAE, test_x: torch.Tensor, step: int, seed: int = 0) -> None:
        """Reconstructions, prior samples, traversals and posterior-mean histograms."""
        if math.isqrt(vae.x_dim) ** 2 != vae.x_dim:  # not square images: scalars only
            return
        with evaluating(vae):
            self._pictures(vae, test_x, step, seed)
        self.flush()

    def _pictures(self, vae: VAE, test_x: torch.Tensor, step: int, seed: int) -> None:
        """Each picture the model has the methods for (pyro_vae.models' protocol)."""
        x, pool = test_x[:16], test_x[:1000]
        if hasattr(vae, "reconstruct"):
            pairs = torch.stack([x, vae.reconstruct(x)])  # (2, 16, D)
            self.writer.add_image("reconstructions", _grid(pairs.cpu()), step)
        if hasattr(vae, "sample_prior"):
            with fixed_noise(seed, x.device):
                samples = vae.sample_prior(64).mean.reshape(8, 8, -1)
            self.writer.add_image("samples", _grid(samples.cpu()), step)
        if hasattr(vae, "encode") and hasattr(vae, "decode"):
            kl = kl_per_dimension(vae, pool)
            dims = kl.argsort(descending=True)[:8].tolist()
            images = traversals(vae, test_x[0], dims, prior_quantiles(9, device=x.device))
            self.writer.add_image("traversals", _grid(images.cpu()), step)
        if hasattr(vae, "encode"):
            means = vae.encode(pool).loc.cpu()
            for d in range(min(vae.z_dim, MAX_HISTOGRAMS)):
                self.writer.add_histogram(f"posterior_mean/z_{d + 1}", means[:, d], step)

    def evaluation(self, result: dict) -> None:
        """An evaluation's results (``pyro_vae.evaluate_run``), at the run's epoch."""
        prefix = f"eval/{result['split']}"
        k, step = result["iwae_samples"], result["epoch"]
        self.writer.add_scalar(f"{prefix}/log_px_K{k}", result["log_px"], step)
        self.writer.add_scalar(f"{prefix}/elbo", result["elbo"], step)
        self.writer.add_scalar(f"{prefix}/kl", result["kl"], step)
        self.flush()

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        try:
            self.writer.close()
        finally:
            _quiet_writer_threads(False)


_hooks: list = []  # threading.excepthook before the first open writer, one per writer


def _quiet_writer_threads(on: bool) -> None:
    """While a writer is open, a failure of its background thread (a full disk, a folder
    made read-only) is not printed as a thread's traceback: the writer raises it again in
    the training's own thread at its next call, where it is reported in one line."""
    if on:
        _hooks.append(threading.excepthook)
        if len(_hooks) == 1:
            threading.excepthook = _writer_thread_hook
    elif _hooks:
        previous = _hooks.pop()
        if not _hooks:
            threading.excepthook = previous


def _writer_thread_hook(args) -> None:
    if type(args.thread).__name__ != "_AsyncWriterThread":  # tensorboard's writer thread
        (_hooks[0] if _hooks else threading.__excepthook__)(args)
