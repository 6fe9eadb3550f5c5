"""Turning what the user typed (a timm name, an ``hf-hub:`` id, a checkpoint file, a built-in name) into a ViT.

Everything downstream works on a :class:`LoadedModel`, which records how many prefix tokens the model has and which
are CLS and which are registers — read from the model itself, because token 0 is not always CLS (``*_reg*_gap``
models have registers and no CLS; Eva and DINOv2 differ from plain ViT).
"""

from __future__ import annotations

import difflib
import json
import pickle
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from artifactscan.models.checkpoint import META_KEY, CheckpointMeta, read_meta
from artifactscan.core.errors import (
    CheckpointMetadataError,
    CheckpointMismatchError,
    InputError,
    ModelLoadError,
    NonFiniteError,
    NotAViTError,
    OfflineError,
    UntrustedCheckpointError,
)
from artifactscan.models.registry import (
    architecture_builder,
    builtin_weights,
    install_checkpoint_extensions,
    unknown_artifactscan_arch,
)

CHECKPOINT_SUFFIXES = {".safetensors", ".pt", ".pth", ".bin", ".ckpt"}
HUB_HOST = "huggingface.co"

PHANTOM_NOTE = (
    "CALIBRATION PHANTOM: its artifact tokens were built in by construction (README: 'The calibration phantom'); "
    "its findings say nothing about real models."
)


def builtin_models() -> dict[str, Path]:
    """Names of the models shipped inside the package (``demo``, ``demo-reg4``, ``phantom`` ...)."""
    return builtin_weights()


@dataclass
class LoadedModel:
    """A ViT ready to scan, with the facts about its token layout.

    Attributes:
        model: the ``nn.Module`` (eval mode).
        name: what to call it in reports.
        source: ``builtin`` / ``timm`` / ``hf-hub`` / ``checkpoint`` / ``pickled-module`` / ``module``.
        num_prefix_tokens: tokens before the patch tokens (CLS + registers).
        num_cls_tokens: 0 or 1.
        num_register_tokens: register tokens (after CLS in timm's layout).
        data_config: timm preprocessing config (input_size, mean, std, interpolation, crop_pct).
        meta: the checkpoint's own metadata, when it had some.
    """

    model: nn.Module
    name: str
    source: str
    arch: str | None
    num_prefix_tokens: int
    num_cls_tokens: int
    num_register_tokens: int
    data_config: dict[str, Any]
    meta: CheckpointMeta | None = None
    kind: str = "model"
    notes: list[str] = field(default_factory=list)
    nonfinite_tensors: list[str] = field(default_factory=list)  # "name (n NaN, m Inf)", checked at load time

    @property
    def prefix_names(self) -> list[str]:
        return ["cls"] * self.num_cls_tokens + [f"reg{i}" for i in range(self.num_register_tokens)]

    @property
    def blocks(self) -> list[nn.Module]:
        return list(self.model.blocks)

    @property
    def patch_size(self) -> tuple[int, int]:
        ps = self.model.patch_embed.patch_size
        return (ps, ps) if isinstance(ps, int) else tuple(ps)  # type: ignore[return-value]

    @property
    def input_size(self) -> tuple[int, int]:
        _, h, w = self.data_config["input_size"]
        return int(h), int(w)

    @property
    def grid_size(self) -> tuple[int, int]:
        (h, w), (ph, pw) = self.input_size, self.patch_size
        return h // ph, w // pw

    @property
    def is_phantom(self) -> bool:
        return self.kind == "phantom"

    @property
    def recorded_onset(self) -> int | None:
        """The artifact onset block this checkpoint's metadata records (phantoms record where they plant), or None.

        Read from the metadata, never measured: error messages may name it without running a scan."""
        extra = self.meta.extra if self.meta is not None else {}
        onset = (extra.get("phantom") or {}).get("onset", extra.get("onset"))
        return int(onset) if isinstance(onset, int) and not isinstance(onset, bool) else None

    def layer_range_hint(self) -> str:
        """'' or '; its checkpoint records the artifact onset at block N (blocks N..L-1 hold outliers)'."""
        onset = self.recorded_onset
        if onset is None or not 0 <= onset < len(self.blocks):
            return ""
        return (f"; its checkpoint records the artifact onset at block {onset} (blocks {onset}..{len(self.blocks) - 1} "
                "hold outliers)")


def describe_vit(model: nn.Module) -> tuple[int, int, int]:
    """``(num_prefix_tokens, num_cls_tokens, num_register_tokens)`` of a timm-style ViT, or raise NotAViTError."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0 or not hasattr(model, "patch_embed"):
        raise NotAViTError(
            f"{type(model).__name__} is not a Vision Transformer: it has no patch embedding and transformer `blocks` "
            "to hook. artifactscan supports timm's VisionTransformer family (ViT, DeiT/DeiT-III, DINOv2, CLIP/SigLIP "
            "image towers, register models) and Eva."
        )
    num_prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    has_cls = getattr(model, "cls_token", None) is not None
    num_reg = getattr(model, "num_reg_tokens", None)
    num_reg = int(num_reg) if num_reg is not None else max(num_prefix - int(has_cls), 0)
    if int(has_cls) + num_reg != num_prefix:
        raise NotAViTError(
            f"{type(model).__name__} reports {num_prefix} prefix tokens but {int(has_cls)} CLS + {num_reg} registers; "
            "cannot tell prefix tokens from patch tokens."
        )
    return num_prefix, int(has_cls), num_reg


def _suggest(name: str) -> str:
    base = name.split(".")[0]
    near = difflib.get_close_matches(base, timm.list_models(), n=5, cutoff=0.6)
    return f" Did you mean: {', '.join(near)}?" if near else " See `timm.list_models('*vit*')` for names."


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _create_pretrained(name: str, **kwargs: Any) -> nn.Module:
    """timm.create_model(pretrained=True), failing fast and clearly when the hub is unreachable."""
    import huggingface_hub.constants as hub_constants

    online = _hub_reachable()
    saved = hub_constants.HF_HUB_OFFLINE
    if not online:
        hub_constants.HF_HUB_OFFLINE = True  # use only the local cache instead of retrying for a minute
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:
        if not online or "connect" in str(exc).lower() or "cache" in str(exc).lower():
            raise OfflineError(
                f"cannot download pretrained weights for '{name}': {HUB_HOST} is unreachable and they are not in the "
                "local Hugging Face cache. Download them on a machine with internet (e.g. `timm.create_model(name, "
                "pretrained=True)`), or pass a local checkpoint: `artifactscan norms weights.safetensors IMAGES "
                "--arch <timm name>`."
            ) from exc
        raise ModelLoadError(f"could not build '{name}': {exc}") from exc
    finally:
        hub_constants.HF_HUB_OFFLINE = saved


def _build_arch(arch: str, arch_kwargs: dict[str, Any]) -> nn.Module:
    builder = architecture_builder(arch)  # artifactscan's own architectures (the phantom) register there
    if builder is None and arch.startswith("artifactscan_"):
        raise unknown_artifactscan_arch(arch)
    if builder is None and not timm.is_model(arch):
        raise ModelLoadError(f"unknown timm architecture '{arch}'.{_suggest(arch)}")
    try:
        if builder is not None:
            return builder(**arch_kwargs)
        return timm.create_model(arch, pretrained=False, **arch_kwargs)
    except (TypeError, ValueError, RuntimeError, AssertionError, ZeroDivisionError) as exc:
        raise ModelLoadError(f"architecture '{arch}' does not accept {arch_kwargs}: {exc or type(exc).__name__}; "
                             "check --arch-kwargs (or the checkpoint's arch_kwargs)") from exc


def _reason(exc: BaseException, path: Path) -> str:
    """Why a checkpoint could not be read, never empty (an empty file's EOFError has no message)."""
    try:
        if path.stat().st_size == 0:
            return "the file is empty (0 bytes); it was probably cut short while being written"
    except OSError:
        pass
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else f"{type(exc).__name__} (truncated or not a checkpoint)"


def nonfinite_tensors(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers holding NaN or Inf, as ``"pos_embed (2 NaN, 0 Inf)"``."""
    found = []
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not (t.is_floating_point() or t.is_complex()):
                continue
            if bool(torch.isfinite(t.sum())):  # one cheap pass: NaN and Inf reach the sum (10x faster than isfinite)
                continue
            n_bad = int((~torch.isfinite(t)).sum())  # exact, and rules out a sum that merely overflowed
            if n_bad:
                n_nan = int(torch.isnan(t).sum())
                found.append(f"{name} ({n_nan} NaN, {n_bad - n_nan} Inf)")
    return found


def _check_finite(loaded: LoadedModel, allow: bool) -> None:
    loaded.nonfinite_tensors = nonfinite_tensors(loaded.model)
    bad = loaded.nonfinite_tensors
    if not bad:
        return
    shown = ", ".join(bad[:4]) + (f" (+{len(bad) - 4} more)" if len(bad) > 4 else "")
    if not allow:
        raise NonFiniteError(f"{loaded.name} has non-finite weights (NaN/Inf) in {len(bad)} tensor(s): {shown}; every "
                             "norm it produces would be meaningless. Repair or re-export the checkpoint (`artifactscan "
                             "norms --allow-nonfinite` scans it anyway, to see where the values lead)")
    note = f"NON-FINITE WEIGHTS in {len(bad)} tensor(s): {shown} (scanned with --allow-nonfinite)"
    if note not in loaded.notes:
        loaded.notes.append(note)


def _extract_state_dict(blob: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    meta = blob.get(META_KEY) if isinstance(blob, dict) else None
    for key in ("state_dict", "model", "model_state_dict", "module", "model_ema"):
        if isinstance(blob, dict) and isinstance(blob.get(key), dict):
            blob = blob[key]
            break
    if not isinstance(blob, dict) or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise ModelLoadError("checkpoint holds no state dict of tensors (looked for 'state_dict', 'model', ...)")
    # DDP / torch.compile wrappers prefix every key; strip them so timm's names match.
    for prefix in ("module.", "_orig_mod."):
        if blob and all(k.startswith(prefix) for k in blob):
            blob = {k[len(prefix):]: v for k, v in blob.items()}
    return blob, meta


def _load_into(model: nn.Module, state_dict: dict[str, torch.Tensor], arch: str, path: Path) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong_shape = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
                   for k, v in own.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or wrong_shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                shown = ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
                parts.append(f"{len(keys)} {label}: {shown}")
        raise CheckpointMismatchError(
            f"{path.name} does not match --arch {arch}: " + "; ".join(parts)
            + ". Check --arch and --arch-kwargs (e.g. img_size, reg_tokens)."
        )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state_dict.items()})


def _load_checkpoint(path: Path, arch: str | None, arch_kwargs: dict[str, Any], trust: bool) -> LoadedModel:
    meta: CheckpointMeta | None = None
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state_dict = load_file(str(path))
            meta = read_meta(path)
        except CheckpointMetadataError as exc:
            raise CheckpointMetadataError(exc.field, exc.why, path.name) from None
        except Exception as exc:  # safetensors raises its own error types for damaged headers
            raise ModelLoadError(f"{path} is not a readable safetensors file: {_reason(exc, path)}") from exc
    else:
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if not trust:
                raise UntrustedCheckpointError(
                    f"{path.name} is a pickled Python object (e.g. a whole nn.Module), and unpickling runs arbitrary "
                    "code. Save `model.state_dict()` instead and pass --arch, or, if you trust the file, add "
                    "--trust-checkpoint."
                ) from exc
            blob = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise ModelLoadError(f"{path} is not a readable PyTorch checkpoint: {_reason(exc, path)}") from exc
        if isinstance(blob, nn.Module):
            loaded = wrap_module(blob, name=path.name, source="pickled-module")
            return loaded
        state_dict, raw_meta = _extract_state_dict(blob)
        try:
            meta = CheckpointMeta.from_dict(raw_meta) if raw_meta is not None else None
        except CheckpointMetadataError as exc:
            raise CheckpointMetadataError(exc.field, exc.why, path.name) from None

    if arch is None and meta is None:
        raise ModelLoadError(
            f"{path.name} is a bare state dict and does not record its architecture: pass --arch TIMM_NAME "
            "(and --arch-kwargs JSON if it was built with non-default arguments)."
        )
    kwargs = dict(meta.arch_kwargs) if meta and (arch is None or arch == meta.arch) else {}
    kwargs.update(arch_kwargs)
    arch_name = arch or meta.arch  # type: ignore[union-attr]
    model = _build_arch(arch_name, kwargs)
    _load_into(model, state_dict, arch_name, path)
    data_config = dict(meta.data_config) if meta and meta.data_config else timm.data.resolve_model_data_config(model)
    kind = meta.kind if meta else "checkpoint"
    loaded = _finish(model, path.name, "checkpoint", arch_name, data_config, meta, kind)
    if meta is not None:  # e.g. the test-time register that `artifactscan fix --out` records
        try:
            install_checkpoint_extensions(loaded, meta.extra)
        except CheckpointMetadataError as exc:
            raise CheckpointMetadataError(exc.field, exc.why, path.name) from None
    return loaded


def _finish(model: nn.Module, name: str, source: str, arch: str | None, data_config: dict[str, Any],
            meta: CheckpointMeta | None, kind: str) -> LoadedModel:
    num_prefix, num_cls, num_reg = describe_vit(model)
    model.eval()
    notes = [PHANTOM_NOTE] if kind == "phantom" else []
    data_config = dict(data_config)
    data_config["input_size"] = tuple(int(v) for v in data_config["input_size"])
    # timm's data config reports the *pretrained* size; a model built with img_size=... only accepts its own.
    built = getattr(model.patch_embed, "img_size", None)
    if built is not None and not getattr(model, "dynamic_img_size", False):
        h, w = (built, built) if isinstance(built, int) else built
        data_config["input_size"] = (3, int(h), int(w))
    return LoadedModel(model, name, source, arch, num_prefix, num_cls, num_reg, data_config, meta, kind, notes)


def wrap_module(model: nn.Module, name: str | None = None, source: str = "module",
                data_config: dict[str, Any] | None = None) -> LoadedModel:
    """Use an ``nn.Module`` the caller already has (e.g. in a notebook)."""
    config = data_config or timm.data.resolve_model_data_config(model)
    return _finish(model, name or type(model).__name__, source, getattr(model, "default_cfg", {}).get("architecture"),
                   config, None, "model")


def parse_arch_kwargs(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"--arch-kwargs must be a JSON object such as '{{\"reg_tokens\": 4}}': {exc.msg}") from None
    if not isinstance(value, dict):
        raise InputError("--arch-kwargs must be a JSON object such as '{\"reg_tokens\": 4}'")
    return value


def _looks_like_path(spec: str) -> bool:
    return "/" in spec or "\\" in spec or Path(spec).suffix.lower() in CHECKPOINT_SUFFIXES


def load_model(
    spec: str | Path | nn.Module | LoadedModel | None = None,
    *,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    trust_checkpoint: bool = False,
    img_size: int | None = None,
    allow_nonfinite: bool = False,
) -> LoadedModel:
    """Load a ViT from a built-in name, a checkpoint file, a timm name or an ``hf-hub:`` id.

    Args:
        spec: ``None`` (the embedded default), ``"demo"``/``"phantom"``..., a ``.safetensors``/``.pt`` path, a timm
            name with optional pretrained tag (``vit_large_patch14_dinov2.lvd142m``) or ``hf-hub:org/name``.
        arch: timm architecture for a bare state dict (overrides the checkpoint's own).
        arch_kwargs: ``timm.create_model`` overrides, e.g. ``{"reg_tokens": 4}``.
        trust_checkpoint: allow unpickling a whole ``nn.Module`` (runs code from the file).
        img_size: resize inputs to this square size (the model's position embeddings are resampled when it allows).
        allow_nonfinite: load weights that hold NaN/Inf (named in ``nonfinite_tensors`` and the notes) instead of
            raising :class:`NonFiniteError`.

    Raises:
        InputError, ModelLoadError and subclasses, with a message that says what to do.
    """
    arch_kwargs = dict(arch_kwargs or {})
    if isinstance(spec, LoadedModel):
        loaded = spec
        if loaded.nonfinite_tensors:
            _check_finite(loaded, allow_nonfinite)
    elif isinstance(spec, nn.Module):
        loaded = wrap_module(spec)
    else:
        spec = default_model_name() if spec is None else str(spec)
        builtins = builtin_models()
        path = Path(spec).expanduser()
        if spec in builtins:
            loaded = _load_checkpoint(builtins[spec], arch, arch_kwargs, trust=False)
            loaded.name, loaded.source = spec, "builtin"
        elif path.is_dir():
            raise InputError(f"{spec} is a folder; pass a checkpoint file (.safetensors / .pt) or a model name")
        elif path.is_file():
            loaded = _load_checkpoint(path, arch, arch_kwargs, trust_checkpoint)
        elif _looks_like_path(spec):
            raise InputError(f"model file {spec} does not exist")
        else:
            loaded = _load_named(spec, arch_kwargs)
    if not isinstance(spec, LoadedModel):
        _check_finite(loaded, allow_nonfinite)  # where NaN starts: name the tensors before anything runs
    if img_size is not None:
        _resize_input(loaded, img_size)
    return loaded


DEFAULT_MODEL_ORDER = ("phantom-deep", "phantom", "demo")


def default_model_name() -> str:
    """The embedded default: the deep calibration phantom (24 blocks, ViT-L's depth) when shipped, else the 6-block
    phantom, else the demo baseline."""
    names = builtin_models()
    for name in DEFAULT_MODEL_ORDER:
        if name in names:
            return name
    raise ModelLoadError("no built-in model is shipped with this install; pass a MODEL (timm name or checkpoint)")


def _load_named(spec: str, arch_kwargs: dict[str, Any]) -> LoadedModel:
    if spec.startswith("hf-hub:"):
        model = _create_pretrained(spec, **arch_kwargs)
        source = "hf-hub"
    else:
        if not timm.is_model(spec):
            raise ModelLoadError(f"unknown model '{spec}': not a built-in ({', '.join(builtin_models()) or 'none'}), "
                                 f"a file, or a timm name.{_suggest(spec)}")
        model = _create_pretrained(spec, **arch_kwargs)
        source = "timm"
    describe_vit(model)
    return _finish(model, spec, source, spec, timm.data.resolve_model_data_config(model), None, "pretrained")


def _resize_input(loaded: LoadedModel, img_size: int) -> None:
    model = loaded.model
    if loaded.data_config["input_size"][1:] == (img_size, img_size):
        return
    ph, pw = loaded.patch_size
    if img_size <= 0 or img_size % ph or img_size % pw:
        raise InputError(f"--img-size {img_size} is not a positive multiple of the patch size {ph}")
    if hasattr(model, "set_input_size"):
        try:
            model.set_input_size(img_size=img_size)  # resamples the position embeddings
        except Exception as exc:
            raise InputError(f"--img-size {img_size} does not fit this model: {exc}") from exc
    elif not getattr(model, "dynamic_img_size", False):
        raise InputError(f"this model has a fixed input size {loaded.input_size}; drop --img-size")
    loaded.data_config["input_size"] = (3, img_size, img_size)
