"""Multi-GPU runs under ``torchrun``: which process this is, and the few collectives training needs.

With ``WORLD_SIZE > 1`` every rank trains on its share of the spots, validation is predicted in
shards and gathered on rank 0, and only rank 0 writes files. A single process sees the same
calls as no-ops, so the trainer has one code path. ``hifusion predict`` shares its inputs (or
one input's spots) the same way.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run: rank 0 of 1 when not distributed."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def launched_world() -> int:
    """How many processes torchrun started (``WORLD_SIZE``; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def distributed(device: str, *, backend: str | None = None,
                timeout: timedelta | None = None) -> Iterator[DistInfo]:
    """Join the process group torchrun describes (if any); leave it only if we joined it.

    ``backend``: NCCL for a CUDA ``device``, else gloo, unless given (prediction passes only
    Python objects, which gloo carries without GPU memory). ``timeout``: how long a collective
    waits for the slowest rank (torch's default, 30 min, unless given).
    """
    if launched_world() <= 1:
        yield DistInfo()
        return
    joined = not dist.is_initialized()
    if joined:
        use_nccl = torch.cuda.is_available() and str(device) not in ("cpu", "mps")
        backend = backend or ("nccl" if use_nccl else "gloo")
        if backend == "nccl":  # NCCL collectives run on the current device: this rank's GPU
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timeout)
    try:
        yield DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
        if joined:  # leave together: tearing gloo down while a peer still talks aborts it
            dist.barrier()
    finally:
        if joined:
            dist.destroy_process_group()


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """Whether ``flag`` is true on any rank (every rank must call it)."""
    if not info.active:
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather_on_main(part: Any, info: DistInfo) -> list[Any] | None:
    """Every rank's ``part`` in rank order on rank 0; ``None`` on the other ranks."""
    if not info.active:
        return [part]
    parts: list[Any] | None = [None] * info.world if info.is_main else None
    dist.gather_object(part, parts, dst=0)
    return parts


def from_main(values: list[Any], info: DistInfo) -> list[Any]:
    """Rank 0's ``values`` on every rank (e.g. the epoch only rank 0 validated)."""
    if info.active:
        dist.broadcast_object_list(values, src=0)
    return values


__all__ = ["DistInfo", "any_rank", "distributed", "from_main", "gather_on_main", "launched_world"]
