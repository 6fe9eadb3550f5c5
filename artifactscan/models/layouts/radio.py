"""C-RADIO v3 / v4 (NVIDIA, 2025) as timm's fixed-grid ``VisionTransformer``.

* **timm's own** ``vit_*_patch16_radio_v3/v4`` ``state_dict()`` files load as they are; their configurations are
  added here to the table a bare state dict is matched against, so they load without ``--arch``. RADIO has 1 CLS and
  7 (v3) or 9 (v4) registers before the patches: 8 or 10 prefix tokens, which the capture layer counts from the model
  (``num_prefix_tokens``, ``num_reg_tokens``) and keeps out of every patch statistic.
* **transformers 5 ``RadioModel`` folders** (``model_type: radio``). No converter exists, so the mapping is here:
  the patch projection (a ``Linear`` over channel-major patches, no bias) is timm's patch convolution reshaped; the
  ``cls_register_token`` rows are timm's CLS then its registers, in order (RADIO's ``num_cls_tokens`` summary tokens
  and ``num_registers`` registers: timm has one CLS slot, so the summary tokens after the first are counted as
  registers; every one of them stays a prefix token, out of the patch statistics); the position embedding, kept
  for RADIO's largest grid, is resampled to the model's grid exactly as RADIO does it at that input size (bilinear,
  ``align_corners=False``); q/k/v are fused, ``layer_scaleN.lambda1`` are ``lsN.gamma``, no final norm. RADIO
  normalises its input inside the model (``input_conditioner``): that mean/std become the preprocessing.
  timm's ``naflexvit_*_radio_*`` (RADIO's own behaviour at any resolution, patches padded) load through
  ``models/layouts/naflex.py``, padded tokens out of every statistic.
* **live transformers 5 ``RadioModel``s** are hooked by their in-memory names (``encoder.layer.N.attention`` ...;
  RADIO has no final norm: ``final_norm`` is the encoder's output). Their prefix tokens are counted as above. RADIO
  normalises inside its forward: a live model takes pixels in [0, 1].
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from artifactscan.models.hooks import register_hook_family
from artifactscan.models.layouts.base import Family, FolderLayout, known
from artifactscan.models.layouts.hf_keys import KeySorter
from artifactscan.models.layouts.hf_vision import HFVisionFamily, Trunk
from artifactscan.models.layouts.hf_vit import ARCH as VIT_ARCH, build_vit
from artifactscan.core.errors import ModelLoadError

#: (size, width) of timm's fixed-grid RADIO towers, per version
TIMM_SIZES = {"v3": {"base": 768, "large": 1024, "huge": 1280, "giant": 1536}, "v4": {"so400m": 1152, "huge": 1280}}

HF_MODEL_TYPE = "radio"
#: RadioConfig's defaults, which config.json may leave out
HF_DEFAULTS: dict[str, Any] = dict(
    hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, mlp_ratio=4.0, hidden_act="gelu",
    layer_norm_eps=1e-6, image_size=224, patch_size=16, num_channels=3, qkv_bias=True, num_cls_tokens=3,
    num_registers=7, max_img_size=2048, use_swiglu_ffn=False, norm_mean=(0.48145466, 0.4578275, 0.40821073),
    norm_std=(0.26862954, 0.26130258, 0.27577711))
# On disk (save_pretrained, the hub) transformers writes NVIDIA's own names (`radio_model.model.blocks.N.attn.qkv`,
# `patch_generator.*`); in memory they are `encoder.layer.N.attention.q_proj` ...: both are read.
_ON_DISK = {"model.patch_generator.embedder.weight": "embeddings.patch_projection.weight",
            "model.patch_generator.pos_embed": "embeddings.position_embedding",
            "model.patch_generator.cls_token.token": "embeddings.cls_register_token",
            "model.patch_generator.video_embedder.weight": "embeddings.video_patch_projection.weight"}
_LAYER = re.compile(r"^(?:model\.blocks|encoder\.layers?)\.(\d+)\.(.+)$")
_BLOCK = {"norm1.": "norm1.", "norm2.": "norm2.", "attention.o_proj.": "attn.proj.", "attn.proj.": "attn.proj.",
          "attn.qkv.": "attn.qkv.", "mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2.",
          "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma"}
# What only RADIO's own forward reads (its input normalisation and which summary tokens it returns), or video.
_NOT_ENCODER = re.compile(r"^(summary_idxs$|input_conditioner\.|embeddings\.video_patch_projection\.)")


def _config(config: dict[str, Any]) -> dict[str, Any]:
    return {**HF_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}


def hf_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """``artifactscan_vit`` kwargs of an HF ``RadioConfig`` (timm's VisionTransformer as its RADIO towers are)."""
    c = _config(config)
    if c["use_swiglu_ffn"] or c["hidden_act"] != "gelu":
        raise ModelLoadError("this RADIO config has a SwiGLU or non-GELU MLP, which timm's RADIO towers do not")
    size = c["image_size"]
    return dict(img_size=int(size if isinstance(size, int) else size[0]), patch_size=int(c["patch_size"]),
                in_chans=int(c["num_channels"]), num_classes=0, global_pool="token", fc_norm=False,
                embed_dim=int(c["hidden_size"]), depth=int(c["num_hidden_layers"]),
                num_heads=int(c["num_attention_heads"]), mlp_ratio=float(c["mlp_ratio"]), qkv_bias=bool(c["qkv_bias"]),
                init_values=1.0, class_token=True, reg_tokens=int(c["num_cls_tokens"]) + int(c["num_registers"]) - 1,
                no_embed_class=True, pre_norm=False, final_norm=False, norm_eps=float(c["layer_norm_eps"]),
                act="gelu", mlp="mlp")


def _position_embedding(pos: torch.Tensor, c: dict[str, Any]) -> torch.Tensor:
    """RADIO's position embedding for the model's grid, as its forward computes it for a square input."""
    side = int(c["max_img_size"]) // int(c["patch_size"])
    size = c["image_size"]
    grid = int(size if isinstance(size, int) else size[0]) // int(c["patch_size"])
    if pos.shape[1] != side * side:
        raise ModelLoadError(f"the RADIO position embedding has {pos.shape[1]} rows; max_img_size "
                             f"{c['max_img_size']} / patch {c['patch_size']} needs {side * side}")
    grid_pos = pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid_pos = F.interpolate(grid_pos.float(), size=(grid, grid), mode="bilinear", align_corners=False)
    return grid_pos.flatten(2).permute(0, 2, 1).to(pos.dtype)


def convert_hf(hf: dict[str, torch.Tensor], config: dict[str, Any], name: str
               ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """HF ``RadioModel`` weights -> timm ``VisionTransformer`` keys; (state dict, dropped key counts)."""
    c = _config(config)
    width, patch, chans = int(c["hidden_size"]), int(c["patch_size"]), int(c["num_channels"])
    keys = KeySorter()
    out = keys.out
    for key, value in hf.items():
        bare = key[len("radio_model."):] if key.startswith("radio_model.") else key
        bare = _ON_DISK.get(bare, bare)
        if bare == "embeddings.patch_projection.weight":
            out["patch_embed.proj.weight"] = value.reshape(width, chans, patch, patch)
        elif bare == "embeddings.position_embedding":
            out["pos_embed"] = _position_embedding(value, c)
        elif bare == "embeddings.cls_register_token":
            out["cls_token"], out["reg_token"] = value[None, :1], value[None, 1:]
        elif m := _LAYER.match(bare):
            if not keys.layer_key(int(m.group(1)), m.group(2), value, _BLOCK):
                keys.unknown.append(key)
        elif _NOT_ENCODER.match(bare):
            keys.drop(bare)
        else:
            keys.unknown.append(key)
    out, dropped = keys.finish("RADIO", name), keys.dropped
    out["patch_embed.proj.bias"] = torch.zeros(width)  # RADIO's projection has none: zeros are exact
    return out, dropped


def preprocessing(config: dict[str, Any], hf: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """The mean/std RADIO applies inside its forward (the weights' buffers first, else the config's)."""
    c = _config(config)
    weights = {k[len("radio_model."):] if k.startswith("radio_model.") else k: v for k, v in (hf or {}).items()}
    mean, std = weights.get("input_conditioner.norm_mean"), weights.get("input_conditioner.norm_std")
    return {"mean": tuple(float(v) for v in (mean.flatten() if mean is not None else c["norm_mean"])),
            "std": tuple(float(v) for v in (std.flatten() if std is not None else c["norm_std"]))}


#: where a live ``RadioModel`` keeps its parts (no final norm: the encoder's output is the final tokens)
LIVE_TRUNK = Trunk("", "encoder.layer", "attention", "mlp.fc2", "embeddings.patch_projection", "encoder", False)


class HFRadioFamily(HFVisionFamily):
    """transformers 5's ``RadioModel``, by its in-memory names."""

    name = "hf-radio"

    def trunk(self, model: nn.Module) -> tuple[str, Trunk] | None:
        if type(model).__name__ == "RadioModel" and type(model).__module__.startswith("transformers."):
            return "", LIVE_TRUNK
        return None

    def prefix_tokens(self, model: nn.Module) -> tuple[int, int]:
        # timm's count: the first summary token is the CLS, the others and the registers are registers
        c = _config(model.config.to_dict())
        return 1, int(c["num_cls_tokens"]) + int(c["num_registers"]) - 1


register_hook_family(HFRadioFamily(), before="hf-vision")
def data_config(folder: Path, config: dict[str, Any] | None, vision: dict[str, Any], hf: dict[str, torch.Tensor],
                kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """RADIO normalises inside its forward: the processor's preprocessing followed by that normalisation, as one
    mean/std: ``((x - m1) / s1 - m2) / s2 == (x - (m1 + m2 * s1)) / (s1 * s2)``."""
    inner, size = preprocessing(vision, hf), kwargs["img_size"]
    config = dict(config or {"input_size": (3, size, size), "interpolation": "bicubic", "crop_pct": 1.0})
    pp_path = folder / "preprocessor_config.json"
    pp = json.loads(pp_path.read_text()) if pp_path.is_file() else {}
    outer_mean, outer_std = (config["mean"], config["std"]) if pp.get("do_normalize") else ((0.0,) * 3, (1.0,) * 3)
    config["mean"] = tuple(m1 + m2 * s1 for m1, m2, s1 in zip(outer_mean, inner["mean"], outer_std))
    config["std"] = tuple(s1 * s2 for s1, s2 in zip(outer_std, inner["std"]))
    note = ("RADIO's in-model input normalisation became the preprocessing; its "
            f"{kwargs['reg_tokens'] + 1} summary and register tokens are prefix tokens (1 CLS + "
            f"{kwargs['reg_tokens']} registers in timm's count)")
    return config, [note]


# RADIO is timm's plain VisionTransformer (as its vit_*_radio_* towers are): built by hf_vit's build_vit
HF_FOLDERS = FolderLayout({HF_MODEL_TYPE: "RadioModel"}, VIT_ARCH, build_vit, convert_hf, config_kwargs=hf_kwargs,
                          preprocessing=data_config, prefix_tokens="1 CLS + the other summary tokens and registers")
FAMILY = Family("radio", folders=(HF_FOLDERS,), known=known(
    "radio", *((f"vit_{size}_patch16_radio_{version}", width, 16)
               for version, sizes in TIMM_SIZES.items() for size, width in sizes.items())))
