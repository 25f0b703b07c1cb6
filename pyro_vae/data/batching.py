"""Binarization and minibatches sliced from tensors that live on the training device."""

from __future__ import annotations

import torch

from .. import seeds
from ..errors import DataError


def check_pixels(x: torch.Tensor, what: str = "data") -> None:
    """Raise :class:`DataError` unless every pixel lies in [0, 1] (needed to binarize)."""
    if not bool(((x >= 0) & (x <= 1)).all()):
        raise DataError(f"{what} has pixel values outside [0, 1]; scale them to [0, 1] "
                        "as torchvision's ToTensor does (uint8 / 255)")


def binarize(x: torch.Tensor, seed: int) -> torch.Tensor:
    """One fixed Bernoulli(x) draw per pixel (static binarization), reproducible by seed.

    Drawn on the CPU with its own generator and moved to ``x``'s device, so the same
    seed gives the same images on every device.
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.bernoulli(x.cpu(), generator=generator).to(x.device)


class DeviceBatches:
    """Shuffled minibatches sliced from a tensor that lives on the training device.

    With ``dynamic=True`` each batch is a fresh Bernoulli(x) draw (dynamic binarization,
    from the global torch RNG). An epoch's order is a permutation seeded by ``seed`` and
    the epoch number (:func:`pyro_vae.seeds.epoch_order`), as
    ``DistributedSampler.set_epoch`` does, so epochs are reproducible and resumable and
    every rank of a data-parallel run draws the same one.

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
        generator = torch.Generator().manual_seed(seeds.epoch_order(self.seed, epoch))
        perm = torch.randperm(len(self.x), generator=generator)
        if self.world_size > 1:
            perm = torch.cat([perm, perm[: (-len(perm)) % self.world_size]])
            perm = perm[self.rank :: self.world_size]
        return perm.to(self.x.device)

    def indices(self, perm: torch.Tensor, start: int = 0):
        """Yield the index tensors of the epoch ordered by ``perm``, from batch ``start`` on."""
        for i in range(start * self.batch_size, len(perm), self.batch_size):
            yield perm[i : i + self.batch_size]

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """The batch ``(B, D)`` at ``index``, binarized afresh under dynamic binarization."""
        xb = self.x.index_select(0, index)
        return torch.bernoulli(xb) if self.dynamic else xb

    def batches(self, perm: torch.Tensor, start: int = 0):
        """Yield the batches of the epoch ordered by ``perm``, from batch ``start`` on."""
        for index in self.indices(perm, start):
            yield self.gather(index)
