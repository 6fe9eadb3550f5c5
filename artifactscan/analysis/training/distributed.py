"""Device and DDP plumbing for training: joining the process group, summing metrics across ranks, barriers."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from artifactscan.core.errors import TrainingError, option


@dataclass
class DistState:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def resolve_train_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise TrainingError(f"unknown device {spec!r}; use cpu, cuda or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"{option('device', 'cuda')} was asked for but no CUDA GPU is available; use "
                            f"{option('device', 'cpu')}")
    return dev


def init_distributed(device: torch.device) -> tuple[DistState, torch.device]:
    """Join the torchrun process group (env:// init; nccl on GPU, gloo on CPU) when ``WORLD_SIZE`` > 1."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistState(), device
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise TrainingError(
                f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs; lower torchrun --nproc-per-node"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return DistState(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local), device


def all_reduce_sum(values: list[float], device: torch.device, d: DistState) -> list[float]:
    if d.world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(d: DistState) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()
