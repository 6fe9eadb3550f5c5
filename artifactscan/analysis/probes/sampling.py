"""Reaching the probed block (early exit) and sampling its tokens: bounded, stratified, deterministic reservoirs.

Every random choice is keyed by (seed, image index, token index), so the sample -- merged across ``torchrun`` ranks
-- is that of a single process."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

from artifactscan.core.blocks import parse_block
from artifactscan.core.numerics import measurement_mode
from artifactscan.core.errors import InputError, option
from artifactscan.core.patch_grid import neighbour_similarity
from artifactscan.models.hooks import CaptureContext, block_point
from artifactscan.models.loading import LoadedModel
from artifactscan.analysis.passes import PATCH_EMBED, Batch, OpenedPass, block_output, require_finite
from artifactscan.core.stats import NUM_BINS, bin_index
from artifactscan.analysis.probes.types import (
    BAND_BINS,
    BAND_CAPACITY,
    RANDOM_TOKENS_PER_IMAGE,
    SIM_BINS,
    TOKENS_PER_IMAGE,
    TOP_TOKENS_PER_IMAGE,
)
from artifactscan.core.distributed import gather

_M32 = 0xFFFFFFFF
#: Streams of the deterministic keys (one per kind of random choice).
STREAM_TOKEN, STREAM_IMAGE, STREAM_RAND_POS, STREAM_MATCHED, STREAM_DRAW_TOKEN, STREAM_DRAW_SPLIT = range(1, 7)


def resolve_layer(layer: int, num_blocks: int, hint: str = "") -> int:
    """Deprecated (kept one version for ``artifactscan.probes.resolve_layer``): use
    :func:`artifactscan.core.blocks.parse_block`, the one parser of block indices."""
    warnings.warn("resolve_layer is deprecated; use artifactscan.core.blocks.parse_block", DeprecationWarning,
                  stacklevel=2)
    return parse_block(layer, num_blocks, hint)


class LayerTap(CaptureContext):
    """Run a ViT only up to block ``k``: returns that block's output tokens ``[B, T, D]`` and the patch-embedding
    output ``[B, N, D]`` (before the position embedding). The capture layer stops the forward once both are taken,
    so blocks after ``k`` never run; all hooks are removed on exit."""

    def __init__(self, loaded: LoadedModel, layer: int):
        self.layer = layer
        self.names = [block_point(layer, "resid_post"), "patch_embed.post"]
        super().__init__(loaded, self.names, stop_early=True)

    @measurement_mode()
    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        captured = self.forward_captured(x)
        out, pe = (captured[n] for n in self.names)
        if out.dim() != 3:
            raise InputError(f"block {self.layer} did not produce tokens shaped [batch, tokens, channels] during "
                             "forward_features; this model's blocks cannot be probed")
        return out, pe


def patchify(x: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/ph)*(W/pw), C*ph*pw]``, row-major patches, channel-major pixels (conv layout)."""
    B, C, H, W = x.shape
    ph, pw = patch
    t = x.unfold(2, ph, ph).unfold(3, pw, pw)  # B C gh gw ph pw
    gh, gw = t.shape[2], t.shape[3]
    return t.permute(0, 2, 3, 1, 4, 5).reshape(B, gh * gw, C * ph * pw)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (int64 tensors holding values in [0, 2^32); products stay below 2^63)."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    return (x >> 16) ^ x


def hash_keys(seed: int, stream: int, img: torch.Tensor, pos: torch.Tensor | int = 0) -> torch.Tensor:
    """Uniform keys in [0, 1) (float64, 53 bits) that depend only on (seed, stream, image index, token index).

    Every sampling decision uses these instead of a running generator, so it does not depend on batching or on how
    the images are sharded across torchrun ranks: the bottom-k of the union of the shards' samples is the bottom-k of
    the whole stream."""
    img = torch.as_tensor(img, dtype=torch.int64)
    pos = torch.as_tensor(pos, dtype=torch.int64)
    h = _mix32(torch.tensor([(seed & _M32) ^ (stream * 0x9E3779B9 & _M32)], dtype=torch.int64))
    h = _mix32(h ^ ((seed >> 32) & _M32))
    h = _mix32(h ^ (img & _M32))
    h = _mix32(h ^ ((img >> 32) & _M32))
    h1 = _mix32(h ^ (pos & _M32))
    h2 = _mix32(h1 ^ 0x85EBCA6B)
    return ((h1 << 21) | (h2 >> 11)).double() / float(2 ** 53)


def canonical_order(rec: dict[str, torch.Tensor]) -> torch.Tensor:
    """Row order by (key, image, token position): a total order, so bottom-k never depends on the input order."""
    order = torch.arange(len(rec["key"]))
    cols = [rec["key"], rec["img"]] + ([rec["pos"]] if "pos" in rec else [])
    for col in reversed(cols):
        order = order[torch.argsort(col[order], stable=True)]
    return order


class Reservoir:
    """Bottom-k sample (smallest deterministic keys, see :func:`hash_keys`) of token records, capacity ``cap``."""

    def __init__(self, cap: int):
        self.cap = cap
        self.parts: dict[str, torch.Tensor] | None = None

    def add(self, rec: dict[str, torch.Tensor]) -> None:
        if self.parts is not None:
            rec = {k: torch.cat([self.parts[k], v]) for k, v in rec.items()}
        if len(rec["key"]) > self.cap:
            keep = canonical_order(rec)[: self.cap]
            rec = {k: v[keep] for k, v in rec.items()}
        self.parts = rec

    def finish(self) -> None:
        """Sort the rows canonically (same order whatever the batching or sharding)."""
        if self.parts is not None:
            order = canonical_order(self.parts)
            self.parts = {k: v[order] for k, v in self.parts.items()}


ImageStore = Reservoir


@dataclass
class Collected:
    counts: torch.Tensor           # [2 splits, levels] exact token counts
    capped: torch.Tensor           # [2, levels] tokens offered to the reservoirs (after the per-image cap)
    sim_hist: torch.Tensor         # [levels, SIM_BINS]
    image_max_counts: torch.Tensor  # [levels] histogram of each image's largest patch level
    reservoirs: dict[tuple[int, int], Reservoir]
    images: ImageStore | None
    num_images: int
    skipped: list[tuple[int, str]]
    has_pe: bool


def level_fn(fixed: float | None) -> tuple[Callable[[torch.Tensor], torch.Tensor], int, int]:
    """Map norms to integer levels (outlier iff level >= edge, decided later) and levels to reservoir bands."""
    if fixed is not None:
        return (lambda n: (n.double() > fixed).long()), 2, 1
    return bin_index, NUM_BINS, BAND_BINS


class TokenSampler:
    """The measurement of a probe: block ``layer``'s patch tokens, batch by batch, into exact level counts per
    split (train/test), the neighbour-similarity histogram, the stratified reservoirs of the local probes and, with
    ``labels``, the per-image candidates of the global probe (module doc). Only blocks ``0..layer`` run."""

    def __init__(self, loaded: LoadedModel, layer: int, fixed: float | None, test_mask: torch.Tensor,
                 labels: torch.Tensor | None, seed: int, max_global_images: int):
        self.loaded, self.layer, self.test_mask, self.labels, self.seed = loaded, layer, test_mask, labels, seed
        self.level_of, self.n_levels, self.band_bins = level_fn(fixed)
        self.counts = torch.zeros(2, self.n_levels, dtype=torch.int64)
        self.capped = torch.zeros(2, self.n_levels, dtype=torch.int64)
        self.sim_hist = torch.zeros(self.n_levels, SIM_BINS, dtype=torch.int64)
        self.image_max_counts = torch.zeros(self.n_levels, dtype=torch.int64)
        self.reservoirs: dict[tuple[int, int], Reservoir] = {}
        self.images = ImageStore(max_global_images) if labels is not None else None
        self.seen = 0
        self.has_pe = True

    def hook_names(self) -> dict[str, Any]:
        return {block_output(self.layer): None, PATCH_EMBED: None}

    def stop_after(self) -> int:
        return self.layer

    def _tokens(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The probed block's tokens ``[B, T, D]`` (float32, on the CPU, finite) and the patch embedding
        ``[B, N, D]``."""
        tokens, pe = batch.captured[block_output(self.layer)], batch.captured.get(PATCH_EMBED)
        if tokens.dim() != 3:
            raise InputError(f"block {self.layer} did not produce tokens shaped [batch, tokens, channels] during "
                             "forward_features; this model's blocks cannot be probed")
        P, (gh, gw) = self.loaded.num_prefix_tokens, self.loaded.grid_size
        if tokens.shape[1] != P + gh * gw:
            raise InputError(f"model produced {tokens.shape[1]} tokens at block {self.layer}, expected {P} prefix + "
                             f"{gh}x{gw} patches; pass {option('img_size')} to match the model")
        tokens = tokens.float().cpu()
        require_finite(tokens, f"block {self.layer} produced non-finite token values (NaN/Inf); probes of them "
                               "would mean nothing (artifactscan norms --allow-nonfinite shows where they start)")
        return tokens, None if pe is None else pe.reshape(pe.shape[0], -1, pe.shape[-1])

    def on_batch(self, batch: Batch) -> None:
        tokens, pe = self._tokens(batch)
        indices = batch.indices
        gh, gw = self.loaded.grid_size
        B, N = tokens.shape[0], gh * gw
        patches = tokens[:, self.loaded.num_prefix_tokens:]
        norms = torch.linalg.vector_norm(patches, dim=-1)
        levels = self.level_of(norms)  # [B, N]
        split = self.test_mask[indices].long()  # 1 = test
        flat_split = split[:, None].expand(B, N).reshape(-1)
        self.counts.index_put_((flat_split, levels.reshape(-1)), torch.ones(B * N, dtype=torch.int64),
                               accumulate=True)
        sims = self._neighbours(pe, levels)
        self.image_max_counts += torch.bincount(levels.amax(1), minlength=self.n_levels)
        pix = patchify(batch.images.float(), self.loaded.patch_size).cpu()
        self._offer_local(indices, split, levels, patches, pix, sims)
        if self.images is not None:
            self._offer_global(indices, tokens, patches, norms, levels)
        self.seen += B

    def _neighbours(self, pe: torch.Tensor | None, levels: torch.Tensor) -> torch.Tensor:
        """Each patch's mean similarity to its neighbours ``[B, N]`` (NaN without a patch embedding per patch),
        counted in the histogram of its level."""
        B, N = levels.shape
        if pe is None or pe.shape[1] != N:
            self.has_pe = False
            return torch.full((B, N), float("nan"))
        sims = neighbour_similarity(pe, self.loaded.grid_size).cpu()
        sbin = ((sims.clamp(-1, 1) + 1) / 2 * SIM_BINS).long().clamp_(0, SIM_BINS - 1)
        self.sim_hist.index_put_((levels.reshape(-1), sbin.reshape(-1)), torch.ones(B * N, dtype=torch.int64),
                                 accumulate=True)
        return sims

    def _offer_local(self, indices: torch.Tensor, split: torch.Tensor, levels: torch.Tensor, patches: torch.Tensor,
                     pix: torch.Tensor, sims: torch.Tensor) -> None:
        """Local reservoirs: a per-image cap per band, then bottom-k per (split, band); the keys depend only on
        (seed, image index, token index), so neither batching nor torchrun sharding changes the sample."""
        B, N = levels.shape
        band = levels // self.band_bins
        key = hash_keys(self.seed, STREAM_TOKEN, indices[:, None], torch.arange(N)[None, :])
        n_bands = (self.n_levels + self.band_bins - 1) // self.band_bins
        group = (torch.arange(B)[:, None] * n_bands + band).reshape(-1)
        order = torch.argsort(key.reshape(-1), stable=True)  # ties (never in practice): token order
        order = order[torch.argsort(group[order], stable=True)]
        g_sorted = group[order]
        first = torch.searchsorted(g_sorted, g_sorted, right=False)
        rank = torch.arange(B * N) - first
        chosen = order[rank < TOKENS_PER_IMAGE]
        b_idx, p_idx = chosen // N, chosen % N
        lv = levels[b_idx, p_idx]
        self.capped.index_put_((split[b_idx], lv), torch.ones(len(chosen), dtype=torch.int64), accumulate=True)
        sel_split, sel_band = split[b_idx], band[b_idx, p_idx]
        for s, bd in torch.unique(torch.stack([sel_split, sel_band], 1), dim=0).tolist():
            m = (sel_split == s) & (sel_band == bd)
            bi, pi = b_idx[m], p_idx[m]
            cap = BAND_CAPACITY["test" if s else "train"]
            res = self.reservoirs.setdefault((s, bd), Reservoir(cap))
            res.add({"key": key[bi, pi], "feat": patches[bi, pi].clone(), "pix": pix[bi, pi].clone(),
                     "pos": pi.clone(), "img": indices[bi].clone(), "level": levels[bi, pi].clone(),
                     "sim": sims[bi, pi].clone()})

    def _offer_global(self, indices: torch.Tensor, tokens: torch.Tensor, patches: torch.Tensor, norms: torch.Tensor,
                      levels: torch.Tensor) -> None:
        """Per-image candidates for the global probe: random and top-norm patch tokens, the CLS and registers."""
        B, N = levels.shape
        R = min(RANDOM_TOKENS_PER_IMAGE, N)
        K = min(TOP_TOKENS_PER_IMAGE, N)
        rand_pos = torch.argsort(hash_keys(self.seed, STREAM_RAND_POS, indices[:, None], torch.arange(N)[None, :]),
                                 dim=1, stable=True)[:, :R]
        top_pos = torch.topk(norms, K, dim=1).indices
        rows = torch.arange(B)[:, None]
        rec = {"key": hash_keys(self.seed, STREAM_IMAGE, indices), "img": indices.clone(),
               "label": self.labels[indices],  # type: ignore[index]
               "rand": patches[rows, rand_pos].clone(), "rand_level": levels[rows, rand_pos].clone(),
               "top": patches[rows, top_pos].clone(), "top_level": levels[rows, top_pos].clone()}
        if self.loaded.num_cls_tokens:
            rec["cls"] = tokens[:, 0].clone()
        if self.loaded.num_register_tokens:
            c = self.loaded.num_cls_tokens
            rec["reg"] = tokens[:, c:c + self.loaded.num_register_tokens].mean(1)
        self.images.add(rec)  # type: ignore[union-attr]

    def finish(self) -> "Collected":
        return Collected(self.counts, self.capped, self.sim_hist, self.image_max_counts, self.reservoirs,
                         self.images, self.seen, [], self.has_pe)


def collect_tokens(opened: OpenedPass, layer: int, fixed: float | None, test_mask: torch.Tensor,
                   labels: torch.Tensor | None, seed: int, max_global_images: int) -> Collected:
    """One pass of a :class:`TokenSampler` over ``opened``'s images (this rank's shard), merged across ranks,
    with the reservoirs in canonical order."""
    sampler = TokenSampler(opened.loaded, layer, fixed, test_mask, labels, seed, max_global_images)
    col, = opened.run([sampler], f"probing block {layer}")
    col.skipped = list(opened.skipped)
    if opened.world > 1:
        merge_collected(col, opened.device)
    for res in col.reservoirs.values():
        res.finish()
    if col.images is not None:
        col.images.finish()
    return col


def merge_collected(col: Collected, dev: torch.device) -> None:
    """torchrun: every rank ends with the statistics and samples of all images, as if one process had seen them.

    Histograms and counts add (all-reduce); each bounded sample is the bottom-k (by deterministic key) of its shard,
    so the bottom-k of the union of all ranks' samples is exactly the bottom-k of the whole stream."""
    import torch.distributed as dist

    comm = dev if dist.get_backend() == "nccl" else torch.device("cpu")
    flags = torch.tensor([col.num_images, 0 if col.has_pe else 1], dtype=torch.int64)
    for t in (col.counts, col.capped, col.sim_hist, col.image_max_counts, flags):
        c = t.to(comm)
        dist.all_reduce(c, op=dist.ReduceOp.SUM)
        t.copy_(c.cpu())
    col.num_images, col.has_pe = int(flags[0]), int(flags[1]) == 0
    col.skipped = sorted(s for part in gather(col.skipped) for s in part)
    parts = gather(({k: r.parts for k, r in col.reservoirs.items()},
                     None if col.images is None else col.images.parts))
    merged: dict[tuple[int, int], Reservoir] = {}
    for res_parts, _ in parts:
        for k, rec in res_parts.items():
            if rec is not None:
                merged.setdefault(k, Reservoir(BAND_CAPACITY["test" if k[0] else "train"])).add(rec)
    col.reservoirs = dict(sorted(merged.items()))
    if col.images is not None:
        store = ImageStore(col.images.cap)
        for _, img_parts in parts:
            if img_parts is not None:
                store.add(img_parts)
        col.images = store


def class_sample(col: Collected, split: int, is_out: Callable[[torch.Tensor], torch.Tensor], outlier: bool,
                  limit: int) -> dict[str, torch.Tensor] | None:
    """A uniform sample of one class (normal / outlier) in one split, from the band reservoirs (see module doc).

    The reservoirs' rows are in canonical (key) order, so the bottom-k of a band is its first k rows."""
    parts, rates = [], []
    level_ids = torch.arange(col.capped.shape[1])
    cls_levels = is_out(level_ids) if outlier else ~is_out(level_ids)
    total = int(col.capped[split, cls_levels].sum())
    if total == 0:
        return None
    bands = [(bd, res) for (s, bd), res in sorted(col.reservoirs.items()) if s == split and res.parts is not None]
    for bd, res in bands:
        rec = res.parts
        m = is_out(rec["level"]) if outlier else ~is_out(rec["level"])
        levels_in_band = rec["level"][m]
        if not len(levels_in_band):
            continue
        # population of this band within the class (capped counts), exact
        band_levels = cls_levels & (level_ids // band_bins(col) == bd)
        n_pop = int(col.capped[split, band_levels].sum())
        taken = int(m.sum())
        parts.append((n_pop, {k: v[m] for k, v in rec.items()}))
        if taken >= min(20, n_pop):
            rates.append(taken / n_pop)
    if not parts:
        return None
    rate = min(min(rates) if rates else 1.0, limit / total)
    out: dict[str, list[torch.Tensor]] = {}
    for n_pop, rec in parts:
        k = min(len(rec["key"]), max(1, round(rate * n_pop)) if rate * n_pop >= 0.5 else 0)
        if k == 0:
            continue
        for name, v in rec.items():
            out.setdefault(name, []).append(v[:k])
    if not out:
        return None
    return {k: torch.cat(v) for k, v in out.items()}


def band_bins(col: Collected) -> int:
    return 1 if col.capped.shape[1] == 2 else BAND_BINS
