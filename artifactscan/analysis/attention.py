"""Capturing attention probabilities from timm ViTs, block by block, and leaving the model as it was.

timm computes attention with ``F.scaled_dot_product_attention`` when ``attn.fused_attn`` is set, which never
materialises the probabilities. For the captured blocks only, :class:`AttentionCapture` switches to timm's explicit
path, where the softmax output passes through ``attn.attn_drop``; a forward hook there sees ``[B, heads, T, T]``.
On exit the hooks are removed and every ``fused_attn`` flag is restored, even after an error.

Only reductions are kept (memory does not grow with images): per block, the mean attention mass that patch queries
put on each prefix token and on flagged outlier tokens, and — for a few images — the CLS (or register / mean-query)
attention map over the patch grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from artifactscan.core.numerics import measurement_mode
from artifactscan.core.errors import NotAViTError
from artifactscan.models.loading import LoadedModel


def _attention_module(block: nn.Module) -> nn.Module:
    attn = getattr(block, "attn", None)
    if attn is None or not hasattr(attn, "attn_drop") or not hasattr(attn, "fused_attn"):
        raise NotAViTError(f"block {type(block).__name__} has no timm attention module (attn.attn_drop) to capture; "
                           "attention maps need timm's Attention/EvaAttention")
    return attn


class AttentionCapture:
    """Context manager: ``with AttentionCapture(loaded, blocks=[3, 5]) as cap: model(x); cap.probs[3]``."""

    def __init__(self, loaded: LoadedModel, blocks: Sequence[int] | None = None,
                 on_probs: Callable[[int, torch.Tensor], None] | None = None):
        """``on_probs(block, probs)``, when given, is called with each block's ``[B, heads, T, T]`` probabilities
        as they are computed, instead of keeping them in ``self.probs`` (reduce on the fly: one block's
        probabilities alive at a time instead of every captured block's)."""
        n = len(loaded.blocks)
        self.block_ids = list(range(n)) if blocks is None else [b % n for b in blocks]
        self.attns = [_attention_module(loaded.blocks[b]) for b in self.block_ids]
        self.probs: dict[int, torch.Tensor] = {}
        self.on_probs = on_probs
        self._saved: list[bool] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> "AttentionCapture":
        for b, attn in zip(self.block_ids, self.attns):
            self._saved.append(bool(attn.fused_attn))
            attn.fused_attn = False  # explicit softmax path, for these blocks only
            self._handles.append(attn.attn_drop.register_forward_hook(self._hook(b)))
        return self

    def _hook(self, block: int):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if self.on_probs is not None:
                self.on_probs(block, inputs[0].detach())
            else:
                self.probs[block] = inputs[0].detach().float()
        return hook

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        for attn, fused in zip(self.attns, self._saved):
            attn.fused_attn = fused
        self._handles.clear()
        self._saved.clear()


@dataclass
class AttentionMass:
    """Per block: mean fraction of the attention of patch queries that lands on each prefix token, and on outliers."""

    block: int
    prefix_mass: dict[str, float]
    outlier_mass: float | None
    num_images: int


@dataclass
class _Accumulator:
    prefix_sum: torch.Tensor
    outlier_sum: float = 0.0
    outlier_images: int = 0
    images: int = 0


@measurement_mode()
def attention_mass(loaded: LoadedModel, batches, outlier_masks=None, blocks: Sequence[int] | None = None,
                   device: torch.device | str = "cpu") -> list[AttentionMass]:
    """Mean attention mass from patch queries onto prefix tokens (and onto flagged outlier patches) per block.

    Args:
        batches: iterable of normalised image tensors ``[B, 3, H, W]``.
        outlier_masks: optional iterable (same order) of ``[B, N]`` bool masks of flagged patch tokens.
    """
    P = loaded.num_prefix_tokens
    names = loaded.prefix_names
    ids = list(range(len(loaded.blocks))) if blocks is None else [b % len(loaded.blocks) for b in blocks]
    acc = {b: _Accumulator(torch.zeros(P, dtype=torch.float64)) for b in ids}
    masks = iter(outlier_masks) if outlier_masks is not None else None
    with AttentionCapture(loaded, ids) as cap:
        for x in batches:
            loaded.model.forward_features(x.to(device))
            mask = next(masks).to(device) if masks is not None else None
            for b in ids:
                probs = cap.probs[b].mean(dim=1)  # [B, T, T], averaged over heads
                patch_queries = probs[:, P:, :]  # [B, N, T]
                a = acc[b]
                if P:
                    a.prefix_sum += patch_queries[:, :, :P].mean(dim=1).sum(dim=0).double().cpu()
                if mask is not None:
                    onto = (patch_queries[:, :, P:] * mask[:, None, :].float()).sum(-1).mean(-1)  # [B]
                    has = mask.any(dim=1)
                    a.outlier_sum += float(onto[has].sum())
                    a.outlier_images += int(has.sum())
                a.images += x.shape[0]
    out = []
    for b in ids:
        a = acc[b]
        prefix = {n: float(a.prefix_sum[i]) / a.images for i, n in enumerate(names)} if a.images else {}
        outlier = a.outlier_sum / a.outlier_images if a.outlier_images else None
        out.append(AttentionMass(b, prefix, outlier, a.images))
    return out
