"""The ViT being trained (with or without registers), its optimiser parameter groups and learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from artifactscan.core.errors import TrainingError, option
from artifactscan.analysis.training.config import TrainConfig


def build_model(config: TrainConfig, registers: int | None = None, *, seed: int | None = None) -> nn.Module:
    """Create the (untrained) timm ViT described by ``config`` with ``registers`` register tokens.

    With ``registers > 0`` every parameter except ``reg_token`` is copied from the 0-register model built from the
    same seed, so a register model and its baseline start from the same weights.
    """
    import timm

    reg = config.registers if registers is None else int(registers)
    if reg < 0:
        raise TrainingError(f"registers must be 0 or more, got {reg}; use e.g. {option('registers', 4)}")
    seed = config.seed if seed is None else seed
    if not timm.is_model(config.arch):
        raise TrainingError(
            f"unknown timm architecture {config.arch!r}; use a ViT name such as vit_small_patch16_224"
        )

    def create(n_reg: int) -> nn.Module:
        torch.manual_seed(seed)
        try:
            model = timm.create_model(config.arch, pretrained=False, **config.model_kwargs(n_reg))
        except TypeError as exc:
            raise TrainingError(
                f"{config.arch} is not a timm VisionTransformer (it does not accept img_size/patch_size/reg_tokens: "
                f"{exc}); use a ViT such as vit_small_patch16_224"
            ) from None
        if not hasattr(model, "blocks") or not hasattr(model, "num_prefix_tokens"):
            raise TrainingError(
                f"{config.arch} has no transformer blocks / prefix tokens; use a ViT such as vit_small_patch16_224"
            )
        if getattr(model, "num_reg_tokens", n_reg) != n_reg:
            raise TrainingError(f"{config.arch} ignored reg_tokens={n_reg}; use a timm VisionTransformer")
        return model

    model = create(reg)
    if reg > 0:
        base = create(0).state_dict()
        missing, unexpected = model.load_state_dict(base, strict=False)
        if unexpected or any(k != "reg_token" for k in missing):
            raise TrainingError(f"{config.arch}: register and baseline models differ beyond reg_token ({missing})")
    return model


def unwrap(model: nn.Module) -> nn.Module:
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod  # torch.compile
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norms, tokens and position embeddings (timm/DeiT convention)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
