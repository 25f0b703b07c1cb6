"""The one checkpoint schema: what ``checkpoint.pt`` holds, written and read here only.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only, so it loads
with ``torch.load(..., weights_only=True)``: a file crafted to run code when unpickled is
refused instead of executed. Writes are atomic (temporary file, fsync, rename), so a crash
at any moment leaves the previous checkpoint or the new one, never a partial file.

=============  ==========================================================================
key            value
=============  ==========================================================================
``format``     :data:`FORMAT_VERSION`
``config``     the run's settings (``RunConfig.to_dict()``), as ``config.json`` holds them
``epoch``      the last finished epoch
``model``      the VAE's ``state_dict``
``optimizer``  the optimizer's ``state_dict``
``rng``        torch's RNG states: ``{"torch": ..., "cuda": [...]}``
``partial``    ``None``, or where an interrupted epoch stands (:class:`EpochProgress`)
=============  ==========================================================================
"""

from __future__ import annotations

import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import RunConfig
from ..errors import CheckpointError

FORMAT_VERSION = 1
_KEYS = ("config", "epoch", "model", "optimizer", "rng", "partial")
_PARTIAL_KEYS = ("step", "perm", "loss_sum", "seconds", "skipped_steps")


@dataclass
class EpochProgress:
    """Where an epoch stands: its order of images, steps done, and running sums."""

    perm: torch.Tensor  # this rank's image indices in the epoch's order, (N_local,)
    step: int = 0  # batches done
    loss_sum: torch.Tensor | None = None  # sum over the images trained on of -ELBO
    seconds: float = 0.0  # training time so far
    skipped_steps: int = 0  # steps skipped for a non-finite loss (nan_policy="skip")

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "perm": self.perm.cpu(), "loss_sum": self.loss_sum.cpu(),
                "seconds": self.seconds, "skipped_steps": self.skipped_steps}

    @classmethod
    def from_dict(cls, d: dict[str, Any], device: torch.device) -> EpochProgress:
        return cls(d["perm"].to(device), d["step"], d["loss_sum"].to(device), d["seconds"],
                   d["skipped_steps"])


@dataclass
class TrainingState:
    """Everything needed to continue a run exactly where it stopped."""

    config: dict[str, Any]
    epoch: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, Any]
    partial: dict[str, Any] | None = None

    def run_config(self) -> RunConfig:
        return RunConfig.from_dict(self.config)


def capture_rng() -> dict[str, Any]:
    """The torch RNG states (CPU and every CUDA device): all that training draws from."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(path: str | os.PathLike, state: TrainingState) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file, fsync, then rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    payload = {"format": FORMAT_VERSION, **{key: getattr(state, key) for key in _KEYS}}
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the run folder's other files are 0644
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def load_state(path: str | os.PathLike, map_location="cpu") -> TrainingState:
    """Load and check a checkpoint (``weights_only=True``); raise :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; train first, or point at a run folder")
    try:
        raw = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # torch's weights-only unpickler refused it: damaged, or objects beyond plain data
        raise CheckpointError(
            f"{path} is damaged or holds objects other than tensors and plain data, whose "
            "loading could run code; it was not loaded: restore it from a copy, or use a "
            "checkpoint written by pyro-vae"
        ) from None
    except OSError as e:  # before its content was seen: permissions, a folder, ...
        raise CheckpointError(f"cannot read {path} ({e.strerror or type(e).__name__}); "
                              "check that it is a file you may read") from None
    except (RuntimeError, EOFError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is damaged or unreadable ({type(e).__name__}); "
                              "delete it or restore it from a copy") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a pyro-vae checkpoint of format {FORMAT_VERSION}")
    problem = _schema_problem(raw)
    if problem:
        raise CheckpointError(f"{path} is damaged ({problem}); restore it from a copy")
    return TrainingState(**{key: raw[key] for key in _KEYS})


def _schema_problem(raw: dict) -> str | None:
    missing = [key for key in _KEYS if key not in raw]
    if missing:
        return f"no {', '.join(missing)}"
    checks = [
        (isinstance(raw["config"], dict), "config is not a dict"),
        (isinstance(raw["epoch"], int) and raw["epoch"] >= 0, "epoch is not a count"),
        (isinstance(raw["model"], dict)
         and all(torch.is_tensor(v) for v in raw["model"].values()), "model is not tensors"),
        (isinstance(raw["optimizer"], dict), "optimizer state is not a dict"),
        (isinstance(raw["rng"], dict) and torch.is_tensor(raw["rng"].get("torch")),
         "no RNG state"),
        (raw["partial"] is None or (isinstance(raw["partial"], dict)
                                    and all(k in raw["partial"] for k in _PARTIAL_KEYS)),
         "the interrupted epoch's state is incomplete"),
    ]
    return next((message for ok, message in checks if not ok), None)


def check_matches(config: RunConfig, state: TrainingState, where: str) -> None:
    """Raise :class:`CheckpointError` if the checkpoint was written for another model or
    data than ``config`` describes (config.json and checkpoint must not disagree)."""
    try:
        saved = state.run_config().to_dict()
    except Exception:  # noqa: BLE001 - any malformed content is the same problem
        saved = None
    current = config.to_dict()
    for section in ("model", "data"):
        if saved is None or saved[section] != current[section]:
            raise CheckpointError(
                f"the checkpoint in {where} was written for another {section} than its "
                "config.json describes; restore the matching config.json"
            )


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
