"""The run folder: ``config.json``, ``metrics.jsonl``, ``checkpoint.pt``, ``figures/``.

Metrics lines are appended and fsynced one epoch at a time, and the checkpoint is written
atomically after its epoch's metrics line, so a crash never leaves a line that the
checkpoint does not cover unnoticed: on resume, lines beyond the checkpoint's epoch (and a
torn last line) are dropped.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import load_checkpoint
from .config import RunConfig
from .errors import CheckpointError, RunDirError

CONFIG, METRICS, CHECKPOINT, FIGURES = "config.json", "metrics.jsonl", "checkpoint.pt", "figures"


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

    def claim(self, force: bool = False) -> None:
        """Create the folder for a new run; refuse one holding another run unless ``force``."""
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"{self.path} is a file, not a folder; choose another --out")
        if self.holds_run() and not force:
            raise RunDirError(
                f"{self.path} holds another run; continue it with --resume {self.path}, "
                "replace it with --force, or choose another --out"
            )
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise RunDirError(f"cannot write to {self.path} ({e.strerror}); "
                              "choose a writable --out") from None
        if force:
            for old in (self.metrics, self.checkpoint, self.config):
                old.unlink(missing_ok=True)

    def write_config(self, config: RunConfig) -> None:
        tmp = self.config.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        os.replace(tmp, self.config)

    def read_config(self) -> RunConfig:
        if not self.config.is_file():
            raise CheckpointError(f"{self.path} is not a run folder (no {CONFIG}); "
                                  "point at a folder written by pyro-vae train")
        try:
            return RunConfig.from_dict(json.loads(self.config.read_text()))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{self.config} is not valid JSON ({e.msg}, line {e.lineno}); "
                                  "restore it or start a new run") from None

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every complete metrics line; a torn last line (from a crash) is skipped."""
        if not self.metrics.is_file():
            return []
        records = []
        for line in self.metrics.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
        return records

    def truncate_metrics(self, epoch: int) -> list[dict[str, Any]]:
        """Keep the lines of epochs ``<= epoch`` (the checkpoint's); return them."""
        kept = [r for r in self.read_metrics() if r.get("epoch", 0) <= epoch]
        tmp = self.metrics.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.metrics)
        return kept


@dataclass
class Run:
    """A trained run: its settings, its model (in eval mode) and its metrics per epoch."""

    path: Path | None
    config: RunConfig
    vae: Any
    metrics: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False

    @property
    def epoch(self) -> int:
        return self.metrics[-1]["epoch"] if self.metrics else 0


def load_run(path: str | os.PathLike, device: str = "cpu") -> Run:
    """Load a run folder: config, model weights from the last checkpoint, metrics."""
    from .model import build_vae

    run_dir = RunDir(path)
    config = run_dir.read_config()
    state = load_checkpoint(run_dir.checkpoint, map_location=device)
    vae = build_vae(config)
    try:
        vae.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as e:
        raise CheckpointError(f"{run_dir.checkpoint} does not fit the model in {CONFIG} "
                              f"({str(e).splitlines()[0][:160]}); was it copied from another run?"
                              ) from None
    vae.to(device).eval()
    metrics = [r for r in run_dir.read_metrics() if r.get("epoch", 0) <= state["epoch"]]
    return Run(run_dir.path, config, vae, metrics)
