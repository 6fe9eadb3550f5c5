"""NaFlex models: variable-resolution patch sequences with padding. timm's ``NaFlexVit`` (``naflexvit_*``, incl.
C-RADIO v3/v4's ``naflexvit_*_radio_v3/v4``: 1 CLS + 7 or 9 registers) and transformers' ``Siglip2VisionModel``
(``siglip2`` / ``siglip2_vision_model`` folders, no prefix token).

Each image keeps its aspect ratio, resized to at most ``max_num_patches`` patches (:mod:`artifactscan.inputs.naflex`
packs it with its grid); the models take the patches, the validity mask and the grids, and mask padding out of their
attention. Padded tokens still leave every block (their norms mean nothing): the pass runner hands measurements the
mask (``Batch.valid``) and every statistic leaves them out.

SigLIP2 folders are run by transformers' own ``Siglip2VisionModel`` (no timm model reproduces its position-embedding
resize exactly), hooked by its in-memory names; timm's NaFlexVit by timm's names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from artifactscan.core.errors import InputError, ModelLoadError, option
from artifactscan.inputs.naflex import NAFLEX_KEY, is_packed, nominal_input_size, unpack
from artifactscan.models.hooks import register_hook_family
from artifactscan.models.layouts.hf_vision import HFVisionFamily, Trunk
from artifactscan.models.layouts.timm_vit import TimmViTFamily, is_timm_class

HF_MODEL_TYPES = ("siglip2", "siglip2_vision_model")
#: Siglip2ImageProcessor's defaults, which preprocessor_config.json may leave out
HF_PROCESSOR_DEFAULTS = {"max_num_patches": 256, "patch_size": 16, "image_mean": (0.5, 0.5, 0.5),
                         "image_std": (0.5, 0.5, 0.5)}


def is_naflex_model(model: nn.Module) -> bool:
    return is_timm_class(model, "NaFlexVit") or _siglip2_prefix(model) is not None


def naflex_config(config: dict[str, Any], patch_size: int, max_num_patches: int, resizer: str) -> dict[str, Any]:
    """A data config with its NaFlex settings (and the nominal square input the budget corresponds to)."""
    return {**config, NAFLEX_KEY: {"patch_size": int(patch_size), "max_num_patches": int(max_num_patches),
                                   "resizer": resizer},
            "input_size": nominal_input_size(patch_size, max_num_patches)}


def set_budget(loaded: Any, img_size: int) -> None:
    """``--img-size S`` on a NaFlex model (a ``LoadedModel``): at most ``(S / patch)^2`` patches per image."""
    settings = loaded.data_config[NAFLEX_KEY]
    patch = int(settings["patch_size"])
    if img_size <= 0 or img_size % patch:
        raise InputError(f"{option('img_size', img_size)} is not a positive multiple of the patch size {patch}")
    loaded.data_config = naflex_config(loaded.data_config, patch, (img_size // patch) ** 2,
                                       settings.get("resizer", "tensor"))
    loaded.notes = with_budget_note(loaded.notes, loaded.data_config)


#: how the note on a NaFlex model's budget begins (replaced when ``--img-size`` changes the budget)
BUDGET_NOTE = "NaFlex:"


def budget_note(config: dict[str, Any]) -> str:
    """What a report says about a NaFlex model's inputs (its header's grid_size is only the budget's square)."""
    return (f"{BUDGET_NOTE} each image keeps its aspect ratio within {config[NAFLEX_KEY]['max_num_patches']} patches "
            "and is measured on its own grid (outliers and maps); padded tokens are left out of every statistic; "
            "grid_size and input_size are the budget's nominal grid")


def with_budget_note(notes: list[str], config: dict[str, Any]) -> list[str]:
    return [n for n in notes if not n.startswith(BUDGET_NOTE)] + [budget_note(config)]


# ----------------------------------------------------------------------------------------------- timm NaFlexVit
def timm_data_config(model: nn.Module, config: dict[str, Any]) -> dict[str, Any]:
    """timm's data config of a NaFlexVit plus its NaFlex settings: the budget is the pretrained square grid's patch
    count (as timm's NaFlex loader uses for evaluation at that size); timm resizes the PIL image."""
    patch = model.embeds.patch_size
    patch = int(patch if isinstance(patch, int) else patch[0])
    _, h, w = config["input_size"]
    return naflex_config(config, patch, (int(h) // patch) * (int(w) // patch), "pil")


class TimmNaFlexFamily(TimmViTFamily):
    """timm's ``NaFlexVit``: the blocks are timm's ViT blocks; the patch projection is ``embeds.proj``."""

    name = "timm-naflex"
    classes = ("NaFlexVit",)
    padded_inputs = True
    patch_module = "embeds.proj"

    def forward(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        if not is_packed(images):
            return model.forward_features(images)
        batch = unpack(images)
        patches = batch.patches.to(_weights_dtype(model))  # held in bf16/fp16 (--precision): run in it
        out = model.forward_features(patches, patch_coord=batch.coords(), patch_valid=batch.valid)
        return out["patches"] if isinstance(out, dict) else out

    def prefix_tokens(self, model: nn.Module) -> tuple[int, int]:
        registers = int(model.num_reg_tokens)
        return int(model.num_prefix_tokens) - registers, registers


def _weights_dtype(model: nn.Module) -> torch.dtype:
    weight = next(model.parameters(), None)
    return weight.dtype if weight is not None else torch.float32


def is_hf_folder(folder: Path) -> bool:
    """Whether a Hugging Face folder's config.json names a SigLIP2 NaFlex model (unreadable: not for us to say)."""
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type") in HF_MODEL_TYPES
    except (OSError, ValueError, AttributeError):
        return False


def describe(model: nn.Module) -> tuple[int, int, int]:
    """``(num_prefix_tokens, num_cls_tokens, num_register_tokens)`` of a NaFlex model."""
    family = _HF_FAMILY if _siglip2_prefix(model) is not None else _TIMM_FAMILY
    cls, registers = family.prefix_tokens(model)
    return cls + registers, cls, registers


# ----------------------------------------------------------------------------------------------- HF SigLIP2
#: where a SigLIP2 vision tower keeps its parts (transformers 5's in-memory names; no CLS)
SIGLIP2_TRUNK = Trunk("", "encoder.layers", "self_attn", "mlp.fc2", "embeddings.patch_embedding", "post_layernorm",
                      False, cls=False)


def _siglip2_prefix(model: nn.Module) -> str | None:
    """"" for a transformers SigLIP2 vision tower (``encoder.layers`` ...), "vision_model." for a model holding one."""
    for prefix, module in (("", model), ("vision_model.", getattr(model, "vision_model", None))):
        if isinstance(module, nn.Module) and type(module).__name__.startswith("Siglip2") \
                and type(module).__module__.startswith("transformers.") and hasattr(module, "encoder") \
                and hasattr(getattr(module, "embeddings", None), "patch_embedding"):
            return prefix
    return None


class HFSiglip2Family(HFVisionFamily):
    """transformers' ``Siglip2VisionModel`` (alone or as a ``Siglip2Model``'s ``vision_model``), by its in-memory
    names; it takes patches, their mask and the grids."""

    name = "hf-siglip2"
    padded_inputs = True

    def trunk(self, model: nn.Module) -> tuple[str, Trunk] | None:
        prefix = _siglip2_prefix(model)
        return None if prefix is None else (prefix, SIGLIP2_TRUNK)

    def forward(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        if not is_packed(images):
            raise ModelLoadError("a SigLIP2 NaFlex model takes packed patch sequences (artifactscan.inputs.naflex), "
                                 f"not images shaped {tuple(images.shape)}")
        batch = unpack(images)
        prefix = _siglip2_prefix(model) or ""
        tower = model.get_submodule(prefix.rstrip(".")) if prefix else model
        out = tower(pixel_values=batch.patches.to(_weights_dtype(model)), pixel_attention_mask=batch.valid.long(),
                    spatial_shapes=batch.grids)
        return out.last_hidden_state

    def prefix_tokens(self, model: nn.Module) -> tuple[int, int]:
        return 0, 0


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path} is not readable JSON: {exc}") from None


def _folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    from artifactscan.models.materialize import read_safetensors, read_safetensors_header

    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise ModelLoadError(f"{folder} has config.json but no model*.safetensors weights")
    weights: dict[str, torch.Tensor] = {}
    for shard in shards:
        weights.update(read_safetensors(read_safetensors_header(shard)))
    return weights


def load_hf_folder(folder: Path) -> tuple[nn.Module, dict[str, Any], list[str]]:
    """A SigLIP2 NaFlex folder as transformers' ``Siglip2VisionModel`` with its weights; (model, data config,
    notes). The text tower of a full ``siglip2`` folder is left out."""
    try:
        from transformers import Siglip2VisionConfig, Siglip2VisionModel
    except ImportError:
        raise ModelLoadError(f"{folder} is a SigLIP2 NaFlex model: it runs on transformers' own Siglip2VisionModel; "
                             "install transformers (pip install 'artifactscan[hf]')") from None
    config = _read_json(folder / "config.json")
    vision = config.get("vision_config", config) if config.get("model_type") == "siglip2" else config
    vision = {k: v for k, v in vision.items() if k not in ("model_type", "architectures", "transformers_version")}
    model = Siglip2VisionModel(Siglip2VisionConfig(**vision)).eval()
    prefix = "vision_model."
    weights = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in _folder_weights(folder).items()}
    own = model.state_dict()
    vision_weights = {k: v for k, v in weights.items() if k in own}
    missing = sorted(set(own) - set(vision_weights))
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in vision_weights.items()
             if v.shape != own[k].shape]
    if missing or wrong:
        raise ModelLoadError(f"{folder}: its weights do not fit its config.json's SigLIP2 vision tower (missing "
                             f"{missing[:3]}, wrong shape {wrong[:3]}); does config.json belong to these weights?")
    model.load_state_dict(vision_weights)
    model.float()
    processor = {**HF_PROCESSOR_DEFAULTS, "patch_size": model.config.patch_size,
                 **_read_json(folder / "preprocessor_config.json")}
    if int(processor["patch_size"]) != int(model.config.patch_size):
        raise ModelLoadError(f"{folder}: preprocessor_config.json cuts {processor['patch_size']}-pixel patches and "
                             f"config.json's model embeds {model.config.patch_size}-pixel ones; they must agree")
    data = {"mean": tuple(processor["image_mean"]), "std": tuple(processor["image_std"]),
            "interpolation": "bilinear", "crop_pct": 1.0}
    dropped = len(weights) - len(vision_weights)
    notes = ["run by transformers' own Siglip2VisionModel"]
    if not (folder / "preprocessor_config.json").is_file():
        notes.append("no preprocessor_config.json: Siglip2ImageProcessor's defaults (256 patches, mean/std 0.5)")
    if dropped:
        notes.append(f"dropped, as not part of the image encoder: {dropped} keys (text tower, heads)")
    return model, naflex_config(data, processor["patch_size"], processor["max_num_patches"], "tensor"), notes


_TIMM_FAMILY = TimmNaFlexFamily()
_HF_FAMILY = HFSiglip2Family()
register_hook_family(_TIMM_FAMILY)
register_hook_family(_HF_FAMILY, before="hf-vision")
