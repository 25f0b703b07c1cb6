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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyro
import torch
from pyro.infer import JitTrace_ELBO, JitTraceMeanField_ELBO, Trace_ELBO, TraceMeanField_ELBO
from tqdm.auto import tqdm

from . import data as data_mod
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import RunConfig
from .data import prepare_splits
from .distributed import Context, ELBOLoss, init_from_env
from .errors import CheckpointError, ConfigError, RunDirError, TrainingDiverged
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
    ctx = init_from_env(device)
    try:
        return _train(config, ctx, ctx.device(device), run_dir, state, resume is None, force,
                      progress)
    finally:
        ctx.close()


@dataclass
class _Loop:
    """What one epoch of training needs."""

    run: Run
    vae: VAE
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[torch.Tensor], torch.Tensor]
    batches: data_mod.DeviceBatches
    test_x: torch.Tensor
    stop: _StopRequest
    writer: RunDir | None  # the run folder on the process that writes it (rank 0), else None
    show: bool
    ctx: Context


def _train(config, ctx, device, run_dir, state, new_run, force, progress) -> Run:
    if ctx.distributed and config.train.jit:
        raise ConfigError("--jit is not supported with torchrun; drop --jit")
    writer = run_dir if ctx.is_main else None
    failure = None
    if writer is not None and new_run:
        try:
            writer.claim(force=force)
        except RunDirError as e:
            failure = e
    if ctx.any(failure is not None, device):
        raise failure or RunDirError("rank 0 could not use the run folder; see its message")

    pyro.set_rng_seed(config.train.seed + ctx.rank)  # independent noise per rank
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
        history = run_dir.truncate_metrics(start_epoch) if writer else []
        if partial is not None and ctx.distributed:
            log.warning("the checkpoint stopped inside epoch %d; with torchrun that epoch "
                        "restarts from its first step", start_epoch + 1)
            partial = None
        log.info("resuming %s after epoch %d%s", run_dir.path, start_epoch,
                 f" (step {partial['step']} of epoch {start_epoch + 1})" if partial else "")
    if writer is not None:
        writer.write_config(config)

    num_data = len(train_x)
    jit_prefix = None
    if ctx.distributed:
        loss_fn = ctx.wrap(ELBOLoss(vae, make_elbo(config), num_data), device)
    else:
        loss_fn, jit_prefix = make_loss(vae, config, num_data)
    batches = data_mod.DeviceBatches(train_x, config.train.batch_size,
                                     dynamic=config.data.binarize == "dynamic",
                                     seed=config.train.seed, rank=ctx.rank,
                                     world_size=ctx.world_size)
    run = Run(run_dir.path if run_dir else None, config, vae, history)
    show = ctx.is_main and (progress if progress is not None else _stderr_is_terminal())
    try:
        with _StopRequest().installed() as stop:
            loop = _Loop(run, vae, optimizer, loss_fn, batches, test_x[ctx.rank::ctx.world_size],
                         stop, writer, show, ctx)
            for epoch in range(start_epoch + 1, config.train.epochs + 1):
                if ctx.distributed:  # noise per (rank, epoch): resumable on any world size
                    torch.manual_seed(config.train.seed * 1_000_003 + epoch * 1009 + ctx.rank)
                record = _train_epoch(loop, epoch, partial, len(data.test_x))
                partial = None
                if record is None:
                    run.interrupted = True
                    break
                history.append(record)
                if writer is not None:
                    writer.append_metrics(record)
                    save_checkpoint(writer.checkpoint, _state(config, epoch, vae, optimizer))
                log.info("epoch %d: train ELBO %.2f, test ELBO %.2f nats/image (%.1f s)",
                         epoch, record["train_elbo"], record["test_elbo"], record["seconds"])
                if ctx.any(stop.signum is not None, device) and epoch < config.train.epochs:
                    run.interrupted = True
                    break
    finally:
        if jit_prefix is not None:
            store = pyro.get_param_store()
            for name in [n for n in store.keys() if n.startswith(jit_prefix)]:
                del store[name]
    vae.eval()
    return run


def _train_epoch(loop: _Loop, epoch: int, partial: dict | None, num_test: int) -> dict | None:
    """One epoch; the metrics record, or None if stopped (after saving a partial state).

    Non-finite losses or gradients: under ``nan_policy="stop"`` the first such step is
    recorded on the device (no host sync per step) and :class:`TrainingDiverged` is raised
    at the end of the epoch, before anything is written; under ``"skip"`` each step is
    checked on the host and skipped (no parameter update), and the count is reported.
    With torchrun, a stop request ends the run after the current epoch.
    """
    run, batches, ctx = loop.run, loop.batches, loop.ctx
    device = batches.x.device
    num_data = len(batches.x)
    skip = run.config.train.nan_policy == "skip"
    if partial is not None:
        perm, step, seconds = partial["perm"].to(device), partial["step"], partial["seconds"]
        loss_sum, skipped = partial["loss_sum"].to(device), partial["skipped_steps"]
    else:
        perm, step, seconds = batches.permutation(epoch), 0, 0.0
        loss_sum, skipped = torch.zeros((), device=device), 0
    first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first non-finite step
    params = [p for p in loop.vae.parameters() if p.requires_grad]
    loop.vae.train()
    bar = tqdm(total=len(batches), initial=step, desc=f"epoch {epoch}/{run.config.train.epochs}",
               disable=not loop.show, leave=False, unit="batch")
    start = time.perf_counter()
    for xb in batches.batches(perm, step):
        try:
            loss = loop.loss_fn(xb)  # scaled to the full data set: N / B * sum over the batch
        except ValueError as e:  # a distribution's validation met non-finite parameters
            if "invalid values" not in str(e):
                raise
            bad = int(first_bad)
            raise _diverged(epoch, bad if bad >= 0 else step, len(batches), loop.writer
                            ) from None
        loop.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # a non-finite value anywhere in the loss or the gradients makes this non-finite
        finite = torch.isfinite(loss.detach() + torch.stack(
            torch._foreach_norm([p.grad for p in params if p.grad is not None])).sum())
        if skip and not bool(finite):  # host sync, accepted only under --nan-policy skip
            skipped += 1
        else:
            first_bad = torch.where((first_bad < 0) & ~finite, step, first_bad)
            loop.optimizer.step()
            loss_sum += loss.detach() * (xb.shape[0] / num_data)  # sum over batch of -ELBO
        step += 1
        bar.update()
        if loop.stop.signum is not None and not ctx.distributed:
            break
    bar.close()
    seconds += time.perf_counter() - start
    bad = int(first_bad)
    if ctx.any(bad >= 0, device):
        raise _diverged(epoch, max(bad, 0), len(batches), loop.writer)
    if step < len(batches):
        if loop.writer is not None:
            partial = {"step": step, "perm": perm.cpu(), "loss_sum": loss_sum.cpu(),
                       "seconds": seconds, "skipped_steps": skipped}
            save_checkpoint(loop.writer.checkpoint,
                            _state(run.config, epoch - 1, loop.vae, loop.optimizer, partial))
            log.warning("stopped in epoch %d at step %d of %d; saved, continue with "
                        "pyro-vae train --resume %s", epoch, step, len(batches),
                        loop.writer.path)
        return None
    if skipped:
        log.warning("epoch %d: skipped %d of %d steps with a non-finite loss or gradient",
                    epoch, skipped, len(batches))
    test = elbo_terms(loop.vae, loop.test_x, run.config.train.eval_batch_size,
                      seed=run.config.train.seed)
    # sums over this rank's images, then over ranks: one transfer per epoch
    sums = ctx.sum(torch.stack([loss_sum, test.elbo.sum(), test.log_likelihood.sum(),
                                test.kl.sum(), torch.tensor(float(skipped), device=device)]))
    sums = sums.tolist()
    trained = batches.num_local * ctx.world_size - sums[4] * batches.batch_size
    return {
        "epoch": epoch,
        "train_elbo": -sums[0] / max(trained, 1),  # exact unless a last, smaller batch skipped
        "test_elbo": sums[1] / num_test,
        "test_log_likelihood": sums[2] / num_test,
        "test_kl": sums[3] / num_test,
        "seconds": seconds,
        "images_per_second": batches.num_local * ctx.world_size / seconds,
        "skipped_steps": int(sums[4]),
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
