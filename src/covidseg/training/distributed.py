"""torchrun / DistributedDataParallel plumbing; a single process is the default and needs none of it."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


def exit_with_parent() -> bool:
    """Ask Linux to SIGTERM this process when its parent dies; returns whether that is set up.

    torchrun starts the ranks as plain child processes: if torchrun itself is killed
    outright (SIGKILL, OOM killer) they would keep training, or hang in a collective, as
    orphans. PR_SET_PDEATHSIG fires when the parent goes; elsewhere this is a no-op.
    """
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(signal.SIGTERM), 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)
    return True


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
    def from_env(cls) -> DistContext:
        """Read RANK, WORLD_SIZE and LOCAL_RANK as set by ``torchrun``."""
        return cls(
            int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
        )

    def init(self, device: torch.device) -> None:
        """Join the process group: nccl on CUDA (one GPU per process), gloo on the CPU."""
        if self.enabled and not dist.is_initialized():
            exit_with_parent()
            if device.type == "cuda":
                # nccl collectives and barrier() use the current device: make it this rank's GPU,
                # or every rank lands on cuda:0.
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @staticmethod
    def _comm_device() -> torch.device:
        """Where collective tensors must live: the current GPU for nccl, the CPU for gloo."""
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def all_sum(self, values: list[float]) -> list[float]:
        """Sum a list of floats over all ranks (identity when alone)."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu().tolist()

    def sync_buffers(self, module: torch.nn.Module) -> None:
        """Make every rank's buffers equal: average floating ones (BatchNorm running statistics), take the rest from rank 0.

        DDP keeps parameters in step, but each rank's BatchNorm updates its running statistics from
        its own shard during the forward pass, so after an epoch the ranks' models differ in their
        buffers; call this before evaluating or saving so that all ranks hold the same model.
        """
        if not self.enabled:
            return
        for buf in module.buffers():
            if buf.is_floating_point():
                dist.all_reduce(buf.data, op=dist.ReduceOp.SUM)
                buf.data.div_(self.world_size)
            else:
                dist.broadcast(buf.data, src=0)

    def shard(self, indices: torch.Tensor) -> torch.Tensor:
        """This rank's share of an epoch's permutation (DistributedSampler's rule: pad by wrapping, then stride)."""
        if not self.enabled:
            return indices
        total = -(-len(indices) // self.world_size) * self.world_size
        padded = indices.repeat(-(-total // len(indices)))[:total] if total > len(indices) else indices
        return padded[self.rank : total : self.world_size]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()
