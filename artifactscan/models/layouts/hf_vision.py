"""Live Hugging Face vision encoders (transformers 5's in-memory module names): ``Dinov2Model``,
``Dinov2WithRegistersModel``, ``ViTModel``, ``CLIPVisionModel``, ``SiglipVisionModel``, ``DINOv3ViTModel``,
``Aimv2VisionModel`` and ``BeitModel``, and
the ``*ForImageClassification`` heads around them. Their hook points, so a model in someone's notebook or training loop
is measured as it is, without converting it (the loader converts HF *files* into timm ViTs: models/hf.py).

The trunk is found by the class's own attribute names (``encoder.layer`` for DINOv2, ``layers`` for ViT,
``encoder.layers`` for CLIP and SigLIP, under ``vision_model`` or a task head's ``dinov2`` / ``vit`` where a
wrapper has one). Attention: HF's ``sdpa`` implementation passes q/k/v to the kernel the capture layer reads;
``eager`` returns the probabilities as the attention module's second output, and q/k/v are its projections. DINOv3
rotates q and k (RoPE, patch tokens only) inside its attention: the kernel receives them rotated, and on the eager
path the rotation is applied to the projections with the attention module's own ``apply_rotary_pos_emb`` and the
``position_embeddings`` (cos, sin) the layer passed it in that forward.
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from artifactscan.models.hooks import HookFamily, HookPoint, register_hook_family


@dataclass(frozen=True)
class Trunk:
    """Where one HF architecture keeps its parts (dotted paths from the model's root)."""

    prefix: str          # "" or "vision_model." / "dinov2." ...
    layers: str          # the ModuleList of layers
    attention: str       # inside a layer
    mlp_out: str         # inside a layer: the MLP's output projection (its input is the hidden units)
    patch_embed: str     # the patch projection
    final_norm: str | None  # the norm applied to every token at the end; None when it is applied to CLS only
    conv_patch: bool     # the patch module is a bare Conv2d ([B, D, h, w] output)
    cls: bool = True     # a CLS token before the patches (SigLIP and AIMv2 have none)


CLASSES = {
    "Dinov2Model": Trunk("", "encoder.layer", "attention", "mlp.fc2", "embeddings.patch_embeddings", "layernorm",
                         False),
    "Dinov2WithRegistersModel": Trunk("", "encoder.layer", "attention", "mlp.fc2", "embeddings.patch_embeddings",
                                      "layernorm", False),
    "ViTModel": Trunk("", "layers", "attention", "mlp.fc2", "embeddings.patch_embeddings", "layernorm", False),
    "CLIPVisionModel": Trunk("", "encoder.layers", "self_attn", "mlp.fc2", "embeddings.patch_embedding", None, True),
    "SiglipVisionModel": Trunk("", "encoder.layers", "self_attn", "mlp.fc2", "embeddings.patch_embedding",
                               "post_layernorm", True, cls=False),
    # BEiT: transformers 5 keeps its layers as `layers` (on disk `encoder.layer`); the relative position bias goes to
    # the kernel as its mask. With mean pooling `layernorm` is an identity (as timm's Beit's `norm` is then).
    "BeitModel": Trunk("", "layers", "attention", "mlp.fc2", "embeddings.patch_embeddings", "layernorm", False),
    # AIMv2: no CLS; the patch projection is followed by an RMSNorm inside the embeddings (read before it)
    "Aimv2VisionModel": Trunk("", "encoder.layers", "attention", "ffn.down_proj", "embeddings.patch_embed",
                              "rms_norm", True, cls=False),
    # transformers 5 keeps DINOv3's layers in an encoder module named `model` (on disk they are `layer.N`)
    "DINOv3ViTModel": Trunk("", "model.layer", "attention", "mlp.down_proj", "embeddings.patch_embeddings", "norm",
                            True),
}
#: wrappers: the attribute that holds one of the models above
WRAPPERS = ("vision_model", "dinov2", "vit", "beit")


def _trunk(model: nn.Module) -> tuple[str, Trunk] | None:
    """(path prefix, trunk) for ``model`` or the vision model it wraps."""
    if not type(model).__module__.startswith("transformers."):
        return None
    name = type(model).__name__
    if name in CLASSES and _has(model, CLASSES[name].layers):
        return "", CLASSES[name]
    for attr in WRAPPERS:
        inner = getattr(model, attr, None)
        # SigLIP2's NaFlex tower shares SigLIP's names but takes padded patch sequences: layouts/naflex.py hooks it
        if isinstance(inner, nn.Module) and not type(inner).__name__.startswith("Siglip2"):
            for trunk in CLASSES.values():  # transformers 5 inner vision transformers share the names above
                if _has(inner, trunk.layers) and _has(inner, trunk.patch_embed):
                    return f"{attr}.", trunk
    return None


def _has(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def conv_tokens(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.flatten(2).transpose(1, 2)  # [B, D, h, w] -> [B, N, D]


def flat_tokens(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.reshape(output.shape[0], -1, output.shape[-1])


#: (cos, sin) each rotating attention module was given in the current forward (kept while a capture holds it)
_rotations: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def rotary_function(attention: nn.Module) -> Callable | None:
    """The ``apply_rotary_pos_emb`` of an attention module that rotates q/k inside its forward, else None."""
    return getattr(sys.modules.get(type(attention).__module__), "apply_rotary_pos_emb", None)


def _rotated(module: nn.Module, projected: torch.Tensor) -> torch.Tensor:
    """q or k as the attention uses them: heads split, the module's own RoPE applied, heads concatenated."""
    rotate = rotary_function(module)
    if rotate is None:
        return projected
    if module not in _rotations:
        raise RuntimeError(f"{type(module).__name__} rotates its queries and keys, and its rotation was not seen")
    batch, tokens, _ = projected.shape
    heads = projected.view(batch, tokens, module.num_heads, -1).transpose(1, 2)
    rotated, _ = rotate(heads, heads, *_rotations[module])
    return rotated.transpose(1, 2).reshape(batch, tokens, -1)


def eager_part(part: str):
    """Read q/k/v/pattern from an eager attention module after its forward: q/k/v by its own projections of the
    input (rotated for RoPE families, as their kernel call receives them), the probabilities from its second
    output."""
    def read(module: nn.Module, inputs: tuple, output: object) -> torch.Tensor:
        if part == "pattern":
            probs = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if probs is None:
                raise RuntimeError("this attention returned no probabilities")
            return probs.float()
        projected = getattr(module, f"{part}_proj")(inputs[0])
        return _rotated(module, projected) if part in ("q", "k") else projected
    return read


class HFVisionFamily(HookFamily):
    name = "hf-vision"

    def trunk(self, model: nn.Module) -> tuple[str, Trunk] | None:
        """(path prefix, trunk) of ``model``, or None when this family does not hook it (a subclass family: its own
        architectures)."""
        return _trunk(model)

    def matches(self, model: nn.Module) -> bool:
        return self.trunk(model) is not None

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        prefix, trunk = self.trunk(model)  # type: ignore[misc]
        return list(model.get_submodule(prefix + trunk.layers))

    def points(self, model: nn.Module) -> list[HookPoint]:
        prefix, trunk = self.trunk(model)  # type: ignore[misc]
        points = [HookPoint("patch_embed.post", prefix + trunk.patch_embed, "output",
                            "the patch embedding before position embedding and prefix tokens",
                            read=conv_tokens if trunk.conv_patch else flat_tokens)]
        for i, layer in enumerate(self.blocks(model)):
            path = f"{prefix}{trunk.layers}.{i}"
            points.append(HookPoint(f"blocks.{i}.resid_pre", path, "input", "the residual stream entering the block"))
            attention = f"{path}.{trunk.attention}"
            for part in ("q", "k", "v", "pattern"):
                points.append(HookPoint(f"blocks.{i}.attn.{part}", attention, "attention",
                                        f"attention {part} as the kernel receives it", part=part,
                                        fallback=eager_part(part)))
            has_mlp = _has(layer, trunk.mlp_out)
            points.append(HookPoint(f"blocks.{i}.mlp.post", f"{path}.{trunk.mlp_out}", "input",
                                    "the MLP's hidden units after the activation", unit=True,
                                    unavailable=None if has_mlp else "its MLP has no fc2 (SwiGLU: no unit points)"))
            points.append(HookPoint(f"blocks.{i}.resid_post", path, "output", "the residual stream leaving the block"))
        if trunk.final_norm is not None:
            points.append(HookPoint("final_norm", prefix + trunk.final_norm, "output", "the final normalised tokens"))
        else:
            points.append(HookPoint("final_norm", prefix + trunk.layers, "output", "", unavailable=(
                "this model's final LayerNorm is applied to the pooled CLS token only")))
        return points

    def forward(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        out = model(pixel_values=images)
        return getattr(out, "last_hidden_state", out[0] if isinstance(out, tuple) else out)

    def attention_setup(self, attention: nn.Module) -> Callable[[], None] | None:
        """For attention that rotates q/k itself (DINOv3): keep the (cos, sin) its layer passes it, which the eager
        path's q/k reading needs."""
        if rotary_function(attention) is None:
            return None

        def keep(module: nn.Module, args: tuple, kwargs: dict) -> None:
            rotation = kwargs.get("position_embeddings", args[2] if len(args) > 2 else None)
            if rotation is not None:
                _rotations[module] = rotation

        handle = attention.register_forward_pre_hook(keep, with_kwargs=True)

        def undo() -> None:
            handle.remove()
            _rotations.pop(attention, None)
        return undo

    def prefix_tokens(self, model: nn.Module) -> tuple[int, int]:
        config = getattr(model, "config", None)
        config = getattr(config, "vision_config", config)
        registers = int(getattr(config, "num_register_tokens", 0) or 0)
        return int(self.trunk(model)[1].cls), registers  # type: ignore[index]


register_hook_family(HFVisionFamily())
