"""Hugging Face ``transformers`` ViTs (a ``save_pretrained`` folder, or a hub id) as timm ``VisionTransformer``s.

One internal representation: a Dinov2, Dinov2WithRegisters, ViT, CLIP (vision tower of ``CLIPVisionModel`` or
``CLIPModel``) or SigLIP vision folder is read from its ``config.json`` and weight files and converted into the
equivalent timm ``VisionTransformer`` (q/k/v fused into ``qkv``, layer scales, the CLS position row folded like timm's
DINOv2 converter), so every command (probe, attention, fix, train-reg) works on it unchanged. ``transformers`` itself
is not needed to load (the ``artifactscan[hf]`` extra installs it to check the conversion against the HF model).
Both the transformers 4 key names (``attention.attention.query``, ``intermediate.dense``, hub files) and the 5 ones
(``attention.q_proj``, ``mlp.fc1``) are read. Preprocessing comes from the folder's ``preprocessor_config.json``.

Each family's folders are converted by its own module in ``models/layouts/``, found by the config's ``model_type`` in
``layouts/table.py`` (the plain ViTs above: ``hf_vit.py``; DINOv3, AIMv2, BEiT, RADIO: their modules); SigLIP2's
NaFlex folders are not converted: they run on transformers' own model (``layouts/naflex.py``). The converted model is built by the layout's registered architecture
(``artifactscan_vit`` ...: plain JSON kwargs), so a checkpoint saved from it (``fix --out``) reloads.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from artifactscan.core.errors import ModelLoadError, NotAViTError, OfflineError
from artifactscan.core.paths import display_name, what_it_is
from artifactscan.models.layouts.base import FolderLayout
from artifactscan.models.layouts.table import folder_layout, folder_model_types
from artifactscan.models.materialize import (
    assign_weights, build_on_meta, dominant_float_dtype, finish_meta_build, own_copies, read_safetensors,
    read_safetensors_header, read_torch_mapped, resolve_precision, state_dict_dtype,
)

#: ``{config model_type: transformers class}`` of every family's folder layout (``layouts/table.py``)
SUPPORTED = folder_model_types()
_RESAMPLE = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic"}  # PIL codes (1 = LANCZOS: nearest we have)
# The weights a save_pretrained folder (transformers, or timm's hub layout) must hold besides config.json; a sharded
# save writes its index. Any other *.safetensors next to a config.json does not make a Hugging Face folder.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# What train-reg and train-model write into a run folder (train_reg.json) and into each model's folder
# (analysis/training: loop.py, orchestration.py). Those folders hold a config.json too: a TrainConfig, not a
# Hugging Face config, so these are checked first.
TRAINING_RUN_FILES = ("train_reg.json", "metrics.jsonl", "result.json", "last.pt", "final.safetensors",
                      "worker-config.json")


def is_training_run(path: str | Path) -> bool:
    """A folder train-reg or train-model wrote (the run, or one model's folder in it), recognised by its own files."""
    path = Path(path)
    return path.is_dir() and (any((path / name).is_file() for name in TRAINING_RUN_FILES)
                              or (path / "checkpoints").is_dir() and (path / "config.json").is_file())


def has_weights(path: str | Path) -> bool:
    """Whether a folder holds the weights of a Hugging Face save_pretrained folder (:data:`WEIGHT_FILES`).

    Any entry of that name counts, not only a regular file: a FIFO or a broken link where the weights should be is a
    damaged Hugging Face folder, which the loader then names for what it is (never opened)."""
    return any(os.path.lexists(Path(path) / name) for name in WEIGHT_FILES)


def is_model_folder(path: str | Path) -> bool:
    """A Hugging Face model folder: ``config.json`` next to its weights, and not a training run's folder."""
    path = Path(path)
    return path.is_dir() and not is_training_run(path) and (path / "config.json").is_file() and has_weights(path)


def not_a_model_folder(spec: str, path: Path) -> str:
    """Why a folder given as MODEL is not one, and what to pass instead."""
    if is_training_run(path):
        finals = sorted(path.glob("final.safetensors")) + sorted(path.glob("*/final.safetensors"))
        example = f" such as {finals[0]}" if finals else ""
        return (f"{spec} is a training run's folder, not a model; pass one of its checkpoints{example}, or scan "
                f"them all with `artifactscan norms {spec} IMAGES`")
    if (path / "config.json").is_file():
        return (f"{spec} has a config.json but none of the weights of a Hugging Face folder "
                f"({', '.join(WEIGHT_FILES)}); pass a folder save_pretrained wrote, or a checkpoint file")
    return (f"{spec} is a folder without a config.json; pass a checkpoint file (.safetensors / .pt), a Hugging Face "
            "save_pretrained folder or a model name")


def is_timm_folder(path: str | Path) -> bool:
    """A timm hub folder (``config.json`` naming a timm ``architecture``), loaded by timm's ``local-dir:``."""
    try:
        return "architecture" in json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False


def _read_config(folder: Path) -> tuple[dict[str, Any], str, FolderLayout]:
    """(vision config, model_type, the layout converting it) of a folder."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{folder}/config.json is not readable JSON: {exc}") from exc
    model_type = config.get("model_type", "")
    if model_type == "dinov3_convnext":
        raise NotAViTError(f"{folder} is a Hugging Face DINOv3 ConvNeXt (dinov3_convnext): a convolutional network, "
                           "not a Vision Transformer, so it has no tokens to scan; use a DINOv3 ViT (dinov3_vit)")
    if model_type not in SUPPORTED:
        raise ModelLoadError(f"{folder} is a Hugging Face {model_type or 'unknown'} model; artifactscan converts "
                             f"{', '.join(sorted(set(SUPPORTED.values())))} (config model_type: "
                             f"{', '.join(sorted(SUPPORTED))})")
    layout = folder_layout(model_type)
    assert layout is not None  # SUPPORTED is the table's model types
    return layout.vision_config(config, model_type), model_type, layout


@dataclass
class FolderWeights:
    """A folder's weights read into the dtype the model will hold (chosen before reading where the files allow)."""

    state_dict: dict[str, torch.Tensor]
    dtype: torch.dtype
    file_dtype: torch.dtype | None
    note: str | None

    def take_state_dict(self) -> dict[str, torch.Tensor]:
        state_dict, self.state_dict = self.state_dict, {}
        return state_dict


def _shards(folder: Path) -> list[Path]:
    """The folder's weight files; one that is not a regular file is a :class:`ModelLoadError` naming it."""
    shards = sorted(folder.glob("*.safetensors"))
    bins = [] if shards else sorted(folder.glob("pytorch_model*.bin"))
    if not shards and not bins:
        raise ModelLoadError(f"{folder} has config.json but no weights (model.safetensors or pytorch_model.bin)")
    for shard in shards or bins:
        why = what_it_is(shard)
        if why is not None:  # a named pipe would block the load forever
            raise ModelLoadError(f"{display_name(shard)} {why}; a Hugging Face folder's weights must be files")
    return shards or bins


def _read_weights(folder: Path, precision: str = "fp32") -> FolderWeights:
    """The folder's weights, floating ones in the dtype ``precision`` resolves to: safetensors shards are read
    straight into it (their headers give the size first, so ``auto`` and the memory check decide before anything is
    read), PyTorch ``.bin`` shards converted tensor by tensor. A shard that is damaged or empty is a
    :class:`ModelLoadError` naming it, as the same file given alone is."""
    shards, what = _shards(folder), display_name(folder)
    if shards[0].suffix == ".safetensors":
        headers = [read_safetensors_header(shard) for shard in shards]  # checked for truncation
        file_dtype = dominant_float_dtype(headers)
        dtype, note = resolve_precision(precision, sum(h.float_elements() for h in headers), file_dtype, what)
        out: dict[str, torch.Tensor] = {}
        for header in headers:
            out.update(read_safetensors(header, dtype))  # checked for rewrites while read
        return FolderWeights(out, dtype, file_dtype, note)
    # torch.load memory-maps each zip shard: nothing is read before the memory check
    read = [(shard, *read_torch_mapped(shard, trust=False)) for shard in shards]
    out = {k: v for _, blob, _ in read for k, v in blob.items()}
    file_dtype = state_dict_dtype(out)
    dtype, note = resolve_precision(precision, sum(t.numel() for t in out.values() if t.is_floating_point()),
                                    file_dtype, what)
    for shard, blob, mapped in read:  # copied out of a mapping (in dtype): a shard rewritten later is no SIGBUS
        own_copies(blob, dtype, shard, mapped)
        out.update(blob)
    return FolderWeights(out, dtype, file_dtype, note)


def data_config(folder: Path, size: int) -> dict[str, Any] | None:
    """timm-style preprocessing from ``preprocessor_config.json`` (``None`` when the folder has none)."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return None
    pp = json.loads(path.read_text())
    crop = pp.get("crop_size") if pp.get("do_center_crop", False) else None
    resize = pp.get("size") or {}
    def side(d: Any) -> int | None:
        if isinstance(d, int):
            return d
        if isinstance(d, dict):
            return d.get("height") or d.get("shortest_edge")
        return None
    out_side = side(crop) or side(resize) or size
    short = side(resize) or out_side
    return {"input_size": (3, int(out_side), int(out_side)), "mean": tuple(pp.get("image_mean", (0.5,) * 3)),
            "std": tuple(pp.get("image_std", (0.5,) * 3)),
            "interpolation": _RESAMPLE.get(int(pp.get("resample", 3)), "bicubic"),
            "crop_pct": float(out_side) / float(short) if crop else 1.0}


@dataclass
class ConvertedFolder:
    """A Hugging Face folder as a timm model: its registered architecture and kwargs (a checkpoint saved from it
    reloads), its data config (None: the folder has no ``preprocessor_config.json``), notes, and the dtype of the
    folder's own weights."""

    model: nn.Module
    arch: str
    kwargs: dict[str, Any]
    data_config: dict[str, Any] | None
    notes: list[str]
    file_dtype: torch.dtype | None


def load_folder(folder: Path, precision: str = "fp32") -> ConvertedFolder:
    """The folder's model, converted by its family's folder layout (``layouts/table.py``), built on the meta device
    and holding the weights in the dtype ``precision`` resolves to: no float32 model is built before a half one."""
    vision, model_type, layout = _read_config(folder)
    kwargs = layout.config_kwargs(vision) if layout.config_kwargs else None  # a bad config before any weight is read
    read = _read_weights(folder, precision)
    raw = read.state_dict if layout.preprocessing else {}  # RADIO reads its normalisation from the weights later
    # Handed over, not kept here: the converter then holds the only reference to the tensors read and can free each
    # block's q/k/v as it fuses them (a bf16 ViT-L folder's load peaks at about its file size).
    sd, dropped = layout.convert(read.take_state_dict(), vision, str(folder))
    if kwargs is None:
        kwargs = layout.weight_kwargs(vision, model_type, sd)  # type: ignore[misc]
    build = partial(layout.build, **kwargs)
    model = build_on_meta(build)  # shapes only: the weights are assigned below, no random initialisation
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = [k for k in own if k in sd and own[k].shape != sd[k].shape]
    if missing or unexpected or wrong:
        raise ModelLoadError(f"{folder}: converted {SUPPORTED[model_type]} weights do not fit the equivalent timm "
                             f"ViT (missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]}); "
                             "does its config.json belong to these weights?")
    assign_weights(model, sd, read.dtype)
    model = finish_meta_build(model, build, sd, read.dtype)
    notes = [f"converted from the Hugging Face {SUPPORTED[model_type]} layout"]
    if dropped:
        notes.append("dropped, as not part of the image encoder: "
                     + ", ".join(f"{what} ({n} keys)" for what, n in sorted(dropped.items())))
    if read.note:
        notes.append(read.note)
    config = data_config(folder, kwargs["img_size"])
    if layout.preprocessing is not None:  # e.g. RADIO normalises inside its forward: that is the preprocessing
        config, more = layout.preprocessing(folder, config, vision, raw, kwargs)
        notes.extend(more)
    return ConvertedFolder(model, layout.arch, kwargs, config, notes, read.file_dtype)


def looks_like_hub_id(spec: str) -> bool:
    """``ORG/NAME`` (one slash, no file suffix, not starting like a path)."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", spec)) and not spec.endswith(
        (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".json"))


def hub_folder(repo_id: str, online: bool) -> Path:
    """The local folder of a Hugging Face model id: downloaded when online, else from the local cache only."""
    from huggingface_hub import list_repo_files, snapshot_download

    patterns = ["config.json", "preprocessor_config.json", "*.safetensors", "*.safetensors.index.json"]
    try:
        if not online:
            patterns += ["pytorch_model*.bin"]
        elif not any(f.endswith(".safetensors") for f in list_repo_files(repo_id)):
            patterns += ["pytorch_model*.bin"]  # older repos: PyTorch weights only (read with weights_only)
        return Path(snapshot_download(repo_id, local_files_only=not online, allow_patterns=patterns))
    except Exception as exc:
        taken = f"'{repo_id}' is not a file or folder here, so it was taken as a Hugging Face model id"
        if online:
            raise ModelLoadError(f"{taken}, and the hub could not give it: {str(exc).splitlines()[0]}") from exc
        raise OfflineError(
            f"{taken}; the hub is unreachable and it is not in the local Hugging Face cache. Pass a local file or "
            "save_pretrained folder instead (or `hf-hub:ORG/NAME` for timm's hub models)."
        ) from exc
