"""CLIP image towers in OpenAI's layout (``visual.conv1``, ``visual.class_embedding``, ``visual.transformer.
resblocks.N``), which OpenCLIP's own ViTs share, and OpenCLIP towers around a timm trunk (``visual.trunk.*``).

The whole CLIP model is the file: the text tower and OpenAI's metadata (and OpenCLIP's projection head beside a timm
trunk) are dropped by name; every key left must be the image tower's. Converted by timm's own
``vision_transformer.checkpoint_filter_fn`` (its ``_convert_openai_clip``). QuickGELU and GELU share every key:
OpenAI's TorchScript archives are QuickGELU, other files need their shapes to agree on one or ``--arch``.
Perception Encoder files use the same key names and are told apart first (``pe.py``).
"""

from __future__ import annotations

import re

from torch import nn

from artifactscan.core.errors import ModelLoadError
from artifactscan.models.layouts.base import Family, FileLayout, StateDict, known, vit_filter

TEXT_TOWER = re.compile(r"^(transformer\.|token_embedding\.|positional_embedding$|ln_final\.|text_projection|"
                        r"logit_scale$|logit_bias$|text\.|attn_mask$)")
OPENAI_META = re.compile(r"^(input_resolution|context_length|vocab_size)$")
OPENCLIP_HEAD = re.compile(r"^visual\.head\.")
#: What a whole CLIP model holds besides its image tower (Perception Encoder's CLIP files too).
CLIP_EXTRAS = [("CLIP text tower", TEXT_TOWER), ("OpenAI metadata", OPENAI_META)]


def _only_the_tower(prefix: str):
    def to_timm(sd: StateDict, model: nn.Module | None, name: str) -> StateDict:
        # timm keeps only the tower's keys; the others were dropped by name above, anything else is refused.
        unknown = [k for k in sd if not k.startswith(prefix)]
        if unknown:
            raise ModelLoadError(f"unexpected keys outside the image tower: {', '.join(unknown[:4])}")
        return vit_filter(sd, model)
    return to_timm


OPENAI = FileLayout("openai_clip", "clip", lambda sd: "visual.class_embedding" in sd, _only_the_tower("visual."),
                    drop=lambda sd: CLIP_EXTRAS, prefix_tokens="1 CLS")
OPENCLIP_TIMM = FileLayout("openclip_timm", "clip", lambda sd: any(k.startswith("visual.trunk.") for k in sd),
                           _only_the_tower("visual.trunk."),
                           drop=lambda sd: [*CLIP_EXTRAS, ("OpenCLIP projection head", OPENCLIP_HEAD)],
                           prefix_tokens="those of the timm trunk")
FAMILY = Family("clip", files=(OPENAI, OPENCLIP_TIMM), known=known(
    "clip",
    ("vit_base_patch32_clip_224", 768, 32), ("vit_base_patch16_clip_224", 768, 16),
    ("vit_large_patch14_clip_224", 1024, 14), ("vit_huge_patch14_clip_224", 1280, 14),
    ("vit_base_patch32_clip_quickgelu_224", 768, 32), ("vit_base_patch16_clip_quickgelu_224", 768, 16),
    ("vit_large_patch14_clip_quickgelu_224", 1024, 14), ("vit_huge_patch14_clip_quickgelu_224", 1280, 14)))
