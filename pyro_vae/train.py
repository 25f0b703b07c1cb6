"""Stochastic variational inference: fit model and guide by maximizing the ELBO.

The loss is Pyro's ``Trace_ELBO`` (or ``TraceMeanField_ELBO``, which uses the analytic
KL) of the VAE's ``model`` and ``guide``, scaled to the full data set, minimized with
``torch.optim.Adam`` over the networks' parameters. This is what ``pyro.infer.SVI.step``
does, minus its ``loss.item()`` per step: the epoch's loss is summed on the device and
read once per epoch.

Per epoch, the run folder receives a line in ``metrics.jsonl`` and then an atomically
written ``checkpoint.pt`` with model, optimizer and RNG state, so ``resume`` continues
exactly where the run stopped. SIGINT (Ctrl-C) and SIGTERM stop training between two
steps and save a mid-epoch checkpoint that resumes exactly too.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import signal
import threading
import time
import warnings
from pathlib import Path

import pyro
import torch
from pyro.infer import JitTrace_ELBO, JitTraceMeanField_ELBO, Trace_ELBO, TraceMeanField_ELBO
from tqdm.auto import tqdm

from . import data as data_mod
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import RunConfig
from .data import prepare_splits
from .errors import CheckpointError, ConfigError, TrainingDiverged
from .evaluate import elbo_terms
from .model import VAE, build_vae
from .rundir import Run, RunDir

log = logging.getLogger(__name__)

_ELBOS = {
    ("trace", False): Trace_ELBO,
    ("trace", True): JitTrace_ELBO,
    ("meanfield", False): TraceMeanField_ELBO,
    ("meanfield", True): JitTraceMeanField_ELBO,
}
_jit_names = itertools.count()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but no CUDA device is available; use --device cpu")
    return torch.device(name)


def make_elbo(config: RunConfig):
    """The Pyro ELBO object named by the training settings."""
    t = config.train
    options = {"ignore_jit_warnings": True} if t.jit else {}
    return _ELBOS[t.elbo, t.jit](
        num_particles=t.num_particles,
        vectorize_particles=t.num_particles > 1,
        max_plate_nesting=1,
        **options,
    )


class _StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked between steps (a second one aborts)."""

    def __init__(self):
        self.signum: int | None = None

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("stopping after this step (press Ctrl-C again to abort at once)")

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)


def make_loss(vae: VAE, config: RunConfig, num_data: int):
    """The training loss ``x -> differentiable loss`` and, under JIT, a param-store prefix.

    Returns ``(loss_fn, prefix)``. With ``--jit`` Pyro's compiled ELBO needs the networks
    in its global parameter store; they are registered under the unique ``prefix``, which
    the caller removes when training ends (``prefix`` is ``None`` without JIT).
    """
    elbo = make_elbo(config)
    if not config.train.jit:
        return lambda x: elbo.differentiable_loss(vae.model, vae.guide, x, num_data), None
    prefix = f"pyro_vae_jit{next(_jit_names)}"

    def model(x, batch_size):
        pyro.module(f"{prefix}_decoder", vae.decoder)
        vae.model(x, num_data)

    def guide(x, batch_size):
        pyro.module(f"{prefix}_encoder", vae.encoder)
        vae.guide(x, num_data)

    def loss(x):
        # the batch size is a keyword so that Pyro compiles one trace per batch shape
        # (the plate's size and the N / B scale are constants inside a trace)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.jit.trace. is deprecated")
            return elbo.differentiable_loss(model, guide, x, batch_size=x.shape[0])

    return loss, prefix


def train(
    config: RunConfig | None = None,
    out: str | Path | None = None,
    *,
    resume: str | Path | None = None,
    epochs: int | None = None,
    force: bool = False,
    progress: bool | None = None,
) -> Run:
    """Train a VAE; return the :class:`~pyro_vae.rundir.Run`.

    Parameters
    ----------
    config:
        Settings for a new run (default: :class:`RunConfig` defaults). Ignored on resume,
        where the run folder's ``config.json`` is used.
    out:
        Run folder to write; ``None`` trains in memory only.
    resume:
        A run folder to continue from its last checkpoint, up to ``epochs`` in total.
    force:
        Replace the run held by ``out`` instead of refusing.
    progress:
        Show a progress bar (default: when stderr is a terminal).
    """
    if resume is not None:
        run_dir = RunDir(resume)
        config = run_dir.read_config()
        state = load_checkpoint(run_dir.checkpoint)
        _check_compatible(config, state, run_dir)
    else:
        config = RunConfig.from_dict(config.to_dict()) if config is not None else RunConfig()
        run_dir, state = (RunDir(out) if out is not None else None), None
    if epochs is not None:
        config.train.epochs = epochs
    config.validate()
    device = resolve_device(config.train.device)
    if run_dir is not None and resume is None:
        run_dir.claim(force=force)

    pyro.set_rng_seed(config.train.seed)
    data, train_x, test_x = prepare_splits(config, device)
    vae = build_vae(config).to(device)
    optimizer = torch.optim.Adam(vae.parameters(), lr=config.train.lr)
    history: list[dict] = []
    start_epoch, partial = 0, None
    if state is not None:
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        start_epoch, partial = state["epoch"], state.get("partial")
        history = run_dir.truncate_metrics(start_epoch)
        log.info("resuming %s after epoch %d%s", run_dir.path, start_epoch,
                 f" (step {partial['step']} of epoch {start_epoch + 1})" if partial else "")
    if run_dir is not None:
        run_dir.write_config(config)

    loss_fn, jit_prefix = make_loss(vae, config, num_data=len(train_x))
    batches = data_mod.DeviceBatches(train_x, config.train.batch_size,
                                     dynamic=config.data.binarize == "dynamic")
    run = Run(run_dir.path if run_dir else None, config, vae, history)
    show = progress if progress is not None else _stderr_is_terminal()
    try:
        with _StopRequest().installed() as stop:
            for epoch in range(start_epoch + 1, config.train.epochs + 1):
                record = _train_epoch(run, epoch, vae, optimizer, loss_fn, batches, test_x,
                                      partial, stop, run_dir, show)
                partial = None
                if record is None:
                    run.interrupted = True
                    break
                history.append(record)
                if run_dir is not None:
                    run_dir.append_metrics(record)
                    save_checkpoint(run_dir.checkpoint, _state(config, epoch, vae, optimizer))
                log.info("epoch %d: train ELBO %.2f, test ELBO %.2f nats/image (%.1f s)",
                         epoch, record["train_elbo"], record["test_elbo"], record["seconds"])
                if stop.signum is not None and epoch < config.train.epochs:
                    run.interrupted = True
                    break
    finally:
        if jit_prefix is not None:
            store = pyro.get_param_store()
            for name in [n for n in store.keys() if n.startswith(jit_prefix)]:
                del store[name]
    vae.eval()
    return run


def _train_epoch(run, epoch, vae, optimizer, loss_fn, batches, test_x, partial, stop,
                 run_dir, show):
    """One epoch; the metrics record, or None if stopped (after saving a partial state).

    Non-finite losses or gradients: under ``nan_policy="stop"`` the first such step is
    recorded on the device (no host sync per step) and :class:`TrainingDiverged` is raised
    at the end of the epoch, before anything is written; under ``"skip"`` each step is
    checked on the host and skipped (no parameter update), and the count is reported.
    """
    n, device = len(batches.x), batches.x.device
    skip = run.config.train.nan_policy == "skip"
    if partial is not None:
        perm, step, seconds = partial["perm"].to(device), partial["step"], partial["seconds"]
        loss_sum, skipped = partial["loss_sum"].to(device), partial["skipped_steps"]
    else:
        perm, step, seconds = batches.permutation(), 0, 0.0
        loss_sum, skipped = torch.zeros((), device=device), 0
    first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first non-finite step
    params = [p for p in vae.parameters() if p.requires_grad]
    vae.train()
    bar = tqdm(total=len(batches), initial=step, desc=f"epoch {epoch}/{run.config.train.epochs}",
               disable=not show, leave=False, unit="batch")
    start = time.perf_counter()
    for xb in batches.batches(perm, step):
        try:
            loss = loss_fn(xb)  # scaled to the full data set: N / B * sum over the batch
        except ValueError as e:  # a distribution's validation met non-finite parameters
            if "invalid values" not in str(e):
                raise
            bad = int(first_bad)
            raise _diverged(epoch, bad if bad >= 0 else step, len(batches), run_dir) from None
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # a non-finite value anywhere in the loss or the gradients makes this non-finite
        finite = torch.isfinite(loss.detach() + torch.stack(
            torch._foreach_norm([p.grad for p in params if p.grad is not None])).sum())
        if skip and not bool(finite):  # host sync, accepted only under --nan-policy skip
            skipped += 1
        else:
            first_bad = torch.where((first_bad < 0) & ~finite, step, first_bad)
            optimizer.step()
            loss_sum += loss.detach() * (xb.shape[0] / n)  # sum over the batch of -ELBO
        step += 1
        bar.update()
        if stop.signum is not None:
            break
    bar.close()
    seconds += time.perf_counter() - start
    if (bad := int(first_bad)) >= 0:
        raise _diverged(epoch, bad, len(batches), run_dir)
    if step < len(batches):
        if run_dir is not None:
            partial = {"step": step, "perm": perm.cpu(), "loss_sum": loss_sum.cpu(),
                       "seconds": seconds, "skipped_steps": skipped}
            save_checkpoint(run_dir.checkpoint,
                            _state(run.config, epoch - 1, vae, optimizer, partial))
            log.warning("stopped in epoch %d at step %d of %d; saved, continue with "
                        "pyro-vae train --resume %s", epoch, step, len(batches), run_dir.path)
        return None
    if skipped:
        log.warning("epoch %d: skipped %d of %d steps with a non-finite loss or gradient",
                    epoch, skipped, len(batches))
    test = elbo_terms(vae, test_x, run.config.train.eval_batch_size, seed=run.config.train.seed)
    means = test.mean()
    trained_images = n - skipped * batches.batch_size  # approximate when the last batch skips
    return {
        "epoch": epoch,
        "train_elbo": -loss_sum.item() / max(trained_images, 1),
        "test_elbo": means["elbo"],
        "test_log_likelihood": means["log_likelihood"],
        "test_kl": means["kl"],
        "seconds": seconds,
        "images_per_second": n / seconds,
        "skipped_steps": skipped,
    }


def _diverged(epoch: int, step: int, num_steps: int, run_dir) -> TrainingDiverged:
    if run_dir is None:
        kept = "nothing was written"
    elif epoch == 1:
        kept = f"nothing of this run is checkpointed yet in {run_dir.path}"
    else:
        kept = f"{run_dir.path} still holds epoch {epoch - 1}, untouched"
    return TrainingDiverged(
        f"non-finite loss or gradient in epoch {epoch} at step {step + 1} of {num_steps}; "
        f"{kept}. Likely causes: a learning rate too high (lower --lr), data outside the "
        "likelihood's support, or a collapsing learned scale; fix and --resume, or train "
        "with --nan-policy skip"
    )


def _state(config, epoch, vae, optimizer, partial=None) -> dict:
    return {"config": config.to_dict(), "epoch": epoch, "model": vae.state_dict(),
            "optimizer": optimizer.state_dict(), "rng": rng_state(), "partial": partial}


def _check_compatible(config: RunConfig, state: dict, run_dir: RunDir) -> None:
    saved = state.get("config", {}).get("model")
    if saved != config.to_dict()["model"]:
        raise CheckpointError(
            f"{run_dir.checkpoint} was written for another model than {run_dir.config} "
            "describes (likelihood, z-dim or network differ); restore the matching config.json"
        )


def _stderr_is_terminal() -> bool:
    import sys

    return sys.stderr is not None and sys.stderr.isatty()
