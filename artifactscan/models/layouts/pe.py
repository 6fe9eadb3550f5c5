"""Perception Encoder (Bolya et al., 2025) in Meta's own ``perception_models`` layout, as timm's ``Eva``.

Meta's files name their keys as OpenAI's CLIP does (``conv1``, ``class_embedding``, ``positional_embedding``,
``ln_pre``, ``transformer.resblocks.N.attn.in_proj_weight``, ``mlp.c_fc``), with a ``visual.`` prefix and a text
tower in the CLIP checkpoints and none in the vision-only ones (PE lang / spatial). What only PE has tells them apart:
layer scales ``ls_1.gamma`` / ``ls_2.gamma`` (lang, spatial, the large core models), the attention pooling head
``attn_pool.*`` (core), or no ``ln_post`` (PE lang / spatial drop it; every OpenAI / OpenCLIP tower has one). A
vision tower without the ``visual.`` prefix is PE's: artifactscan reads OpenAI's layout only as a whole CLIP model.
PE's RoPE is recomputed from the grid (its frequencies are not in the state dict), which timm's Eva does as well.

The conversion is timm's own ``timm.models.eva.checkpoint_filter_fn`` (its ``_convert_pe`` branch); the CLIP
projection (``proj``) is dropped by name, as the other CLIP layouts' is: it maps the pooled embedding into the text
space and touches no token. timm's ``vit_pe_core/lang/spatial_*`` ``state_dict()`` files need none of this (loaded
as they are, matched by the shapes listed here).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from artifactscan.models.layouts.base import Family, FileLayout, known
from artifactscan.models.layouts.openai_clip import CLIP_EXTRAS

LAYOUT = "pe"
#: PE's own keys (any one is enough), with or without the ``visual.`` prefix
_OWN = re.compile(r"^(?:visual\.)?(?:transformer\.resblocks\.\d+\.ls_[12]\.gamma$|attn_pool\.)")
_TOWER = re.compile(r"^(?:visual\.)?(?:conv1\.weight|transformer\.resblocks\.0\.attn\.in_proj_weight)$")
#: the CLIP projection of the pooled embedding (``head`` after timm's converter)
PROJECTION = re.compile(r"^(?:visual\.)?proj$")


def is_native(sd: dict[str, Any]) -> bool:
    """A PE tower in Meta's layout: CLIP-style keys plus one of PE's own, or a CLIP-style tower without OpenAI's
    ``visual.`` wrapping, or one without ``ln_post``."""
    if not any(_TOWER.match(k) for k in sd):
        return False
    prefixed = "visual.conv1.weight" in sd
    if not prefixed:
        return "conv1.weight" in sd and any(k.startswith("transformer.resblocks.") for k in sd)
    return any(_OWN.match(k) for k in sd) or "visual.ln_post.weight" not in sd


def has_text_tower(sd: dict[str, Any]) -> bool:
    """Whether the file is a whole CLIP model (``visual.*`` next to a text tower), so text keys may be dropped."""
    return "visual.conv1.weight" in sd


def to_timm(sd: dict[str, torch.Tensor], model: nn.Module | None = None, name: str = "") -> dict[str, torch.Tensor]:
    """timm's ``Eva`` keys through timm's converter (which renames only: PE's files are at their model's grid)."""
    from timm.models.eva import checkpoint_filter_fn

    return dict(checkpoint_filter_fn(dict(sd), model))  # type: ignore[arg-type]


def drop_rules(sd: dict[str, Any]) -> list:
    """The CLIP projection always; text rules only beside a ``visual.`` tower (a vision-only PE file's own
    ``transformer.`` keys are its blocks)."""
    return [*(CLIP_EXTRAS if has_text_tower(sd) else []), ("PE CLIP projection", PROJECTION)]


FILES = FileLayout(LAYOUT, "pe", is_native, to_timm, drop=drop_rules,
                   prefix_tokens="1 CLS (the core models; PE lang and spatial have none)")
FAMILY = Family("pe", files=(FILES,), known=known(
    "pe",
    ("vit_pe_core_tiny_patch16_384", 192, 16), ("vit_pe_core_small_patch16_384", 384, 16),
    ("vit_pe_core_base_patch16_224", 768, 16), ("vit_pe_core_large_patch14_336", 1024, 14),
    ("vit_pe_core_gigantic_patch14_448", 1536, 14)))
#: timm's PE lang and spatial towers (matched after the other families' sizes, as they always were)
LANG_SPATIAL = known(
    "pe",
    ("vit_pe_lang_large_patch14_448", 1024, 14), ("vit_pe_lang_gigantic_patch14_448", 1536, 14),
    ("vit_pe_spatial_tiny_patch16_512", 192, 16), ("vit_pe_spatial_small_patch16_512", 384, 16),
    ("vit_pe_spatial_base_patch16_512", 768, 16), ("vit_pe_spatial_large_patch14_448", 1024, 14),
    ("vit_pe_spatial_gigantic_patch14_448", 1536, 14))
