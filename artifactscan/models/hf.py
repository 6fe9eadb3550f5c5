"""Hugging Face ``transformers`` ViTs (a ``save_pretrained`` folder, or a hub id) as timm ``VisionTransformer``s.

One internal representation: a Dinov2, Dinov2WithRegisters, ViT, CLIP (vision tower of ``CLIPVisionModel`` or
``CLIPModel``) or SigLIP vision folder is read from its ``config.json`` and weight files and converted into the
equivalent timm ``VisionTransformer`` (q/k/v fused into ``qkv``, layer scales, the CLS position row folded like timm's
DINOv2 converter), so every command (probe, attention, fix, train-reg) works on it unchanged. ``transformers`` itself
is not needed to load (the ``artifactscan[hf]`` extra installs it to check the conversion against the HF model).
Both the transformers 4 key names (``attention.attention.query``, ``intermediate.dense``, hub files) and the 5 ones
(``attention.q_proj``, ``mlp.fc1``) are read. Preprocessing comes from the folder's ``preprocessor_config.json``.

Families that are not a plain timm ``VisionTransformer``, or whose weights need their own mapping, are converted by
their own module (``FAMILY_CONVERTERS``: DINOv3, AIMv2, BEiT, RADIO in ``models/layouts/``); SigLIP2's NaFlex
folders are refused by name.

The converted model is built by the registered architecture ``artifactscan_vit`` (plain JSON kwargs, including the
LayerNorm epsilon and activation of the HF config), so a checkpoint saved from it (``fix --out``) reloads.
"""

from __future__ import annotations

import json
import os
import re
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from artifactscan.core.errors import ModelLoadError, NotAViTError, OfflineError
from artifactscan.core.paths import display_name, what_it_is
from artifactscan.models.layouts import aimv2, beit, dinov3, radio
from artifactscan.models.layouts.hf_keys import KeySorter
from artifactscan.models.materialize import (
    assign_weights, build_on_meta, finish_meta_build, read_safetensors, read_safetensors_header, read_torch_weights,
    refuse_unless_stored_weights_fit,
)
from artifactscan.models.registry import register_architecture

ARCH = "artifactscan_vit"
SUPPORTED = {
    "dinov2": "Dinov2", "dinov2_with_registers": "Dinov2WithRegisters", "vit": "ViT", "clip": "CLIPModel",
    "clip_vision_model": "CLIPVisionModel", "siglip": "SiglipModel", "siglip_vision_model": "SiglipVisionModel",
    dinov3.HF_MODEL_TYPE: "DINOv3ViTModel", "aimv2_vision_model": "Aimv2VisionModel", "aimv2": "Aimv2Model",
    beit.HF_MODEL_TYPE: "BeitModel", radio.HF_MODEL_TYPE: "RadioModel",
}
#: NaFlex (variable resolution, padded patch sequences): refused by name until padding is kept out of statistics
NAFLEX_MODEL_TYPES = ("siglip2", "siglip2_vision_model")
# Families converted into a timm model other than the plain VisionTransformer, each by its own module:
# model_type -> (convert_hf, hf_kwargs, build, registered architecture).
FAMILY_CONVERTERS = {
    dinov3.HF_MODEL_TYPE: (dinov3.convert_hf, dinov3.hf_kwargs, dinov3.build_dinov3, dinov3.ARCH),
    beit.HF_MODEL_TYPE: (beit.convert_hf, beit.hf_kwargs, beit.build_beit, beit.ARCH),
    # RADIO is timm's plain VisionTransformer (as its vit_*_radio_* towers): built by build_vit, defined below
    radio.HF_MODEL_TYPE: (radio.convert_hf, radio.hf_kwargs, lambda **kwargs: build_vit(**kwargs), "artifactscan_vit"),
    **{t: (aimv2.convert_hf, aimv2.hf_kwargs, aimv2.build_aimv2, aimv2.ARCH) for t in aimv2.HF_MODEL_TYPES},
}
_ACT = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
        "silu": "silu", "relu": "relu"}
_RESAMPLE = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic"}  # PIL codes (1 = LANCZOS: nearest we have)
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


# The weights a save_pretrained folder (transformers, or timm's hub layout) must hold besides config.json; a sharded
# save writes its index. Any other *.safetensors next to a config.json does not make a Hugging Face folder.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# What train-reg and train-model write into a run folder (train_reg.json) and into each model's folder
# (analysis/training: loop.py, orchestration.py). Those folders hold a config.json too: a TrainConfig, not a
# Hugging Face config, so these are checked first.
TRAINING_RUN_FILES = ("train_reg.json", "metrics.jsonl", "result.json", "last.pt", "final.safetensors",
                      "worker-config.json")


def is_training_run(path: str | Path) -> bool:
    """A folder train-reg or train-model wrote (the run, or one model's folder in it), recognised by its own files."""
    path = Path(path)
    return path.is_dir() and (any((path / name).is_file() for name in TRAINING_RUN_FILES)
                              or (path / "checkpoints").is_dir() and (path / "config.json").is_file())


def has_weights(path: str | Path) -> bool:
    """Whether a folder holds the weights of a Hugging Face save_pretrained folder (:data:`WEIGHT_FILES`).

    Any entry of that name counts, not only a regular file: a FIFO or a broken link where the weights should be is a
    damaged Hugging Face folder, which the loader then names for what it is (never opened)."""
    return any(os.path.lexists(Path(path) / name) for name in WEIGHT_FILES)


def is_model_folder(path: str | Path) -> bool:
    """A Hugging Face model folder: ``config.json`` next to its weights, and not a training run's folder."""
    path = Path(path)
    return path.is_dir() and not is_training_run(path) and (path / "config.json").is_file() and has_weights(path)


def is_timm_folder(path: str | Path) -> bool:
    """A timm hub folder (``config.json`` naming a timm ``architecture``), loaded by timm's ``local-dir:``."""
    try:
        return "architecture" in json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False


def _read_config(folder: Path) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(vision config, whole config, model_type) of a folder."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{folder}/config.json is not readable JSON: {exc}") from exc
    model_type = config.get("model_type", "")
    if model_type == "dinov3_convnext":
        raise NotAViTError(f"{folder} is a Hugging Face DINOv3 ConvNeXt (dinov3_convnext): a convolutional network, "
                           "not a Vision Transformer, so it has no tokens to scan; use a DINOv3 ViT (dinov3_vit)")
    if model_type in NAFLEX_MODEL_TYPES:
        raise ModelLoadError(
            f"{folder} is a SigLIP2 NaFlex model ({model_type}): its images are variable-resolution patch sequences "
            "with padding, which artifactscan does not measure yet (the padded tokens would enter every statistic); "
            "the fixed-resolution SigLIP2 checkpoints (model_type siglip, e.g. google/siglip2-base-patch16-224) load")
    if model_type not in SUPPORTED:
        raise ModelLoadError(f"{folder} is a Hugging Face {model_type or 'unknown'} model; artifactscan converts "
                             f"{', '.join(sorted(set(SUPPORTED.values())))} (config model_type: "
                             f"{', '.join(sorted(SUPPORTED))})")
    vision = config.get("vision_config", config) if model_type in ("clip", "siglip") else config
    return vision, config, model_type


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The folder's weights; a shard that is damaged, empty or not a regular file is a :class:`ModelLoadError`
    naming it, as the same file given alone is."""
    shards = sorted(folder.glob("*.safetensors"))
    bins = [] if shards else sorted(folder.glob("pytorch_model*.bin"))
    if not shards and not bins:
        raise ModelLoadError(f"{folder} has config.json but no weights (model.safetensors or pytorch_model.bin)")
    out: dict[str, torch.Tensor] = {}
    for shard in shards or bins:
        why = what_it_is(shard)
        if why is not None:  # a named pipe would block the load forever
            raise ModelLoadError(f"{display_name(shard)} {why}; a Hugging Face folder's weights must be files")
    for shard in bins:
        out.update(read_torch_weights(shard))  # copied out of torch.load's memory map
    headers = [read_safetensors_header(shard) for shard in shards]  # every shard checked for truncation first
    refuse_unless_stored_weights_fit(headers, display_name(folder))  # before any is read
    for header in headers:
        out.update(read_safetensors(header))  # checked for rewrites while read
    return out


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


def convert_state_dict(hf: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """HF vision-encoder keys -> timm ``VisionTransformer`` keys; returns (state dict, dropped key counts)."""
    hf = dict(hf)
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


def data_config(folder: Path, size: int) -> dict[str, Any] | None:
    """timm-style preprocessing from ``preprocessor_config.json`` (``None`` when the folder has none)."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return None
    pp = json.loads(path.read_text())
    crop = pp.get("crop_size") if pp.get("do_center_crop", False) else None
    resize = pp.get("size") or {}
    def side(d: Any) -> int | None:
        if isinstance(d, int):
            return d
        if isinstance(d, dict):
            return d.get("height") or d.get("shortest_edge")
        return None
    out_side = side(crop) or side(resize) or size
    short = side(resize) or out_side
    return {"input_size": (3, int(out_side), int(out_side)), "mean": tuple(pp.get("image_mean", (0.5,) * 3)),
            "std": tuple(pp.get("image_std", (0.5,) * 3)),
            "interpolation": _RESAMPLE.get(int(pp.get("resample", 3)), "bicubic"),
            "crop_pct": float(out_side) / float(short) if crop else 1.0}


def load_folder(folder: Path) -> tuple[nn.Module, str, dict[str, Any], dict[str, Any] | None, list[str]]:
    """(timm model with the weights, its registered architecture (``artifactscan_vit``, or a family's own:
    ``artifactscan_dinov3`` ...) and kwargs, data config or None, notes)."""
    vision, _, model_type = _read_config(folder)
    if model_type in FAMILY_CONVERTERS:  # the family's own mapping (DINOv3 into timm's Eva, AIMv2 ...)
        convert, family_kwargs, family_build, arch = FAMILY_CONVERTERS[model_type]
        kwargs = family_kwargs(vision)
        raw = _read_weights(folder)
        sd, dropped = convert(raw, vision, str(folder))
        build = partial(family_build, **kwargs)
    else:
        sd, dropped = convert_state_dict(_read_weights(folder))
        if "patch_embed.proj.weight" not in sd:
            raise ModelLoadError(f"{folder}: the weights hold no vision encoder (no patch embedding)")
        arch, kwargs = ARCH, model_kwargs(vision, model_type, sd)
        build = partial(build_vit, **kwargs)
    model = build_on_meta(build)  # shapes only: the weights are assigned below, no random initialisation
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = [k for k in own if k in sd and own[k].shape != sd[k].shape]
    if missing or unexpected or wrong:
        raise ModelLoadError(f"{folder}: converted {SUPPORTED[model_type]} weights do not fit the equivalent timm "
                             f"ViT (missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]}); "
                             "does its config.json belong to these weights?")
    assign_weights(model, sd, torch.float32)
    model = finish_meta_build(model, build, sd, torch.float32)  # load_model applies --precision afterwards
    notes = [f"converted from the Hugging Face {SUPPORTED[model_type]} layout"]
    if dropped:
        notes.append("dropped, as not part of the image encoder: "
                     + ", ".join(f"{what} ({n} keys)" for what, n in sorted(dropped.items())))
    config = data_config(folder, kwargs["img_size"])
    if model_type == radio.HF_MODEL_TYPE:  # RADIO normalises inside its forward: that is the preprocessing
        config = radio_data_config(folder, config, radio.preprocessing(vision, raw), kwargs["img_size"])
        notes.append("RADIO's in-model input normalisation became the preprocessing; its "
                     f"{kwargs['reg_tokens'] + 1} summary and register tokens are prefix tokens (1 CLS + "
                     f"{kwargs['reg_tokens']} registers in timm's count)")
    return model, arch, kwargs, config, notes


def radio_data_config(folder: Path, config: dict[str, Any] | None, inner: dict[str, Any], size: int
                      ) -> dict[str, Any]:
    """The processor's preprocessing followed by RADIO's own normalisation, as one mean/std:
    ``((x - m1) / s1 - m2) / s2 == (x - (m1 + m2 * s1)) / (s1 * s2)``."""
    config = dict(config or {"input_size": (3, size, size), "interpolation": "bicubic", "crop_pct": 1.0})
    pp_path = folder / "preprocessor_config.json"
    pp = json.loads(pp_path.read_text()) if pp_path.is_file() else {}
    outer_mean, outer_std = (config["mean"], config["std"]) if pp.get("do_normalize") else ((0.0,) * 3, (1.0,) * 3)
    config["mean"] = tuple(m1 + m2 * s1 for m1, m2, s1 in zip(outer_mean, inner["mean"], outer_std))
    config["std"] = tuple(s1 * s2 for s1, s2 in zip(outer_std, inner["std"]))
    return config


def looks_like_hub_id(spec: str) -> bool:
    """``ORG/NAME`` (one slash, no file suffix, not starting like a path)."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", spec)) and not spec.endswith(
        (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".json"))


def hub_folder(repo_id: str, online: bool) -> Path:
    """The local folder of a Hugging Face model id: downloaded when online, else from the local cache only."""
    from huggingface_hub import list_repo_files, snapshot_download

    patterns = ["config.json", "preprocessor_config.json", "*.safetensors", "*.safetensors.index.json"]
    try:
        if not online:
            patterns += ["pytorch_model*.bin"]
        elif not any(f.endswith(".safetensors") for f in list_repo_files(repo_id)):
            patterns += ["pytorch_model*.bin"]  # older repos: PyTorch weights only (read with weights_only)
        return Path(snapshot_download(repo_id, local_files_only=not online, allow_patterns=patterns))
    except Exception as exc:
        taken = f"'{repo_id}' is not a file or folder here, so it was taken as a Hugging Face model id"
        if online:
            raise ModelLoadError(f"{taken}, and the hub could not give it: {str(exc).splitlines()[0]}") from exc
        raise OfflineError(
            f"{taken}; the hub is unreachable and it is not in the local Hugging Face cache. Pass a local file or "
            "save_pretrained folder instead (or `hf-hub:ORG/NAME` for timm's hub models)."
        ) from exc
