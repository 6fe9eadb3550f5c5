"""Which timm architecture a bare ViT state dict belongs to: read from its shapes, matched against known ones.

Tensor shapes give depth, width, patch size, the grid (hence ``img_size``), CLS, register count, whether the position
embedding covers the prefix tokens, layer scale, pre-norm, MLP width, qkv bias and the final / fc norm. They do not
give the number of attention heads (q, k and v have the same shapes for any head count) nor the activation (OpenAI
CLIP's QuickGELU and OpenCLIP's GELU share every key). So a state dict is matched against a table of known timm
configurations, each built on the ``meta`` device (no memory, no weights), by comparing every key and shape; it is
loaded only when the matches agree on heads and activation, and refused otherwise, naming the candidates. An unknown
configuration is never guessed.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from artifactscan.core.errors import ModelLoadError, option

#: ``(timm name, family, width, patch)`` of the known configurations, in matching order: among equivalent matches the
#: family of the file's layout wins, then the earlier entry. Each family's module lists its own
#: (``models/layouts/``), and ``layouts/table.py`` sets them all here in one order (:func:`set_table`).
_table: list[tuple[str, str, int, int]] = []
_extra_known: list[tuple[str, str, int, int]] = []  # what callers register, after the table
#: What each file layout says about the family (used only to choose among equivalent matches); set by the table.
LAYOUT_FAMILY: dict[str, str] = {}


def set_table(rows: list[tuple[str, str, int, int]], layout_family: dict[str, str]) -> None:
    """The families' known configurations and layouts' families (called once, by ``layouts/table.py``)."""
    _table[:] = rows
    LAYOUT_FAMILY.clear()
    LAYOUT_FAMILY.update(layout_family)


def register_known_config(name: str, family: str, width: int, patch: int) -> None:
    """Add a timm architecture to the table bare state dicts are matched against (e.g. a project's own size)."""
    if (name, family, width, patch) not in _table + _extra_known:
        _extra_known.append((name, family, width, patch))


def known_configs() -> list[tuple[str, str, int, int]]:
    return _table + _extra_known


@dataclass
class ShapeFacts:
    """What a timm-layout ViT state dict's shapes say about its architecture (``model.inferred`` in the report)."""

    depth: int
    embed_dim: int
    patch_size: int
    in_chans: int
    grid: list[int] | None
    img_size: int | None
    class_token: bool
    reg_tokens: int
    pos_embed_on_prefix: bool | None
    layer_scale: bool
    mlp_ratio: float
    qkv_bias: bool
    norm_pre: bool
    final_norm: str | None
    num_classes: int
    attn_pool: bool

    def brief(self) -> str:
        grid = ("grid " + "x".join(map(str, self.grid))) if self.grid else "no absolute position embedding"
        return (f"depth {self.depth}, width {self.embed_dim}, patch {self.patch_size}, {grid}, "
                f"{'CLS' if self.class_token else 'no CLS'}, {self.reg_tokens} registers"
                + (", layer scale" if self.layer_scale else "") + (", pre-norm" if self.norm_pre else ""))


def _shape(sd: dict[str, Any], key: str) -> tuple[int, ...] | None:
    v = sd.get(key)
    return tuple(v.shape) if v is not None else None


def read_facts(sd: dict[str, torch.Tensor], name: str = "the state dict") -> ShapeFacts:
    """The architecture facts of a timm-layout ViT state dict (tensors may live on the ``meta`` device).

    Raises:
        ModelLoadError when the dict is not a ViT (no patch embedding or blocks), or is a NaFlex ViT's.
    """
    patch = _shape(sd, "patch_embed.proj.weight")
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if any(k.startswith("embeds.") for k in sd) and blocks and patch is None:
        raise ModelLoadError(f"{name} is a timm NaFlexViT's (naflexvit_*: embeds.proj / embeds.pos_embed, patches "
                             "of variable resolution and padding): its size is not in the table a bare state dict is matched against; "
                             f"pass {option('arch', 'naflexvit_<size>_patch16_<variant>')} (e.g. "
                             "naflexvit_base_patch16_radio_v3)")
    if patch is None or len(patch) != 4 or not blocks:
        found = f"its blocks.0 ... blocks.{max(blocks)} keys" if blocks else "no blocks.N keys"
        conv = "no patch_embed.proj.weight" if patch is None else f"patch_embed.proj.weight of shape {patch}"
        raise ModelLoadError(f"{name} is not a Vision Transformer's state dict that artifactscan reads: it has "
                             f"{conv} (a 4-d convolution) and {found} (first keys: {', '.join(list(sd)[:4])})")
    width = patch[0]
    cls = "cls_token" in sd
    reg = (_shape(sd, "reg_token") or (1, 0))[1]
    pos = _shape(sd, "pos_embed")
    grid, on_prefix = None, None
    if pos is not None:
        n = pos[1]
        for prefix_in_pos in (True, False):
            side = math.isqrt(max(n - (cls + reg if prefix_in_pos else 0), 0))
            if side * side == n - (cls + reg if prefix_in_pos else 0) and side > 0:
                grid, on_prefix = [side, side], prefix_in_pos
                break
    fc1 = _shape(sd, "blocks.0.mlp.fc1.weight") or _shape(sd, "blocks.0.mlp.fc1_g.weight") or (0,)
    head = _shape(sd, "head.weight")
    final = "norm" if "norm.weight" in sd else ("fc_norm" if "fc_norm.weight" in sd else None)
    return ShapeFacts(
        depth=max(blocks) + 1, embed_dim=width, patch_size=patch[2], in_chans=patch[1], grid=grid,
        img_size=grid[0] * patch[2] if grid else None, class_token=cls, reg_tokens=reg,
        pos_embed_on_prefix=on_prefix, layer_scale="blocks.0.ls1.gamma" in sd or "blocks.0.gamma_1" in sd,
        mlp_ratio=round(fc1[0] / width, 4), qkv_bias="blocks.0.attn.qkv.bias" in sd or "blocks.0.attn.q_bias" in sd,
        norm_pre="norm_pre.weight" in sd, final_norm=final, num_classes=head[0] if head else 0,
        attn_pool=any(k.startswith("attn_pool.") for k in sd))


def fit_kwargs(facts: ShapeFacts, candidate: ShapeFacts) -> dict[str, Any]:
    """Keyword overrides that make a known architecture take this file's grid and head (not its architecture)."""
    kwargs: dict[str, Any] = {"num_classes": facts.num_classes}
    if facts.img_size and facts.img_size != candidate.img_size:
        kwargs["img_size"] = facts.img_size
    if candidate.attn_pool and not facts.attn_pool:  # e.g. a SigLIP tower saved without its pooling head
        kwargs.update(global_pool="token" if facts.class_token else "avg", fc_norm=False)
    elif facts.final_norm == "fc_norm" and candidate.final_norm == "norm":  # MAE / BEiT fine-tuned: avg pool
        kwargs.update(global_pool="avg", fc_norm=True)
    return kwargs


class _NoInitOnMeta(TorchFunctionMode):
    """Turns in-place tensor methods on meta tensors (``uniform_``, ``erfinv_``, ``mul_`` ...) into no-ops: a meta
    tensor holds no values, yet torch traces each such call through its reference decompositions (Eva's weight
    initialisation took 1-2 s per model on the meta device for nothing)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.startswith("_") and args and isinstance(args[0], torch.Tensor) \
                and args[0].is_meta:
            return args[0]
        return func(*args, **(kwargs or {}))


def _meta_model(name: str, **kwargs: Any) -> Any:
    """Built on the meta device, initialisation skipped where the class allows (7x faster; shapes only)."""
    import timm

    with torch.device("meta"), _NoInitOnMeta():
        try:
            return timm.create_model(name, pretrained=False, weight_init="skip", **kwargs)
        except TypeError:  # not a VisionTransformer: no weight_init argument
            return timm.create_model(name, pretrained=False, **kwargs)


@lru_cache(maxsize=None)
def _meta_shapes(name: str, kwargs_items: tuple[tuple[str, Any], ...] = ()) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in _meta_model(name, **dict(kwargs_items)).state_dict().items()}


@lru_cache(maxsize=None)
def _behaviour(name: str, kwargs_items: tuple[tuple[str, Any], ...] = ()) -> tuple[int, str, str]:
    """What a configuration computes that its shapes do not show: heads, activation, and (``""`` for a plain ViT)
    the norm epsilon and rotary embedding settings where they differ from ViT's (RoPE temperature, grid indexing,
    reference grid...). Configurations that agree on these and on every shape compute the same function."""
    model = _meta_model(name, **{**dict(kwargs_items), "depth": 1})
    block = model.blocks[0]
    act = type(getattr(block.mlp, "act", None)).__name__
    rope = getattr(model, "rope", None)
    details = []
    if rope is not None:
        settings = {k: v for k, v in sorted(vars(rope).items())
                    if not k.startswith("_") and k != "training" and not isinstance(v, torch.Tensor)}
        details.append(f"{type(rope).__name__}{settings}")
    eps = getattr(getattr(block, "norm1", None), "eps", None)
    if details or type(model).__name__ != "VisionTransformer":
        details.insert(0, f"{type(model).__name__}, norm eps {eps}")
    return int(block.attn.num_heads), act, "; ".join(details)


class _MetaTensor:  # read_facts only looks at .shape
    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape


def _facts_of(shapes: dict[str, tuple[int, ...]]) -> ShapeFacts:
    return read_facts({k: _MetaTensor(s) for k, s in shapes.items()})  # type: ignore[misc]


@dataclass
class Match:
    arch: str
    kwargs: dict[str, Any]
    facts: ShapeFacts
    equivalent: list[str]
    num_heads: int
    act: str

    def inferred(self) -> dict[str, Any]:
        return {"arch": self.arch, "arch_kwargs": self.kwargs, **asdict(self.facts), "num_heads": self.num_heads,
                "activation": self.act, "equivalent": self.equivalent}


def infer_architecture(sd: dict[str, torch.Tensor], layout: str = "timm", name: str = "the state dict",
                       activation: str | None = None) -> Match:
    """The unique known timm architecture whose keys and shapes are exactly this state dict's.

    ``activation`` (a timm activation class name such as ``QuickGELU``) is what the file's provenance says when its
    shapes cannot: OpenAI's TorchScript archives are all QuickGELU. It only chooses among shape matches.

    Raises:
        ModelLoadError naming the closest candidates and ``--arch`` when none or several (disagreeing on heads or
        activation) match.
    """
    facts = read_facts(sd, name)
    if facts.grid is None and "pos_embed" in sd:
        size = option("arch_kwargs", '{"img_size": (H, W)}', shell_value="""'{"img_size": [H, W]}'""")
        raise ModelLoadError(f"{name}: its position embedding ({_shape(sd, 'pos_embed')}) is not a square grid plus "
                             "prefix tokens, so the input size cannot be read from it; pass "
                             f"{option('arch', 'TIMM_NAME')} and {size}")
    matches = _matches(facts, {k: tuple(v.shape) for k, v in sd.items()})
    if not matches:
        raise ModelLoadError(f"{name}: its shapes ({facts.brief()}) match no known ViT configuration; closest: "
                             f"{', '.join(closest(facts))}. Pass {option('arch', 'TIMM_NAME')} (and "
                             f"{option('arch_kwargs')} for non-default sizes), or save it with artifactscan's "
                             "checkpoint format.")
    groups: dict[tuple[int, str, str], list[tuple[str, str, dict[str, Any]]]] = {}
    for m in matches:
        groups.setdefault(_behaviour(m[0], tuple(sorted(m[2].items()))), []).append(m)
    if activation is not None and len(groups) > 1:
        groups = {key: ms for key, ms in groups.items() if key[1] == activation} or groups
    at_own_size = {key: ms for key, ms in groups.items() if any("img_size" not in kw for _, _, kw in ms)}
    if len(groups) > 1 and len(at_own_size) == 1:  # one configuration's own input size is the file's grid: that one
        groups = at_own_size  # (timm's SigLIP-L: GELU at 256 and 384, GELUTanh at 512, same shapes at any grid)
    if len(groups) > 1:
        options = "; ".join(f"{', '.join(a for a, _, _ in ms)} ({h} heads, {act}" + (f"; {more})" if more else ")")
                            for (h, act, more), ms in groups.items())
        raise ModelLoadError(f"{name} ({facts.brief()}) fits several known architectures that its shapes cannot tell "
                             f"apart (heads / activation): {options}. Pass {option('arch')} with the one it was "
                             "trained as.")
    (heads, act, _), members = next(iter(groups.items()))
    want = LAYOUT_FAMILY.get(layout)
    members.sort(key=lambda m: m[1] != want)  # stable: table order within the preferred family
    arch, _, kwargs = members[0]
    return Match(arch, kwargs, facts, [a for a, _, _ in members[1:]], heads, act)


def _matches(facts: ShapeFacts, shapes: dict[str, tuple[int, ...]]) -> list[tuple[str, str, dict[str, Any]]]:
    """``(arch, family, kwargs)`` of every known configuration whose keys and shapes, with the file's grid and head
    (:func:`fit_kwargs`), are exactly ``shapes``."""
    matches = []
    for arch, family, width, patch in known_configs():
        if width != facts.embed_dim or patch != facts.patch_size:
            continue
        candidate = _facts_of(_meta_shapes(arch))
        kwargs = fit_kwargs(facts, candidate)
        try:
            fits = _meta_shapes(arch, tuple(sorted(kwargs.items()))) == shapes
        except (AssertionError, TypeError, ValueError):  # e.g. token pooling asked of a model without CLS
            fits = False
        if fits:
            matches.append((arch, family, kwargs))
    return matches


def _matching_names(sd: dict[str, torch.Tensor]) -> list[str]:
    try:
        facts = read_facts(sd)
    except ModelLoadError:
        return []
    return [arch for arch, _, _ in _matches(facts, {k: tuple(v.shape) for k, v in sd.items()})]


def infer_from_file(native_sd: dict[str, torch.Tensor], converted: dict[str, torch.Tensor], layout: str,
                    name: str = "the state dict", activation: str | None = None) -> tuple[Match, str]:
    """:func:`infer_architecture` for a file whose keys suggested a native ``layout``, and the layout it is read in.

    The file's keys are tried as they are first: the keys that suggest a native layout can be a timm model's own
    (Eva and BEiT name their layer scales ``gamma_1``/``gamma_2``, as DeiT-III's original files do), and such a
    file is timm's own state dict (layout ``timm``). When both readings match known configurations, the shapes
    cannot tell which the file is, and it is refused naming both.
    """
    as_is = _matching_names(native_sd) if layout != "timm" and set(converted) != set(native_sd) else []
    if as_is:
        read_converted = _matching_names(converted)
        if read_converted:
            raise ModelLoadError(f"{name} fits known architectures both as timm's own keys ({', '.join(as_is)}) "
                                 f"and read as a {layout} file ({', '.join(read_converted)}); its shapes cannot tell "
                                 f"which it is. Pass {option('arch')} with the one it was trained as.")
        return infer_architecture(native_sd, "timm", name, activation), "timm"
    return infer_architecture(converted, layout, name, activation), layout


def closest(facts: ShapeFacts, n: int = 3) -> list[str]:
    """The table's nearest names (width first, then patch size), with their width and patch."""
    def distance(entry: tuple[str, str, int, int]) -> tuple[float, int]:
        _, _, width, patch = entry
        return abs(math.log(width / max(facts.embed_dim, 1))), int(patch != facts.patch_size)

    ranked = sorted(known_configs(), key=distance)[:n]
    return [f"{a} (width {w}, patch {p})" for a, _, w, p in ranked]
