"""Which torch device a measurement runs on: ``auto`` resolved, and an absent CUDA device refused up front."""

from __future__ import annotations

import torch

from artifactscan.core.errors import InputError, option


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/None -> cuda when available else cpu; refuse a CUDA device that is absent."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"{option('device', repr(device))} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{option('device', device)} asked for CUDA, but no CUDA GPU is available here; use "
                             f"{option('device', 'cpu')}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"{option('device', device)}: only {torch.cuda.device_count()} CUDA device(s) present")
    return dev
