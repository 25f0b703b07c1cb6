"""Fixtures: a clean Pyro state and a fixed seed for every test, data folders."""

from __future__ import annotations

import os
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on two cores: one OpenMP thread each (and in the
    # processes they start), set before torch starts; else one worker's spinning threads
    # stall the other's 25-35x
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pyro
import pytest

from .helpers import write_idx

SHARED_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist-t10k"


@pytest.fixture(autouse=True)
def clean_pyro_state():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def shared_mnist() -> Path:
    if not (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"the real MNIST test set is not at {SHARED_MNIST} (developer/CI machines "
                    "only)")
    return SHARED_MNIST


@pytest.fixture
def idx_folder(tmp_path, rng) -> Path:
    """A flat folder with four small MNIST-format files (60 train, 20 test images)."""
    folder = tmp_path / "idx"
    folder.mkdir()
    for split, n in (("train", 60), ("t10k", 20)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images, compress=True)
        write_idx(folder / f"{split}-labels-idx1-ubyte", labels)
    return folder
