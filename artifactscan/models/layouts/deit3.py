"""DeiT-III (Touvron et al., 2022) in its original files: layer scales named ``blocks.N.gamma_1`` / ``gamma_2`` and a
position embedding without the CLS row. Converted by timm's DeiT-III filter (``vision_transformer.
checkpoint_filter_fn`` with ``adapt_layer_scale=True``: ``gamma_N`` -> ``lsN.gamma``). Eva and BEiT name their own
layer scales ``gamma_1/2`` too: a file that is already such a model's ``state_dict()`` is loaded as it is (the
loader tries that before any converter).
"""

from __future__ import annotations

import re

from artifactscan.models.layouts.base import Family, FileLayout, StateDict, known, vit_filter


def has_gamma_keys(sd: StateDict) -> bool:
    return any(re.match(r"blocks\.\d+\.gamma_[12]$", k) for k in sd)


FILES = FileLayout("deit3", "deit3", has_gamma_keys,
                   lambda sd, model, name: vit_filter(sd, model, adapt_layer_scale=True), prefix_tokens="1 CLS")
FAMILY = Family("deit3", files=(FILES,), known=known(
    "deit3",
    ("deit3_small_patch16_224", 384, 16), ("deit3_medium_patch16_224", 512, 16), ("deit3_base_patch16_224", 768, 16),
    ("deit3_large_patch16_224", 1024, 16), ("deit3_huge_patch14_224", 1280, 14)))
