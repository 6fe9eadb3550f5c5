"""AIMv2 (Fini et al., 2025): Hugging Face ``Aimv2VisionModel`` folders as timm's ``aimv2_*`` ``VisionTransformer``.

timm's own ``aimv2_*`` files need nothing here (its ``state_dict()`` loads as it is; Apple's original ``trunk.*``
layout goes through timm's ``vision_transformer.checkpoint_filter_fn``). transformers has its own key names and no
converter to timm, so the mapping is here: the patch projection then the embedding RMSNorm (timm's
``patch_embed.norm``) and the learnt position embedding (no CLS, no registers: every token is a patch),
``rms_norm1/2`` -> ``norm1/2``, q/k/v fused into ``qkv``, ``out_proj`` -> ``proj``, the SwiGLU ``gate/up/down_proj``
-> ``fc1_g/fc1_x/fc2``, the final ``rms_norm`` -> ``norm``. The attention-pooling ``head`` touches no token and is
dropped by name; ``is_native`` configs (sin-cos position embedding, AIMv2-native) are refused: timm has no such
model. The converted model is the registered architecture ``artifactscan_aimv2`` (JSON kwargs), so a checkpoint
saved from it reloads. Live HF models are hooked by layouts/hf_vision.py.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Any

import torch
from torch import nn

from artifactscan.models.layouts.base import Family, FolderLayout, known
from artifactscan.models.layouts.hf_keys import KeySorter, timm_mlp_ratio
from artifactscan.core.errors import ModelLoadError
from artifactscan.models.registry import register_architecture

HF_MODEL_TYPES = ("aimv2_vision_model", "aimv2")
#: timm's AIMv2 towers, so their ``state_dict()`` files load without ``--arch`` (no CLS, RMSNorm, SwiGLU)
TIMM_SIZES = {"large": 1024, "huge": 1536, "1b": 2048, "3b": 3072}
ARCH = "artifactscan_aimv2"
#: Aimv2VisionConfig's defaults, which config.json may leave out
HF_DEFAULTS: dict[str, Any] = dict(
    hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=8, num_channels=3,
    image_size=224, patch_size=14, rms_norm_eps=1e-5, qkv_bias=False, mlp_bias=False, hidden_act="silu",
    is_native=False)
_LAYER = re.compile(r"^(?:vision_model\.)?encoder\.layers\.(\d+)\.(.+)$")
_TOP = {"embeddings.patch_embed.weight": "patch_embed.proj.weight", "embeddings.patch_embed.bias":
        "patch_embed.proj.bias", "embeddings.rms_norm.weight": "patch_embed.norm.weight",
        "embeddings.position_embedding.weight": "pos_embed", "rms_norm.weight": "norm.weight"}
_BLOCK = {"rms_norm1.": "norm1.", "rms_norm2.": "norm2.", "attention.out_proj.": "attn.proj.",
          "ffn.gate_proj.": "mlp.fc1_g.", "ffn.up_proj.": "mlp.fc1_x.", "ffn.down_proj.": "mlp.fc2."}
_NOT_ENCODER = re.compile(r"^(head\.|text_model\.|visual_projection|text_projection|logit_scale)")


def build_aimv2(norm_eps: float = 1e-5, **kwargs: Any) -> nn.Module:
    """timm's ``VisionTransformer`` set up as its ``aimv2_*`` models are, from JSON-able arguments."""
    from timm.layers import RmsNorm, SwiGLU
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(**kwargs, class_token=False, fc_norm=False, global_pool="avg", act_layer="silu",
                             norm_layer=partial(RmsNorm, eps=norm_eps), embed_norm_layer=partial(RmsNorm, eps=norm_eps),
                             mlp_layer=SwiGLU)


register_architecture(ARCH, build_aimv2)


def vision_config(config: dict[str, Any]) -> dict[str, Any]:
    """The vision part of an ``aimv2`` (CLIP-style) or ``aimv2_vision_model`` config, with the defaults filled in."""
    vision = config.get("vision_config", config) if config.get("model_type") == "aimv2" else config
    return {**HF_DEFAULTS, **{k: v for k, v in vision.items() if v is not None}}


def hf_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """``artifactscan_aimv2`` kwargs of an HF AIMv2 config (as config.json holds it)."""
    c = vision_config(config)
    if c["is_native"]:
        raise ModelLoadError("this AIMv2 config is the native-resolution variant (is_native: sin-cos position "
                             "embedding at any size), which timm has no model for; use a fixed-resolution AIMv2")
    if c["hidden_act"] != "silu":
        raise ModelLoadError(f"this AIMv2 config's MLP uses {c['hidden_act']!r}; timm's AIMv2 has SiLU there")
    width, hidden = int(c["hidden_size"]), int(c["intermediate_size"])
    ratio = timm_mlp_ratio(width, hidden)
    size = c["image_size"]
    return dict(img_size=int(size if isinstance(size, int) else size[0]), patch_size=int(c["patch_size"]),
                in_chans=int(c["num_channels"]), num_classes=0, embed_dim=width, depth=int(c["num_hidden_layers"]),
                num_heads=int(c["num_attention_heads"]), mlp_ratio=ratio, qkv_bias=bool(c["qkv_bias"]),
                proj_bias=bool(c["qkv_bias"] or c["mlp_bias"]), norm_eps=float(c["rms_norm_eps"]))


def convert_hf(hf: dict[str, torch.Tensor], config: dict[str, Any], name: str
               ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """HF ``Aimv2VisionModel`` (or ``Aimv2Model``'s vision tower) weights -> timm keys; (state dict, dropped)."""
    c = vision_config(config)
    hf = {k[len("vision_model."):] if k.startswith("vision_model.") else k: v for k, v in hf.items()}
    keys = KeySorter()
    for key, value in hf.items():
        if key in _TOP:
            keys.out[_TOP[key]] = value[None] if key.endswith("position_embedding.weight") else value
        elif m := _LAYER.match(key):
            if not keys.layer_key(int(m.group(1)), m.group(2), value, _BLOCK):
                keys.unknown.append(key)
        elif _NOT_ENCODER.match(key):
            keys.drop(key)
        else:
            keys.unknown.append(key)
    depth, width = int(c["num_hidden_layers"]), int(c["hidden_size"])
    out, dropped = keys.finish("AIMv2", name, blocks=range(depth)), keys.dropped
    for i in range(depth):
        if c["qkv_bias"] != c["mlp_bias"]:  # timm has one switch for both: the biases a config left out are zeros
            hidden = int(c["intermediate_size"])
            wanted = [("mlp.fc1_g.bias", hidden), ("mlp.fc1_x.bias", hidden), ("mlp.fc2.bias", width)] \
                if not c["mlp_bias"] else [("attn.proj.bias", width)]
            for key, size in wanted:
                out.setdefault(f"blocks.{i}.{key}", torch.zeros(size))
    return out, dropped


HF_FOLDERS = FolderLayout({"aimv2_vision_model": "Aimv2VisionModel", "aimv2": "Aimv2Model"}, ARCH, build_aimv2,
                          convert_hf, config_kwargs=hf_kwargs, prefix_tokens="none (every token is a patch)")
FAMILY = Family("aimv2", folders=(HF_FOLDERS,), known=known(
    "aimv2", *((f"aimv2_{size}_patch14_{res}", width, 14) for size, width in TIMM_SIZES.items() for res in (224, 336))))
