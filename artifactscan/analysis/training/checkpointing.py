"""Writing a run's files atomically: resumable state, self-describing checkpoints, float16 export."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from artifactscan.models.checkpoint import CheckpointMeta, read_meta, save_checkpoint
from artifactscan.core.errors import TrainingError
from artifactscan.analysis.training.config import RUNTIME_FIELDS, TrainConfig


def atomic_torch_save(obj: Any, path: Path) -> None:
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def checkpoint_meta(config: TrainConfig, registers: int, data_config: dict, step: int, kind: str = "trained",
          description: str = "", extra: dict | None = None) -> CheckpointMeta:
    return CheckpointMeta(
        arch=config.arch,
        arch_kwargs=config.model_kwargs(registers),
        data_config=data_config,
        kind=kind,
        step=step,
        description=description
        or f"{config.arch} ({config.depth}×{config.embed_dim}, {config.img_size}px/{config.patch_size}) with "
        f"{registers} register tokens, trained by artifactscan train-reg for {step} steps",
        extra={"config": config.to_dict(), **(extra or {})},
    )


def check_same_config(saved: dict, expected: TrainConfig | dict | None, run_dir: Path) -> None:
    if expected is None:
        return
    given = expected.identity() if isinstance(expected, TrainConfig) else dict(expected)
    # None means "automatic" (e.g. num_classes from the folders), which matches whatever was resolved then
    diffs = [k for k, v in given.items()
             if k not in RUNTIME_FIELDS and k in saved and v is not None and saved[k] != v]
    if diffs:
        shown = ", ".join(f"{k}: saved {saved[k]!r} vs given {given[k]!r}" for k in diffs[:3])
        raise TrainingError(
            f"{run_dir} was trained with a different config ({shown}); drop those options or start a new run folder"
        )


def export_half(src: str | Path, dst: str | Path, *, kind: str = "demo", description: str = "",
                extra: dict | None = None) -> Path:
    """Copy a trained checkpoint to a float16 ``.safetensors`` (half the size; loaders upcast to float32)."""
    from safetensors.torch import load_file

    src = Path(src)
    meta = read_meta(src)
    if meta is None:
        raise TrainingError(f"{src} is not a self-describing artifactscan checkpoint")
    sd = load_file(str(src)) if src.suffix == ".safetensors" else torch.load(src, weights_only=True)["state_dict"]
    meta.kind = kind
    meta.description = description or meta.description
    meta.extra = {**meta.extra, "dtype": "float16", "source": src.name, **(extra or {})}
    return save_checkpoint(dst, {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, meta)
