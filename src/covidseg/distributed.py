"""torchrun / DistributedDataParallel plumbing; a single process is the default and needs none of it."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in a ``torchrun`` job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process (rank 0) writes outputs."""
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "DistContext":
        """Read RANK, WORLD_SIZE and LOCAL_RANK as set by ``torchrun``."""
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))

    def init(self, device: torch.device) -> None:
        """Join the process group: nccl on CUDA, gloo on the CPU."""
        if self.enabled and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def all_sum(self, values: list[float]) -> list[float]:
        """Sum a list of floats over all ranks (identity when alone)."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def shard(self, indices: torch.Tensor) -> torch.Tensor:
        """This rank's share of an epoch's permutation (DistributedSampler's rule: pad by wrapping, then stride)."""
        if not self.enabled:
            return indices
        total = -(-len(indices) // self.world_size) * self.world_size
        padded = torch.cat([indices, indices[: total - len(indices)]]) if total > len(indices) else indices
        return padded[self.rank:total:self.world_size]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()
