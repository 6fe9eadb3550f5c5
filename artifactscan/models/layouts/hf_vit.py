"""Hugging Face ``transformers`` Dinov2, Dinov2WithRegisters, ViT, CLIP (the vision tower of ``CLIPVisionModel`` or
``CLIPModel``) and SigLIP vision folders as the equivalent timm ``VisionTransformer``.

transformers has no converter to timm for these, so the mapping is here: q/k/v fused into ``qkv``, layer scales,
the CLS position row folded like timm's DINOv2 converter (registers outside the grid), CLIP's ``class_embedding``
and ``nn.Embedding`` position table reshaped. Both the transformers 4 key names (``attention.attention.query``,
``intermediate.dense``, hub files) and the 5 ones (``attention.q_proj``, ``mlp.fc1``) are read. Sizes come from the
weights, the rest (heads, LayerNorm epsilon, activation) from the config, with transformers' defaults for what
``save_pretrained`` leaves out. The converted model is the registered architecture ``artifactscan_vit`` (plain JSON
kwargs), so a checkpoint saved from it (``fix --out``) reloads. Live HF models are hooked by ``hf_vision.py``.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Any

import torch
from torch import nn

from artifactscan.core.errors import ModelLoadError
from artifactscan.models.layouts.base import Family, FolderLayout
from artifactscan.models.layouts.hf_keys import KeySorter
from artifactscan.models.registry import register_architecture

ARCH = "artifactscan_vit"

_ACT = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
        "silu": "silu", "relu": "relu"}
# transformers' config defaults, which `save_pretrained` leaves out of config.json when unchanged
_DEFAULTS = {
    "dinov2": dict(layer_norm_eps=1e-6, hidden_act="gelu"), "vit": dict(layer_norm_eps=1e-12, hidden_act="gelu"),
    "clip": dict(layer_norm_eps=1e-5, hidden_act="quick_gelu"),
    "siglip": dict(layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh"),
}


def build_vit(norm_eps: float = 1e-6, act: str = "gelu", mlp: str = "mlp", **kwargs: Any) -> nn.Module:
    """A timm ``VisionTransformer`` from JSON-able arguments (``norm_eps``, ``act``, ``mlp``: ``mlp`` / ``swiglu``)."""
    from timm.layers import SwiGLUPacked, get_act_layer
    from timm.models.vision_transformer import VisionTransformer

    extra: dict[str, Any] = {"norm_layer": partial(nn.LayerNorm, eps=norm_eps)}
    if mlp == "swiglu":
        extra.update(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
    else:
        extra["act_layer"] = get_act_layer(act)
    return VisionTransformer(**kwargs, **extra)


register_architecture(ARCH, build_vit)


_LAYER = re.compile(r"^(?:encoder\.layers?|layers)\.(\d+)\.(.+)$")
_BLOCK_KEYS = [  # (HF suffix pattern, timm suffix), transformers 4 and 5 names; first match wins
    (r"attention\.attention\.query\.|attention\.q_proj\.|self_attn\.q_proj\.", "attn.q."),
    (r"attention\.attention\.key\.|attention\.k_proj\.|self_attn\.k_proj\.", "attn.k."),
    (r"attention\.attention\.value\.|attention\.v_proj\.|self_attn\.v_proj\.", "attn.v."),
    (r"attention\.output\.dense\.|attention\.o_proj\.|self_attn\.out_proj\.", "attn.proj."),
    (r"norm1\.|layernorm_before\.|layer_norm1\.", "norm1."),
    (r"norm2\.|layernorm_after\.|layer_norm2\.", "norm2."),
    (r"intermediate\.dense\.|mlp\.fc1\.|mlp\.weights_in\.", "mlp.fc1."),
    (r"output\.dense\.|mlp\.fc2\.|mlp\.weights_out\.", "mlp.fc2."),
    (r"layer_scale1\.lambda1$", "ls1.gamma"),
    (r"layer_scale2\.lambda1$", "ls2.gamma"),
]
_TOP_KEYS = {
    "embeddings.cls_token": "cls_token", "embeddings.class_embedding": "cls_token",
    "embeddings.position_embeddings": "pos_embed", "embeddings.position_embedding.weight": "pos_embed",
    "embeddings.register_tokens": "reg_token",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
    "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
    "pre_layrnorm.weight": "norm_pre.weight", "pre_layrnorm.bias": "norm_pre.bias",
    "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
    "post_layernorm.weight": "norm.weight", "post_layernorm.bias": "norm.bias",
}
_PREFIXES = ("vision_model.", "dinov2.", "vit.", "model.")
_NOT_ENCODER = re.compile(r"^(text_model\.|visual_projection|text_projection|logit_scale|logit_bias|classifier\.|"
                          r"pooler\.|head\.|embeddings\.mask_token$)")


def convert_state_dict(hf: dict[str, torch.Tensor], consume: bool = False
                       ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """HF vision-encoder keys -> timm ``VisionTransformer`` keys; returns (state dict, dropped key counts).

    ``consume``: ``hf`` is emptied, so that the converted dict holds the only reference to each tensor and each
    block's q/k/v are freed as soon as they are fused (no second copy of the attention weights at the peak)."""
    given, hf = hf, dict(hf)
    for prefix in _PREFIXES:  # task models wrap the encoder (Dinov2ForImageClassification: `dinov2.`)
        if any(k.startswith(prefix) for k in hf) and not any(k.startswith("embeddings.") for k in hf):
            hf = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in hf.items()}
    keys = KeySorter()
    out, dropped, unknown = keys.out, keys.dropped, keys.unknown
    for k, v in hf.items():
        if k in _TOP_KEYS:
            out[_TOP_KEYS[k]] = v
        elif m := _LAYER.match(k):
            i, rest = m.groups()
            for pattern, target in _BLOCK_KEYS:
                if mm := re.match(pattern, rest):
                    out[f"blocks.{i}.{target}{rest[mm.end():]}"] = v
                    break
            else:
                unknown.append(k)
        elif _NOT_ENCODER.match(k):
            keys.drop(k)
        else:
            unknown.append(k)
    hf.clear()
    if consume:
        given.clear()
    keys.finish("Hugging Face")
    if "cls_token" in out and out["cls_token"].dim() == 1:  # CLIP's class_embedding
        out["cls_token"] = out["cls_token"][None, None]
    if out.get("pos_embed") is not None and out["pos_embed"].dim() == 2:  # CLIP / SigLIP nn.Embedding
        out["pos_embed"] = out["pos_embed"][None]
    if "reg_token" in out:  # as timm's DINOv2 converter: registers and CLS outside the position grid
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
        out["pos_embed"] = out["pos_embed"][:, 1:]
    for i in sorted({int(k.split(".")[1]) for k in out if k.startswith("blocks.")}):
        for part in ("weight", "bias"):
            qkv = [out.pop(f"blocks.{i}.attn.{n}.{part}", None) for n in "qkv"]
            if all(t is not None for t in qkv):
                out[f"blocks.{i}.attn.qkv.{part}"] = torch.cat(qkv, 0)  # type: ignore[arg-type]
    return out, dropped


def model_kwargs(vision: dict[str, Any], model_type: str, sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``artifactscan_vit`` kwargs of the equivalent timm model (sizes from the weights, the rest from the config)."""
    width = sd["patch_embed.proj.weight"].shape[0]
    patch = sd["patch_embed.proj.weight"].shape[-1]
    size = vision.get("image_size", 224)
    defaults = {**dict(num_attention_heads=12), **_DEFAULTS[model_type.split("_")[0]]}
    vision = {**defaults, **vision}
    swiglu = bool(vision.get("use_swiglu_ffn", False))
    act = "silu" if swiglu else vision["hidden_act"]
    if act not in _ACT:
        raise ModelLoadError(f"activation {act!r} of this Hugging Face model has no timm equivalent here")
    has_cls = "cls_token" in sd
    return dict(
        img_size=int(size), patch_size=int(patch), in_chans=int(sd["patch_embed.proj.weight"].shape[1]),
        num_classes=0, global_pool="token" if has_cls else "avg", fc_norm=False, embed_dim=int(width),
        depth=1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.")),
        num_heads=int(vision["num_attention_heads"]),
        mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / width, qkv_bias="blocks.0.attn.qkv.bias" in sd,
        init_values=1.0 if "blocks.0.ls1.gamma" in sd else None, class_token=has_cls,
        reg_tokens=int(sd["reg_token"].shape[1]) if "reg_token" in sd else 0,
        no_embed_class="reg_token" in sd, pre_norm="norm_pre.weight" in sd,
        norm_eps=float(vision["layer_norm_eps"]),
        act=_ACT[act], mlp="swiglu" if swiglu else "mlp")


def vision_config(config: dict[str, Any], model_type: str) -> dict[str, Any]:
    """A CLIP or SigLIP model's config nests its vision tower's; the vision-only ones are it."""
    return config.get("vision_config", config) if model_type in ("clip", "siglip") else config


def convert(hf: dict[str, torch.Tensor], vision: dict[str, Any], name: str
            ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    sd, dropped = convert_state_dict(hf, consume=True)  # a folder's weights, handed over by hf.load_folder
    if "patch_embed.proj.weight" not in sd:
        raise ModelLoadError(f"{name}: the weights hold no vision encoder (no patch embedding)")
    return sd, dropped


HF_FOLDERS = FolderLayout(
    {"dinov2": "Dinov2", "dinov2_with_registers": "Dinov2WithRegisters", "vit": "ViT", "clip": "CLIPModel",
     "clip_vision_model": "CLIPVisionModel", "siglip": "SiglipModel", "siglip_vision_model": "SiglipVisionModel"},
    ARCH, build_vit, convert, weight_kwargs=model_kwargs, vision_config=vision_config,
    prefix_tokens="1 CLS (none for SigLIP) + the DINOv2 folders' register_tokens")
FAMILY = Family("hf_vit", folders=(HF_FOLDERS,))
