"""Writing a run's files atomically: resumable state, self-describing checkpoints, float16 export."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from artifactscan.core.files import atomic_path, atomic_write_text
from artifactscan.models.checkpoint import CheckpointMeta, read_meta, save_checkpoint, torch_save
from artifactscan.core.errors import TrainingError
from artifactscan.analysis.training.config import RUNTIME_FIELDS, TrainConfig, option_name


def atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch_save(tmp, obj)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


# Temporaries a killed writer may leave in a run folder: this version's ``.<name>.<random>.partial`` and the
# ``.<name>[.<random>].tmp`` names earlier versions used.
_STALE = re.compile(r"^\..+(\.[a-z0-9_]{8}\.partial|\.tmp)$")


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Remove the temporaries a killed run left in ``run_dir`` (and its variant and checkpoint folders)."""
    removed: list[Path] = []
    if not run_dir.is_dir():
        return removed
    folders = [run_dir, run_dir / "checkpoints"] + [d / sub for d in run_dir.glob("reg*") if d.is_dir()
                                                     for sub in ("", "checkpoints")]
    for folder in folders:
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if _STALE.match(entry.name) and entry.is_file() and not entry.is_symlink():
                try:
                    entry.unlink()
                    removed.append(entry)
                except OSError:
                    pass
    return removed


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


def config_conflicts(saved: dict, expected: TrainConfig | dict | None) -> list[str]:
    """``--steps: the run has 400, given 9``: one entry per field of ``expected`` that differs from ``saved``."""
    if expected is None:
        return []
    given = expected.identity() if isinstance(expected, TrainConfig) else dict(expected)
    # None means "automatic" (e.g. num_classes from the folders), which matches whatever was resolved then
    diffs = [k for k, v in given.items()
             if k not in RUNTIME_FIELDS and k in saved and v is not None and saved[k] != v]
    return [f"{option_name(k)}: the run has {saved[k]!r}, given {given[k]!r}" for k in diffs]


def refuse_conflicts(conflicts: list[str], run_dir: Path) -> None:
    """One line naming every option that differs from the saved run, with both values."""
    if conflicts:
        raise TrainingError(f"{run_dir} was trained with a different config ({'; '.join(conflicts)}); drop those "
                            "options to continue it as it was, or start a new run folder")


def check_same_config(saved: dict, expected: TrainConfig | dict | None, run_dir: Path) -> None:
    refuse_conflicts(config_conflicts(saved, expected), run_dir)


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
