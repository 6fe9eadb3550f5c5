"""The capture layer: named hook points on any supported ViT, and one way to read (or edit) them during a forward.

Every measurement reads activations through this module; no other module registers hooks or looks up module paths
(the test-time register in :mod:`artifactscan.models.interventions` is the one intervention, built on
:func:`resolve_point`). Names follow TransformerLens' spirit, one per block ``i`` (0-based, as timm's
``forward_intermediates`` indices):

==========================  ==================================================================================
``blocks.{i}.resid_pre``    the residual stream entering block ``i``, ``[B, T, D]``
``blocks.{i}.resid_post``   the residual stream leaving block ``i`` (before any final norm: where the paper
                            measures norms), ``[B, T, D]``
``blocks.{i}.attn.q/k/v``   the queries, keys and values the attention kernel is given, heads concatenated,
                            ``[B, T, heads * head_dim]``. For qk-norm and RoPE families (Eva, EVA02, DINOv3)
                            they are taken *after* the norm and the rotation: the tensors attention really uses
                            (LOST's keys are these)
``blocks.{i}.attn.pattern`` the attention probabilities, ``[B, heads, T, T]`` (rows: queries), in float32
``blocks.{i}.mlp.post``     the MLP's hidden units after the activation (for SwiGLU, the gated product): what its
                            output projection reads, ``[B, T, hidden]``. A *unit* point: ``fix`` searches these
``patch_embed.post``        the patch embedding's output before position embedding and prefix tokens, ``[B, N, D]``
``final_norm``              the model's final normalised tokens, ``[B, T, D]``
==========================  ==================================================================================

Families add their own (the phantom's ``blocks.{i}.artifact_units.post`` is a unit point too). Each family of
models declares its map in its own module (``models/layouts/*.py``, the phantom in ``models/phantom.py``) and
registers it here with :func:`register_hook_family`; the contract tests list every family's names exactly.

Why the attention points read the kernel's inputs instead of switching attention to an explicit softmax: the
tensors are exactly what the model uses (after qk-norm and RoPE, whatever the family), and capturing attention does
not change the forward, so norms measured in the same pass are those of a plain forward. While a capture holds
attention points, ``torch.nn.functional.scaled_dot_product_attention`` is wrapped for the duration of those
attention modules' forwards only (the wrapper passes every call through unchanged); families with an explicit
softmax path that never calls it (timm with fused attention off, Hugging Face "eager") read the same tensors from
that path's modules instead.

Usage::

    with capture(model, ["blocks.*.resid_post"], reduce=token_norms) as cap:
        cap.forward(images)
        cap["blocks.3.resid_post"]          # what token_norms returned for block 3 in this forward

    with capture(model, ["blocks.5.attn.k"], stop_early=True) as cap:
        cap.forward(images)                 # blocks after 5 never run
        keys = cap["blocks.5.attn.k"]
"""

from __future__ import annotations

import fnmatch
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from artifactscan.core.errors import InputError, NotAViTError

#: Reads a point's tensor: ``(module, inputs, output) -> tensor`` (``output`` is None for input points).
Reader = Callable[[nn.Module, tuple, Any], torch.Tensor]
#: A reduction applied inside the hook, so a block's full output need not outlive it: ``tensor -> anything``.
Reducer = Callable[[torch.Tensor], Any]

ATTENTION_PARTS = ("q", "k", "v", "pattern")


class UnknownHookPoint(InputError):
    """A hook name this model does not have; the message lists the names it has."""


class HookPointUnavailable(NotAViTError):
    """A hook name this model's family has, but cannot expose (e.g. attention probabilities of an opaque kernel)."""


@dataclass(frozen=True)
class HookPoint:
    """One named place in a model.

    ``where`` says how it is reached: ``"output"`` (a forward hook on ``module``; ``read`` picks the tensor out of
    its output), ``"input"`` (a forward pre-hook; ``read`` picks it out of the inputs) or ``"attention"`` (``module``
    is an attention module and ``part`` one of q/k/v/pattern: the kernel's inputs). ``unit`` marks points whose last
    dimension indexes hidden units (register-neuron search). ``unavailable`` is the reason a model cannot expose it.
    """

    name: str
    module: str
    where: str
    meaning: str
    read: Reader | None = None
    part: str = ""
    unit: bool = False
    unavailable: str | None = None
    #: for "attention" points of an explicit (non-kernel) path: read from this submodule path instead
    fallback: Reader | None = None


def first_tensor(module: nn.Module, inputs: tuple, output: Any) -> torch.Tensor:
    """The tensor of a module's output, unwrapping the ``(tensor, ...)`` tuples HF layers return."""
    out = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(out, torch.Tensor):
        out = getattr(out, "last_hidden_state", out)
    return out


def positional(kwargs: dict[str, Any]) -> tuple:
    """A module's main input when it was passed by keyword (HF layers call ``layer(hidden_states=...)``)."""
    if "hidden_states" in kwargs:
        return (kwargs["hidden_states"],)
    return tuple(v for v in kwargs.values() if isinstance(v, torch.Tensor))[:1]


def first_input(module: nn.Module, inputs: tuple, output: Any) -> torch.Tensor:
    return inputs[0]


def tokens_from_grid(module: nn.Module, inputs: tuple, output: Any) -> torch.Tensor:
    """A patch embedding's output as ``[B, N, D]`` (timm's ``dynamic_img_size`` gives ``[B, H, W, D]``)."""
    out = first_tensor(module, inputs, output)
    return out.reshape(out.shape[0], -1, out.shape[-1]) if out.dim() == 4 else out


# ----------------------------------------------------------------------------------------------- families
class HookFamily:
    """A family of models (timm ViT, Eva, a Hugging Face vision encoder ...): how to recognise one, its hook points,
    and its feature forward. Subclass and :func:`register_hook_family` it, in the family's own module."""

    name = "family"
    #: its inputs are padded sequences (NaFlex): a capture must say that its reader leaves the padding out
    padded_inputs = False

    def matches(self, model: nn.Module) -> bool:
        raise NotImplementedError

    def points(self, model: nn.Module) -> list[HookPoint]:
        raise NotImplementedError

    def forward(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """The forward a capture runs: the final normalised tokens ``[B, T, D]``."""
        raise NotImplementedError

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        """The transformer blocks in order: ``blocks.{i}`` is ``blocks(model)[i]``."""
        raise NotImplementedError

    def num_blocks(self, model: nn.Module) -> int:
        return len(self.blocks(model))

    def prefix_tokens(self, model: nn.Module) -> tuple[int, int]:
        """``(class tokens, register tokens)`` before the patch tokens of this live model."""
        raise NotImplementedError

    def attention_setup(self, attention: nn.Module) -> Callable[[], None] | None:
        """Prepare an attention module for reading its kernel's inputs; returns the undo (or None)."""
        return None


_families: list[HookFamily] = []


def register_hook_family(family: HookFamily, *, before: str | None = None) -> None:
    """Add ``family``; ``before`` names a family it must be tried before (a subclass family before its parent)."""
    global _families
    _families = [f for f in _families if f.name != family.name]
    names = [f.name for f in _families]
    _families.insert(names.index(before) if before in names else len(_families), family)


def hook_families() -> list[str]:
    return [f.name for f in _families]


def unwrap_model(model: Any) -> nn.Module:
    """The ``nn.Module`` inside a ``LoadedModel``, a DDP/FSDP-style ``.module`` wrapper or a ``torch.compile`` one."""
    model = getattr(model, "model", model) if not isinstance(model, nn.Module) else model
    for _ in range(4):  # wrappers nest (DDP around a compiled model ...); each level has one attribute
        inner = getattr(model, "_orig_mod", None)
        if inner is None and type(model).__name__ in ("DistributedDataParallel", "DataParallel"):
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    if not isinstance(model, nn.Module):
        raise NotAViTError(f"expected a torch nn.Module (or a LoadedModel), got {type(model).__name__}")
    return model


def family_of(model: Any) -> HookFamily:
    module = unwrap_model(model)
    for family in _families:
        if family.matches(module):
            return family
    raise NotAViTError(f"{type(module).__name__} is not a model family artifactscan can hook (known: "
                       f"{', '.join(hook_families()) or 'none'}); it needs a ViT whose blocks it can name")


def hook_points(model: Any) -> dict[str, HookPoint]:
    """Every named hook point of ``model`` (a LoadedModel or an ``nn.Module``), in forward order."""
    module = unwrap_model(model)
    return {p.name: p for p in family_of(module).points(module)}


def hook_names(model: Any) -> list[str]:
    return list(hook_points(model))


def unit_points(model: Any, blocks: Iterable[int] | None = None) -> list[str]:
    """The unit points (hidden units ``fix`` may move) of ``blocks`` (all when None), in forward order."""
    wanted = None if blocks is None else {int(b) for b in blocks}
    return [p.name for p in hook_points(model).values()
            if p.unit and p.unavailable is None and (wanted is None or block_of(p.name) in wanted)]


def block_of(name: str) -> int | None:
    """The block index a ``blocks.{i}....`` name refers to, else None."""
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit() else None


def block_point(block: int, what: str) -> str:
    """``block_point(3, "resid_post") == "blocks.3.resid_post"``."""
    return f"blocks.{int(block)}.{what}"


def _listing(points: Mapping[str, HookPoint]) -> str:
    """The valid names compactly: ``blocks.{0..11}.resid_post`` instead of twelve names."""
    shapes: dict[str, list[int]] = {}
    for name in points:
        b = block_of(name)
        key = name if b is None else "blocks.{i}." + name.split(".", 2)[2]
        shapes.setdefault(key, []).append(-1 if b is None else b)
    out = []
    for key, blocks in shapes.items():
        if "{i}" in key:
            lo, hi = min(blocks), max(blocks)
            key = key.replace("{i}", f"{{{lo}..{hi}}}" if hi > lo else str(lo))
        out.append(key)
    return ", ".join(out)


def resolve_names(model: Any, names: Iterable[str]) -> list[HookPoint]:
    """The points ``names`` designate (``*`` patterns allowed), in forward order; clear errors otherwise."""
    points = hook_points(model)
    chosen: dict[str, HookPoint] = {}
    for name in names:
        matched = [p for n, p in points.items() if fnmatch.fnmatchcase(n, name)] if any(
            c in name for c in "*?[") else ([points[name]] if name in points else [])
        if not matched:
            family = family_of(model).name
            raise UnknownHookPoint(f"{name!r} is not a hook point of this {family} model; valid names: "
                                   f"{_listing(points)}")
        for p in matched:
            if p.unavailable is not None:
                raise HookPointUnavailable(f"{p.name} is not available on this model: {p.unavailable}")
            chosen[p.name] = p
    order = list(points)
    return sorted(chosen.values(), key=lambda p: order.index(p.name))


def resolve_point(model: Any, name: str) -> tuple[nn.Module, HookPoint]:
    """The module a (non-pattern) point hooks and the point itself; for interventions."""
    module = unwrap_model(model)
    (point,) = resolve_names(module, [name])
    return module.get_submodule(point.module), point


# ----------------------------------------------------------------------------------------------- the kernel tap
_sdpa_lock = threading.Lock()
_sdpa_taps: list["_KernelTap"] = []
_sdpa_original: Callable[..., torch.Tensor] | None = None


def _probabilities(q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool,
                   scale: float | None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) in float32, as the kernel defines its attention (grouped keys repeated)."""
    q, k = q.float(), k.float()
    if k.shape[-3] != q.shape[-3]:  # grouped-query attention: each key head serves several query heads
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if is_causal:
        L, S = scores.shape[-2:]
        scores = scores.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
            else scores + attn_mask.float()
    return scores.softmax(dim=-1)


def _tapped_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any):
    tap = _sdpa_taps[-1] if _sdpa_taps else None
    if tap is not None and tap.active is not None and threading.get_ident() == tap.thread:
        attn_mask = kwargs.get("attn_mask", args[0] if args else None)
        is_causal = bool(kwargs.get("is_causal", args[2] if len(args) > 2 else False))
        tap.take(query, key, value, attn_mask, is_causal, kwargs.get("scale"))
    return _sdpa_original(query, key, value, *args, **kwargs)  # type: ignore[misc]


class _KernelTap:
    """Reads q/k/v (and the probabilities) that attention modules pass to ``scaled_dot_product_attention``."""

    def __init__(self, on_value: Callable[[HookPoint, torch.Tensor], None]):
        self.on_value = on_value
        self.wanted: dict[int, list[HookPoint]] = {}  # id(attention module) -> its requested points
        self.active: list[HookPoint] | None = None
        self.seen = False
        self.thread = threading.get_ident()

    def take(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Any, is_causal: bool,
             scale: float | None) -> None:
        # One kernel call per attention forward: clear first, so a stop raised while storing (stop_early) cannot
        # leave this module's points active for the next forward's earlier blocks.
        points, self.active, self.seen = self.active or [], None, True
        for point in points:
            if point.part == "pattern":
                self.on_value(point, _probabilities(q.detach(), k.detach(), attn_mask, is_causal, scale))
            else:
                t = {"q": q, "k": k, "v": v}[point.part].detach()
                self.on_value(point, t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1))

    def install(self) -> None:
        global _sdpa_original
        with _sdpa_lock:
            if not _sdpa_taps:
                _sdpa_original = torch.nn.functional.scaled_dot_product_attention
                torch.nn.functional.scaled_dot_product_attention = _tapped_sdpa
            _sdpa_taps.append(self)

    def uninstall(self) -> None:
        global _sdpa_original
        with _sdpa_lock:
            if self in _sdpa_taps:
                _sdpa_taps.remove(self)
            if not _sdpa_taps and _sdpa_original is not None:
                torch.nn.functional.scaled_dot_product_attention = _sdpa_original
                _sdpa_original = None


# ----------------------------------------------------------------------------------------------- capture
class _StopForward(Exception):
    """Raised inside a hook once everything asked for is captured: the rest of the forward is not needed."""


@dataclass
class Capture:
    """What :func:`capture` yields: run forwards with :meth:`forward`, read values with ``cap[name]``."""

    model: nn.Module
    family: HookFamily
    points: list[HookPoint]
    reducers: dict[str, Reducer | None]
    stop_early: bool = False
    values: dict[str, Any] = field(default_factory=dict)
    _handles: list[Any] = field(default_factory=list)
    _undo: list[Callable[[], None]] = field(default_factory=list)
    _tap: _KernelTap | None = None
    _stopped: bool = False

    # -- reading
    def __getitem__(self, name: str) -> Any:
        if name not in self.values:
            if name not in self.reducers:
                raise KeyError(f"{name} was not asked for in this capture (asked: {', '.join(self.reducers)})")
            raise RuntimeError(f"{name} did not run during the last forward")
        return self.values[name]

    def __contains__(self, name: str) -> bool:
        return name in self.values

    @property
    def stopped_early(self) -> bool:
        """Whether the last forward stopped once everything was captured (its output is then None)."""
        return self._stopped

    def forward(self, images: torch.Tensor) -> torch.Tensor | None:
        """One forward of the family's feature path under the hooks; the final tokens, or None if stopped early."""
        self.values = {}
        self._stopped = False
        try:
            out = self.family.forward(self.model, images)
        except _StopForward:
            self._stopped = True
            out = None
        missing = [p.name for p in self.points if p.name not in self.values]
        if missing:
            raise NotAViTError(f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} did not run during "
                               f"the forward of this {self.family.name} model; cannot capture it")
        return out

    # -- hooks
    def _store(self, point: HookPoint, tensor: torch.Tensor) -> None:
        reducer = self.reducers.get(point.name)
        self.values[point.name] = reducer(tensor) if reducer is not None else tensor.detach()
        if self.stop_early and len(self.values) == len(self.points):
            raise _StopForward

    def _install(self) -> None:
        by_attention: dict[str, list[HookPoint]] = {}
        for point in self.points:
            if point.where == "attention":
                by_attention.setdefault(point.module, []).append(point)
                continue
            target = self.model.get_submodule(point.module)
            if point.where == "input":
                self._handles.append(target.register_forward_pre_hook(
                    lambda m, args, kwargs, p=point: self._store(p, (p.read or first_input)(
                        m, args or positional(kwargs), None)), with_kwargs=True))
            else:
                self._handles.append(target.register_forward_hook(
                    lambda m, args, out, p=point: self._store(p, (p.read or first_tensor)(m, args, out))))
        if by_attention:
            self._install_attention(by_attention)

    def _install_attention(self, by_attention: dict[str, list[HookPoint]]) -> None:
        tap = self._tap = _KernelTap(self._store)
        tap.install()
        self._undo.append(tap.uninstall)
        for path, points in by_attention.items():
            attention = self.model.get_submodule(path)
            undo = self.family.attention_setup(attention)
            if undo is not None:
                self._undo.append(undo)

            def enter(m: nn.Module, args: Any, kwargs: Any, pts: list[HookPoint] = points) -> None:
                tap.active, tap.seen = pts, False

            def leave(m: nn.Module, args: Any, kwargs: Any, out: Any, pts: list[HookPoint] = points) -> None:
                tap.active = None
                args = args or positional(kwargs)
                if not tap.seen:  # an explicit path: the family reads the same tensors from its modules
                    for p in pts:
                        if p.fallback is None:
                            raise HookPointUnavailable(f"{p.name}: this attention did not call "
                                                       "scaled_dot_product_attention and has no other way to "
                                                       "expose its " + p.part)
                        self._store(p, p.fallback(m, args, out))

            self._handles.append(attention.register_forward_pre_hook(enter, with_kwargs=True))
            self._handles.append(attention.register_forward_hook(leave, with_kwargs=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        while self._undo:
            self._undo.pop()()

    def __enter__(self) -> "Capture":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def capture(model: Any, names: Iterable[str] | Mapping[str, Reducer | None], *, reduce: Reducer | None = None,
            stop_early: bool = False, masks_padding: bool = False) -> Capture:
    """Hook ``names`` on ``model`` (a LoadedModel, an ``nn.Module``, or one wrapped by DDP / ``torch.compile``).

    ``names``: hook names (``*`` patterns allowed, e.g. ``blocks.*.resid_post``), or a mapping of names to their
    own reducers. ``reduce`` is applied (inside the hook) to every name without its own reducer; without one the
    detached tensor is kept until the next forward. ``stop_early``: each forward stops as soon as every requested
    point has been captured (blocks after the deepest one never run). ``masks_padding``: the caller leaves the
    padded tokens of NaFlex inputs out of what it computes (``inputs.naflex.unpack`` says which); without it a
    NaFlex model is refused. Use as a context manager: the hooks are removed and every setting restored on exit,
    even after an error."""
    module = unwrap_model(model)
    family = family_of(module)
    if family.padded_inputs and not masks_padding:
        raise NotAViTError(padded_refusal(getattr(model, "name", type(module).__name__)))
    own = dict(names) if isinstance(names, Mapping) else {n: None for n in names}
    points = resolve_names(module, own)
    reducers: dict[str, Reducer | None] = {}
    for pattern, reducer in own.items():
        for p in resolve_names(module, [pattern]):
            reducers[p.name] = reducer if reducer is not None else reduce
    cap = Capture(module, family, points, reducers, stop_early)
    try:
        cap._install()
    except BaseException:
        cap.remove()
        raise
    return cap


def padded_refusal(name: str, what: str = "this measurement") -> str:
    """The one line that refuses a NaFlex model where the measurement needs one patch grid for all images."""
    return (f"{name} is a NaFlex model (each image has its own patch grid, padded to one length): {what} needs one "
            "grid for all images and does not measure NaFlex models yet; the norms scan (artifactscan norms) does")


# ----------------------------------------------------------------------------------------------- interventions
@dataclass
class Intervention:
    """Edits applied to hook points during every forward until :meth:`remove` (or the end of a ``with``)."""

    handles: list[Any] = field(default_factory=list)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def __enter__(self) -> "Intervention":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def intervene(model: Any, edits: Mapping[str, Callable[[torch.Tensor], torch.Tensor]]) -> Intervention:
    """Replace the tensor at each named point by ``edit(tensor)`` in every forward, until removed.

    Works on ``input`` points (a block's input: the new tensor is what the block receives) and ``output`` points
    whose tensor is the module's whole output or its first element; attention points are read-only."""
    module = unwrap_model(model)
    handle = Intervention()
    try:
        for name, edit in edits.items():
            target, point = resolve_point(module, name)
            if point.where == "input":
                handle.handles.append(target.register_forward_pre_hook(
                    lambda m, args, e=edit: (e(args[0]),) + tuple(args[1:])))
            elif point.where == "output" and point.read in (None, first_tensor):
                handle.handles.append(target.register_forward_hook(
                    lambda m, args, out, e=edit: (e(out[0]),) + tuple(out[1:]) if isinstance(out, tuple)
                    else e(out)))
            else:
                raise HookPointUnavailable(f"{name} can be read but not edited")
    except BaseException:
        handle.remove()
        raise
    return handle


def cast_inputs_to_weights(module: nn.Module) -> None:
    """Cast the floating inputs of ``module`` to its weights' dtype, for good: a model held in bf16/fp16
    (``--precision``) then takes every caller's float32 pixels where they enter (its patch embedding). Kept here,
    with every other hook artifactscan registers; at most one per module."""
    if getattr(module, "_artifactscan_casts_inputs", False):
        return

    def cast(mod: nn.Module, args: tuple) -> tuple:
        weight = next(mod.parameters(), None)
        if weight is None:
            return args
        return tuple(a.to(weight.dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)

    module.register_forward_pre_hook(cast)
    module._artifactscan_casts_inputs = True  # type: ignore[assignment]


def blocks_sequence(model: Any) -> Sequence[nn.Module]:
    """The model's blocks, in order (as the family names them ``blocks.{i}``)."""
    module = unwrap_model(model)
    return list(family_of(module).blocks(module))


class CaptureContext:
    """The base of a measurement's own capture (norms, a probe's tap, LOST's features, attention maps): hook
    ``requests`` on enter, remove them on exit, and run one forward at a time with :meth:`forward_captured`."""

    def __init__(self, loaded: Any, requests: Iterable[str] | Mapping[str, Reducer | None], *,
                 reduce: Reducer | None = None, stop_early: bool = False):
        self.loaded = loaded
        self.requests = dict(requests) if isinstance(requests, Mapping) else list(requests)
        self.reduce, self.stop_early = reduce, stop_early
        self._capture: Capture | None = None

    def __enter__(self):
        self._capture = capture(self.loaded, self.requests, reduce=self.reduce, stop_early=self.stop_early)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._capture is not None:
            self._capture.remove()
            self._capture = None

    def forward_captured(self, images: torch.Tensor) -> Capture:
        """One forward under the hooks; the capture holding its values."""
        if self._capture is None:
            raise RuntimeError(f"{type(self).__name__} must be used inside `with`")
        self._capture.forward(images)
        return self._capture


def vit_inside(model: Any, module: str | nn.Module | None = None) -> nn.Module:
    """The ViT to measure inside what a framework hands a callback (a LightningModule holding a timm ViT, an HF
    ``ViTForImageClassification``): ``module`` (a submodule or its dotted name) if given, else ``model`` itself when
    the capture layer hooks it, else its first submodule the capture layer hooks."""
    if isinstance(module, nn.Module):
        return module
    root = unwrap_model(model)
    if isinstance(module, str):
        try:
            return root.get_submodule(module)
        except AttributeError:
            raise InputError(f"{type(root).__name__} has no submodule {module!r} (module=)") from None
    for candidate in root.modules():  # the root first, then depth first: the outermost hookable ViT
        try:
            family_of(candidate)
        except NotAViTError:
            continue
        return candidate
    raise NotAViTError(f"{type(root).__name__} holds no model family artifactscan can hook (known: "
                       f"{', '.join(hook_families())}); pass module= naming the ViT inside it")
