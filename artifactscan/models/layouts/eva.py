"""timm's ``Eva``-class models that only come as timm's own files (EVA02, and the RoPE ViTs of Heo et al., 2024):
nothing to convert, only their known configurations, so their bare ``state_dict()`` files load without ``--arch``.
They keep Eva's own layer-scale names (``gamma_1/gamma_2``), which the loader reads as they are. (EVA02-CLIP files
come through OpenCLIP's timm trunk, ``openai_clip.py``; DINOv3 and PE, also Eva-class, have their own modules.)
"""

from __future__ import annotations

from artifactscan.models.layouts.base import Family, known

EVA02 = known(
    "eva02",
    ("eva02_tiny_patch14_224", 192, 14), ("eva02_tiny_patch14_336", 192, 14), ("eva02_small_patch14_224", 384, 14),
    ("eva02_small_patch14_336", 384, 14), ("eva02_base_patch14_224", 768, 14), ("eva02_base_patch14_448", 768, 14),
    ("eva02_large_patch14_224", 1024, 14), ("eva02_large_patch14_448", 1024, 14),
    ("eva02_base_patch16_clip_224", 768, 16), ("eva02_large_patch14_clip_224", 1024, 14),
    ("eva02_large_patch14_clip_336", 1024, 14), ("eva02_enormous_patch14_clip_224", 1792, 14))
# Not `vit_*_patch16_rope_ape_224`: its keys and shapes are exactly those of DeiT-III's original files (gamma_N, a
# position embedding without the CLS row), so shapes cannot tell the two apart; it needs --arch.
ROPE = known(
    "rope",
    ("vit_small_patch16_rope_224", 384, 16), ("vit_base_patch16_rope_224", 768, 16),
    ("vit_large_patch16_rope_224", 1024, 16), ("vit_small_patch16_rope_mixed_224", 384, 16),
    ("vit_base_patch16_rope_mixed_224", 768, 16), ("vit_large_patch16_rope_mixed_224", 1024, 16),
    ("vit_small_patch16_rope_mixed_ape_224", 384, 16), ("vit_base_patch16_rope_mixed_ape_224", 768, 16),
    ("vit_large_patch16_rope_mixed_ape_224", 1024, 16), ("vit_medium_patch16_rope_reg1_gap_256", 512, 16),
    ("vit_mediumd_patch16_rope_reg1_gap_256", 512, 16), ("vit_betwixt_patch16_rope_reg4_gap_256", 640, 16),
    ("vit_base_patch16_rope_reg1_gap_256", 768, 16))
FAMILY = Family("eva", known=EVA02 + ROPE)
