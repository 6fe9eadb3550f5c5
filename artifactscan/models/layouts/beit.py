"""BEiT / BEiT v2 (Bao et al., 2022; Peng et al., 2022): Hugging Face ``BeitModel`` folders as timm's ``Beit``.

timm's own ``beit*`` ``state_dict()`` files need nothing here (they load as they are). transformers has no converter
to timm, so the mapping is here, for both key spellings: on disk (``save_pretrained``, the hub) transformers writes
``encoder.layer.N.attention.attention.query`` / ``.output.dense`` / ``intermediate.dense``; in memory (transformers
5) the same weights are ``layers.N.attention.q_proj`` / ``o_proj`` / ``mlp.fc1``. q/k/v are fused into ``qkv`` with
separate q/v biases (BEiT has no key bias, as timm's ``Beit``), ``lambda_1/2`` are ``gamma_1/2``, the per-layer or
shared relative position tables keep their shape, the absolute position embedding (when the config has one) is
``pos_embed``. Mean pooling (``use_mean_pooling``: the pooler's LayerNorm) is timm's ``fc_norm``; without it the
final ``layernorm`` is timm's ``norm``. The classifier is dropped by name. The converted model is the registered
architecture ``artifactscan_beit`` (JSON kwargs, the config's LayerNorm epsilon kept).
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

HF_MODEL_TYPE = "beit"
ARCH = "artifactscan_beit"
#: BeitConfig's defaults, which config.json may leave out
HF_DEFAULTS: dict[str, Any] = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, hidden_act="gelu",
    layer_norm_eps=1e-12, image_size=224, patch_size=16, num_channels=3, use_mask_token=False,
    use_absolute_position_embeddings=False, use_relative_position_bias=False, use_shared_relative_position_bias=False,
    layer_scale_init_value=0.1, use_mean_pooling=True)
_PREFIX = "beit."
_LAYER = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)$")
_TOP = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "encoder.relative_position_bias.relative_position_bias_table": "rel_pos_bias.relative_position_bias_table",
        "shared_position_bias.relative_position_bias_table": "rel_pos_bias.relative_position_bias_table",
        "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
        "pooler.layernorm.weight": "fc_norm.weight", "pooler.layernorm.bias": "fc_norm.bias"}
_BLOCK = [  # (HF suffix, timm suffix), on-disk and in-memory spellings
    (r"attention\.attention\.query\.bias$|attention\.q_proj\.bias$", "attn.q_bias"),
    (r"attention\.attention\.value\.bias$|attention\.v_proj\.bias$", "attn.v_bias"),
    (r"attention\.attention\.relative_position_bias\.|relative_position_bias\.", "attn."),
    (r"attention\.output\.dense\.|attention\.o_proj\.", "attn.proj."),
    (r"layernorm_before\.", "norm1."), (r"layernorm_after\.", "norm2."),
    (r"intermediate\.dense\.|mlp\.fc1\.", "mlp.fc1."), (r"output\.dense\.|mlp\.fc2\.", "mlp.fc2."),
    (r"lambda_1$", "gamma_1"), (r"lambda_2$", "gamma_2"),
]
_QKV = re.compile(r"^(?:attention\.attention\.(query|key|value)|attention\.([qkv])_proj)\.weight$")
_NOT_ENCODER = re.compile(r"^(classifier\.|lm_head\.|embeddings\.mask_token$|layernorm_final)")


def build_beit(norm_eps: float = 1e-12, **kwargs: Any) -> nn.Module:
    """timm's ``Beit`` from JSON-able arguments (the LayerNorm epsilon of the HF config)."""
    from timm.layers import LayerNorm
    from timm.models.beit import Beit

    return Beit(**kwargs, norm_layer=partial(LayerNorm, eps=norm_eps))


register_architecture(ARCH, build_beit)


def _config(config: dict[str, Any]) -> dict[str, Any]:
    return {**HF_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}


def hf_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """``artifactscan_beit`` kwargs of an HF ``BeitConfig`` (as config.json holds it)."""
    c = _config(config)
    if c["hidden_act"] != "gelu":
        raise ModelLoadError(f"this BEiT config's MLP uses {c['hidden_act']!r}; timm's BEiT has GELU there")
    width, hidden = int(c["hidden_size"]), int(c["intermediate_size"])
    ratio = timm_mlp_ratio(width, hidden)
    size = c["image_size"]
    scale = c["layer_scale_init_value"]
    return dict(img_size=int(size if isinstance(size, int) else size[0]), patch_size=int(c["patch_size"]),
                in_chans=int(c["num_channels"]), num_classes=0, embed_dim=width, depth=int(c["num_hidden_layers"]),
                num_heads=int(c["num_attention_heads"]), mlp_ratio=ratio,
                init_values=float(scale) if scale and scale > 0 else None,
                use_abs_pos_emb=bool(c["use_absolute_position_embeddings"]),
                use_rel_pos_bias=bool(c["use_relative_position_bias"]),
                use_shared_rel_pos_bias=bool(c["use_shared_relative_position_bias"]),
                global_pool="avg" if c["use_mean_pooling"] else "token",
                use_fc_norm=bool(c["use_mean_pooling"]), norm_eps=float(c["layer_norm_eps"]))


def convert_hf(hf: dict[str, torch.Tensor], config: dict[str, Any], name: str
               ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """HF ``BeitModel`` (or a task model's ``beit.``) weights -> timm ``Beit`` keys; (state dict, dropped)."""
    hf = {k[len(_PREFIX):] if k.startswith(_PREFIX) else k: v for k, v in hf.items()}
    keys = KeySorter()
    out, dropped, unknown = keys.out, keys.dropped, keys.unknown
    for key, value in hf.items():
        if key in _TOP:
            out[_TOP[key]] = value
        elif m := _LAYER.match(key):
            i, rest = int(m.group(1)), m.group(2)
            if mm := _QKV.match(rest):
                keys.qkv[(i, (mm.group(1) or mm.group(2))[0], "weight")] = value
            elif rest in ("attention.attention.key.bias", "attention.k_proj.bias"):
                if value.any():
                    raise ModelLoadError(f"{name}: block {i}'s key bias is non-zero, and BEiT (as timm's Beit) has "
                                         "none; loading would change the model")
            else:
                for pattern, target in _BLOCK:
                    if mm := re.match(pattern, rest):
                        out[f"blocks.{i}.{target}{rest[mm.end():]}"] = value
                        break
                else:
                    unknown.append(key)
        elif _NOT_ENCODER.match(key):
            keys.drop(key)
        else:
            unknown.append(key)
    keys.finish("BEiT", name)
    return out, dropped


HF_FOLDERS = FolderLayout({HF_MODEL_TYPE: "BeitModel"}, ARCH, build_beit, convert_hf, config_kwargs=hf_kwargs,
                          prefix_tokens="1 CLS")
#: timm's BEiT v1/v2 and BEiT3 (their own files load as they are)
FAMILY = Family("beit", folders=(HF_FOLDERS,), known=known(
    "beit",
    ("beit_base_patch16_224", 768, 16), ("beit_base_patch16_384", 768, 16), ("beit_large_patch16_224", 1024, 16),
    ("beit_large_patch16_384", 1024, 16), ("beit_large_patch16_512", 1024, 16), ("beitv2_base_patch16_224", 768, 16),
    ("beitv2_large_patch16_224", 1024, 16)) + known(
    "beit3", ("beit3_base_patch16_224", 768, 16), ("beit3_large_patch16_224", 1024, 16),
    ("beit3_giant_patch14_224", 1408, 14)))
