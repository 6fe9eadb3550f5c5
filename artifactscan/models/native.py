"""Checkpoint files in the layouts people hold, turned into a timm ``VisionTransformer`` (or ``Eva``) state dict.

Which layout a file is in, what it drops and how it converts belong to its family's module in ``models/layouts/``
(dispatched through ``layouts/table.py``); the conversions themselves are timm's (the ones it runs when it loads
pretrained weights), and ``timm.models.clean_state_dict`` strips ``module.`` / ``_orig_mod.`` in any order. This module
adds what timm leaves to the caller: reading the file
(``weights_only``, with ``argparse.Namespace`` allowed for timm ``train.py`` checkpoints), unwrapping training
checkpoints (``state_dict`` / ``model`` / ``model_ema`` / ``teacher`` / ``student`` / ``backbone.``), choosing EMA or
raw weights, and dropping only the keys it can *name* as not part of the image encoder (text tower, MAE decoder,
DINO heads, OpenAI's metadata), so that everything else is loaded strictly.
"""

from __future__ import annotations

import argparse
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from artifactscan.core.errors import InputError, ModelLoadError, UntrustedCheckpointError, option
from artifactscan.models.layouts.table import file_layout, file_layout_of

# Top-level entries of training checkpoints that hold a model's weights, EMA first (timm's own preference).
EMA_KEYS = ("state_dict_ema", "model_ema", "ema", "teacher")
RAW_KEYS = ("state_dict", "model", "model_state_dict", "student", "module", "net", "network")
WEIGHT_CHOICES = ("ema", "raw")

# The projection heads of self-supervised training around a `backbone.` (dropped, and counted in `dropped`).
_SSL_HEADS = re.compile(r"^(dino_head\.|ibot_head\.|head\.)")


@dataclass
class NativeCheckpoint:
    """A checkpoint's image-encoder weights in their native key layout, and what was learnt unwrapping them.

    Attributes:
        state_dict: the encoder's tensors, wrapper prefixes removed, native key names (not yet timm's).
        layout: ``timm``, ``dinov2``, ``dinov3`` (Meta's original DINOv3 files), ``pe`` (Meta's Perception Encoder
            files), ``deit3``, ``mae``, ``openai_clip`` (OpenAI and OpenCLIP share it), ``openclip_timm`` (an OpenCLIP tower around a timm trunk).
        weights: ``ema`` or ``raw`` when the checkpoint held a choice (``None``: it held one set of weights).
        wrapper: where the weights were found (``state_dict_ema``, ``teacher.backbone.`` ...), ``""`` for a bare dict.
        dropped: ``{what: number of keys}`` removed as not part of the image encoder.
        train_arch / train_args: a timm ``train.py`` checkpoint's recorded ``arch`` and ``args``.
        top_keys: the file's top-level keys (named in errors).
        data_config: preprocessing the layout implies (Meta's DINOv3 files: mean/std from the name's tag).
        notes: what the reader has to say about the file (added to the loaded model's notes).
    """

    state_dict: dict[str, torch.Tensor]
    layout: str
    weights: str | None = None
    wrapper: str = ""
    dropped: dict[str, int] = field(default_factory=dict)
    train_arch: str | None = None
    train_args: dict[str, Any] = field(default_factory=dict)
    top_keys: list[str] = field(default_factory=list)
    torchscript: bool = False
    data_config: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def is_wrapped(self) -> bool:
        return bool(self.wrapper)


# ----------------------------------------------------------------------------------------------- reading
def is_torchscript(path: Path) -> bool:
    """A TorchScript archive (e.g. OpenAI's CLIP ``.pt``): a zip holding compiled ``code/``."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.split("/", 2)[1:2] == ["code"] or n.endswith("/constants.pkl") for n in zf.namelist())


def read_error_reason(exc: BaseException, path: Path) -> str:
    """Why a checkpoint could not be read, never empty (an empty file's EOFError has no message)."""
    try:
        if path.stat().st_size == 0:
            return "the file is empty (0 bytes); it was probably cut short while being written"
    except OSError:
        pass
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else f"{type(exc).__name__} (truncated or not a checkpoint)"


def read_torch_file(path: Path, trust: bool) -> Any:
    """``torch.load`` with ``weights_only`` (``argparse.Namespace`` allowed); TorchScript and whole modules only
    with ``trust`` (both run code from the file)."""
    if is_torchscript(path):
        if not trust:
            raise UntrustedCheckpointError(
                f"{path.name} is a TorchScript archive (e.g. OpenAI's CLIP .pt), and loading it executes its code. "
                f"If you trust the file, add {option('trust_checkpoint', True)} (its state dict is then loaded like "
                "any other).")
        try:
            with warnings.catch_warnings():  # torch.jit's deprecation notice is not the user's concern here
                warnings.simplefilter("ignore")
                return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        except Exception as exc:
            raise ModelLoadError(f"{path} is not a loadable TorchScript archive: {exc}") from exc
    # Memory-mapped where the format allows: a training checkpoint's optimizer state is never read into memory.
    mmap = zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if not trust:
            found = unsafe_globals(path)
            raise UntrustedCheckpointError(
                f"{path.name} holds pickled Python objects{found} that weights_only loading refuses, because "
                "unpickling runs code from the file. Save `model.state_dict()` instead, or, if you trust the file, "
                f"add {option('trust_checkpoint', True)}.") from exc
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as exc:
        raise ModelLoadError(f"{path} is not a readable PyTorch checkpoint: {read_error_reason(exc, path)}") from exc


def unsafe_globals(path: Path) -> str:
    """`` (posix.system, ...)``: the first objects a pickle would build that weights_only refuses, or ``""``."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:
        return ""
    return f" ({', '.join(names[:3])})" if names else ""


# ----------------------------------------------------------------------------------------------- unwrapping
def _tensor_dict(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def _namespace_dict(value: Any) -> dict[str, Any]:
    if isinstance(value, argparse.Namespace):
        return dict(vars(value))
    return dict(value) if isinstance(value, dict) else {}


def _choose(options: dict[str, str], weights: str | None) -> tuple[str, str | None]:
    """Pick among ``{key: 'ema'|'raw'}``: the requested kind if present, else EMA; returns (key, label or None).

    The label is ``None`` when there was no choice to make (one kind only, none requested)."""
    kinds = set(options.values())
    want = weights if weights in kinds else ("ema" if "ema" in kinds else "raw")
    key = next(k for k, kind in options.items() if kind == want)
    return key, (want if len(kinds) > 1 or weights == want else None)


def unwrap(blob: Any, weights: str | None = None, name: str = "checkpoint") -> NativeCheckpoint:
    """Find the image encoder's weights in whatever a training script saved.

    Raises:
        ModelLoadError naming the top-level keys when no state dict of tensors is found.
    """
    if weights is not None and weights not in WEIGHT_CHOICES:
        raise InputError(f"{option('weights')} must be one of {', '.join(WEIGHT_CHOICES)}, got {weights!r}")
    if not isinstance(blob, dict):
        raise ModelLoadError(f"{name} holds a {type(blob).__name__}, not a state dict")
    top_keys = [str(k) for k in blob]
    train_arch = blob.get("arch") if isinstance(blob.get("arch"), str) else None
    train_args = _namespace_dict(blob.get("args"))
    wrapper, label = "", None
    sd: Any = blob
    if not _tensor_dict(blob):
        tensors = {k: v for k, v in blob.items() if isinstance(v, torch.Tensor)}
        options = {k: "ema" for k in EMA_KEYS if _tensor_dict(blob.get(k))}
        options.update({k: "raw" for k in RAW_KEYS if _tensor_dict(blob.get(k))})
        if options:
            wrapper, label = _choose(options, weights)
            sd = blob[wrapper]
        elif tensors and all(isinstance(v, (torch.Tensor, int, float, str)) for v in blob.values()):
            sd = tensors  # a state dict next to a few scalars
        else:
            shown = ", ".join(top_keys[:8]) + (" ..." if len(top_keys) > 8 else "")
            raise ModelLoadError(f"{name} holds no state dict of tensors: its top-level keys are {shown} (looked for "
                                 f"{', '.join(EMA_KEYS + RAW_KEYS)})")
    from timm.models import clean_state_dict  # DDP `module.` / torch.compile `_orig_mod.`, in any order

    sd = clean_state_dict(dict(sd))
    # Prefix wrappers inside the dict: a whole SSL meta-architecture (`teacher.` / `student.`), then `backbone.`.
    prefixes = {k.split(".", 1)[0] for k in sd if "." in k}
    if {"teacher", "student"} & prefixes and all(k.split(".", 1)[0] in ("teacher", "student") for k in sd):
        options = {p: ("ema" if p == "teacher" else "raw") for p in ("teacher", "student") if p in prefixes}
        chosen, label2 = _choose(options, weights)
        label = label2 or label
        sd = clean_state_dict({k[len(chosen) + 1:]: v for k, v in sd.items() if k.startswith(chosen + ".")})
        wrapper = f"{wrapper}: {chosen}." if wrapper else f"{chosen}."
    dropped: dict[str, int] = {}
    if any(k.startswith("backbone.") for k in sd):
        rest = [k for k in sd if not k.startswith("backbone.")]
        if all(_SSL_HEADS.match(k) for k in rest):
            if rest:
                dropped["self-supervised projection heads (dino_head / ibot_head / head)"] = len(rest)
            sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
            wrapper += "backbone."
    if weights is not None and label != weights:
        found = wrapper or "one bare state dict"
        raise InputError(f"{option('weights', weights)}: {name} holds no {weights} weights (found: {found}; top-level "
                         f"keys: {', '.join(top_keys[:6])}); drop {option('weights')}")
    layout = file_layout_of(sd)
    if layout.refusal is not None:  # recognised only to be refused (a ConvNeXt)
        raise layout.refusal(name)
    sd, more = drop_non_encoder(sd, layout.name)
    dropped.update(more)
    ckpt = NativeCheckpoint(sd, layout.name, label, wrapper, dropped, train_arch, train_args, top_keys)
    if layout.inspect is not None:  # what the layout itself says (Meta's DINOv3: completeness, preprocessing)
        ckpt.data_config, ckpt.notes = layout.inspect(sd, name)
    return ckpt


def detect_layout(sd: dict[str, torch.Tensor]) -> str:
    """The key layout family, by its keys: the first of the table's layouts (``layouts/table.py``) that recognises
    them."""
    return file_layout_of(sd).name


def drop_non_encoder(sd: dict[str, torch.Tensor], layout: str) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Remove the keys that are nameably not the image encoder; everything else stays (and must load strictly)."""
    rules = file_layout(layout).drop(sd)
    kept, dropped = {}, {}
    for k, v in sd.items():
        what = next((label for label, rx in rules if rx.match(k)), None)
        if what is None:
            kept[k] = v
        else:
            dropped[what] = dropped.get(what, 0) + 1
    return kept, dropped


# ----------------------------------------------------------------------------------------------- to timm's layout
def to_timm(sd: dict[str, torch.Tensor], layout: str, model: nn.Module | None = None,
            name: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """The state dict in timm's keys (``VisionTransformer``, ``Eva`` for DINOv3 and PE), through the layout's own
    converter (timm's ``checkpoint_filter_fn`` of the family).

    With ``model``, timm also resamples the position and patch embeddings to the model's grid (as when it loads
    pretrained weights). Without it only keys are renamed (used to read a bare file's shapes before any model
    exists).
    """
    return file_layout(layout).to_timm(sd, model, name)  # type: ignore[misc]


def describe_dropped(native: NativeCheckpoint) -> str:
    """``'dropped 302 keys of the CLIP text tower'``-style phrase, or ``''``."""
    parts = [f"{n} keys of the {what}" if not what.startswith("self") else f"{n} keys of {what}"
             for what, n in native.dropped.items()]
    return ("dropped " + ", ".join(parts)) if parts else ""
