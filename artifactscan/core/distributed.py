"""torch.distributed for the measurements: join torchrun's process group, and gather one object per rank.

Everything here works (and does nothing special) in a single process.
"""

from __future__ import annotations

import os
from typing import Any

import torch


def distributed_world() -> tuple[int, int]:
    """``(world_size, rank)``; joins the process group when launched by torchrun (WORLD_SIZE > 1 in the env)."""
    import torch.distributed as dist

    if not dist.is_available():
        return 1, 0
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return 1, 0
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return dist.get_world_size(), dist.get_rank()


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a collective: every rank must call it)."""
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
