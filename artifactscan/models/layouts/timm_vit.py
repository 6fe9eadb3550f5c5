"""timm's ``VisionTransformer`` (and every layout artifactscan converts into one: DINOv2, DeiT-III, MAE, OpenCLIP,
Hugging Face conversions), timm's ``Eva`` (EVA02, DINOv3, PE, the RoPE ViTs) and ``Beit``: their hook points.

All name their modules alike (``patch_embed``, ``blocks.{i}.attn``, ``blocks.{i}.mlp.fc2``, ``norm``), so one map
serves all three; Eva's attention applies qk-norm and RoPE before its kernel, and the capture layer reads the kernel's
inputs, so ``attn.q``/``attn.k`` are the rotated tensors for Eva without anything special here.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from artifactscan.models.hooks import HookFamily, HookPoint, register_hook_family, tokens_from_grid


def is_timm_class(model: nn.Module, *names: str) -> bool:
    """Whether ``model`` is (a subclass of) one of timm's classes ``names``, without importing timm."""
    return any(c.__name__ in names and c.__module__.startswith("timm.") for c in type(model).__mro__)


def attention_points(block: str, attn: nn.Module | None) -> list[HookPoint]:
    path = f"{block}.attn"
    reason = None if attn is not None and hasattr(attn, "fused_attn") else \
        "its blocks have no timm attention module (attn with fused_attn)"
    meanings = {"q": "queries as the attention kernel receives them (after qk-norm and RoPE), heads concatenated",
                "k": "keys as the attention kernel receives them (after qk-norm and RoPE), heads concatenated",
                "v": "values as the attention kernel receives them, heads concatenated",
                "pattern": "attention probabilities [B, heads, T, T], float32"}
    return [HookPoint(f"{path}.{part}", path, "attention", meaning, part=part, unavailable=reason)
            for part, meaning in meanings.items()]


def mlp_point(block_path: str, block: nn.Module) -> HookPoint:
    fc2 = getattr(getattr(block, "mlp", None), "fc2", None)
    return HookPoint(f"{block_path}.mlp.post", f"{block_path}.mlp.fc2", "input",
                     "the MLP's hidden units after the activation (the input of mlp.fc2)", unit=True,
                     unavailable=None if isinstance(fc2, nn.Module) else "its blocks have no mlp.fc2")


def block_points(i: int, block: nn.Module, extra: Callable[[int, nn.Module], list[HookPoint]] | None = None
                 ) -> list[HookPoint]:
    path = f"blocks.{i}"
    points = [HookPoint(f"{path}.resid_pre", path, "input", "the residual stream entering the block")]
    points += attention_points(path, getattr(block, "attn", None))
    points.append(mlp_point(path, block))
    points += extra(i, block) if extra is not None else []
    points.append(HookPoint(f"{path}.resid_post", path, "output",
                            "the residual stream leaving the block (before the final norm)"))
    return points


class TimmViTFamily(HookFamily):
    """timm ``VisionTransformer``, ``Eva`` and ``Beit`` models (and their subclasses)."""

    name = "timm-vit"
    classes = ("VisionTransformer", "Eva", "Beit")
    patch_module = "patch_embed"  # the module projecting the patches (a subclass family names its own)

    def matches(self, model: nn.Module) -> bool:
        return is_timm_class(model, *self.classes)

    def extra_points(self, i: int, block: nn.Module) -> list[HookPoint]:
        """Points a subclass family adds inside block ``i`` (after the MLP)."""
        return []

    def points(self, model: nn.Module) -> list[HookPoint]:
        points = [HookPoint("patch_embed.post", self.patch_module, "output",
                            "the patch embedding before position embedding and prefix tokens", read=tokens_from_grid)]
        for i, block in enumerate(model.blocks):
            points += block_points(i, block, self.extra_points)
        points.append(HookPoint("final_norm", "norm", "output", "the final normalised tokens (forward_features)"))
        return points

    def forward(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return model.forward_features(images)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.blocks)

    def prefix_tokens(self, model: nn.Module) -> tuple[int, int]:
        # Eva (DINOv3's 4 registers, the RoPE *_reg*_gap models) keeps no count: its reg_token parameter says.
        reg_token = getattr(model, "reg_token", None)
        registers = int(getattr(model, "num_reg_tokens", None) or (reg_token.shape[1] if reg_token is not None else 0))
        return int(model.num_prefix_tokens) - registers, registers

    def attention_setup(self, attention: nn.Module) -> Callable[[], None] | None:
        # The kernel path is where q/k/v are read; a model built with fused attention off goes through it only while
        # captured (the explicit path computes the same attention).
        fused = attention.fused_attn
        attention.fused_attn = True

        def undo() -> None:
            attention.fused_attn = fused
        return undo


register_hook_family(TimmViTFamily())
