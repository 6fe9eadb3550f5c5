"""Turning what the user typed (a timm name, an ``hf-hub:`` id, a checkpoint file, a built-in name) into a ViT.

Everything downstream works on a :class:`LoadedModel`, which records how many prefix tokens the model has and which
are CLS and which are registers — read from the model itself, because token 0 is not always CLS (``*_reg*_gap``
models have registers and no CLS; Eva and DINOv2 differ from plain ViT).

timm is imported by the functions that use it, not with this module: its import (torchvision, ``torch._dynamo``)
is ~1.6 s, and the command line starts decoding images before it (core/lazy.py, docs/data-path.md).
"""

from __future__ import annotations

import difflib
import json
import os
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from artifactscan.models import hf, infer, native
from artifactscan.models.layouts import timm_train
from artifactscan.models.checkpoint import CheckpointMeta, read_meta
from artifactscan.models.materialize import (
    assign_weights, build_on_meta, check_precision, finish_meta_build, hold_in, model_dtype, nonfinite_tensors,
    PRECISION_DTYPES, precision_name, read_checkpoint,
)
from artifactscan.core.memory import GIB, available_bytes
from artifactscan.core.paths import display_name, what_it_is
from artifactscan.models.hooks import blocks_sequence
from artifactscan.models.layouts import naflex
from artifactscan.inputs.naflex import NAFLEX_KEY
from artifactscan.models.phantom_notice import PHANTOM_NOTE
from artifactscan.core.callbacks import Callbacks
from artifactscan.core.summaries import ModelSummary
from artifactscan.core.errors import (
    CheckpointMetadataError,
    CheckpointMismatchError,
    InputError,
    ModelLoadError,
    NonFiniteError,
    NotAViTError,
    OfflineError,
    ResourceError,
    option,
)
from artifactscan.models.registry import (
    architecture_builder,
    builtin_weights,
    install_checkpoint_extensions,
    unknown_artifactscan_arch,
)

CHECKPOINT_SUFFIXES = {".safetensors", ".pt", ".pth", ".bin", ".ckpt"}
HUB_HOST = "huggingface.co"

#: Called with the :class:`LoadedModel` at the end of every :func:`load_model`. The command line registers the end of
#: its start-up phase here (core/startup.py: imports and building the model are start-up); the library calls only
#: what was registered.
after_load = Callbacks("model loaded")


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
        weights: which weights a checkpoint holding EMA and raw ones gave (``"ema (state_dict_ema)"``), else None.
        inferred: for a bare state dict, what its shapes said and the known architecture they matched.
        layout: the file's native key layout when it was converted (``dinov2``, ``openai_clip``, ``hf:dinov2`` ...).
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
    weights: str | None = None
    inferred: dict[str, Any] | None = None
    layout: str | None = None
    nonfinite_tensors: list[str] = field(default_factory=list)  # "name (n NaN, m Inf)", checked at load time
    checkpoint_dtype: torch.dtype | None = None  # the file's own floating dtype (what `fix --out` saves in)

    @property
    def precision(self) -> str:
        """What the weights are held in and the forward runs in: ``fp32``, ``bf16`` or ``fp16``."""
        return precision_name(model_dtype(self.model))

    @property
    def prefix_names(self) -> list[str]:
        return ["cls"] * self.num_cls_tokens + [f"reg{i}" for i in range(self.num_register_tokens)]

    @property
    def blocks(self) -> list[nn.Module]:
        """The transformer blocks in order, as the model's hook family names them (``blocks.{i}``)."""
        return list(blocks_sequence(self.model))

    @property
    def patch_size(self) -> tuple[int, int]:
        if NAFLEX_KEY in self.data_config:  # NaFlex: the grid varies per image, the patch does not
            return (int(self.data_config[NAFLEX_KEY]["patch_size"]),) * 2
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

    def summary(self) -> ModelSummary:
        """What a result records about this model (the ``model`` of every result's header)."""
        return ModelSummary(
            name=self.name, source=self.source, arch=self.arch, kind=self.kind, num_blocks=len(self.blocks),
            num_prefix_tokens=self.num_prefix_tokens, num_cls_tokens=self.num_cls_tokens,
            num_register_tokens=self.num_register_tokens, patch_size=list(self.patch_size),
            grid_size=list(self.grid_size), input_size=list(self.input_size),
            calibration_note=self.notes[0] if self.is_phantom else None, weights=self.weights,
            layout=self.layout, inferred=self.inferred)

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
    if naflex.is_naflex_model(model):  # timm's NaFlexVit, transformers' SigLIP2: models/layouts/naflex.py
        return naflex.describe(model)
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
    import timm

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
    import timm
    import huggingface_hub.constants as hub_constants

    online = name.startswith("local-dir:") or _hub_reachable()
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
    import timm

    builder = architecture_builder(arch)  # artifactscan's own architectures (the phantom) register there
    if builder is None and arch.startswith("artifactscan_"):
        raise unknown_artifactscan_arch(arch)
    if builder is None and not timm.is_model(arch):
        raise ModelLoadError(f"unknown timm architecture '{arch}'.{_suggest(arch)}")
    try:
        if builder is not None:
            return builder(**arch_kwargs)
        if "weight_init" not in arch_kwargs:
            try:  # every weight is loaded next: skip timm's initialisation (seconds for a large ViT on CPU)
                return timm.create_model(arch, pretrained=False, weight_init="skip", **arch_kwargs)
            except (TypeError, AssertionError):  # NaFlexVit asserts on the mode
                pass  # not a VisionTransformer, or a bad kwarg: the plain call below says which
        return timm.create_model(arch, pretrained=False, **arch_kwargs)
    except (TypeError, ValueError, RuntimeError, AssertionError, ZeroDivisionError) as exc:
        raise ModelLoadError(f"architecture '{arch}' does not accept {arch_kwargs}: {exc or type(exc).__name__}; "
                             f"check {option('arch_kwargs')} (or the checkpoint's arch_kwargs)") from exc


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


def _fits_as_is(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> bool:
    """Whether ``state_dict`` has exactly the model's keys and shapes, so it loads without any converter."""
    own = model.state_dict()
    return own.keys() == state_dict.keys() and all(own[k].shape == v.shape for k, v in state_dict.items())


def _load_into(model: nn.Module, state_dict: dict[str, torch.Tensor], arch: str, path: Path,
               native_ckpt: native.NativeCheckpoint | None = None, dtype: torch.dtype = torch.float32) -> None:
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
        foreign = [k for k in missing + unexpected if not timm_train.TIMM_VIT_KEY.match(k)]
        if foreign or not hasattr(model, "patch_embed"):
            where = native_ckpt.top_keys if native_ckpt and native_ckpt.is_wrapped else sorted(
                {k.split(".")[0] for k in state_dict})
            advice = (f" The file's top-level keys: {', '.join(where[:8])}; its layout is not one artifactscan "
                      "converts (docs/loading.md lists them).")
        else:  # every differing key is one timm's ViT has for some setting: a kwarg can fix it
            advice = (f" Check {option('arch')} and {option('arch_kwargs')} (e.g. img_size, reg_tokens, num_classes, "
                      "depth).")
        raise CheckpointMismatchError(f"{display_name(path.name)} does not match {option('arch', arch)}: "
                                      + "; ".join(parts)
                                      + "." + advice)
    assign_weights(model, state_dict, dtype)


def _load_checkpoint(path: Path, arch: str | None, arch_kwargs: dict[str, Any], trust: bool,
                     weights: str | None = None, precision: str = "auto") -> LoadedModel:
    import timm.data

    read = read_checkpoint(path, trust, precision)
    blob, meta = read.blob, read.meta
    if isinstance(blob, nn.Module):
        return wrap_module(blob, name=path.name, source="pickled-module")
    ckpt = native.unwrap(blob, weights, name=path.name)
    read.resolve_precision(ckpt.state_dict, precision, display_name(path.name))
    ckpt.torchscript = path.suffix != ".safetensors" and native.is_torchscript(path)
    timm_sd = native.to_timm(ckpt.state_dict, ckpt.layout) if ckpt.layout != "timm" else ckpt.state_dict
    inferred = None
    if arch is None and meta is None and ckpt.train_arch:
        arch_name = ckpt.train_arch  # timm train.py records what it trained
        kwargs = {**timm_train.fit_file(timm_sd, arch_kwargs), **timm_train.train_kwargs(ckpt.train_args),
                  **arch_kwargs}
    elif arch is None and meta is None:
        what = "a training checkpoint" if ckpt.is_wrapped else "a bare state dict"
        act = "QuickGELU" if ckpt.torchscript and ckpt.layout == "openai_clip" else None  # OpenAI's archives
        match, ckpt.layout = infer.infer_from_file(ckpt.state_dict, timm_sd, ckpt.layout, f"{path.name} ({what})",
                                                   activation=act)
        arch_name, kwargs, inferred = match.arch, {**match.kwargs, **arch_kwargs}, match.inferred()
    elif meta is not None and (arch is None or arch == meta.arch):
        arch_name, kwargs = meta.arch, {**meta.arch_kwargs, **arch_kwargs}
    else:
        arch_name = arch  # type: ignore[assignment]
        kwargs = {**timm_train.fit_file(timm_sd, arch_kwargs), **arch_kwargs}
    model = build_on_meta(lambda: _build_arch(arch_name, kwargs))  # shapes only: the weights are assigned below
    if ckpt.layout != "timm" and _fits_as_is(model, ckpt.state_dict) and set(timm_sd) != set(ckpt.state_dict):
        # The keys that suggested a native layout are the target's own (Eva and BEiT name their layer scales
        # gamma_1/gamma_2, as DeiT-III's original files do): the file is timm's own state dict, converting would
        # break it.
        ckpt.layout = "timm"
    try:
        state_dict = ckpt.state_dict if ckpt.layout == "timm" else native.to_timm(ckpt.state_dict, ckpt.layout, model,
                                                                                 display_name(path.name))
    except (RuntimeError, ValueError, KeyError) as exc:  # timm's resampling of a pos-embed that cannot fit
        raise CheckpointMismatchError(
            f"{display_name(path.name)} ({ckpt.layout} layout) does not fit {option('arch', arch_name)}: timm's "
            f"converter failed on it ({str(exc).splitlines()[0]}). Check {option('arch')} (CLS / registers / position "
            "embedding of this family)."
        ) from exc
    _load_into(model, state_dict, arch_name, path, ckpt, read.dtype)  # type: ignore[arg-type]
    model = finish_meta_build(model, lambda: _build_arch(arch_name, kwargs), state_dict, read.dtype)  # type: ignore
    data_config = dict(meta.data_config) if meta and meta.data_config else {
        **timm.data.resolve_model_data_config(model), **ckpt.data_config}
    kind = meta.kind if meta else "checkpoint"
    loaded = _finish(model, path.name, "checkpoint", arch_name, data_config, meta, kind)
    loaded.inferred, loaded.layout = inferred, (ckpt.layout if ckpt.layout != "timm" else None)
    loaded.checkpoint_dtype = read.file_dtype
    if read.note:
        loaded.notes.append(read.note)
    if ckpt.weights:
        loaded.weights = f"{ckpt.weights} ({ckpt.wrapper})"
        other = "raw" if ckpt.weights == "ema" else "ema"
        shown = "EMA" if ckpt.weights == "ema" else "raw"
        loaded.notes.append(f"loaded the {shown} weights ({ckpt.wrapper}) of a checkpoint holding EMA and raw "
                            f"ones; --weights {other} loads the others")
    loaded.notes.extend(ckpt.notes)
    dropped = native.describe_dropped(ckpt)
    if ckpt.layout != "timm":
        loaded.notes.append(f"converted from the {ckpt.layout} key layout by timm's converter"
                            + (f"; {dropped}" if dropped else ""))
    elif dropped:
        loaded.notes.append(dropped)
    if inferred is not None:
        loaded.notes.append(f"architecture inferred from the shapes: {arch_name} {kwargs or ''}".rstrip())
    if meta is None:  # now known: a checkpoint saved from this model (`fix --out`) describes itself
        loaded.meta = CheckpointMeta(arch_name, dict(kwargs), dict(loaded.data_config), kind="checkpoint",
                                     description=f"loaded from {path.name}")
    if meta is not None:  # e.g. the test-time register that `artifactscan fix --out` records
        try:
            install_checkpoint_extensions(loaded, meta.extra)
        except CheckpointMetadataError as exc:
            raise CheckpointMetadataError(exc.field, exc.why, path.name) from None
    return loaded


def normalized_data_config(data_config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a timm data config with ``input_size`` as a tuple of ints (JSON metadata stores a list)."""
    out = dict(data_config)
    out["input_size"] = tuple(int(v) for v in out["input_size"])
    return out


def _finish(model: nn.Module, name: str, source: str, arch: str | None, data_config: dict[str, Any],
            meta: CheckpointMeta | None, kind: str) -> LoadedModel:
    num_prefix, num_cls, num_reg = describe_vit(model)
    model.eval()
    notes = [PHANTOM_NOTE] if kind == "phantom" else []
    data_config = normalized_data_config(data_config)
    # timm's data config reports the *pretrained* size; a model built with img_size=... only accepts its own.
    if naflex.is_naflex_model(model) and NAFLEX_KEY not in data_config:
        data_config = naflex.timm_data_config(model, data_config)
        notes = naflex.with_budget_note(notes, data_config)
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if built is not None and not getattr(model, "dynamic_img_size", False):
        h, w = (built, built) if isinstance(built, int) else built
        data_config["input_size"] = (3, int(h), int(w))
    return LoadedModel(model, name, source, arch, num_prefix, num_cls, num_reg, data_config, meta, kind, notes)


def wrap_module(model: nn.Module, name: str | None = None, source: str = "module",
                data_config: dict[str, Any] | None = None) -> LoadedModel:
    """Use an ``nn.Module`` the caller already has (e.g. in a notebook)."""
    import timm.data

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
    """A path the user meant (and that does not exist), as opposed to a hub id: ``ORG/NAME`` is an id."""
    if spec.startswith(("/", "./", "../", "~", ".\\")) or "\\" in spec:
        return True
    return Path(spec).suffix.lower() in CHECKPOINT_SUFFIXES or spec.count("/") > 1


def load_model(
    spec: str | Path | nn.Module | LoadedModel | None = None,
    *,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    trust_checkpoint: bool = False,
    img_size: int | None = None,
    weights: str | None = None,
    allow_nonfinite: bool = False,
    precision: str = "auto",
) -> LoadedModel:
    """Load a ViT from a built-in name, a checkpoint file or folder, a timm name or a hub id.

    What ``spec`` is, in this order: a built-in name; an existing path (a checkpoint file in any layout
    docs/loading.md lists, or a Hugging Face ``save_pretrained`` folder); ``hf-hub:ORG/NAME`` (timm's hub loading);
    a bare ``ORG/NAME`` (a Hugging Face transformers id, from the local cache when offline); a timm name.

    Args:
        spec: ``None`` (the embedded default), ``"demo"``/``"phantom"``..., a ``.safetensors``/``.pt`` path or HF
            folder, a timm name with optional pretrained tag (``vit_large_patch14_dinov2.lvd142m``),
            ``hf-hub:org/name`` or ``org/name``.
        arch: timm architecture for a bare state dict (default: inferred from its shapes, when unambiguous).
        arch_kwargs: ``timm.create_model`` overrides, e.g. ``{"reg_tokens": 4}``.
        trust_checkpoint: allow unpickling a whole ``nn.Module`` or loading TorchScript (runs code from the file).
        img_size: resize inputs to this square size (the model's position embeddings are resampled when it allows).
        weights: ``"ema"`` or ``"raw"``, for a checkpoint holding both (default: EMA, as timm does).
        allow_nonfinite: load weights that hold NaN/Inf (named in ``nonfinite_tensors`` and the notes) instead of
            raising :class:`NonFiniteError`.
        precision: ``fp32``, ``bf16`` or ``fp16``: the weights are held in it and the forward runs in it (statistics
            are accumulated in float32 whatever it is); ``auto`` (default): float32 when the float32 weights fit in
            the memory available, else the checkpoint's own half precision (a note says so). docs/loading.md.

    Raises:
        InputError, ModelLoadError and subclasses, with a message that says what to do.
    """
    arch_kwargs = dict(arch_kwargs or {})
    check_precision(precision)
    if weights is not None and weights not in native.WEIGHT_CHOICES:
        raise InputError(f"{option('weights')} must be one of {', '.join(native.WEIGHT_CHOICES)}, got {weights!r}")
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
            loaded = _load_checkpoint(builtins[spec], arch, arch_kwargs, trust=False, precision=precision)
            loaded.name, loaded.source = spec, "builtin"
        elif path.is_dir():
            if not hf.is_model_folder(path):
                raise InputError(hf.not_a_model_folder(spec, path))
            if hf.is_timm_folder(path):  # a timm hub snapshot: timm's own loader
                loaded = _load_named(f"local-dir:{path}", arch_kwargs, precision)
            else:
                loaded = _load_hf_folder(path, spec, "hf-folder", precision)
        elif path.is_file():
            loaded = _load_checkpoint(path, arch, arch_kwargs, trust_checkpoint, weights, precision)
        elif os.path.lexists(path):  # a named pipe, a socket, a symlink loop: it exists, so say what it is
            raise InputError(f"model {display_name(spec)} {what_it_is(path, 'a checkpoint file or a folder')}; pass a "
                             "checkpoint file (.safetensors / .pt), a Hugging Face save_pretrained folder or a name")
        elif spec.startswith("hf-hub:") or spec.startswith("timm/"):  # timm's hub repos need timm's loader
            loaded = _load_named(spec if spec.startswith("hf-hub:") else f"hf-hub:{spec}", arch_kwargs, precision)
        elif hf.looks_like_hub_id(spec):
            loaded = _load_hf_folder(hf.hub_folder(spec, online=_hub_reachable()), spec, "hf-transformers", precision)
        elif _looks_like_path(spec):
            raise InputError(f"model file {display_name(spec)} does not exist")
        else:
            loaded = _load_named(spec, arch_kwargs, precision)
    if weights is not None and loaded.source != "checkpoint":
        raise InputError(f"{option('weights', weights)} chooses between the EMA and raw weights of a checkpoint "
                         f"file; {loaded.name} is not one (drop {option('weights')})")
    if isinstance(spec, (LoadedModel, nn.Module)) or loaded.source not in ("checkpoint", "builtin", "hf-folder",
                                                                           "hf-transformers"):
        _hold_loaded(loaded, precision)  # built before the precision could apply: held in it now
    held = f"weights held and run in {loaded.precision} ({option('precision', precision)}); statistics in float32"
    if precision not in ("auto", "fp32") and held not in loaded.notes:
        loaded.notes.append(held)  # a report says what it was computed in
    if not isinstance(spec, LoadedModel):
        _check_finite(loaded, allow_nonfinite)  # where NaN starts: name the tensors before anything runs
    if img_size is not None:
        _resize_input(loaded, img_size)
    after_load(loaded)  # the command line ends its start-up phase here (core/startup.py); a library caller: nothing
    return loaded


def _hold_loaded(loaded: LoadedModel, precision: str) -> None:
    """An explicit ``precision`` applied to a model built before it could apply (a timm or hub name, an HF folder, a
    module or LoadedModel passed in). ``auto`` leaves it as it is: it is in memory already, so it fits."""
    current = model_dtype(loaded.model)
    if loaded.checkpoint_dtype is None:
        loaded.checkpoint_dtype = current
    if precision == "auto":
        return
    dtype = PRECISION_DTYPES[precision]
    if dtype != current:
        loaded.model.to(dtype)
    hold_in(loaded.model, dtype)


def peek_data_config(spec: str | Path | None) -> dict[str, Any] | None:
    """The data config ``load_model(spec)`` will give, read from the checkpoint's own metadata without building the
    model or importing timm, so that images can start decoding meanwhile; ``None`` when only loading can tell (a timm
    or hub name, a file without artifactscan metadata, a ``.pt`` whose metadata means unpickling all of it). A hint:
    callers compare it with the loaded model's config before using anything prepared with it."""
    if spec is not None and not isinstance(spec, (str, Path)):
        return None
    try:
        name = default_model_name() if spec is None else str(spec)
        path = builtin_models().get(name) or Path(name).expanduser()
        if path.suffix != ".safetensors" or not path.is_file():
            return None
        meta = read_meta(path)
    except Exception:  # whatever is wrong with it, load_model will say it properly
        return None
    if meta is None or not meta.data_config:
        return None
    return normalized_data_config(meta.data_config)  # as the loaded model's config has it


def _load_hf_folder(folder: Path, name: str, source: str, precision: str) -> LoadedModel:
    import timm.data

    if naflex.is_hf_folder(folder):  # run by transformers itself (SigLIP2 NaFlex), built in float32
        model, config, notes = naflex.load_hf_folder(folder)
        loaded = replace(_finish(model, name, source, None, config, None, "pretrained"), layout="hf:siglip2",
                         notes=naflex.with_budget_note(notes, config))
        _hold_loaded(loaded, precision)
        return loaded
    converted = hf.load_folder(folder, precision)  # built on the meta device, in the precision's dtype
    config = converted.data_config
    if config is None:
        config = timm.data.resolve_model_data_config(converted.model)
        converted.notes.append("no preprocessor_config.json: timm's default preprocessing")
    loaded = _finish(converted.model, name, source, converted.arch, config, None, "pretrained")
    loaded.notes.extend(converted.notes)
    loaded.checkpoint_dtype = converted.file_dtype
    loaded.layout = "hf:" + json.loads((folder / "config.json").read_text()).get("model_type", "")
    loaded.meta = CheckpointMeta(converted.arch, converted.kwargs, dict(loaded.data_config), kind="pretrained",
                                 description=f"converted from {name}")
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


def _create_in(spec: str, arch_kwargs: dict[str, Any], precision: str) -> nn.Module:
    """A pretrained timm model built in an explicit half precision and the weights copied into it: never a float32
    model first (timm's model classes take ``dtype``; one that does not is held in it afterwards)."""
    if precision in ("auto", "fp32") or "dtype" in arch_kwargs:
        return _create_pretrained(spec, **arch_kwargs)
    try:
        return _create_pretrained(spec, **arch_kwargs, dtype=PRECISION_DTYPES[precision])
    except TypeError:
        return _create_pretrained(spec, **arch_kwargs)


def _load_named(spec: str, arch_kwargs: dict[str, Any], precision: str = "auto") -> LoadedModel:
    import timm.data

    if spec.startswith(("hf-hub:", "local-dir:")):  # timm's own hub / hub-folder loading
        model = _create_in(spec, arch_kwargs, precision)
        source = spec.split(":", 1)[0]
    else:
        if not timm.is_model(spec):
            raise ModelLoadError(f"unknown model '{display_name(spec)}': not a built-in "
                                 f"({', '.join(builtin_models()) or 'none'}), a file, or a timm name.{_suggest(spec)}")
        model = _create_in(spec, arch_kwargs, precision)
        source = "timm"
    describe_vit(model)
    return _finish(model, spec, source, spec, timm.data.resolve_model_data_config(model), None, "pretrained")


def _grid_text(loaded: LoadedModel, img_size: int) -> str:
    ph, pw = loaded.patch_size
    gh, gw = img_size // ph, img_size // pw
    return f"a {gh:,}x{gw:,} grid of {ph}-pixel patches ({gh * gw:,} tokens per image)"


def check_resample_fits(loaded: LoadedModel, img_size: int) -> None:
    """Refuse an ``--img-size`` whose resampled position embeddings alone exceed the memory available, before torch
    tries (its allocator's message names bytes, not the option): the new table (tokens x width float32 numbers)
    and the interpolation's copies of it, three in all."""
    pos_embed = getattr(loaded.model, "pos_embed", None)
    if not isinstance(pos_embed, torch.Tensor):
        return
    ph, pw = loaded.patch_size
    need = 3 * (img_size // ph) * (img_size // pw) * int(pos_embed.shape[-1]) * 4
    free = available_bytes(torch.device("cpu"))
    if free is not None and need > free:
        raise ResourceError(f"{option('img_size', img_size)} makes {_grid_text(loaded, img_size)}: resampling the "
                            f"position embeddings alone needs about {need / GIB:,.1f} GiB and {free / GIB:.1f} GiB of "
                            f"memory is available; choose a smaller {option('img_size')} (the model's own is "
                            f"{loaded.input_size[0]})")


def _resize_input(loaded: LoadedModel, img_size: int) -> None:
    if NAFLEX_KEY in loaded.data_config:  # NaFlex: the size sets the patch budget; each image keeps its aspect
        return naflex.set_budget(loaded, img_size)
    model = loaded.model
    if loaded.data_config["input_size"][1:] == (img_size, img_size):
        return
    ph, pw = loaded.patch_size
    if img_size <= 0 or img_size % ph or img_size % pw:
        raise InputError(f"{option('img_size', img_size)} is not a positive multiple of the patch size {ph}")
    if hasattr(model, "set_input_size"):
        check_resample_fits(loaded, img_size)
        try:
            model.set_input_size(img_size=img_size)  # resamples the position embeddings
        except (MemoryError, RuntimeError) as exc:
            if not isinstance(exc, MemoryError) and "alloc" not in str(exc).lower():
                raise InputError(f"{option('img_size', img_size)} does not fit this model: {exc}") from exc
            raise ResourceError(f"{option('img_size', img_size)}: {_grid_text(loaded, img_size)}; resampling the "
                                "position embeddings ran out of memory; choose a smaller "
                                f"{option('img_size')} (the model's own is "
                                f"{loaded.input_size[0]})") from None
        except Exception as exc:
            raise InputError(f"{option('img_size', img_size)} does not fit this model: {exc}") from exc
    elif not getattr(model, "dynamic_img_size", False):
        raise InputError(f"this model has a fixed input size {loaded.input_size}; drop {option('img_size')}")
    loaded.data_config["input_size"] = (3, img_size, img_size)
