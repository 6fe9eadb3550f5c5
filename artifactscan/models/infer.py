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

from artifactscan.core.errors import ModelLoadError, option

# (timm name, family, width, patch). Order matters: among equivalent matches the family of the file's layout wins,
# then the earlier entry.
KNOWN: list[tuple[str, str, int, int]] = [
    ("vit_tiny_patch16_224", "vit", 192, 16),
    ("vit_small_patch16_224", "vit", 384, 16),
    ("vit_small_patch32_224", "vit", 384, 32),
    ("vit_base_patch16_224", "vit", 768, 16),
    ("vit_base_patch32_224", "vit", 768, 32),
    ("vit_base_patch8_224", "vit", 768, 8),
    ("vit_large_patch16_224", "vit", 1024, 16),
    ("vit_large_patch14_224", "vit", 1024, 14),
    ("vit_huge_patch14_224", "vit", 1280, 14),
    ("deit_tiny_patch16_224", "deit", 192, 16),
    ("deit_small_patch16_224", "deit", 384, 16),
    ("deit_base_patch16_224", "deit", 768, 16),
    ("deit3_small_patch16_224", "deit3", 384, 16),
    ("deit3_medium_patch16_224", "deit3", 512, 16),
    ("deit3_base_patch16_224", "deit3", 768, 16),
    ("deit3_large_patch16_224", "deit3", 1024, 16),
    ("deit3_huge_patch14_224", "deit3", 1280, 14),
    ("vit_base_patch16_224.mae", "mae", 768, 16),
    ("vit_large_patch16_224.mae", "mae", 1024, 16),
    ("vit_huge_patch14_224.mae", "mae", 1280, 14),
    ("vit_small_patch14_dinov2", "dinov2", 384, 14),
    ("vit_base_patch14_dinov2", "dinov2", 768, 14),
    ("vit_large_patch14_dinov2", "dinov2", 1024, 14),
    ("vit_giant_patch14_dinov2", "dinov2", 1536, 14),
    ("vit_small_patch14_reg4_dinov2", "dinov2", 384, 14),
    ("vit_base_patch14_reg4_dinov2", "dinov2", 768, 14),
    ("vit_large_patch14_reg4_dinov2", "dinov2", 1024, 14),
    ("vit_giant_patch14_reg4_dinov2", "dinov2", 1536, 14),
    ("vit_base_patch32_clip_224", "clip", 768, 32),
    ("vit_base_patch16_clip_224", "clip", 768, 16),
    ("vit_large_patch14_clip_224", "clip", 1024, 14),
    ("vit_huge_patch14_clip_224", "clip", 1280, 14),
    ("vit_base_patch32_clip_quickgelu_224", "clip", 768, 32),
    ("vit_base_patch16_clip_quickgelu_224", "clip", 768, 16),
    ("vit_large_patch14_clip_quickgelu_224", "clip", 1024, 14),
    ("vit_huge_patch14_clip_quickgelu_224", "clip", 1280, 14),
    ("vit_base_patch16_siglip_224", "siglip", 768, 16),
    ("vit_large_patch16_siglip_256", "siglip", 1024, 16),
    ("vit_so400m_patch14_siglip_224", "siglip", 1152, 14),
]
# What each file layout says about the family (used only to choose among equivalent matches).
LAYOUT_FAMILY = {"dinov2": "dinov2", "deit3": "deit3", "mae": "mae", "openai_clip": "clip", "openclip_timm": "clip"}
_extra_known: list[tuple[str, str, int, int]] = []


def register_known_config(name: str, family: str, width: int, patch: int) -> None:
    """Add a timm architecture to the table bare state dicts are matched against (e.g. a project's own size)."""
    if (name, family, width, patch) not in _extra_known:
        _extra_known.append((name, family, width, patch))


def known_configs() -> list[tuple[str, str, int, int]]:
    return KNOWN + _extra_known


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
        grid = "x".join(map(str, self.grid)) if self.grid else "?"
        return (f"depth {self.depth}, width {self.embed_dim}, patch {self.patch_size}, grid {grid}, "
                f"{'CLS' if self.class_token else 'no CLS'}, {self.reg_tokens} registers"
                + (", layer scale" if self.layer_scale else "") + (", pre-norm" if self.norm_pre else ""))


def _shape(sd: dict[str, Any], key: str) -> tuple[int, ...] | None:
    v = sd.get(key)
    return tuple(v.shape) if v is not None else None


def read_facts(sd: dict[str, torch.Tensor]) -> ShapeFacts:
    """The architecture facts of a timm-layout ViT state dict (tensors may live on the ``meta`` device).

    Raises:
        ModelLoadError when the dict is not a ViT (no patch embedding or blocks).
    """
    patch = _shape(sd, "patch_embed.proj.weight")
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if patch is None or len(patch) != 4 or not blocks:
        raise ModelLoadError("the state dict is not a Vision Transformer's: no patch_embed.proj.weight / blocks.N "
                             f"keys (first keys: {', '.join(list(sd)[:4])})")
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
        pos_embed_on_prefix=on_prefix, layer_scale="blocks.0.ls1.gamma" in sd,
        mlp_ratio=round(fc1[0] / width, 4), qkv_bias="blocks.0.attn.qkv.bias" in sd,
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


def _meta_model(name: str, **kwargs: Any) -> Any:
    """Built on the meta device, initialisation skipped where the class allows (7x faster; shapes only)."""
    import timm

    with torch.device("meta"):
        try:
            return timm.create_model(name, pretrained=False, weight_init="skip", **kwargs)
        except TypeError:  # not a VisionTransformer: no weight_init argument
            return timm.create_model(name, pretrained=False, **kwargs)


@lru_cache(maxsize=None)
def _meta_shapes(name: str, kwargs_items: tuple[tuple[str, Any], ...] = ()) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in _meta_model(name, **dict(kwargs_items)).state_dict().items()}


@lru_cache(maxsize=None)
def _heads_and_act(name: str) -> tuple[int, str]:
    block = _meta_model(name, depth=1).blocks[0]
    act = type(getattr(block.mlp, "act", None)).__name__
    return int(block.attn.num_heads), act


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
    facts = read_facts(sd)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    if facts.grid is None:
        size = option("arch_kwargs", '{"img_size": (H, W)}', shell_value="""'{"img_size": [H, W]}'""")
        raise ModelLoadError(f"{name}: its position embedding ({_shape(sd, 'pos_embed')}) is not a square grid plus "
                             "prefix tokens, so the input size cannot be read from it; pass "
                             f"{option('arch', 'TIMM_NAME')} and {size}")
    matches: list[tuple[str, str, dict[str, Any]]] = []
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
    if not matches:
        raise ModelLoadError(f"{name}: its shapes ({facts.brief()}) match no known ViT configuration; closest: "
                             f"{', '.join(closest(facts))}. Pass {option('arch', 'TIMM_NAME')} (and "
                             f"{option('arch_kwargs')} for non-default sizes), or save it with artifactscan's "
                             "checkpoint format.")
    groups: dict[tuple[int, str], list[tuple[str, str, dict[str, Any]]]] = {}
    for m in matches:
        groups.setdefault(_heads_and_act(m[0]), []).append(m)
    if activation is not None and len(groups) > 1:
        groups = {key: ms for key, ms in groups.items() if key[1] == activation} or groups
    if len(groups) > 1:
        options = "; ".join(f"{', '.join(a for a, _, _ in ms)} ({h} heads, {act})" for (h, act), ms in groups.items())
        raise ModelLoadError(f"{name} ({facts.brief()}) fits several known architectures that its shapes cannot tell "
                             f"apart (heads / activation): {options}. Pass {option('arch')} with the one it was "
                             "trained as.")
    (heads, act), members = next(iter(groups.items()))
    want = LAYOUT_FAMILY.get(layout)
    members.sort(key=lambda m: m[1] != want)  # stable: table order within the preferred family
    arch, _, kwargs = members[0]
    return Match(arch, kwargs, facts, [a for a, _, _ in members[1:]], heads, act)


def closest(facts: ShapeFacts, n: int = 3) -> list[str]:
    """The table's nearest names (width first, then patch size), with their width and patch."""
    def distance(entry: tuple[str, str, int, int]) -> tuple[float, int]:
        _, _, width, patch = entry
        return abs(math.log(width / max(facts.embed_dim, 1))), int(patch != facts.patch_size)

    ranked = sorted(known_configs(), key=distance)[:n]
    return [f"{a} (width {w}, patch {p})" for a, _, w, p in ranked]
