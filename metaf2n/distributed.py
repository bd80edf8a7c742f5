"""torch.distributed for training: one process per device, tasks sharded across ranks, gradients averaged by hand.

The inner loop takes gradients with ``torch.autograd.grad``, which DistributedDataParallel cannot see, so the outer
gradients are all-reduced here after ``backward`` instead of wrapping the models in DDP.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_from_env(device_type: str) -> DistInfo:
    """Join the process group torchrun describes (``WORLD_SIZE``/``RANK``/``LOCAL_RANK``); single process otherwise.

    NCCL for CUDA, gloo for the CPU. A group someone else initialised is used as it is.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not dist.is_initialized():
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def average_gradients(parameters, info: DistInfo) -> None:
    """All-reduce the ``.grad`` of ``parameters`` to their mean across ranks (one flat buffer per dtype/device)."""
    if not info.enabled:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= info.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def average_scalars(values: dict[str, float], info: DistInfo, device: torch.device) -> dict[str, float]:
    """The mean across ranks of each value (for logging and for agreeing on a skipped step)."""
    if not info.enabled or not values:
        return values
    keys = sorted(values)
    buffer = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    buffer /= info.world_size
    return dict(zip(keys, buffer.tolist()))


def gather_tensors(tensor: torch.Tensor, info: DistInfo) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape on all ranks), in rank order."""
    if not info.enabled:
        return [tensor]
    out = [torch.empty_like(tensor) for _ in range(info.world_size)]
    dist.all_gather(out, tensor)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
