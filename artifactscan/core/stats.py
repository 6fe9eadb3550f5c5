"""Streaming per-layer norm statistics whose memory does not grow with the number of images.

Every token norm lands in a fixed log-spaced histogram (``NUM_BINS`` bins from 1e-4 to 1e6, 0.58 % wide each), so
medians and percentiles are exact to within one bin, and the histograms of several shards or ranks merge by addition.
Counts above a *known* threshold (the paper's 150, or a number the user gave) are kept exactly on the side; the
adaptive threshold is snapped to a bin edge so that its counts are exact too.

Shapes: ``L`` = number of captured rows (blocks + final norm), ``B`` = batch, ``T`` = tokens, ``P`` = prefix tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOG10_MIN = -4.0
LOG10_MAX = 6.0
NUM_BINS = 4000
BIN_WIDTH_LOG10 = (LOG10_MAX - LOG10_MIN) / NUM_BINS


def bin_index(values: torch.Tensor) -> torch.Tensor:
    """Histogram bin of each value (clamped into the range; values <= 0 fall into bin 0)."""
    logs = torch.log10(values.double().clamp_min(10**LOG10_MIN))
    idx = torch.floor((logs - LOG10_MIN) / BIN_WIDTH_LOG10).long()
    return idx.clamp_(0, NUM_BINS - 1)


def quantile_from_counts(counts: torch.Tensor, q: float) -> float:
    """Quantile ``q`` of a histogram, interpolated geometrically inside the bin it falls in."""
    total = int(counts.sum())
    if total == 0:
        return float("nan")
    cum = torch.cumsum(counts.double(), 0)
    target = q * total
    i = int(torch.searchsorted(cum, torch.tensor([target], dtype=torch.float64)).item())
    i = min(i, NUM_BINS - 1)
    before = float(cum[i - 1]) if i > 0 else 0.0
    inside = float(counts[i])
    frac = 0.0 if inside == 0 else min(max((target - before) / inside, 0.0), 1.0)
    return 10 ** (LOG10_MIN + (i + frac) * BIN_WIDTH_LOG10)


@dataclass
class PrefixTokenStats:
    """Mean / std / max of one prefix token's norm (a CLS or register token) over images."""

    name: str
    mean: float
    std: float
    max: float


class NormStatistics:
    """Accumulates per-layer token-norm statistics batch by batch (update / merge / query).

    Args:
        num_rows: captured rows (one per block, plus one for the final normalised output).
        prefix_names: names of the prefix tokens in order, e.g. ``["cls", "reg0", "reg1"]``; these are never mixed
            into the patch statistics.
        fixed_thresholds: norms whose exceedances are counted exactly as tokens stream by (a scan always passes the
            paper's, ``core.thresholds.PAPER_THRESHOLD``, which is defined there: that module builds on this one).
    """

    def __init__(self, num_rows: int, prefix_names: list[str], fixed_thresholds: tuple[float, ...] = ()):
        self.num_rows = num_rows
        self.prefix_names = list(prefix_names)
        self.fixed_thresholds = tuple(float(t) for t in fixed_thresholds)
        P, L, F = len(self.prefix_names), num_rows, len(self.fixed_thresholds)
        self.patch_counts = torch.zeros(L, NUM_BINS, dtype=torch.int64)
        # Histogram of each image's largest patch norm per row: "images with >= 1 outlier" for any threshold later.
        self.image_max_counts = torch.zeros(L, NUM_BINS, dtype=torch.int64)
        self.patch_max = torch.zeros(L, dtype=torch.float64)
        self.patch_sum = torch.zeros(L, dtype=torch.float64)
        self.prefix_sum = torch.zeros(L, P, dtype=torch.float64)
        self.prefix_sumsq = torch.zeros(L, P, dtype=torch.float64)
        self.prefix_max = torch.zeros(L, P, dtype=torch.float64)
        self.fixed_token_hits = torch.zeros(L, F, dtype=torch.int64)
        self.fixed_image_hits = torch.zeros(L, F, dtype=torch.int64)
        # Token norms that are NaN or Inf (any token, prefix included): they make every other number meaningless.
        self.nonfinite = torch.zeros(L, dtype=torch.int64)
        # Patch tokens counted (per row alike): images x patches, or an image's own patches only under a mask (NaFlex)
        self.patch_tokens = torch.zeros((), dtype=torch.int64)
        self.num_images = 0
        self.num_patches_per_image: int | None = None

    # ------------------------------------------------------------------ update / merge
    def update(self, norms: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Add one batch of norms, shaped ``[L, B, P + N]`` (prefix tokens first, then the N patch tokens).

        ``valid`` ``[B, N]`` (NaFlex batches): which patch tokens are an image's own; the others are padding and
        never counted, in any statistic."""
        L, B, T = norms.shape
        P = len(self.prefix_names)
        if L != self.num_rows:
            raise ValueError(f"expected {self.num_rows} rows of norms, got {L}")
        norms = norms.detach().to("cpu", torch.float64)
        patches = norms[:, :, P:]
        if valid is None:
            N = patches.shape[-1]
            if self.num_patches_per_image is None:
                self.num_patches_per_image = N
            elif N != self.num_patches_per_image:
                # Dynamic image size would change the grid mid-run; per-image fractions would then be ill-defined.
                raise ValueError(f"patch count changed from {self.num_patches_per_image} to {N} within one scan")
            self.nonfinite += (~torch.isfinite(norms)).sum(dim=(1, 2))
            own, image_max = patches.reshape(L, -1), patches.amax(dim=2)  # [L, B*N], [L, B]
        else:  # images with patch grids of their own: the padding never counts
            keep = torch.cat([torch.ones(B, P, dtype=torch.bool), valid.cpu().bool()], dim=1)
            self.nonfinite += (~torch.isfinite(norms) & keep).sum(dim=(1, 2))
            valid = keep[:, P:]
            self.num_patches_per_image = self.num_patches_per_image or patches.shape[-1]  # the padded length
            own = patches[:, valid]  # [L, valid tokens of the batch]
            image_max = patches.masked_fill(~valid[None], float("-inf")).amax(dim=2)
        idx = bin_index(own)
        self.patch_counts.scatter_add_(1, idx, torch.ones_like(idx))
        midx = bin_index(image_max)
        self.image_max_counts.scatter_add_(1, midx, torch.ones_like(midx))
        self.patch_max = torch.maximum(self.patch_max, image_max.amax(dim=1))
        self.patch_sum += own.sum(dim=1)
        if P:
            pre = norms[:, :, :P]
            self.prefix_sum += pre.sum(dim=1)
            self.prefix_sumsq += (pre**2).sum(dim=1)
            self.prefix_max = torch.maximum(self.prefix_max, pre.amax(dim=1))
        for j, t in enumerate(self.fixed_thresholds):
            above = patches > t if valid is None else (patches > t) & valid[None]
            self.fixed_token_hits[:, j] += above.sum(dim=(1, 2))
            self.fixed_image_hits[:, j] += above.any(dim=2).sum(dim=1)
        self.patch_tokens += own.shape[1]
        self.num_images += B

    _SUMMED = ("patch_counts", "image_max_counts", "patch_sum", "prefix_sum", "prefix_sumsq",
               "fixed_token_hits", "fixed_image_hits", "nonfinite", "patch_tokens")
    _MAXED = ("patch_max", "prefix_max")

    def merge(self, other: "NormStatistics") -> None:
        """Fold another shard's statistics into this one: counts add exactly, maxima take the max, float64 sums add
        (equal to one stream's up to float64 rounding: the terms are grouped otherwise)."""
        if (other.num_rows, other.prefix_names, other.fixed_thresholds) != (
            self.num_rows, self.prefix_names, self.fixed_thresholds):
            raise ValueError("cannot merge statistics of different models or thresholds")
        if other.num_images == 0:
            return
        if self.num_patches_per_image not in (None, other.num_patches_per_image):
            raise ValueError("cannot merge statistics of different patch grids")
        for name in self._SUMMED:
            getattr(self, name).add_(getattr(other, name))
        for name in self._MAXED:
            setattr(self, name, torch.maximum(getattr(self, name), getattr(other, name)))
        self.num_images += other.num_images
        self.num_patches_per_image = other.num_patches_per_image

    def tensors(self) -> dict[str, torch.Tensor]:
        """All accumulated state as named tensors (for ``torch.distributed`` all-reduce)."""
        return {n: getattr(self, n) for n in self._SUMMED + self._MAXED}

    # ------------------------------------------------------------------ queries
    @property
    def num_patch_tokens(self) -> int:
        return int(self.patch_tokens)

    def median(self, row: int) -> float:
        return quantile_from_counts(self.patch_counts[row], 0.5)

    def quantile(self, row: int, q: float) -> float:
        return quantile_from_counts(self.patch_counts[row], q)

    def mean(self, row: int) -> float:
        n = self.num_patch_tokens
        return float(self.patch_sum[row]) / n if n else float("nan")

    def tokens_above_bin(self, row: int, edge_index: int) -> int:
        """Patch tokens whose norm falls in bins ``>= edge_index`` (exact for a threshold on that bin edge)."""
        return int(self.patch_counts[row, edge_index:].sum())

    def images_above_bin(self, row: int, edge_index: int) -> int:
        return int(self.image_max_counts[row, edge_index:].sum())

    def fixed_hits(self, row: int, threshold: float) -> tuple[int, int]:
        """Exact (tokens, images) above a threshold that was declared up front."""
        j = self.fixed_thresholds.index(float(threshold))
        return int(self.fixed_token_hits[row, j]), int(self.fixed_image_hits[row, j])

    def prefix_stats(self, row: int) -> list[PrefixTokenStats]:
        n = self.num_images
        out = []
        for p, name in enumerate(self.prefix_names):
            mean = float(self.prefix_sum[row, p]) / n if n else float("nan")
            var = float(self.prefix_sumsq[row, p]) / n - mean**2 if n else float("nan")
            out.append(PrefixTokenStats(name, mean, math.sqrt(max(var, 0.0)), float(self.prefix_max[row, p])))
        return out
