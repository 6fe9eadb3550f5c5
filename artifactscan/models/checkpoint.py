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
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from artifactscan.core.errors import CheckpointMetadataError

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
        """Read and validate; malformed fields raise ``checkpoint metadata invalid: <field>: <why>``."""
        validate_meta(raw)
        known = {f for f in cls.__dataclass_fields__}  # ignore keys written by newer versions
        return cls(**{k: v for k, v in raw.items() if k in known})


# arch_kwargs keys whose values are sizes: positive integers (or >= 0 where zero means "none").
_POSITIVE_KWARGS = ("depth", "embed_dim", "num_heads", "patch_size")
_COUNT_KWARGS = ("reg_tokens", "num_classes")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _type(v: Any) -> str:
    return type(v).__name__ if v is not None else "null"


def validate_meta(raw: Any) -> None:
    """Check the fields a loader relies on; raise :class:`CheckpointMetadataError` naming the first bad one."""
    def bad(field_name: str, why: str) -> CheckpointMetadataError:
        return CheckpointMetadataError(field_name, why)

    if not isinstance(raw, dict):
        raise bad(META_KEY, f"must be a JSON object, got {_type(raw)}")
    arch = raw.get("arch")
    if not isinstance(arch, str) or not arch.strip():
        raise bad("arch", "missing or not a non-empty string" if arch is None or isinstance(arch, str)
                  else f"must be a string, got {_type(arch)}")
    for key in ("arch_kwargs", "data_config", "extra"):
        if key in raw and not isinstance(raw[key], dict):
            raise bad(key, f"must be a JSON object, got {_type(raw[key])}")
    kwargs = raw.get("arch_kwargs", {})
    for key in _POSITIVE_KWARGS + _COUNT_KWARGS:
        if key in kwargs:
            v, least = kwargs[key], 1 if key in _POSITIVE_KWARGS else 0
            if not _is_int(v) or v < least:
                raise bad(f"arch_kwargs.{key}", f"must be an integer >= {least}, got {v!r}")
    if "img_size" in kwargs:
        v = kwargs["img_size"]
        sizes = v if isinstance(v, (list, tuple)) else [v]
        if not sizes or len(sizes) > 2 or not all(_is_int(x) and x > 0 for x in sizes):
            raise bad("arch_kwargs.img_size", f"must be a positive integer or [height, width], got {v!r}")
    config = raw.get("data_config", {})
    if config:
        if "input_size" not in config:
            raise bad("data_config.input_size", "missing (expected [3, height, width])")
        size = config["input_size"]
        if (not isinstance(size, (list, tuple)) or len(size) != 3 or not all(_is_int(x) and x > 0 for x in size)):
            raise bad("data_config.input_size", f"must be [3, height, width] of positive integers, got {size!r}")
        for key in ("mean", "std"):
            if key in config:
                v = config[key]
                if not isinstance(v, (list, tuple)) or len(v) != 3 or not all(_is_number(x) for x in v):
                    raise bad(f"data_config.{key}", f"must be 3 finite numbers (one per channel), got {v!r}")
                if key == "std" and not all(x > 0 for x in v):
                    raise bad("data_config.std", f"must be positive (images are divided by it), got {v!r}")
        if "crop_pct" in config and not (_is_number(config["crop_pct"]) and config["crop_pct"] > 0):
            raise bad("data_config.crop_pct", f"must be a positive number, got {config['crop_pct']!r}")
        if "interpolation" in config and not isinstance(config["interpolation"], str):
            raise bad("data_config.interpolation", f"must be a string, got {_type(config['interpolation'])}")
    if raw.get("step") is not None and not (_is_int(raw["step"]) and raw["step"] >= 0):
        raise bad("step", f"must be an integer >= 0 or null, got {raw['step']!r}")
    for key in ("kind", "description"):
        if key in raw and not isinstance(raw[key], str):
            raise bad(key, f"must be a string, got {_type(raw[key])}")


def parse_meta_json(text: str) -> "CheckpointMeta":
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise CheckpointMetadataError(META_KEY, f"not valid JSON ({exc})") from None
    return CheckpointMeta.from_dict(raw)


def save_checkpoint(path: str | Path, state_dict: dict[str, torch.Tensor], meta: CheckpointMeta) -> Path:
    """Write ``state_dict`` + ``meta`` atomically (temp file + rename), so a killed run never leaves half a file.

    ``.safetensors`` files are safetensors; any other suffix gets the ``.pt`` layout (``torch.save`` of plain dicts).
    """
    from artifactscan.core.files import atomic_path

    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError
            from safetensors.torch import save_file

            try:
                save_file(_untie_shared(tensors), tmp, metadata={META_KEY: meta.to_json()})
            except SafetensorError as exc:
                # Its I/O errors are text ("... No space left on device (os error 28)"): give back the OSError, so
                # that a full disk reads as one (core/errors.py) and not as a bug.
                code = re.search(r"\(os error (\d+)\)", str(exc))
                if code is None:
                    raise
                raise OSError(int(code.group(1)), os.strerror(int(code.group(1)))) from exc
        else:
            torch_save(tmp, {"state_dict": tensors, META_KEY: json.loads(meta.to_json())})
    return path


class _WriteFailures:
    """A binary file for ``torch.save`` that remembers the OSError of a failed write: torch turns it into a
    RuntimeError ("unexpected pos ...") that no longer says what happened (a full disk)."""

    def __init__(self, file: Any):
        self.file, self.failure = file, None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.failure = self.failure or exc
            raise

    def flush(self) -> None:
        self.file.flush()


def torch_save(path: str | Path, obj: Any) -> None:
    """``torch.save`` whose failed writes raise the OSError itself (with its errno: a full disk reads as one)."""
    with open(path, "wb") as f:
        out = _WriteFailures(f)
        try:
            torch.save(obj, out)
        except RuntimeError as exc:
            if out.failure is None:
                raise
            raise out.failure from exc


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
        return parse_meta_json(raw) if raw else None
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(blob, dict) and META_KEY in blob:
        return CheckpointMeta.from_dict(blob[META_KEY])
    return None
