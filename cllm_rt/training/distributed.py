"""The process group that ``torchrun`` describes through its environment, or a single process without one.

Collection and training read ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` as torchrun sets them and pick
NCCL on GPUs, gloo on CPUs; run without torchrun, the same code is one process with no process group, so
every collective below degrades to a no-op instead of being guarded at each call site.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Processes:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, values: list[float]) -> list[float]:
        """Element-wise mean over processes (each process passes its own values)."""
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.world_size).tolist()

    def sum(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t)


@contextlib.contextmanager
def torchrun_processes(device: str | None = None):
    """Join the process group torchrun set up (if any) for the duration of the block.

    ``device`` overrides the default: ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    chosen = torch.device(device)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
        owned = True
    else:
        owned = False
    processes = Processes(rank, world_size, chosen)
    try:
        yield processes
        if owned:
            # gloo aborts a process whose group is destroyed while a peer is still in a collective with it
            processes.barrier()
    finally:
        if owned:
            dist.destroy_process_group()
