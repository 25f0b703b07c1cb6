"""Every seed a run derives from its settings, in one place.

A run has two seeds: ``TrainConfig.seed`` (training noise, the order of the data, the
noise of evaluations) and ``DataConfig.binarize_seed`` (fixed binarizations). Everything
else is derived here, so two places can never disagree on how.
"""

from __future__ import annotations

_EPOCH_STRIDE = 1_000_003  # a prime: (seed, epoch) pairs never collide for epoch < stride


def process(seed: int, rank: int = 0) -> int:
    """The global RNG seed of one process (rank) at the start of a run."""
    return seed + rank


def epoch_order(seed: int, epoch: int) -> int:
    """The permutation of the training images in ``epoch`` (the same on every rank)."""
    return seed * _EPOCH_STRIDE + epoch


def rank_epoch(seed: int, epoch: int, rank: int) -> int:
    """Training noise of one rank in one epoch of a data-parallel run: resumable on any
    number of ranks, since it depends on nothing that happened before the epoch."""
    return seed * _EPOCH_STRIDE + epoch * 1009 + rank


def static_binarization(binarize_seed: int) -> int:
    """The one fixed binarization of the training images (``binarize="static"``)."""
    return binarize_seed


def test_binarization(binarize_seed: int) -> int:
    """The fixed binarization of the test images, used by every evaluation."""
    return binarize_seed + 1


def train_eval_binarization(binarize_seed: int) -> int:
    """The fixed binarization of the training images when they are evaluated."""
    return binarize_seed + 2


def elbo_noise(seed: int) -> int:
    """The guide's noise in the per-epoch test ELBO and in ``evaluate``."""
    return seed


def importance_noise(seed: int) -> int:
    """The importance samples of ``log p(x)`` estimates."""
    return seed + 1
