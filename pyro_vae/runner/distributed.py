"""Data-parallel training on PyTorch's distributed runtime (torchrun + DDP).

``torchrun --nproc_per_node N -m pyro_vae train ...`` starts N processes that each run
:func:`pyro_vae.train`; this module gives them a :class:`Context`:

- the process group (NCCL on CUDA, Gloo on CPU) from torchrun's environment variables,
  and a clean teardown;
- :meth:`Context.wrap`: the objective (:class:`~pyro_vae.objective.Objective`, an
  ``nn.Module`` whose ``forward`` is the loss) in ``DistributedDataParallel``, so the loss
  runs through DDP's forward and gradients are averaged across ranks. (Calling
  ``vae.model`` / ``vae.guide`` directly would bypass DDP's forward: the ranks would train
  apart without any error.)
- sums across ranks for the epoch's metrics, once per epoch.

Without torchrun (no ``WORLD_SIZE`` in the environment, or 1) everything here is a no-op
and training runs in one process.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import ConfigError, get_logger

log = get_logger(__name__)


@dataclass
class Context:
    """Where this process stands in a (possibly one-process) data-parallel run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def device(self, requested: torch.device) -> torch.device:
        """One GPU per process: ``cuda:LOCAL_RANK`` when training on CUDA."""
        if self.distributed and requested.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return requested

    def wrap(self, module: nn.Module, device: torch.device) -> nn.Module:
        if not self.distributed:
            return module
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over ranks (a copy; the input is left alone)."""
        tensor = tensor.clone()
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank if ``flag`` is true on any rank."""
        if not self.distributed:
            return flag
        return bool(self.sum(torch.tensor(float(flag), device=device)) > 0)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self, wait: bool = True) -> None:
        """Tear the process group down, after everything that holds on to it.

        DDP's reducer keeps the group (and Gloo's worker threads) alive; a wrapper that
        is only garbage in a reference cycle would otherwise be destroyed at interpreter
        exit, after the group, and abort the process ("terminate called without an
        active exception") although training succeeded. ``wait=False`` (after a failure,
        when another rank may be gone) skips the barrier.
        """
        if self.distributed and dist.is_initialized():
            gc.collect()  # the DDP wrappers of this run, while the group is alive
            if wait:
                dist.barrier()  # no rank leaves while another still talks to it
            dist.destroy_process_group()


def init_from_env(device: torch.device) -> Context:
    """The context described by torchrun's environment (``RANK``, ``WORLD_SIZE``, ...).

    Initializes the default process group when there is more than one process: NCCL for
    CUDA training, Gloo on the CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Context()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} "
                              "GPUs here; start at most that many processes per node")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    log.info("rank %d of %d (%s)", rank, world_size, backend)
    return Context(rank, world_size, local_rank, backend)
