"""Attention probabilities block by block, through the capture layer's ``blocks.{i}.attn.pattern`` points.

The capture layer reads the probabilities from the queries and keys the attention kernel is given, so capturing
does not change the forward (fused attention stays fused) and works for every family it can hook. On exit the hooks
are removed and every setting restored, even after an error.

Only reductions are kept (memory does not grow with images): per block, the mean attention mass that patch queries
put on each prefix token and on flagged outlier tokens, and — for a few images — the CLS (or register / mean-query)
attention map over the patch grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from artifactscan.core.numerics import measurement_mode
from artifactscan.models.hooks import CaptureContext, block_of, block_point, resolve_names
from artifactscan.models.loading import LoadedModel


class AttentionCapture(CaptureContext):
    """Context manager: ``with AttentionCapture(loaded, blocks=[3, 5]) as cap: cap.forward(x); cap.probs[3]``."""

    def __init__(self, loaded: LoadedModel, blocks: Sequence[int] | None = None,
                 on_probs: Callable[[int, torch.Tensor], None] | None = None):
        """``on_probs(block, probs)``, when given, is called with each block's ``[B, heads, T, T]`` probabilities
        as they are computed, instead of keeping them in ``self.probs`` (reduce on the fly: one block's
        probabilities alive at a time instead of every captured block's)."""
        n = len(loaded.blocks)
        self.block_ids = list(range(n)) if blocks is None else [b % n for b in blocks]
        self.on_probs = on_probs
        self.names = [block_point(b, "attn.pattern") for b in self.block_ids]
        resolve_names(loaded, self.names)  # refuses a block that cannot expose attention before any work
        super().__init__(loaded, self.names)
        self._last: dict[int, torch.Tensor] = {}

    def __enter__(self) -> "AttentionCapture":
        # with on_probs, reduce inside the hook: the block's probabilities are dropped before the next block runs
        self.requests = {n: (lambda p, b=block_of(n): self.on_probs(b, p)) if self.on_probs is not None else None
                         for n in self.names}
        return super().__enter__()

    @property
    def probs(self) -> dict[int, torch.Tensor]:
        """Each captured block's ``[B, heads, T, T]`` probabilities of the latest forward (without ``on_probs``)."""
        if self._capture is None or self.on_probs is not None:
            return self._last
        return {block_of(n): self._capture.values[n] for n in self.names if n in self._capture.values}

    def forward(self, images: torch.Tensor) -> None:
        """One forward of the model under the capture (a direct call of the model captures as well)."""
        self.forward_captured(images)

    def __exit__(self, *exc: object) -> None:
        self._last = self.probs  # the latest forward's probabilities stay readable after the block
        super().__exit__(*exc)


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
            cap.forward(x.to(device))
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
