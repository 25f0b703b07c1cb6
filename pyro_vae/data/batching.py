"""Binarization and minibatches sliced from tensors that live on the training device."""

from __future__ import annotations

import itertools

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


# lowbias32 (C. Wellons, "Prospecting for hash functions", 2018): a bijection of the 32-bit
# integers whose output bits each flip with probability 1/2 (bias 0.17) when an input bit
# does; on int32 tensors, with the right shifts masked to logical ones, and products that
# wrap modulo 2^32 on every torch backend
_MIX1, _MIX2 = 0x7FEB352D, 0x846CA68B - 2**32
# elements hashed at a time when eager, in the L2 cache through the hash's 25 passes: a
# batch of 1024 MNIST images hashed at once took 1.3x as long as in blocks of 2^17, 2^16
# blocks cost a batch of 128 images 1.4x (docs/benchmarks.md)
_BLOCK = 2**17


def _lowbias32_(h: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """``h`` hashed in place (``scratch``: a tensor like it; in place, the eager gather
    makes no buffers per operation)."""
    for shift, factor in ((16, _MIX1), (15, _MIX2), (16, None)):
        torch.bitwise_right_shift(h, shift, out=scratch)
        h.bitwise_xor_(scratch.bitwise_and_((1 << (32 - shift)) - 1))
        if factor is not None:
            h.mul_(factor)
    return h


def counter_uniform(shape: torch.Size | tuple[int, ...], key: torch.Tensor, *,
                    block: int = _BLOCK) -> torch.Tensor:
    """Float32 uniforms on [0, 1), one per element of ``shape``, from a counter-based
    generator (the design of Salmon et al.'s Philox, with a cheaper round): element ``n``
    (row-major) is ``lowbias32(lowbias32(n ^ key[0]) ^ key[1])``, its top 24 bits over 2^24.

    ``key``: two int32 words on the device. Each element is computed on its own, so the
    draws are the same bits on every device, thread count and compiler (integer
    arithmetic only), and a compiled gather fuses them with the comparison that
    binarizes (on the CPU a sixth to a ninth of the time of ``index_select`` and torch's
    sequential Mersenne Twister). Eagerly, blocks of ``block`` elements are hashed in
    place, in the cache: about torch's time at 128 MNIST images a batch, up to 2.3x at
    1024; a graph traced for a compiler takes the whole batch as one block.
    """
    numel = 1
    for d in shape:
        numel *= d
    if numel > 2**31:
        raise ValueError(f"counter_uniform: {numel} draws in one call; at most 2^31")
    u = torch.empty(numel, dtype=torch.float32, device=key.device)
    for start in range(0, numel, block):
        h = torch.arange(start, min(start + block, numel), dtype=torch.int32,
                         device=key.device)
        scratch = torch.empty_like(h)
        _lowbias32_(h.bitwise_xor_(key[0]), scratch)
        _lowbias32_(h.bitwise_xor_(key[1]), scratch)
        u[start:start + len(h)] = h.bitwise_right_shift_(8).bitwise_and_(0xFFFFFF)
    return u.mul_(2.0**-24).view(shape)


def binarized_rows(x: torch.Tensor, index: torch.Tensor, key: torch.Tensor, *,
                   block: int = _BLOCK) -> torch.Tensor:
    """The images ``x[index]``, each pixel a fresh Bernoulli(pixel) draw, ``u < x`` with
    ``u`` from :func:`counter_uniform` under ``key`` (probability the pixel's value, to
    2^-24); ``block``: as there."""
    xb = x.index_select(0, index)
    return torch.lt(counter_uniform(xb.shape, key, block=block), xb).to(xb.dtype)


class DeviceBatches:
    """Shuffled minibatches sliced from a tensor that lives on the training device.

    With ``dynamic=True`` each batch is a fresh Bernoulli(x) draw (dynamic binarization:
    :meth:`gather`, from the global torch RNG). An epoch's order is a
    permutation seeded by ``seed`` and the epoch number (:func:`pyro_vae.seeds.epoch_order`),
    as ``DistributedSampler.set_epoch`` does, so epochs are reproducible and resumable and
    every rank of a data-parallel run draws the same one.

    With ``world_size > 1`` the permutation is padded to a multiple of ``world_size`` (by
    repeating its first indices) and rank ``r`` takes every ``world_size``-th index from
    ``r`` on: the ranks' ``i``-th batches together form batch ``i`` of a single process
    with batch size ``batch_size * world_size``, and every rank has as many batches.

    ``apart`` (a bool mask over the images, one process only) puts the images it marks in
    batches of their own, spread evenly through the epoch: how Pyro's ss-vae example
    presents the labelled images of a semi-supervised run, each once per epoch. With
    ``apart_every = K`` a batch of them comes after every ``K`` other batches instead,
    cycling through them (as Kingma et al.'s training draws labelled images in every
    step): a few labelled images are then seen many times per epoch.
    """

    def __init__(self, x: torch.Tensor, batch_size: int, dynamic: bool = False, seed: int = 0,
                 rank: int = 0, world_size: int = 1, apart: torch.Tensor | None = None,
                 apart_every: int = 0):
        self.x, self.batch_size, self.dynamic = x, batch_size, dynamic
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_local = -(-len(x) // world_size)  # images per rank and epoch (padded)
        self.groups = None  # (indices of the apart images, of the others) with ``apart``
        sizes = [batch_size] * (self.num_local // batch_size) + (
            [self.num_local % batch_size] if self.num_local % batch_size else [])
        if apart is not None and apart.any() and not apart.all():
            if world_size > 1:
                raise ValueError("batches apart need one process")
            self.groups = (apart.nonzero().flatten().cpu(), (~apart).nonzero().flatten().cpu())
            rest = _split(len(self.groups[1]), batch_size)
            own = _split(len(self.groups[0]), batch_size)
            if apart_every > 0:  # cycled: as many as fit, each image at least once
                size = min(batch_size, len(self.groups[0]))
                own = [size] * max(-(-len(self.groups[0]) // size), len(rest) // apart_every)
            sizes, self._apart_slots = _interleaved([own, rest])
        self.sizes = sizes
        self.offsets = [0, *itertools.accumulate(sizes)]
        self.rows, self.rows_batch = binarized_rows, None  # see use_rows

    def __len__(self) -> int:
        return len(self.sizes)

    def permutation(self, epoch: int) -> torch.Tensor:
        """This rank's order of image indices in ``epoch``, on the data's device."""
        generator = torch.Generator().manual_seed(seeds.epoch_order(self.seed, epoch))
        if self.groups is not None:
            return self._grouped(generator).to(self.x.device)
        perm = torch.randperm(len(self.x), generator=generator)
        if self.world_size > 1:
            perm = torch.cat([perm, perm[: (-len(perm)) % self.world_size]])
            perm = perm[self.rank :: self.world_size]
        return perm.to(self.x.device)

    def _grouped(self, generator: torch.Generator) -> torch.Tensor:
        """Each group shuffled, then its batches laid into their slots of the epoch (the
        apart group shuffled anew each time round when it is cycled)."""
        own, rest = self.groups
        needed = sum(n for n, is_apart in zip(self.sizes, self._apart_slots) if is_apart)
        apart = torch.cat([own[torch.randperm(len(own), generator=generator)]
                           for _ in range(-(-needed // len(own)))])
        rest = rest[torch.randperm(len(rest), generator=generator)]
        parts, taken = [], {True: 0, False: 0}
        for size, is_apart in zip(self.sizes, self._apart_slots):
            source = apart if is_apart else rest
            parts.append(source[taken[is_apart] : taken[is_apart] + size])
            taken[is_apart] += size
        return torch.cat(parts)

    def indices(self, perm: torch.Tensor, start: int = 0):
        """Yield the index tensors of the epoch ordered by ``perm``, from batch ``start`` on."""
        for i in range(start, len(self.sizes)):
            yield perm[self.offsets[i] : self.offsets[i + 1]]

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """The batch ``(B, D)`` at ``index``, binarized afresh under dynamic binarization.

        On the CPU by :func:`binarized_rows`, its key drawn from the global torch RNG (a
        checkpoint's RNG state resumes it exactly); on other devices ``u < x`` with ``u``
        from the device's own generator (one kernel: on a GPU the hash's two dozen
        elementwise launches would cost more host time than the step's CUDA graph)."""
        if not self.dynamic:
            return self.x.index_select(0, index)
        if self.x.device.type != "cpu":
            xb = self.x.index_select(0, index)
            u = torch.rand_like(xb)
            return torch.lt(u, xb, out=u)
        key = torch.randint(-2**31, 2**31, (2,), dtype=torch.int32)
        rows = self.rows if self.rows_batch in (None, len(index)) else binarized_rows
        return rows(self.x, index, key)

    def use_rows(self, rows, batch_size: int | None = None) -> None:
        """Gather and binarize batches of ``batch_size`` images (``None``: every batch)
        with ``rows``, a function equal to :func:`binarized_rows` (e.g. that function
        compiled: :func:`pyro_vae.runner.compiling.compile_gather`)."""
        self.rows, self.rows_batch = rows, batch_size

    def batches(self, perm: torch.Tensor, start: int = 0):
        """Yield the batches of the epoch ordered by ``perm``, from batch ``start`` on."""
        for index in self.indices(perm, start):
            yield self.gather(index)


def _split(n: int, batch_size: int) -> list[int]:
    """The sizes of ``n`` images in batches of ``batch_size`` (a smaller last one)."""
    return [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])


def _interleaved(groups: list[list[int]]) -> tuple[list[int], list[bool]]:
    """The batch sizes of two groups in one epoch, the first group's batches spread evenly
    among the second's; and for each slot, whether it holds the first group."""
    apart, rest = groups
    slots = len(apart) + len(rest)
    at = {min(slots - 1, int((k + 0.5) * slots / len(apart))) for k in range(len(apart))}
    sizes, flags, a, r = [], [], iter(apart), iter(rest)
    for slot in range(slots):
        is_apart = slot in at
        sizes.append(next(a) if is_apart else next(r))
        flags.append(is_apart)
    return sizes, flags
