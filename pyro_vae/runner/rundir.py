"""The run folder, and the :class:`Run` that users get back.

A run folder holds ``config.json`` (the resolved settings), ``metrics.jsonl`` (one JSON
line per epoch), ``checkpoint.pt`` (:mod:`~pyro_vae.runner.state`) and ``figures/``.
Metrics lines are appended and fsynced one epoch at a time, and the checkpoint is written
atomically after its epoch's line, so a crash never leaves a line that the checkpoint does
not cover unnoticed: on resume, lines beyond the checkpoint's epoch are dropped.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import files
from ..config import RunConfig
from ..errors import (
    CheckpointError,
    ConfigError,
    NotRegisteredError,
    RunDirError,
    get_logger,
    render,
)
from ..model import VAE
from .resolve import Splits, build_vae, check_config, resolve
from .state import check_matches, load_state

log = get_logger(__name__)

CONFIG, METRICS, CHECKPOINT, FIGURES = "config.json", "metrics.jsonl", "checkpoint.pt", "figures"
TENSORBOARD = "tensorboard"  # TensorBoard events, with TrainConfig.tensorboard
LOCK = ".lock"  # held (flock) by the one process that writes the folder
OUTPUTS_LOCK = ".outputs.lock"  # held while eval.json, diagnostics.json... are rewritten
LABELS = "labels.json"  # which training labels a run that learns from labels kept
# what a run writes besides the above; a replaced run loses these too
_OUTPUTS = ("eval.json", "diagnostics.json", "diagnostics_draws.npz", "calibration.json",
            LABELS)
# temporary files of the writes of training (pyro_vae.files) that a killed process left
# behind, and those of earlier versions
_STALE = (*(f".{name}.*.tmp" for name in (CHECKPOINT, CONFIG, METRICS, LABELS)),
          "config.json.tmp", "metrics.jsonl.tmp", "labels.json.tmp")
# what a run writes, by name: none may be a symbolic link (pyro_vae.files)
_WRITTEN = (CONFIG, METRICS, CHECKPOINT, FIGURES, TENSORBOARD, LOCK, OUTPUTS_LOCK, *_OUTPUTS)


class RunDir:
    """Paths and file operations of one run folder."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.config = self.path / CONFIG
        self.metrics = self.path / METRICS
        self.checkpoint = self.path / CHECKPOINT
        self.figures = self.path / FIGURES

    def holds_run(self) -> bool:
        return self.config.exists() or self.checkpoint.exists() or self.metrics.exists()

    def check_claimable(self, force: bool = False) -> None:
        """Raise :class:`RunDirError` unless a new run may be written here (changes nothing)."""
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"{self.path} is a file, not a folder; choose another {{out}}")
        self.check_links()
        if self.holds_run() and not force:
            if not self.checkpoint.exists():
                raise RunDirError(f"{self.path} holds a run that never finished an epoch; "
                                  "start it again with {force}, or choose another {out}")
            raise RunDirError(
                f"{self.path} holds another run; continue it with {{resume={self.path}}}, "
                "replace it with {force}, or choose another {out}"
            )

    def check_links(self, tensorboard: bool = False) -> None:
        """Refuse (:class:`~pyro_vae.files.UnsafePathError`) a symbolic link in place of
        anything a run writes; with ``tensorboard``, a ``tensorboard`` that is no folder."""
        if not self.path.is_dir():
            return
        for name in _WRITTEN:
            files.refuse_link(self.path / name)
        board = self.path / TENSORBOARD
        if tensorboard and board.exists():
            if not board.is_dir():
                raise RunDirError(f"{board} is a file, where TensorBoard's events go; move it "
                                  "away and run again")
            files.check_writable(board)

    @contextlib.contextmanager
    def writing(self):
        """Hold the folder's write lock while the block runs (create the folder if needed).

        An advisory ``flock`` on ``.lock``, released by the kernel however the process
        ends (SIGKILL included): a second writer gets :class:`RunDirError` naming the
        holder's PID. Temporary files that killed writes left behind are removed.
        """
        try:
            files.check_writable(self.path)
            handle = files.open_lock(self.path / LOCK)
        except OSError as e:
            raise RunDirError(f"cannot write to {self.path} ({e.strerror}); "
                              "choose a writable {out}") from None
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise RunDirError(f"{self.path} is being written by another training "
                                  f"(PID {self._holder_pid(handle)}); wait for it to finish, "
                                  "or stop it first") from None
            with files.named_errors(self.path / LOCK):  # unbuffered: nothing left to flush
                os.ftruncate(handle.fileno(), 0)
                os.pwrite(handle.fileno(), f"{os.getpid()}\n".encode(), 0)
            for pattern in _STALE:
                for stale in self.path.glob(pattern):
                    stale.unlink(missing_ok=True)
            yield self

    def writer_pid(self) -> int | None:
        """The PID of the training that holds the folder's write lock, or ``None``."""
        try:
            handle = os.fdopen(os.open(self.path / LOCK, os.O_RDONLY | os.O_NOFOLLOW))
        except OSError:  # none, or a link: no writer of this folder holds it
            return None
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return self._holder_pid(handle)
            fcntl.flock(handle, fcntl.LOCK_UN)
            return None

    @staticmethod
    def _holder_pid(handle) -> int | str:
        handle.seek(0)
        text = handle.read().strip()
        return int(text) if text.isdigit() else "unknown"

    def claim(self, force: bool = False) -> None:
        """Create the folder for a new run; with ``force``, remove the old run's files."""
        self.check_claimable(force)
        try:
            files.check_writable(self.path)
        except OSError as e:
            raise RunDirError(f"cannot write to {self.path} ({e.strerror}); "
                              "choose a writable {out}") from None
        if force:
            for old in (self.metrics, self.checkpoint, self.config,
                        *(self.path / name for name in _OUTPUTS)):
                old.unlink(missing_ok=True)
            files.remove_tree(self.figures)
            files.remove_tree(self.path / TENSORBOARD)

    def write(self, name: str, data: bytes | str) -> None:
        """Replace the file ``name`` (below the run folder) atomically, never through a
        link (:func:`pyro_vae.files.write_atomic`)."""
        files.write_atomic(self.path / name, data, root=self.path)

    def check_output(self, name: str) -> None:
        """Raise now, before a long computation, if ``name`` could not be written later:
        a link in its place, or a folder that cannot be written."""
        self.check_links()
        files.refuse_link(self.path / name)
        files.check_writable(self.path)

    @contextlib.contextmanager
    def outputs_lock(self):
        """Serialize the read-modify-write of a command's output (``eval.json``...) among
        processes: an ``flock`` on ``.outputs.lock``, waited for."""
        with files.open_lock(self.path / OUTPUTS_LOCK, root=self.path) as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def write_config(self, config: RunConfig) -> None:
        self.write(CONFIG, json.dumps(config.to_dict(), indent=2) + "\n")

    def write_labels(self, indices: list[int], seed: int) -> None:
        """Record the positions of the training images whose labels the run uses."""
        self.write(LABELS, json.dumps({"seed": seed, "count": len(indices),
                                       "indices": indices}) + "\n")

    def read_config(self) -> RunConfig:
        """The run's settings, checked; :class:`CheckpointError` if missing or broken."""
        if not self.config.is_file():
            raise CheckpointError(f"{self.path} is not a run folder (no {CONFIG}); "
                                  "point at a folder written by pyro-vae train")
        try:
            data = files.parse_json(files.read_bytes(self.config))
        except ValueError as e:
            raise CheckpointError(f"{self.config} is damaged: {e}; restore it or start a "
                                  "new run") from None
        except OSError as e:
            raise CheckpointError(f"cannot read {self.config} ({e.strerror})") from None
        try:
            return check_config(RunConfig.from_dict(data))
        except NotRegisteredError:
            raise
        except ConfigError as e:  # named as config.json spells it: model.z_dim
            problem = render(e.args[0], lambda setting, value: setting if value is None
                             else f"{setting} = {value}")
            raise CheckpointError(f"{self.config} is damaged ({problem}); restore it or "
                                  "start a new run") from None

    def append_metrics(self, record: dict[str, Any]) -> None:
        files.append(self.metrics, json.dumps(_strict_json(record), allow_nan=False) + "\n",
                     root=self.path)

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every well-formed metrics line (objects with an ``epoch``); others are reported."""
        if not self.metrics.is_file():
            return []
        records, damaged = [], []
        lines = files.read_bytes(self.metrics).decode(errors="replace").splitlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = files.parse_json(line)
                _check_record(record)
            except ValueError as e:
                damaged.append(f"line {number}: {e}")
                continue
            records.append(record)
        if damaged:
            log.warning("%s: skipped %d damaged line(s) (%s)", self.metrics, len(damaged),
                        "; ".join(damaged[:3]) + ("; ..." if len(damaged) > 3 else ""))
        return records

    def truncate_metrics(self, epoch: int) -> list[dict[str, Any]]:
        """Keep the lines of epochs ``<= epoch`` (the checkpoint's); return them."""
        kept = [r for r in self.read_metrics() if r["epoch"] <= epoch]
        self.write(METRICS, "".join(json.dumps(r) + "\n" for r in kept))
        return kept


def _check_record(record: Any) -> None:
    """Raise ``ValueError`` naming the field of a metrics line that breaks its schema: an
    object whose ``epoch`` is a count from 1 and whose other fields are numbers or null."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    epoch = record.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
        raise ValueError(f"epoch is {epoch!r}, not a count from 1")
    for key, value in record.items():
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise ValueError(f"{key} is {value!r}, not a number")


def _strict_json(record: dict[str, Any]) -> dict[str, Any]:
    """Non-finite floats (not JSON) become ``None``: recorded as missing, explicitly."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()}


@dataclass
class Run:
    """A trained run: settings, model (in eval mode), metrics per epoch, and its data.

    ``splits`` (the data as the likelihood scores it, on the model's device) is loaded on
    first use of :attr:`data` and kept, so figures and evaluations never reload it.
    """

    path: Path | None
    config: RunConfig
    vae: VAE
    metrics: list[dict[str, Any]] = field(default_factory=list)
    splits: Splits | None = None
    interrupted: bool = False
    partial_step: int | None = None  # steps done in the epoch after ``epoch``, if stopped

    @property
    def epoch(self) -> int:
        """The last finished epoch."""
        return self.metrics[-1]["epoch"] if self.metrics else 0

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def data(self) -> Splits:
        if self.splits is None:
            self.splits = resolve(self.config, self.device, recorded=True)
        return self.splits


def load_run(path: str | os.PathLike, device: str | torch.device = "cpu") -> Run:
    """Load a run folder: config, model weights from the last checkpoint, metrics.

    Works beside a training that is still writing the folder: it reads the last
    checkpoint, and says that the run is in progress.
    """
    run_dir = RunDir(path)
    config = run_dir.read_config()
    pid = run_dir.writer_pid()
    if pid is not None:
        log.warning("%s is still training (PID %s); reading its last checkpoint",
                    run_dir.path, pid)
    state = load_state(run_dir.checkpoint, map_location=device)
    check_matches(config, state, str(run_dir.path))
    vae = build_vae(config)
    try:
        vae.load_state_dict(state.model)
    except (RuntimeError, KeyError) as e:
        raise CheckpointError(f"{run_dir.checkpoint} does not fit the model in {CONFIG} "
                              f"({str(e).splitlines()[0][:160]}); was it copied from another run?"
                              ) from None
    vae.to(device).eval()
    metrics = [r for r in run_dir.read_metrics() if r["epoch"] <= state.epoch]
    partial = state.partial["step"] if state.partial is not None else None
    return Run(run_dir.path, config, vae, metrics, partial_step=partial)
