"""DINOv3 (Siméoni et al., 2025) in the two layouts no timm loader reads directly, as timm's ``Eva``.

* **Meta's original files**, ``dinov3_vit*16_pretrain_<tag>-<hash>.pth`` (the dinov3 repository's
  ``DinoVisionTransformer``): ``storage_tokens`` (the 4 registers), ``ls1.gamma``, ``rope_embed.periods``, a 2-d
  ``mask_token``, ``attn.qkv.bias`` with its ``bias_mask`` (the key bias masked to zero) and, for S+/H+/7B, SwiGLU
  ``mlp.w1/w2/w3``. Converted by timm's own ``timm.models.eva.checkpoint_filter_fn``. That converter keeps or drops
  the q/v biases depending on whether the target model has ``q_bias`` (and prints an exception per block when it
  drops them): this module chooses the ``_qkvb`` variant when the file's q/v biases are non-zero, refuses to drop
  non-zero biases, and keeps timm's prints out of our stdout (``--json``). The files carry no preprocessing: the
  tag in the name says which (``sat493m``: the satellite models' own mean/std).
* **Hugging Face ``DINOv3ViTModel`` folders** (``model_type: dinov3_vit``). No converter exists between HF and timm,
  so the mapping is here: ``register_tokens``, q/k/v fused into timm's ``qkv`` with separate q/v biases, ``o_proj``,
  ``layer_scaleN.lambda1``, plain (``up/down_proj``) and gated (``gate/up/down_proj``) MLPs, and the RoPE settings
  (``rope_theta``). transformers 5 renames ``layer.N`` to ``model.layer.N`` when it loads; ``save_pretrained`` and the
  hub write ``layer.N``; both are read. The converted model is the registered architecture ``artifactscan_dinov3``
  (JSON kwargs), so a checkpoint saved from it reloads.

DINOv3 ConvNeXt files (either layout) are refused as what they are. timm's own DINOv3 ``state_dict()`` files need
none of this (matched by the shapes of ``FAMILY.known`` as they are); live HF models are hooked by layouts/hf_vision.py.
"""

from __future__ import annotations

import contextlib
import io
import re
from functools import partial
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from artifactscan.models.layouts.base import Family, FileLayout, FolderLayout, known
from artifactscan.models.layouts.hf_keys import KeySorter, timm_mlp_ratio
from artifactscan.core.errors import CheckpointMismatchError, ModelLoadError, NotAViTError
from artifactscan.models.registry import register_architecture

# ----------------------------------------------------------------------------------------------- Meta's files
#: The dinov3 repository's README gives these transforms ("For models using the SAT-493M weights ..."); timm's
#: ``*_dinov3.sat493m`` pretrained configurations hold the same numbers.
IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
PREPROCESSING = {"lvd1689m": IMAGENET, "sat493m": {"mean": (0.430, 0.411, 0.296), "std": (0.213, 0.156, 0.143)}}
_TAG = re.compile(r"_pretrain_([a-z0-9]+?)(?:[-_][0-9a-f]{8})?\.[a-z]+$")
# Keys only Meta's layout has (timm's Eva calls the registers reg_token and recomputes rope.periods).
_MARKS = ("storage_tokens", "rope_embed.periods")
_BLOCK_PIECES = ("norm1.weight", "attn.qkv.weight", "attn.proj.weight", "ls1.gamma", "norm2.weight", "ls2.gamma")
_TOP_PIECES = ("cls_token", "storage_tokens", "patch_embed.proj.weight", "norm.weight")


def is_meta_vit(sd: dict[str, Any]) -> bool:
    """A DINOv3 ViT in Meta's layout, by the keys only that layout has (any one is enough, so that a file missing
    one of them is still recognised and told what it lacks)."""
    return any(k in sd for k in _MARKS) or any(k.endswith(".attn.qkv.bias_mask") for k in sd)


def is_convnext(sd: dict[str, Any]) -> bool:
    """A ConvNeXt's state dict (Meta's DINOv3 ConvNeXt: ``downsample_layers`` and ``stages``; timm's: ``stem``)."""
    stages = any(k.startswith("stages.") for k in sd)
    return stages and any(k.startswith(("downsample_layers.", "stem.")) for k in sd)


def convnext_refusal(name: str) -> NotAViTError:
    what = "a DINOv3 ConvNeXt" if "dinov3" in name.lower() else "a ConvNeXt"
    return NotAViTError(f"{name} is {what} checkpoint (downsample_layers / stages): a convolutional network, not a "
                        "Vision Transformer, so it has no tokens to scan; use a DINOv3 ViT "
                        "(dinov3_vit*16_pretrain_*.pth, or timm's vit_*_patch16_dinov3)")


def missing_pieces(sd: dict[str, Any]) -> list[str]:
    """What a DINOv3 ViT in Meta's layout must hold and this one does not (top-level keys, then per block)."""
    missing = [k for k in _TOP_PIECES if k not in sd]
    blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    if not blocks:
        return missing + ["blocks.N"]
    for i in range(blocks[-1] + 1):
        missing += [f"blocks.{i}.{p}" for p in _BLOCK_PIECES if f"blocks.{i}.{p}" not in sd]
        if f"blocks.{i}.mlp.fc1.weight" not in sd and f"blocks.{i}.mlp.w1.weight" not in sd:
            missing.append(f"blocks.{i}.mlp.fc1.weight (or w1/w2/w3)")
    return missing


def check_complete(sd: dict[str, Any], name: str) -> None:
    """Refuse, in one line, a Meta DINOv3 file that lacks a piece timm's converter needs."""
    missing = missing_pieces(sd)
    if missing:
        marks = ", ".join(k for k in (*_MARKS, "attn.qkv.bias_mask") if k in sd or any(
            key.endswith(k) for key in sd))
        shown = ", ".join(missing[:4]) + (f" (+{len(missing) - 4} more)" if len(missing) > 4 else "")
        raise ModelLoadError(f"{name} is a DINOv3 checkpoint in Meta's layout (it has {marks}) but it is missing "
                             f"{shown}; the file is incomplete or was edited: re-download or re-export it")


def qkv_biases(sd: dict[str, torch.Tensor]) -> tuple[bool, list[int]]:
    """(whether any block's q or v bias is non-zero, the blocks whose key bias is non-zero once ``bias_mask``
    is applied as Meta's ``LinearKMaskedBias`` applies it)."""
    nonzero_qv, nonzero_k = False, []
    for key, bias in sd.items():
        if not key.endswith(".attn.qkv.bias"):
            continue
        mask = sd.get(key + "_mask")
        effective = bias.float() * mask.float() if mask is not None else bias.float()
        q, k, v = effective.chunk(3)
        nonzero_qv = nonzero_qv or bool(q.any() or v.any())
        if k.any():
            nonzero_k.append(int(key.split(".")[1]))
    return nonzero_qv, sorted(nonzero_k)


def _timm_filter(sd: dict[str, torch.Tensor], model: Any) -> dict[str, torch.Tensor]:
    """timm's Eva converter, its prints kept out of our stdout: for a target without ``q_bias`` it prints an
    exception for every block (``--json`` output must stay JSON)."""
    from timm.models.eva import checkpoint_filter_fn

    with contextlib.redirect_stdout(io.StringIO()):
        return dict(checkpoint_filter_fn(dict(sd), model))


def rename_only(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's keys and shapes of a Meta file, before any model exists (to infer its architecture): the q/v biases
    are kept exactly when they are non-zero, so the shapes then match the ``_qkvb`` variant and otherwise the
    plain one."""
    keep_biases, _ = qkv_biases(sd)
    patch = sd.get("patch_embed.proj.weight")

    def get_parameter(name: str) -> None:
        if not keep_biases:
            raise AttributeError(f"no {name}")

    stand_in = SimpleNamespace(pos_embed=None, get_parameter=get_parameter,
                               patch_embed=SimpleNamespace(proj=SimpleNamespace(weight=patch)))
    return _timm_filter(sd, stand_in)


def to_timm(sd: dict[str, torch.Tensor], model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The file in ``model``'s keys through timm's converter; biases the model cannot hold are refused, never
    dropped."""
    nonzero_qv, nonzero_k = qkv_biases(sd)
    if nonzero_k:
        raise CheckpointMismatchError(
            f"{name}: the key biases of blocks {', '.join(map(str, nonzero_k[:4]))} are non-zero (after bias_mask), "
            "and timm's Eva, as DINOv3, fixes them at zero; loading would change the model")
    if nonzero_qv and "blocks.0.attn.q_bias" not in model.state_dict():
        raise CheckpointMismatchError(
            f"{name} has non-zero query/value biases (attn.qkv.bias) and this architecture has none; use the _qkvb "
            "variant (e.g. vit_small_patch16_dinov3_qkvb), or leave --arch out to have it chosen")
    return _timm_filter(sd, model)


def preprocessing(name: str) -> tuple[dict[str, Any], str | None]:
    """(mean/std for a Meta file, from its name's tag; a note when the name says nothing)."""
    match = _TAG.search(name.lower())
    tag = match.group(1) if match else None
    if tag in PREPROCESSING:
        return dict(PREPROCESSING[tag]), None
    return dict(IMAGENET), (f"{name}: Meta's DINOv3 files carry no preprocessing and its name has no known tag "
                            f"({', '.join(PREPROCESSING)}): ImageNet mean/std are used, as for the LVD-1689M models; "
                            "satellite (SAT-493M) weights expect mean (0.430, 0.411, 0.296) and std "
                            "(0.213, 0.156, 0.143) - keep their file name's _sat493m tag")


def meta_notes(sd: dict[str, Any]) -> list[str]:
    left = [k for k in ("mask_token", "rope_embed.periods") if k in sd]
    left += ["qkv.bias_mask"] if any(k.endswith(".bias_mask") for k in sd) else []
    left += ["local_cls_norm"] if any(k.startswith("local_cls_norm.") for k in sd) else []
    return [f"timm's converter left out what only pretraining uses: {', '.join(left)}"] if left else []


# ----------------------------------------------------------------------------------------------- Hugging Face
HF_MODEL_TYPE = "dinov3_vit"
ARCH = "artifactscan_dinov3"
#: DINOv3ViTConfig's defaults, which config.json may leave out
HF_DEFAULTS: dict[str, Any] = dict(
    hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, hidden_act="gelu",
    layer_norm_eps=1e-5, rope_theta=100.0, image_size=224, patch_size=16, num_channels=3, query_bias=True,
    key_bias=False, value_bias=True, proj_bias=True, mlp_bias=True, use_gated_mlp=False, num_register_tokens=0)
_HF_LAYER = re.compile(r"^(?:model\.)?layer\.(\d+)\.(.+)$")  # on disk `layer.N`; in memory (transformers 5)
_HF_TOP = {"embeddings.cls_token": "cls_token", "embeddings.register_tokens": "reg_token",
           "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
           "embeddings.patch_embeddings.bias": "patch_embed.proj.bias", "norm.weight": "norm.weight",
           "norm.bias": "norm.bias"}
_HF_BLOCK = {"norm1.": "norm1.", "norm2.": "norm2.", "attention.o_proj.": "attn.proj.",
             "layer_scale1.lambda1": "gamma_1", "layer_scale2.lambda1": "gamma_2", "mlp.down_proj.": "mlp.fc2.",
             "mlp.gate_proj.": "mlp.fc1_g.", "attention.q_proj.bias": "attn.q_bias",
             "attention.v_proj.bias": "attn.v_bias"}


def build_dinov3(norm_eps: float = 1e-5, rope_temperature: float = 100.0, swiglu: bool = False,
                 mlp_ratio: float = 4.0, **kwargs: Any) -> nn.Module:
    """timm's ``Eva`` set up as timm's ``vit_*_patch16_dinov3`` models are (DINOv3 RoPE, 1 CLS + registers, layer
    scale, no absolute position embedding), from JSON-able arguments."""
    from timm.layers import LayerNorm
    from timm.models.eva import Eva

    return Eva(**kwargs, mlp_ratio=mlp_ratio, swiglu_mlp=swiglu, swiglu_align_to=1 if swiglu else 0,
               init_values=1.0, rope_type="dinov3", rope_temperature=rope_temperature, rope_rotate_half=True,
               use_rot_pos_emb=True, use_abs_pos_emb=False, use_fc_norm=False, dynamic_img_size=True,
               norm_layer=partial(LayerNorm, eps=norm_eps))


register_architecture(ARCH, build_dinov3)


def _config(config: dict[str, Any]) -> dict[str, Any]:
    return {**HF_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}


def hf_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """``artifactscan_dinov3`` kwargs of an HF ``DINOv3ViTConfig`` (as config.json holds it)."""
    c = _config(config)
    width, hidden = int(c["hidden_size"]), int(c["intermediate_size"])
    ratio = timm_mlp_ratio(width, hidden)
    want_act = "silu" if c["use_gated_mlp"] else "gelu"
    if c["hidden_act"] != want_act:
        raise ModelLoadError(f"this DINOv3 config's {'gated' if c['use_gated_mlp'] else 'plain'} MLP uses "
                             f"{c['hidden_act']!r}; timm's DINOv3 has {want_act!r} there, so it cannot be converted")
    size = c["image_size"]
    return dict(img_size=int(size if isinstance(size, int) else size[0]), patch_size=int(c["patch_size"]),
                in_chans=int(c["num_channels"]), num_classes=0, embed_dim=width, depth=int(c["num_hidden_layers"]),
                num_heads=int(c["num_attention_heads"]), qkv_bias=bool(c["query_bias"] or c["value_bias"]),
                mlp_ratio=ratio, swiglu=bool(c["use_gated_mlp"]), norm_eps=float(c["layer_norm_eps"]),
                rope_temperature=float(c["rope_theta"]), num_reg_tokens=int(c["num_register_tokens"]))


def convert_hf(hf: dict[str, torch.Tensor], config: dict[str, Any], name: str
               ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """HF ``DINOv3ViTModel`` weights -> timm ``Eva`` keys; returns (state dict, dropped key counts)."""
    c = _config(config)
    gated = bool(c["use_gated_mlp"])
    keys = KeySorter()
    out, dropped, unknown = keys.out, keys.dropped, keys.unknown
    for key, value in hf.items():
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
        elif key == "embeddings.mask_token":
            dropped["mask_token (pretraining only)"] = 1
        elif m := _HF_LAYER.match(key):
            i, rest = int(m.group(1)), m.group(2)
            if mm := re.fullmatch(r"attention\.([qkv])_proj\.weight", rest):
                keys.qkv[(i, mm.group(1), "weight")] = value
            elif rest == "attention.k_proj.bias":
                if value.any():
                    raise CheckpointMismatchError(f"{name}: block {i}'s key bias is non-zero, and timm's Eva (as "
                                                  "Meta's DINOv3) fixes it at zero; loading would change the model")
            elif rest.startswith("mlp.up_proj."):
                out[f"blocks.{i}.mlp.{'fc1_x' if gated else 'fc1'}.{rest.rsplit('.', 1)[1]}"] = value
            else:
                target = next((t + rest[len(s):] for s, t in _HF_BLOCK.items() if rest.startswith(s)), None)
                if target is None:
                    unknown.append(key)
                else:
                    out[f"blocks.{i}.{target}"] = value
        else:
            unknown.append(key)
    keys.finish("DINOv3", name)
    _zero_fill(out, c, int(c["num_hidden_layers"]))
    return out, dropped


def _zero_fill(out: dict[str, torch.Tensor], c: dict[str, Any], depth: int) -> None:
    """Biases the HF config switched off are zeros in timm's Eva, which always has them: exact."""
    width = int(c["hidden_size"])
    for i in range(depth):
        wanted = []
        if c["query_bias"] or c["value_bias"]:
            wanted += [(f"attn.{p}_bias", width) for p, on in (("q", c["query_bias"]), ("v", c["value_bias"]))
                       if not on]
        if not c["proj_bias"]:
            wanted.append(("attn.proj.bias", width))
        if not c["mlp_bias"]:
            fc2 = out.get(f"blocks.{i}.mlp.fc2.weight")
            hidden = int(fc2.shape[1]) if fc2 is not None else int(c["intermediate_size"])
            ins = ("fc1_g", "fc1_x") if c["use_gated_mlp"] else ("fc1",)
            wanted += [(f"mlp.{n}.bias", hidden) for n in ins] + [("mlp.fc2.bias", width)]
        for key, size in wanted:
            out.setdefault(f"blocks.{i}.{key}", torch.zeros(size))


# ----------------------------------------------------------------------------------------------- the table's entries
def inspect_meta_file(sd: dict[str, Any], name: str) -> tuple[dict[str, Any], list[str]]:
    """A Meta file's preprocessing (from its name's tag) and notes, once it is known to hold every piece."""
    check_complete(sd, name)
    data_config, note = preprocessing(name)
    return data_config, meta_notes(sd) + ([note] if note else [])


#: ConvNeXt files (DINOv3's, or any): recognised only to be refused before any ViT layout is tried
CONVNEXT = FileLayout("convnext", None, is_convnext, refusal=convnext_refusal)
META_FILES = FileLayout(
    "dinov3", "dinov3", is_meta_vit,
    lambda sd, model, name: rename_only(sd) if model is None else to_timm(sd, model, name),
    inspect=inspect_meta_file, prefix_tokens="1 CLS + 4 registers (storage_tokens)")
HF_FOLDERS = FolderLayout({HF_MODEL_TYPE: "DINOv3ViTModel"}, ARCH, build_dinov3, convert_hf, config_kwargs=hf_kwargs,
                          prefix_tokens="1 CLS + num_register_tokens registers")
FAMILY = Family("dinov3", files=(CONVNEXT, META_FILES), folders=(HF_FOLDERS,), known=known(
    "dinov3",
    ("vit_small_patch16_dinov3", 384, 16), ("vit_small_plus_patch16_dinov3", 384, 16),
    ("vit_base_patch16_dinov3", 768, 16), ("vit_large_patch16_dinov3", 1024, 16),
    ("vit_huge_plus_patch16_dinov3", 1280, 16), ("vit_7b_patch16_dinov3", 4096, 16),
    ("vit_tiny_patch16_dinov3_qkvb", 192, 16), ("vit_small_patch16_dinov3_qkvb", 384, 16),
    ("vit_small_plus_patch16_dinov3_qkvb", 384, 16), ("vit_base_patch16_dinov3_qkvb", 768, 16),
    ("vit_large_patch16_dinov3_qkvb", 1024, 16), ("vit_huge_plus_patch16_dinov3_qkvb", 1280, 16)))
