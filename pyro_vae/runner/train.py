"""Stochastic variational inference: :func:`train` fits a VAE and writes its run folder.

The steps, in order: check every setting, load and resolve the data, claim the run folder
(only now is anything written or replaced), build the VAE, its
:class:`~pyro_vae.objective.Objective` and :class:`~pyro_vae.runner.step.Trainer`, then
per epoch: train, evaluate the test ELBO, append a metrics line, write the checkpoint.
SIGINT (Ctrl-C) and SIGTERM stop training between two steps and save a mid-epoch
checkpoint that resumes exactly.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from pathlib import Path

import pyro
import torch

from .. import seeds
from ..config import RunConfig
from ..data import DeviceBatches
from ..errors import CheckpointError, ConfigError, RunDirError, TrainingDiverged, get_logger
from ..estimators import correct, elbo_terms, importance_log_likelihood
from ..objective import Objective, kl_weight, learning_rate, make_elbo
from ..progress import Progress
from ..registry import MAIN
from ..semisupervised import partial_labels
from ..tracking import TensorBoard, check_available
from .allocator import keep_freed_memory
from .compiling import compile_gather, compile_step, remember_compiled, use_inductor_cache
from .distributed import Context, init_from_env
from .resolve import build_vae, check_config, check_memory, resolve, resolve_device
from .rundir import Run, RunDir
from .signals import StopRequest
from .state import (
    EpochProgress,
    TrainingState,
    capture_rng,
    check_matches,
    load_state,
    restore_rng,
    save_state,
)
from .step import Diverged, Trainer
from .threads import ThreadTuner

log = get_logger(__name__)


def train(
    config: RunConfig | None = None,
    out: str | Path | None = None,
    *,
    resume: str | Path | None = None,
    epochs: int | None = None,
    force: bool = False,
    progress: bool | None = None,
) -> Run:
    """Train a VAE with ``config`` into the run folder ``out`` (``None``: in memory), or
    continue the run folder ``resume`` with its own ``config.json``, up to ``epochs`` in
    all; return the :class:`~pyro_vae.runner.rundir.Run`. ``force`` replaces a run that
    ``out`` holds; ``progress=False`` shows no bar (default: a bar on a terminal)."""
    use_inductor_cache()  # before torchvision or tracing import Dynamo (see there)
    state = None
    if resume is not None:
        run_dir = RunDir(resume)
        config = run_dir.read_config()
        if not run_dir.checkpoint.exists():
            raise CheckpointError(f"{run_dir.path} has not finished an epoch, so there is "
                                  "nothing to resume; start it again with {force}")
        state = load_state(run_dir.checkpoint)
        check_matches(config, state, str(run_dir.path))
        _check_fits(config, state, run_dir)
        saved = state.run_config().train
        if state.partial is not None and saved.batch_size != config.train.batch_size:
            raise ConfigError(f"the checkpoint in {run_dir.path} stopped inside an epoch with "
                              f"{{train.batch_size}} {saved.batch_size}; resume with that "
                              "batch size")
    else:
        config = RunConfig.from_dict(config.to_dict()) if config is not None else RunConfig()
        run_dir = RunDir(out) if out is not None else None
    if epochs is not None:
        config.train.epochs = epochs
    check_config(config)
    for kind, name, module in [("likelihood", config.model.likelihood,
                                 config.model.likelihood_module),
                                ("network", config.model.network, config.model.network_module)]:
        if run_dir is not None and module == MAIN:
            log.warning("%s %s is defined in %s (a script or notebook cell): no other "
                        "process can use this run (evaluate, plot, resume); define it in a "
                        "module instead", kind, name, MAIN)
    if state is not None and config.train.epochs < state.epoch:
        raise ConfigError(f"{{train.epochs}} is {config.train.epochs}, but the run in "
                          f"{run_dir.path} has finished {state.epoch} epochs already; "
                          "ask for at least that many")
    if run_dir is not None:  # before the data loads: planted links, a file for a folder
        run_dir.check_links(tensorboard=config.train.tensorboard)
    if config.train.tensorboard:
        if run_dir is None:
            raise ConfigError("{train.tensorboard} writes into the run folder; give an "
                              "{out}, or leave {train.tensorboard} off")
        check_available()
    device = resolve_device(config.train.device)
    ctx = init_from_env(device)
    try:
        run = _train(config, ctx, ctx.device(device), run_dir, state, force, progress)
    except BaseException:
        ctx.close(wait=False)  # another rank may be gone: do not wait for it
        raise
    ctx.close()
    return run


def _train(config: RunConfig, ctx: Context, device, run_dir: RunDir | None,
           state: TrainingState | None, force: bool, progress: bool | None) -> Run:
    writer = run_dir if ctx.is_main else None  # the process that writes the run folder
    # data and model first: a setting that fails there changes nothing on disk
    splits = resolve(config, device, recorded=state is not None)
    check_memory(config, device, num_train=len(splits.train_x))
    pyro.set_rng_seed(seeds.process(config.train.seed, ctx.rank))  # noise per rank
    vae = build_vae(config).to(device)
    labels = _give_labels(config, vae, splits)
    elbo = make_elbo(config.train, enumerated=getattr(vae, "enumerated", False))
    with contextlib.ExitStack() as held:
        failure = None
        if writer is not None:
            try:
                if state is None:
                    writer.check_claimable(force)  # before the lock creates the folder
                writer.check_links(tensorboard=config.train.tensorboard)
                held.enter_context(writer.writing())  # one writer per run folder
                if state is None:
                    writer.claim(force=force)
            except RunDirError as e:
                failure = e
        if ctx.any(failure is not None, device):
            raise failure or RunDirError("rank 0 could not use the run folder; see its message")
        if writer is not None and labels is not None:
            writer.write_labels((labels >= 0).nonzero().flatten().tolist(), config.train.seed)
        return _fit(config, ctx, device, run_dir, writer, splits, vae, elbo, labels, state,
                    progress)


def _give_labels(config: RunConfig, vae, splits) -> torch.Tensor | None:
    """Hand a model that learns from labels (``set_labels``) the training labels it may
    use; return them (-1 where unknown; ``None`` for other models)."""
    if not hasattr(vae, "set_labels"):
        for name, value in (("labels", config.data.labels),
                            ("labelled_every", config.data.labelled_every or None)):
            if value is not None:
                raise ConfigError(f"{{data.{name}}} is for models that learn from labels "
                                  f"(m2); model '{config.model.name}' does not; leave it out")
        return None
    labels = partial_labels(splits.train_y, config.data.labels, config.train.seed)
    vae.set_labels(labels)
    log.info("%d of %d training images labelled", int((labels >= 0).sum()), len(labels))
    return labels


def _fit(config: RunConfig, ctx: Context, device, run_dir: RunDir | None,
         writer: RunDir | None, splits, vae, elbo, labels: torch.Tensor | None,
         state: TrainingState | None, progress: bool | None) -> Run:
    """Build objective and trainer, restore a checkpoint, run the epochs. Labelled images
    (``labels`` >= 0) come in batches of their own, as in Pyro's ss-vae example."""
    num_data = len(splits.train_x)
    weighted = config.train.kl_warmup > 0 or config.train.beta != 1
    objective = Objective(vae, elbo, num_data, weighted_kl=weighted)
    config.train.compile_step = compile_step(config, num_data, device)  # recorded
    trainer = Trainer(objective, config.train.lr, fast=config.train.fast_step,
                      nan_policy=config.train.nan_policy, eps=config.train.adam_eps,
                      beta1=config.train.adam_beta1, compile=config.train.compile_step,
                      compile_batch=config.train.batch_size,
                      module=ctx.wrap(objective, device) if ctx.distributed else None)
    history: list[dict] = []
    start_epoch, partial = 0, None
    if state is not None:
        _restore(state, vae, trainer, run_dir, learning_rate(config.train, state.epoch + 1))
        start_epoch, partial = state.epoch, state.partial
        history = run_dir.truncate_metrics(start_epoch) if writer else []
        if partial is not None and ctx.distributed:
            log.warning("the checkpoint stopped inside epoch %d; with torchrun that epoch "
                        "restarts from its first step", start_epoch + 1)
            partial = None
        log.info("resuming %s after epoch %d%s", run_dir.path, start_epoch,
                 f" (step {partial['step']} of epoch {start_epoch + 1})" if partial else "")
    if writer is not None:
        writer.write_config(config)

    apart = None if labels is None else labels >= 0
    if apart is not None and ctx.distributed:
        log.info("under torchrun, labelled and unlabelled images share batches")
        apart = None
    batches = DeviceBatches(splits.train_x, config.train.batch_size,
                            dynamic=config.data.binarize == "dynamic",
                            seed=config.train.seed, rank=ctx.rank, world_size=ctx.world_size,
                            apart=apart, apart_every=config.data.labelled_every)
    run = Run(run_dir.path if run_dir else None, config, vae, history, splits)
    # a bar on a terminal; elsewhere the per-epoch log line is the progress
    show = "bar" if ctx.is_main and progress is not False else False

    def checkpoint(epoch: int, progress_: EpochProgress | None = None) -> None:
        save_state(writer.checkpoint, TrainingState(
            config.to_dict(), epoch, vae.state_dict(), trainer.optimizer.state_dict(),
            capture_rng(), progress_.to_dict() if progress_ is not None else None))

    board = None
    if writer is not None and config.train.tensorboard:
        board = TensorBoard(writer.path, purge_step=start_epoch + 1)
    threads = ThreadTuner() if device.type == "cpu" else None
    if device.type == "cpu":
        keep_freed_memory()  # each step's buffers reused without page faults
    with contextlib.ExitStack() as cleanup, StopRequest().installed() as stop:
        if board is not None:
            cleanup.callback(board.close)
        if threads is not None:
            cleanup.callback(threads.close)
        for epoch in range(start_epoch + 1, config.train.epochs + 1):
            if ctx.distributed:  # noise per (rank, epoch): resumable on any world size
                torch.manual_seed(seeds.rank_epoch(config.train.seed, epoch, ctx.rank))
            if weighted:
                objective.set_kl_weight(kl_weight(config.train, epoch))
            trainer.set_lr(learning_rate(config.train, epoch))
            begun = (EpochProgress.from_dict(partial, device) if partial is not None
                     else EpochProgress(batches.permutation(epoch)))
            partial = None
            bar = Progress(len(batches), f"epoch {epoch}/{config.train.epochs}", show=show,
                           initial=begun.step)
            try:
                done = fit_epoch(
                    trainer, batches, begun, bar=bar, threads=threads,
                    should_stop=(lambda: False) if ctx.distributed else (lambda: stop.requested))
            except Diverged as e:
                failed = True
                step = e.step
            else:
                failed, step = False, done.step
            finally:
                bar.close()
            if ctx.any(failed, device):
                raise _diverged(epoch, step if failed else 0, len(batches), writer)
            if done.step < len(batches):  # stopped by a signal, between two steps
                if writer is not None:
                    checkpoint(epoch - 1, done)
                    log.warning("stopped in epoch %d at step %d of %d; saved", epoch,
                                done.step, len(batches))
                run.interrupted = True
                break
            if done.skipped_steps:
                log.warning("epoch %d: skipped %d of %d steps with a non-finite loss or "
                            "gradient", epoch, done.skipped_steps, len(batches))
            record = _record(epoch, done, vae, splits, batches, ctx, config)
            if trainer.compile_seconds:  # this epoch's compilations (part of its seconds)
                record["compile_seconds"] = trainer.compile_seconds
                trainer.compile_seconds = 0.0
                if trainer.compile:  # compiled, not fallen back: a later run finds it
                    remember_compiled(config)
            history.append(record)
            if writer is not None:
                writer.append_metrics(record)
                checkpoint(epoch)
            if board is not None:
                board.epoch(record, learning_rate(config.train, epoch))
                board.pictures(vae, splits.test_x, epoch, seed=config.train.seed)
            log.info("epoch %d: %s, test ELBO %.2f nats/image%s (%.1f s)", epoch,
                     train_summary(record), record["test_elbo"],
                     f", test accuracy {record['test_accuracy']:.4f}"
                     if "test_accuracy" in record else "", record["seconds"])
            if ctx.any(stop.requested, device) and epoch < config.train.epochs:
                run.interrupted = True
                break
    vae.eval()
    return run


def fit_epoch(trainer: Trainer, batches: DeviceBatches, progress: EpochProgress, *,
              should_stop: Callable[[], bool] = lambda: False,
              bar: Progress | None = None, threads: ThreadTuner | None = None
              ) -> EpochProgress:
    """Train on the epoch's batches from ``progress.step`` on; return the new progress.

    ``threads``: a :class:`~pyro_vae.runner.threads.ThreadTuner` told of every step (on
    the CPU: the thread count follows the load on the machine).

    Stops early (between two steps) when ``should_stop()`` turns true. Raises
    :class:`Diverged` at the end if a step met a non-finite value and the trainer does
    not skip such steps. Reads the device once, at the end: the first non-finite step and
    the count of skipped ones (the epoch's sums stay on the device for the caller).
    """
    device = batches.x.device
    loss_sum = progress.loss_sum if progress.loss_sum is not None else \
        torch.zeros((), device=device)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    skipped = torch.zeros((), dtype=torch.long, device=device)
    step = progress.step
    trainer.objective.train()
    start = time.perf_counter()
    if trainer.compile and batches.rows_batch is None:  # the gather compiled with the step
        trainer.compile_seconds += compile_gather(batches, trainer.compile_batch
                                                  or batches.batch_size)
    if threads is not None:
        threads.resume()
    for index in batches.indices(progress.perm, step):
        xb = batches.gather(index)
        try:
            loss, ok = trainer.step(xb, index)
        except Diverged:  # found by validation of a new batch shape
            bad = int(first_bad)
            raise Diverged(bad if bad >= 0 else step) from None
        first_bad = torch.where((first_bad < 0) & ~ok, step, first_bad)
        skipped = skipped + (~ok).long()
        # the loss is scaled to N images: B / N of it is the batch's sum of -ELBO
        loss_sum = loss_sum + torch.where(ok, loss, 0.0) * (xb.shape[0] / len(batches.x))
        step += 1
        if threads is not None:
            threads.step_done()
        if bar is not None:
            bar.update()
        if should_stop():
            break
    bad, count = torch.stack([first_bad, skipped]).tolist()  # the epoch's one read
    seconds = progress.seconds + time.perf_counter() - start
    if bad >= 0 and not trainer.skip_nonfinite:
        raise Diverged(bad)
    return EpochProgress(progress.perm, step, loss_sum, seconds, progress.skipped_steps + count)


_LOAD_ERRORS = (RuntimeError, KeyError, ValueError, TypeError, IndexError)


def _does_not_fit(run_dir: RunDir, e: Exception) -> CheckpointError:
    reason = " ".join(str(e).split())[:160]
    return CheckpointError(f"{run_dir.checkpoint} does not fit the model in its config.json "
                           f"({reason}); restore the matching checkpoint")


def _check_fits(config: RunConfig, state: TrainingState, run_dir: RunDir) -> None:
    """Load the checkpoint into a scratch model and optimizer: a mismatch fails here,
    before any data is loaded or anything is written."""
    try:
        vae = build_vae(config)
        vae.load_state_dict(state.model)
        torch.optim.Adam(vae.parameters()).load_state_dict(state.optimizer)
    except _LOAD_ERRORS as e:
        raise _does_not_fit(run_dir, e) from None


def _restore(state: TrainingState, vae, trainer: Trainer, run_dir: RunDir, lr: float) -> None:
    try:
        vae.load_state_dict(state.model)
        trainer.load_state_dict(state.optimizer)
        restore_rng(state.rng)
    except _LOAD_ERRORS as e:
        raise _does_not_fit(run_dir, e) from None
    saved = float(trainer.lr)  # a float32 tensor: equal to 7 digits
    if not math.isclose(saved, lr, rel_tol=1e-6):  # config.json's rate, not the checkpoint's
        log.info("learning rate %g (config.json) replaces %g (checkpoint)", lr, saved)
        trainer.set_lr(lr)


def _record(epoch, done: EpochProgress, vae, splits, batches, ctx, config) -> dict:
    """The epoch's metrics line: the test ELBO (and accuracy, validation scores where the
    model and data have them), then one read of every sum, summed over ranks (one transfer
    per epoch)."""
    t = config.train
    test_x = splits.test_x[ctx.rank :: ctx.world_size]
    num_test = len(splits.test_x)
    terms = elbo_terms(vae, test_x, t.eval_batch_size, seed=seeds.elbo_noise(t.seed))
    test = torch.stack([terms.elbo.sum(), terms.log_likelihood.sum(), terms.kl.sum()])
    parts = [done.loss_sum.reshape(1), test,
             torch.tensor([float(done.skipped_steps)], device=test.device)]
    extra = {}  # metric name -> (index into parts' sums, divisor)

    def add(name: str, total: torch.Tensor, count: int) -> None:
        extra[name] = (sum(len(p) for p in parts), count)
        parts.append(total.reshape(1))

    if t.objective == "iwae":  # the bound trained, on the test set, with the same K
        add("test_iwae", importance_log_likelihood(
            vae, test_x, t.num_particles, batch_size=max(1, t.eval_batch_size // 10),
            seed=seeds.importance_noise(t.seed)).sum(), num_test)
    if hasattr(vae, "classify"):
        test_y = splits.test_y[ctx.rank :: ctx.world_size].to(test_x.device)
        add("test_accuracy", correct(vae, test_x, test_y, t.eval_batch_size), num_test)
    if splits.valid_x is not None:
        valid_x = splits.valid_x[ctx.rank :: ctx.world_size]
        add("validation_elbo", elbo_terms(vae, valid_x, t.eval_batch_size,
                                          seed=seeds.elbo_noise(t.seed)).elbo.sum(),
            len(splits.valid_x))
        if hasattr(vae, "classify"):
            valid_y = splits.valid_y[ctx.rank :: ctx.world_size].to(valid_x.device)
            add("validation_accuracy", correct(vae, valid_x, valid_y, t.eval_batch_size),
                len(splits.valid_x))
    sums = ctx.sum(torch.cat(parts)).tolist()
    loss_sum, elbo_sum, lik_sum, kl_sum, skipped = sums[:5]
    trained = batches.num_local * ctx.world_size - skipped * batches.batch_size
    if trained <= 0:
        log.warning("epoch %d: every step was skipped; its train ELBO is recorded as null",
                    epoch)
    # exact unless a last, smaller batch was skipped; None if nothing was trained
    optimized = -loss_sum / trained if trained > 0 else None
    weight = kl_weight(t, epoch)
    plain = t.objective == "elbo" and weight == 1 and not getattr(vae, "auxiliary_loss", False)
    record = {
        "epoch": epoch,
        # the true ELBO where it is what was optimized; else see train_objective
        "train_elbo": optimized if plain else None,
        "test_elbo": elbo_sum / num_test,
        "test_log_likelihood": lik_sum / num_test,
        "test_kl": kl_sum / num_test,
        "seconds": done.seconds,
        "images_per_second": batches.num_local * ctx.world_size / done.seconds,
        "skipped_steps": int(skipped),
    }
    if not plain:
        # what was optimized: the KL-weighted ELBO, the IWAE bound, or the ELBO plus a
        # model's auxiliary loss (per image)
        record["train_objective"] = optimized
    for name, (at, count) in extra.items():
        record[name] = sums[at] / count
    if weight != 1:
        record["kl_weight"] = weight
    return record


def _diverged(epoch: int, step: int, num_steps: int, run_dir: RunDir | None
              ) -> TrainingDiverged:
    if run_dir is None:
        kept = "nothing was written"
    elif epoch == 1:
        kept = (f"nothing of this run is checkpointed yet in {run_dir.path} (start it "
                "again with {force})")
    else:
        kept = f"{run_dir.path} still holds epoch {epoch - 1}, untouched"
    return TrainingDiverged(
        f"non-finite loss or gradient in epoch {epoch} at step {step + 1} of {num_steps}; "
        f"{kept}. Likely causes: a learning rate too high (lower {{train.lr}}), data "
        "outside the likelihood's support, or a collapsing learned scale; or train with "
        "{train.nan_policy=skip}"
    )


def train_summary(record: dict) -> str:
    """``train ELBO -98.12``, or ``train objective -97.50`` where the epoch optimized the
    IWAE bound or a KL-weighted ELBO (metrics line ``train_objective``)."""
    if "train_objective" in record:
        value, what = record["train_objective"], "train objective"
    else:
        value, what = record["train_elbo"], "train ELBO"
    return f"{what} {'n/a' if value is None else f'{value:.2f}'}"

