"""The one checkpoint schema: what ``checkpoint.pt`` holds, written and read here only.

The file is a short header -- :data:`MAGIC`, then ``format 2 sha256 <hex> bytes <n>`` --
followed by ``torch.save``'s bytes. The length and SHA-256 of those bytes are checked
before anything is unpickled, so a changed byte anywhere (a flipped bit on disk, a partial
copy, an edit) is "damaged", never a silently different model, optimizer state or step.
The payload is a dict of tensors, numbers, strings, lists and dicts only, loaded with
``torch.load(..., weights_only=True)``: a file crafted to run code when unpickled is
refused instead of executed, checksum or not. Writes are atomic (temporary file, fsync,
rename; :mod:`pyro_vae.files`), so a crash at any moment leaves the previous checkpoint or
the new one. Files of format 1 (the zip alone, written before checksums) still load, with
a warning.

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

import hashlib
import io
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import files
from ..config import RunConfig
from ..errors import CheckpointError, get_logger

log = get_logger(__name__)

FORMAT_VERSION = 1  # of the payload's keys
# the file: MAGIC, a header line, then torch.save's bytes (a zip); format 1 was the zip alone
CHECKSUM_FORMAT = 2
MAGIC = b"pyro-vae checkpoint\n"
HEADER = MAGIC + b"format %d sha256 %s bytes %d\n"
_HEADER_LINE = re.compile(re.escape(MAGIC) + rb"format (?P<format>[0-9]{1,4}) "
                          rb"sha256 (?P<sha256>[0-9a-f]{64}) bytes (?P<size>[0-9]{1,15})\n")
_HEADER_MAX = 128
_ZIP = b"PK\x03\x04"
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
    """Write ``state`` to ``path`` atomically, with its checksum (:func:`write_payload`)."""
    write_payload(path, {"format": FORMAT_VERSION, **{key: getattr(state, key) for key in _KEYS}})


def write_payload(path: str | os.PathLike, payload: Any) -> None:
    """``torch.save(payload)`` behind a header that holds its length and SHA-256, written
    atomically (:func:`pyro_vae.files.write_atomic`: a temporary file, fsync, rename)."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    header = HEADER % (CHECKSUM_FORMAT, hashlib.sha256(data).hexdigest().encode(), len(data))
    files.write_atomic(path, header + data)


def read_payload(path: str | os.PathLike, map_location="cpu") -> Any:
    """What :func:`write_payload` wrote, after its checksum is verified; unpickled with
    ``weights_only=True``. Raises :class:`CheckpointError` saying what is wrong."""
    path = Path(path)
    if not path.is_file() and not path.is_symlink():
        raise CheckpointError(f"no checkpoint at {path}; train first, or point at a run folder")
    try:
        data = files.read_bytes(path)
    except OSError as e:  # permissions, a folder, ...
        raise CheckpointError(f"cannot read {path} ({e.strerror or type(e).__name__}); "
                              "check that it is a file you may read") from None
    payload = _verified(path, data)
    try:
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # torch's weights-only unpickler refused it: objects beyond plain data
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain data, whose loading could "
            "run code; it was not loaded: use a checkpoint written by pyro-vae"
        ) from None
    except Exception as e:  # noqa: BLE001 - whatever the parser meets, the file is damaged
        raise _damaged(path, f"unreadable: {type(e).__name__}") from None


def _verified(path: Path, data: bytes) -> bytes:
    """The payload of a checkpoint whose header and checksum hold (or of one written
    before checksums existed, with a warning)."""
    if data.startswith(_ZIP):  # format 1: torch.save's zip alone
        log.warning("%s was written without a checksum (pyro-vae before checkpoint format "
                    "%d): its integrity cannot be checked; the next save adds one", path,
                    CHECKSUM_FORMAT)
        return data
    if not data.startswith(MAGIC):
        raise _damaged(path, "it does not begin with a pyro-vae checkpoint's header")
    end = data.find(b"\n", len(MAGIC), len(MAGIC) + _HEADER_MAX) + 1
    match = _HEADER_LINE.fullmatch(data[:end]) if end else None
    if match is None:
        raise _damaged(path, "its header is unreadable")
    if int(match["format"]) != CHECKSUM_FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {int(match['format'])}; this "
                              f"pyro-vae reads format {CHECKSUM_FORMAT}")
    payload = data[end:]
    if len(payload) != int(match["size"]):
        raise _damaged(path, f"{len(payload)} bytes where its header says {int(match['size'])}")
    if hashlib.sha256(payload).hexdigest().encode() != match["sha256"]:
        raise _damaged(path, "its checksum does not match its content")
    return payload


def _damaged(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} is damaged ({what}); nothing was loaded: "
                           "restore it from a copy, or start the run again with {force}")


def load_state(path: str | os.PathLike, map_location="cpu") -> TrainingState:
    """Load and check a checkpoint (checksum, ``weights_only=True``, schema); raise
    :class:`CheckpointError` before anything of a damaged one is used."""
    raw = read_payload(path, map_location)
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
