"""DINOv2 (Oquab et al., 2024) in the layout of its own repository (torch hub ``dinov2_vit*14*.pth`` and its training
code): ``register_tokens``, a 2-d ``mask_token``, fused SwiGLU ``mlp.w12`` for the giant, and a position embedding
whose first row is the CLS token's. Converted by timm's own ``vision_transformer.checkpoint_filter_fn`` (its
``_convert_dinov2``: the CLS row folded into the CLS token, registers outside the grid). timm's ``*_dinov2``
``state_dict()`` files need no conversion; Hugging Face ``Dinov2`` folders are read by ``hf_vit.py``.
"""

from __future__ import annotations

import re

from artifactscan.models.layouts.base import Family, FileLayout, StateDict, known, vit_filter


def is_hub_file(sd: StateDict) -> bool:
    """The DINOv2 repository's keys (checked after DINOv3's, whose ``mask_token`` is 2-d too)."""
    return "register_tokens" in sd or any(re.match(r"blocks\.\d+\.mlp\.w12\.", k) for k in sd) or (
        "mask_token" in sd and sd["mask_token"].dim() == 2)


HUB = FileLayout("dinov2", "dinov2", is_hub_file, lambda sd, model, name: vit_filter(sd, model),
                 prefix_tokens="1 CLS + the file's register_tokens (0 or 4)")
FAMILY = Family("dinov2", files=(HUB,), known=known(
    "dinov2",
    ("vit_small_patch14_dinov2", 384, 14), ("vit_base_patch14_dinov2", 768, 14),
    ("vit_large_patch14_dinov2", 1024, 14), ("vit_giant_patch14_dinov2", 1536, 14),
    ("vit_small_patch14_reg4_dinov2", 384, 14), ("vit_base_patch14_reg4_dinov2", 768, 14),
    ("vit_large_patch14_reg4_dinov2", 1024, 14), ("vit_giant_patch14_reg4_dinov2", 1536, 14)))
