"""Run-time plumbing shared by every measurement: the device, a progress bar, and torch.distributed ranks.

``distributed_world`` joins the process group when launched by torchrun; ``gather`` collects one Python object per
rank. Everything here works (and does nothing special) in a single process.
"""

from __future__ import annotations

from typing import Any

import torch

from artifactscan.core.errors import InputError


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/None -> cuda when available else cpu; refuse a CUDA device that is absent."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {device} asked for CUDA, but no CUDA GPU is available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present")
    return dev


class ProgressBar:
    """A rich progress bar on stderr (so ``--json`` stdout stays clean), or nothing."""

    def __init__(self, enabled: bool, total: int, label: str):
        self.bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("img"), TimeRemainingColumn(), console=Console(stderr=True),
                                transient=True)
            self.task = self.bar.add_task(label, total=total)

    def __enter__(self) -> "ProgressBar":
        if self.bar:
            self.bar.__enter__()
        return self

    def advance(self, n: int) -> None:
        if self.bar:
            self.bar.advance(self.task, n)

    def __exit__(self, *exc: object) -> None:
        if self.bar:
            self.bar.__exit__(*exc)


def distributed_world() -> tuple[int, int]:
    """``(world_size, rank)``; joins the process group when launched by torchrun (WORLD_SIZE > 1 in the env)."""
    import os

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
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
