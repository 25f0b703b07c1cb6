"""Every seed a run derives from its settings, in one place.

A run has two seeds: ``TrainConfig.seed`` (training noise, the order of the data, the
noise of evaluations) and ``DataConfig.binarize_seed`` (fixed binarizations). Every stream
is a child of numpy's :class:`~numpy.random.SeedSequence` of that seed, keyed by its
purpose (and epoch, rank): what ``SeedSequence(seed).spawn`` gives, so two streams are
independent by construction for any seed, epoch or rank -- no hand-picked offsets that
could collide.
"""

from __future__ import annotations

import numpy as np

# purposes: the first element of each child's spawn key (never reorder; append new ones)
(_PROCESS, _EPOCH_ORDER, _RANK_EPOCH, _STATIC, _TEST, _TRAIN_EVAL, _ELBO, _IMPORTANCE,
 _LABELS, _VALIDATION) = range(10)


def _child(seed: int, *key: int) -> int:
    """A 32-bit seed (the range numpy and ``pyro.set_rng_seed`` accept) of the child
    stream ``key`` of ``seed``."""
    return int(np.random.SeedSequence(seed, spawn_key=key).generate_state(1)[0])


def process(seed: int, rank: int = 0) -> int:
    """The global RNG seed of one process (rank) at the start of a run."""
    return _child(seed, _PROCESS, rank)


def epoch_order(seed: int, epoch: int) -> int:
    """The permutation of the training images in ``epoch`` (the same on every rank)."""
    return _child(seed, _EPOCH_ORDER, epoch)


def rank_epoch(seed: int, epoch: int, rank: int) -> int:
    """Training noise of one rank in one epoch of a data-parallel run: resumable on any
    number of ranks, since it depends on nothing that happened before the epoch."""
    return _child(seed, _RANK_EPOCH, epoch, rank)


def static_binarization(binarize_seed: int) -> int:
    """The one fixed binarization of the training images (``binarize="static"``)."""
    return _child(binarize_seed, _STATIC)


def test_binarization(binarize_seed: int) -> int:
    """The fixed binarization of the test images, used by every evaluation."""
    return _child(binarize_seed, _TEST)


def train_eval_binarization(binarize_seed: int) -> int:
    """The fixed binarization of the training images when they are evaluated."""
    return _child(binarize_seed, _TRAIN_EVAL)


def elbo_noise(seed: int) -> int:
    """The guide's noise in the per-epoch test ELBO and in ``evaluate``."""
    return _child(seed, _ELBO)


def importance_noise(seed: int) -> int:
    """The importance samples of ``log p(x)`` estimates."""
    return _child(seed, _IMPORTANCE)


def label_choice(seed: int) -> int:
    """Which training labels a semi-supervised run keeps (``DataConfig.labels``)."""
    return _child(seed, _LABELS)


def validation_binarization(binarize_seed: int) -> int:
    """The fixed binarization of the held-out validation images (``DataConfig.validation``)."""
    return _child(binarize_seed, _VALIDATION)
