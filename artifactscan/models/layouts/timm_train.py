"""timm's own files: a model's ``state_dict()``, and ``train.py`` checkpoints (the weights under ``state_dict`` /
``state_dict_ema``, with the ``arch`` and ``args`` they were trained with, which the loader uses). Nothing to
convert: this layout is the one every other converts to, and it is tried last (any ViT's keys are timm's).

The known configurations here are timm's plain ``VisionTransformer`` families with no layout of their own. Among
shape-equivalent matches the earlier one wins, so ``vit_*`` comes before ``deit_*`` (and both before MAE's).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from artifactscan.core.errors import ModelLoadError
from artifactscan.models.infer import read_facts
from artifactscan.models.layouts.base import Family, FileLayout, known, vit_filter

#: Every key a timm ViT has for some setting: a file differing from the model only in these is fixed by a kwarg.
TIMM_VIT_KEY = re.compile(r"^(cls_token|reg_token|pos_embed|patch_embed\.|blocks\.\d+\.|norm\.|fc_norm\.|norm_pre\.|"
                          r"head\.|attn_pool\.)")

FILES = FileLayout("timm", None, lambda sd: True, lambda sd, model, name: vit_filter(sd, model),
                   prefix_tokens="what the timm model has (CLS, reg_tokens)")
VIT = known("vit", ("vit_tiny_patch16_224", 192, 16), ("vit_small_patch16_224", 384, 16),
            ("vit_small_patch32_224", 384, 32), ("vit_base_patch16_224", 768, 16), ("vit_base_patch32_224", 768, 32),
            ("vit_base_patch8_224", 768, 8), ("vit_large_patch16_224", 1024, 16), ("vit_large_patch14_224", 1024, 14),
            ("vit_huge_patch14_224", 1280, 14))
DEIT = known("deit", ("deit_tiny_patch16_224", 192, 16), ("deit_small_patch16_224", 384, 16),
             ("deit_base_patch16_224", 768, 16))
SIGLIP = known("siglip", ("vit_base_patch16_siglip_224", 768, 16), ("vit_large_patch16_siglip_256", 1024, 16),
               ("vit_large_patch16_siglip_384", 1024, 16),
               ("vit_large_patch16_siglip_512", 1024, 16),  # GELUTanh, where timm's 256 and 384 are GELU
               ("vit_so400m_patch14_siglip_224", 1152, 14),
               # SigLIP2's fixed-resolution towers: these architectures (timm tags .v2_webli) and three of their own
               ("vit_base_patch32_siglip_256", 768, 32), ("vit_so400m_patch16_siglip_256", 1152, 16),
               ("vit_giantopt_patch16_siglip_256", 1536, 16))
FLEXIVIT = known("flexivit", ("flexivit_small", 384, 16), ("flexivit_base", 768, 16), ("flexivit_large", 1024, 16))
FAMILY = Family("timm", files=(FILES,), known=VIT + DEIT + SIGLIP + FLEXIVIT)


def train_kwargs(args: dict[str, Any]) -> dict[str, Any]:
    """timm train.py's recorded arguments that shape the model."""
    kwargs = dict(args.get("model_kwargs") or {})
    if args.get("img_size"):
        kwargs.setdefault("img_size", args["img_size"])
    elif args.get("input_size"):
        kwargs.setdefault("img_size", tuple(args["input_size"][-2:]))
    if args.get("in_chans"):
        kwargs.setdefault("in_chans", args["in_chans"])
    return kwargs


def fit_file(timm_sd: dict[str, torch.Tensor], user_kwargs: dict[str, Any]) -> dict[str, Any]:
    """img_size and num_classes read from a file's shapes (they are not the architecture), unless given."""
    try:
        facts = read_facts(timm_sd)
    except ModelLoadError:
        return {}
    out: dict[str, Any] = {}
    if "num_classes" not in user_kwargs and "head.weight" in timm_sd:
        out["num_classes"] = facts.num_classes
    elif "num_classes" not in user_kwargs and not any(k.startswith("head.") for k in timm_sd):
        out["num_classes"] = 0  # the tool needs the encoder; a missing classifier head is fine
    if "img_size" not in user_kwargs and facts.img_size:
        out["img_size"] = facts.img_size
    return out
