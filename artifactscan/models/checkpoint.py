"""The self-describing checkpoint format that ``train-reg`` writes and every command reads.

A checkpoint is a ``.safetensors`` file (preferred) or a ``.pt`` file whose header records the architecture, so that
``artifactscan norms run/ckpt.safetensors`` needs no ``--arch``:

* ``.safetensors``: tensors = the model's ``state_dict``; ``metadata["artifactscan"]`` = JSON of :class:`CheckpointMeta`.
* ``.pt``: ``torch.save({"state_dict": {...}, "artifactscan": {...}})`` — plain dicts, tensors and strings only, so it
  loads with ``torch.load(weights_only=True)`` and never unpickles code.

``arch`` is a timm model name (or an architecture artifactscan registers with timm, e.g. the phantom) and
``arch_kwargs`` are the keyword overrides passed to ``timm.create_model`` (``img_size``, ``depth``, ``reg_tokens`` ...).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

FORMAT_NAME = "artifactscan-checkpoint"
FORMAT_VERSION = 1
META_KEY = "artifactscan"


@dataclass
class CheckpointMeta:
    """What a checkpoint says about itself.

    Attributes:
        arch: timm model name the weights belong to.
        arch_kwargs: keyword overrides for ``timm.create_model`` (e.g. ``{"img_size": 32, "reg_tokens": 4}``).
        data_config: timm-style preprocessing (``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``).
        kind: free label: ``"trained"``, ``"demo"``, ``"phantom"`` ...
        step: optimiser step the weights were saved at (``None`` for final or unknown).
        description: one human sentence shown in reports.
        extra: anything else (training config, phantom ground truth settings ...).
    """

    arch: str
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    data_config: dict[str, Any] = field(default_factory=dict)
    kind: str = "trained"
    step: int | None = None
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "CheckpointMeta":
        known = {f for f in cls.__dataclass_fields__}  # ignore keys written by newer versions
        return cls(**{k: v for k, v in raw.items() if k in known})


def _atomic_target(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)


def save_checkpoint(path: str | Path, state_dict: dict[str, torch.Tensor], meta: CheckpointMeta) -> Path:
    """Write ``state_dict`` + ``meta`` atomically (temp file + rename), so a killed run never leaves half a file."""
    path = Path(path)
    fd, tmp = _atomic_target(path)
    os.close(fd)
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(_untie_shared(tensors), tmp, metadata={META_KEY: meta.to_json()})
        else:
            torch.save({"state_dict": tensors, META_KEY: json.loads(meta.to_json())}, tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a checkpoint is meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _untie_shared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage; clone the later ones so the file stays loadable anywhere.
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def read_meta(path: str | Path) -> CheckpointMeta | None:
    """Return the checkpoint's own metadata, or ``None`` when it does not describe itself."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
        return CheckpointMeta.from_dict(json.loads(raw)) if raw else None
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(blob, dict) and isinstance(blob.get(META_KEY), dict):
        return CheckpointMeta.from_dict(blob[META_KEY])
    return None
