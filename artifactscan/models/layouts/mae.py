"""MAE (He et al., 2022) pretraining checkpoints: the encoder in timm's ``VisionTransformer`` keys next to the
decoder (``decoder_*``) and the ``mask_token``, which are dropped by name; what remains goes through timm's
``vision_transformer.checkpoint_filter_fn``. The encoder-only files are timm's own layout.
"""

from __future__ import annotations

import re

from artifactscan.models.layouts.base import Family, FileLayout, StateDict, known, vit_filter

DECODER = re.compile(r"^(decoder_|mask_token$)")


def has_decoder(sd: StateDict) -> bool:
    return any(k.startswith("decoder_") for k in sd)


FILES = FileLayout("mae", "mae", has_decoder, lambda sd, model, name: vit_filter(sd, model),
                   drop=lambda sd: [("MAE decoder", DECODER)], prefix_tokens="1 CLS")
FAMILY = Family("mae", files=(FILES,), known=known(
    "mae",
    ("vit_base_patch16_224.mae", 768, 16), ("vit_large_patch16_224.mae", 1024, 16),
    ("vit_huge_patch14_224.mae", 1280, 14)))
