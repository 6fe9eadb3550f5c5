"""``probe()``: do the flagged high-norm tokens behave like the paper's artifacts, or like content?

Darcet et al. (2024) show that artifact tokens (Sec. 2.2) sit on *redundant* patches (Fig. 5a), have *lost their
local information* (position and pixels, Fig. 5b) and *hold global information* (Table 1). A norm rule alone also
flags content tokens (saturated object patches reach 5-7x the median norm in small trained ViTs), so this module
measures those signatures at one layer and calls the flagged tokens artifact-like, content-like or inconclusive.
The exact protocol is :data:`PROTOCOL` (also in ``artifactscan probe --help``, the README and every report).

Streaming and memory: the model runs once over the data, only up to the probed block (early exit). Tokens go into
bounded, stratified reservoirs (per split x log-norm band, with a per-image cap); the class of a token (normal /
outlier) is decided at the end, from the same exact histogram and threshold rule as ``artifactscan norms``, and each
class is then re-sampled in proportion to the exact band counts, so it is a uniform sample of that class. Memory does
not grow with the number of images. Every random choice is keyed by (seed, image index, token index), so under
``torchrun`` each rank probes its shard of the images and the merged histograms and samples -- hence the report -- are
those of a single process. Probes are closed-form ridge fits (torch, on the GPU when present) with the
penalty chosen on a held-out part of the training images.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset

from . import __version__
from .errors import InputError
from .images import SkippedImage, image_folder_labels
from .loading import LoadedModel, load_model
from .scan import (ImageSummary, ModelSummary, _batches, _model_summary, _Progress, distributed_world,
                   make_image_source, resolve_device)
from .stats import BIN_WIDTH_LOG10, NUM_BINS, bin_index
from .thresholds import AutoRule, auto_threshold, fixed_threshold, parse_threshold
from .report import JsonResult

SCHEMA = "artifactscan.probe/1"

#: Fewer held-out outlier (or normal) tokens than this and a local-probe row says "too few (n=...)".
MIN_LOCAL_TOKENS = 50
#: Fewer images than this with the token type and a global-probe row says "too few (n=...)".
MIN_GLOBAL_IMAGES = 50
#: Images of the built-in labelled synthetic set used when no DATA is given.
DEFAULT_PROBE_IMAGES = 2000
#: The image split needs at least this many images (2 to fit, 1 to choose the ridge penalty, 1 to test).
MIN_IMAGES = 4
#: Fraction of images held out for testing (by image, never by token).
TEST_FRACTION = 0.25
#: Random draws of the global probe (token choice + image split), reported as mean +- std.
GLOBAL_DRAWS = 5
#: Cap on the tokens of one class used to fit (train) and test (test) the local probes.
MAX_TRAIN_TOKENS = 20_000
MAX_TEST_TOKENS = 5_000
#: Reservoir capacity per (split, log-norm band), and per image per band (spreads the sample over images).
BAND_CAPACITY = {"train": 6_144, "test": 2_048}
TOKENS_PER_IMAGE = 16
#: Width of a reservoir band in histogram bins (80 bins = 0.2 decades of norm).
BAND_BINS = 80
#: Images kept (uniform reservoir) for the global probe, and candidate tokens stored per image.
MAX_GLOBAL_IMAGES = 5_000
RANDOM_TOKENS_PER_IMAGE = 4
TOP_TOKENS_PER_IMAGE = 8
#: Ridge penalties, as multiples of the mean eigenvalue of X^T X (chosen on held-out training images).
RIDGE_GRID = (1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # x the mean eigenvalue of X^T X
#: Verdict margins (see PROTOCOL).
REDUNDANCY_MARGIN = 0.02
POSITION_RATIO = 0.75
POSITION_MIN_DROP = 0.05
RECONSTRUCTION_RATIO = 1.5
RECONSTRUCTION_MIN_RISE = 0.05
SIM_BINS = 200

PROTOCOL = f"""\
Probed layer: the residual-stream output of block k (0-based like timm; -1 = last block), before the final norm;
the model runs only up to block k. Tokens: patch tokens are split into normal and outlier by the same rule as
`artifactscan norms` at that layer (--threshold auto: adaptive bimodal rule on the exact log-norm histogram, outlier
iff its histogram bin >= the threshold's bin edge; a number: outlier iff norm > number). Images are split by image
into train ({1 - TEST_FRACTION:.0%}) and held-out test ({TEST_FRACTION:.0%}); within train, 20% of images choose the
ridge penalty from a small grid. Tokens are sampled uniformly per class (stratified reservoirs over log-norm bands,
at most {TOKENS_PER_IMAGE} per image per band, re-sampled in proportion to the exact counts; at most
{MAX_TRAIN_TOKENS} train / {MAX_TEST_TOKENS} test tokens per class). Features are standardised on the train tokens.
All probes are closed-form ridge (multi-output regression; classification = one-vs-rest ridge on one-hot targets,
argmax).
1. Position (Fig 5b): classifier from a patch token to its grid index. Reported on held-out images: top-1 accuracy,
   chance (most frequent train position), mean Euclidean distance in patch units between predicted and true cell.
2. Reconstruction (Fig 5b): regression from a patch token to the pixels of its own patch (patchified like the
   patch embedding, channel-major, in the model's normalised input space). Reported: mean squared error per pixel
   value (L2), and the fraction of variance unexplained (FVU = error / variance of the targets).
   Probes 1-2 are fitted per token class (a probe trained on outliers reads outliers), so the outlier row is compared
   with 'normal (n-matched)': the same probe trained on as many normal tokens as there are outlier tokens.
3. Global (Table 1): per image one random normal patch token, one random outlier token (images without outliers
   left out of that row; with more than {TOP_TOKENS_PER_IMAGE} outliers the draw is among its {TOP_TOKENS_PER_IMAGE} largest), the CLS token
   when the model has one, the mean of the register tokens when it has some. One linear classifier per token type
   on the image labels (ImageFolder sub-folders, or the synthetic set's labels); top-1 on held-out images, mean +- std
   over {GLOBAL_DRAWS} draws (each redraws the tokens and the image split).
4. Neighbour similarity (Fig 5a): cosine similarity of each patch's input embedding (patch-embedding output, before
   the position embedding) with its 4-neighbours (mean over the neighbours inside the grid); exact histograms over
   all tokens, normal vs outlier, and their medians.
5. Verdict: outliers are 'redundant' if their median neighbour similarity exceeds the normal one by
   > {REDUNDANCY_MARGIN}; they 'lost local information' if position top-1 <= {POSITION_RATIO} x the n-matched normal one
   (and >= {POSITION_MIN_DROP:.2f} lower) or reconstruction FVU >= {RECONSTRUCTION_RATIO} x the normal one (and >= {RECONSTRUCTION_MIN_RISE:.2f} higher).
   redundant AND lost -> 'artifact-like'; local information kept on both probes -> 'content-like' (a high norm alone
   is not an artifact); fewer than the minimum held-out outlier tokens (default {MIN_LOCAL_TOKENS}) or mixed signals ->
   'inconclusive'; no outliers -> 'clean' (a valid finding: probes still run on normal tokens and CLS).
Rows with fewer than the minimum tokens (local: {MIN_LOCAL_TOKENS} held-out tokens; global: {MIN_GLOBAL_IMAGES} images)
say 'too few (n=...)' instead of a number."""


# ----------------------------------------------------------------------------------------------- result types
@dataclass
class TokenTypeRow:
    """One row of the table (``normal``, ``normal (n-matched)``, ``outlier``, ``cls``, ``registers``).

    Local metrics are ``None`` where they do not apply (prefix tokens) or where there were too few tokens; the
    ``*_status`` fields then say why (``"ok"``, ``"too few (n=12)"``, ``"n/a"``, ``"skipped: ..."``).
    """

    name: str
    tokens_total: int | None = None
    local_train_tokens: int = 0
    local_test_tokens: int = 0
    local_status: str = "n/a"
    position_top1: float | None = None
    position_chance: float | None = None
    position_distance: float | None = None
    reconstruction_l2: float | None = None
    reconstruction_fvu: float | None = None
    neighbour_tokens: int = 0
    neighbour_similarity_median: float | None = None
    global_images: int = 0
    global_status: str = "n/a"
    global_top1: float | None = None
    global_top1_std: float | None = None
    global_chance: float | None = None


@dataclass
class NeighbourHistogram:
    """Exact histograms of the 4-neighbour cosine similarity of input patch embeddings, over ``[-1, 1]``."""

    edges: list[float]
    normal: list[int]
    outlier: list[int]
    normal_median: float | None
    outlier_median: float | None
    available: bool = True


@dataclass
class Verdict:
    """``label`` is ``artifact-like`` / ``content-like`` / ``inconclusive`` / ``clean``; ``reasons`` say why."""

    label: str
    summary: str
    reasons: list[str]
    numbers: dict[str, float | None] = field(default_factory=dict)


@dataclass
class LabelInfo:
    source: str
    num_classes: int
    class_names: list[str]
    global_probe: bool
    message: str


@dataclass
class ProbeReport(JsonResult):
    """Everything ``artifactscan probe`` found (serialises with :func:`artifactscan.report.to_jsonable`)."""

    model: ModelSummary
    images: ImageSummary
    layer: int
    layer_requested: int
    num_blocks: int
    layer_description: str
    threshold_mode: str
    threshold: float | None
    threshold_reason: str
    num_patch_tokens: int
    num_outliers: int
    outlier_fraction: float
    images_with_outliers: int
    rows: list[TokenTypeRow]
    neighbours: NeighbourHistogram
    labels: LabelInfo
    verdict: Verdict
    settings: dict[str, Any]
    protocol: str
    notes: list[str]
    schema: str = SCHEMA
    artifactscan_version: str = __version__

    def row(self, name: str) -> TokenTypeRow | None:
        return next((r for r in self.rows if r.name == name), None)



# ----------------------------------------------------------------------------------------------- early exit
class _StopForward(Exception):
    pass


def resolve_layer(layer: int, num_blocks: int) -> int:
    """0-based block index for ``layer`` (negative counts from the end); InputError with the valid range."""
    if not -num_blocks <= layer < num_blocks:
        raise InputError(f"--layer {layer} is out of range: this model has {num_blocks} blocks; use 0..{num_blocks - 1} "
                         f"or -{num_blocks}..-1 (-1 = last block)")
    return layer % num_blocks


class LayerTap:
    """Run a ViT only up to block ``k``: returns that block's output tokens ``[B, T, D]`` and the patch-embedding
    output ``[B, N, D]`` (before the position embedding). A forward hook on block ``k`` stores its output and stops
    the forward, so blocks after ``k`` never run; all hooks are removed on exit."""

    def __init__(self, loaded: LoadedModel, layer: int):
        self.loaded = loaded
        self.layer = layer
        self._out: torch.Tensor | None = None
        self._pe: torch.Tensor | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> "LayerTap":
        model = self.loaded.model

        def grab_block(module: Any, inputs: Any, output: Any) -> None:
            tokens = output[0] if isinstance(output, (tuple, list)) else output
            self._out = tokens.detach()
            raise _StopForward

        def grab_pe(module: Any, inputs: Any, output: Any) -> None:
            pe = output[0] if isinstance(output, (tuple, list)) else output
            self._pe = pe.detach()

        self._handles.append(self.loaded.blocks[self.layer].register_forward_hook(grab_block))
        self._handles.append(model.patch_embed.register_forward_hook(grab_pe))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @torch.inference_mode()
    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        self._out = self._pe = None
        try:
            self.loaded.model.forward_features(x)
        except _StopForward:
            pass
        if self._out is None or self._out.dim() != 3:
            raise InputError(f"block {self.layer} did not produce tokens shaped [batch, tokens, channels] during "
                             "forward_features; this model's blocks cannot be probed")
        pe = self._pe
        if pe is not None:
            pe = pe.reshape(pe.shape[0], -1, pe.shape[-1])
        return self._out, pe


def patchify(x: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/ph)*(W/pw), C*ph*pw]``, row-major patches, channel-major pixels (conv layout)."""
    B, C, H, W = x.shape
    ph, pw = patch
    t = x.unfold(2, ph, ph).unfold(3, pw, pw)  # B C gh gw ph pw
    gh, gw = t.shape[2], t.shape[3]
    return t.permute(0, 2, 3, 1, 4, 5).reshape(B, gh * gw, C * ph * pw)


def neighbour_similarity(pe: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Mean cosine similarity of each patch embedding with its 4-neighbours inside the grid: ``[B, N]``."""
    B, N, D = pe.shape
    gh, gw = grid
    e = torch.nn.functional.normalize(pe.float(), dim=-1).reshape(B, gh, gw, D)
    total = torch.zeros(B, gh, gw, device=pe.device)
    count = torch.zeros(1, gh, gw, device=pe.device)
    h = (e[:, :, 1:] * e[:, :, :-1]).sum(-1)
    v = (e[:, 1:] * e[:, :-1]).sum(-1)
    total[:, :, 1:] += h
    total[:, :, :-1] += h
    total[:, 1:] += v
    total[:, :-1] += v
    count[:, :, 1:] += 1
    count[:, :, :-1] += 1
    count[:, 1:] += 1
    count[:, :-1] += 1
    return (total / count.clamp_min(1)).reshape(B, N)


# ----------------------------------------------------------------------------------------------- streaming sample
_M32 = 0xFFFFFFFF
#: Streams of the deterministic keys (one per kind of random choice).
_S_TOKEN, _S_IMAGE, _S_RAND_POS, _S_MATCHED, _S_DRAW_TOKEN, _S_DRAW_SPLIT = range(1, 7)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (int64 tensors holding values in [0, 2^32); products stay below 2^63)."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    return (x >> 16) ^ x


def _hash_keys(seed: int, stream: int, img: torch.Tensor, pos: torch.Tensor | int = 0) -> torch.Tensor:
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


def _canonical_order(rec: dict[str, torch.Tensor]) -> torch.Tensor:
    """Row order by (key, image, token position): a total order, so bottom-k never depends on the input order."""
    order = torch.arange(len(rec["key"]))
    cols = [rec["key"], rec["img"]] + ([rec["pos"]] if "pos" in rec else [])
    for col in reversed(cols):
        order = order[torch.argsort(col[order], stable=True)]
    return order


class _Reservoir:
    """Bottom-k sample (smallest deterministic keys, see :func:`_hash_keys`) of token records, capacity ``cap``."""

    def __init__(self, cap: int):
        self.cap = cap
        self.parts: dict[str, torch.Tensor] | None = None

    def add(self, rec: dict[str, torch.Tensor]) -> None:
        if self.parts is not None:
            rec = {k: torch.cat([self.parts[k], v]) for k, v in rec.items()}
        if len(rec["key"]) > self.cap:
            keep = _canonical_order(rec)[: self.cap]
            rec = {k: v[keep] for k, v in rec.items()}
        self.parts = rec

    def finish(self) -> None:
        """Sort the rows canonically (same order whatever the batching or sharding)."""
        if self.parts is not None:
            order = _canonical_order(self.parts)
            self.parts = {k: v[order] for k, v in self.parts.items()}


#: Per-image candidates for the global probe: a uniform reservoir of at most ``cap`` images.
_ImageStore = _Reservoir


@dataclass
class _Collected:
    counts: torch.Tensor           # [2 splits, levels] exact token counts
    capped: torch.Tensor           # [2, levels] tokens offered to the reservoirs (after the per-image cap)
    sim_hist: torch.Tensor         # [levels, SIM_BINS]
    image_max_counts: torch.Tensor  # [levels] histogram of each image's largest patch level
    reservoirs: dict[tuple[int, int], _Reservoir]
    images: _ImageStore | None
    num_images: int
    skipped: list[tuple[int, str]]
    has_pe: bool


def _level_fn(fixed: float | None) -> tuple[Callable[[torch.Tensor], torch.Tensor], int, int]:
    """Map norms to integer levels (outlier iff level >= edge, decided later) and levels to reservoir bands."""
    if fixed is not None:
        return (lambda n: (n.double() > fixed).long()), 2, 1
    return bin_index, NUM_BINS, BAND_BINS


def _collect(loaded: LoadedModel, source: Any, layer: int, dev: torch.device, fixed: float | None,
             test_mask: torch.Tensor, labels: torch.Tensor | None, batch_size: int, num_workers: int,
             seed: int, progress: bool, max_global_images: int, world: int = 1) -> _Collected:
    P = loaded.num_prefix_tokens
    gh, gw = loaded.grid_size
    N = gh * gw
    level_of, n_levels, band_bins = _level_fn(fixed)
    counts = torch.zeros(2, n_levels, dtype=torch.int64)
    capped = torch.zeros(2, n_levels, dtype=torch.int64)
    sim_hist = torch.zeros(n_levels, SIM_BINS, dtype=torch.int64)
    reservoirs: dict[tuple[int, int], _Reservoir] = {}
    images = _ImageStore(max_global_images) if labels is not None else None
    image_max_counts = torch.zeros(n_levels, dtype=torch.int64)
    skipped: list[tuple[int, str]] = []
    seen = 0
    has_pe = True
    with LayerTap(loaded, layer) as tap, _Progress(progress, source.num_found, f"probing block {layer}") as bar:
        for x, indices, bad in _batches(source, batch_size, num_workers):
            skipped.extend(bad)
            bar.advance(len(indices) + len(bad))
            if x is None:
                continue
            x = x.to(dev, non_blocking=True)
            tokens, pe = tap.run(x)
            if tokens.shape[1] != P + N:
                raise InputError(f"model produced {tokens.shape[1]} tokens at block {layer}, expected {P} prefix + "
                                 f"{gh}x{gw} patches; pass --img-size to match the model")
            tokens = tokens.float().cpu()
            B, _, D = tokens.shape
            patches = tokens[:, P:]
            norms = torch.linalg.vector_norm(patches, dim=-1)
            levels = level_of(norms)  # [B, N]
            split = test_mask[indices].long()  # 1 = test
            flat_split = split[:, None].expand(B, N).reshape(-1)
            counts.index_put_((flat_split, levels.reshape(-1)), torch.ones(B * N, dtype=torch.int64), accumulate=True)
            if pe is not None and pe.shape[1] == N:
                sims = neighbour_similarity(pe, (gh, gw)).cpu()
                sbin = ((sims.clamp(-1, 1) + 1) / 2 * SIM_BINS).long().clamp_(0, SIM_BINS - 1)
                sim_hist.index_put_((levels.reshape(-1), sbin.reshape(-1)), torch.ones(B * N, dtype=torch.int64),
                                    accumulate=True)
            else:
                has_pe = False
                sims = torch.full((B, N), float("nan"))
            image_max_counts += torch.bincount(levels.amax(1), minlength=n_levels)
            pix = patchify(x.float(), loaded.patch_size).cpu()
            # --- local reservoirs: per-image cap per band, then bottom-k per (split, band); the keys depend only
            # on (seed, image index, token index), so neither batching nor torchrun sharding changes the sample
            band = levels // band_bins
            key = _hash_keys(seed, _S_TOKEN, indices[:, None], torch.arange(N)[None, :])
            n_bands = (n_levels + band_bins - 1) // band_bins
            group = (torch.arange(B)[:, None] * n_bands + band).reshape(-1)
            order = torch.argsort(key.reshape(-1), stable=True)  # ties (never in practice): token order
            order = order[torch.argsort(group[order], stable=True)]
            g_sorted = group[order]
            first = torch.searchsorted(g_sorted, g_sorted, right=False)
            rank = torch.arange(B * N) - first
            chosen = order[rank < TOKENS_PER_IMAGE]
            b_idx, p_idx = chosen // N, chosen % N
            lv = levels[b_idx, p_idx]
            capped.index_put_((split[b_idx], lv), torch.ones(len(chosen), dtype=torch.int64), accumulate=True)
            sel_split, sel_band = split[b_idx], band[b_idx, p_idx]
            for s, bd in torch.unique(torch.stack([sel_split, sel_band], 1), dim=0).tolist():
                m = (sel_split == s) & (sel_band == bd)
                bi, pi = b_idx[m], p_idx[m]
                cap = BAND_CAPACITY["test" if s else "train"]
                res = reservoirs.setdefault((s, bd), _Reservoir(cap))
                res.add({"key": key[bi, pi], "feat": patches[bi, pi].clone(), "pix": pix[bi, pi].clone(),
                         "pos": pi.clone(), "img": indices[bi].clone(), "level": levels[bi, pi].clone(),
                         "sim": sims[bi, pi].clone()})
            # --- per-image candidates for the global probe
            if images is not None:
                R = min(RANDOM_TOKENS_PER_IMAGE, N)
                K = min(TOP_TOKENS_PER_IMAGE, N)
                rand_pos = torch.argsort(_hash_keys(seed, _S_RAND_POS, indices[:, None], torch.arange(N)[None, :]),
                                         dim=1, stable=True)[:, :R]
                top_pos = torch.topk(norms, K, dim=1).indices
                rows = torch.arange(B)[:, None]
                rec = {"key": _hash_keys(seed, _S_IMAGE, indices), "img": indices.clone(), "label": labels[indices],
                       "rand": patches[rows, rand_pos].clone(), "rand_level": levels[rows, rand_pos].clone(),
                       "top": patches[rows, top_pos].clone(), "top_level": levels[rows, top_pos].clone()}
                if loaded.num_cls_tokens:
                    rec["cls"] = tokens[:, 0].clone()
                if loaded.num_register_tokens:
                    c = loaded.num_cls_tokens
                    rec["reg"] = tokens[:, c:c + loaded.num_register_tokens].mean(1)
                images.add(rec)
            seen += B
    col = _Collected(counts, capped, sim_hist, image_max_counts, reservoirs, images, seen, skipped, has_pe)
    if world > 1:
        _merge_collected(col, dev)
    for res in col.reservoirs.values():
        res.finish()
    if col.images is not None:
        col.images.finish()
    return col


def _merge_collected(col: _Collected, dev: torch.device) -> None:
    """torchrun: every rank ends with the statistics and samples of all images, as if one process had seen them.

    Histograms and counts add (all-reduce); each bounded sample is the bottom-k (by deterministic key) of its shard,
    so the bottom-k of the union of all ranks' samples is exactly the bottom-k of the whole stream."""
    import torch.distributed as dist

    from .scan import _gather

    comm = dev if dist.get_backend() == "nccl" else torch.device("cpu")
    flags = torch.tensor([col.num_images, 0 if col.has_pe else 1], dtype=torch.int64)
    for t in (col.counts, col.capped, col.sim_hist, col.image_max_counts, flags):
        c = t.to(comm)
        dist.all_reduce(c, op=dist.ReduceOp.SUM)
        t.copy_(c.cpu())
    col.num_images, col.has_pe = int(flags[0]), int(flags[1]) == 0
    col.skipped = sorted(s for part in _gather(col.skipped) for s in part)
    parts = _gather(({k: r.parts for k, r in col.reservoirs.items()},
                     None if col.images is None else col.images.parts))
    merged: dict[tuple[int, int], _Reservoir] = {}
    for res_parts, _ in parts:
        for k, rec in res_parts.items():
            if rec is not None:
                merged.setdefault(k, _Reservoir(BAND_CAPACITY["test" if k[0] else "train"])).add(rec)
    col.reservoirs = dict(sorted(merged.items()))
    if col.images is not None:
        store = _ImageStore(col.images.cap)
        for _, img_parts in parts:
            if img_parts is not None:
                store.add(img_parts)
        col.images = store


def _class_sample(col: _Collected, split: int, is_out: Callable[[torch.Tensor], torch.Tensor], outlier: bool,
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
        band_levels = cls_levels & (level_ids // _band_bins(col) == bd)
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


def _band_bins(col: _Collected) -> int:
    return 1 if col.capped.shape[1] == 2 else BAND_BINS


# ----------------------------------------------------------------------------------------------- ridge
@dataclass
class RidgeFit:
    weight: torch.Tensor
    bias: torch.Tensor
    x_mean: torch.Tensor
    x_scale: torch.Tensor
    alpha: float

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.weight.device, self.weight.dtype)
        return ((x - self.x_mean) / self.x_scale) @ self.weight + self.bias


def _dtype_for(device: torch.device) -> torch.dtype:
    # float64: X^T X of tokens that include outliers (~10x the others' norm) is badly conditioned, and in float32 the
    # small-eigenvalue directions that carry position and pixel detail are lost (measured: reconstruction FVU 0.19 in
    # float32 vs 0.13 for scikit-learn's float64 least squares). The matrices are only d x d, so it costs little.
    return torch.float32 if device.type == "mps" else torch.float64


def fit_ridge(x: torch.Tensor, y: torch.Tensor, groups: torch.Tensor | None = None, *, classify: bool = False,
              device: torch.device | str = "cpu", grid: Sequence[float] = RIDGE_GRID, val_fraction: float = 0.2,
              seed: int = 0) -> RidgeFit:
    """Closed-form ridge regression ``x -> y`` (``classify``: ``y`` are class ids, one-hot targets, argmax).

    Features are standardised. The penalty (a multiple of the mean eigenvalue of the centred ``X^T X``) is chosen
    from ``grid`` on a held-out part of the rows (whole ``groups`` -- images -- at a time when given), then the model
    is refitted on all rows. One pass over the data builds the sufficient statistics (``X^T X``, ``X^T Y``, sums) of
    all rows and of the held-out rows; the fitting rows' statistics are their difference, and one eigendecomposition
    serves every penalty.
    """
    device = torch.device(device)
    dt = _dtype_for(device)
    x = x.to(device, dt)
    n, d = x.shape
    if classify:
        y_ids = y.to(device).long()
        n_cls = int(y_ids.max()) + 1
        target = torch.zeros(n, n_cls, device=device, dtype=dt)
        target[torch.arange(n, device=device), y_ids] = 1.0
    else:
        target = y.to(device, dt)
        if target.dim() == 1:
            target = target[:, None]
    mean = x.mean(0)
    scale = x.std(0).clamp_min(1e-6) if n > 1 else torch.ones_like(mean)
    xs = (x - mean) / scale

    def stats(xa: torch.Tensor, ta: torch.Tensor) -> list[torch.Tensor]:
        return [xa.T @ xa, xa.T @ ta, xa.sum(0), ta.sum(0), torch.tensor(float(len(xa)), device=device, dtype=dt)]

    def solve(st: list[torch.Tensor]):
        g, b, sx, st_, m = st
        xm, tm = sx / m, st_ / m
        evals, evecs = torch.linalg.eigh(g - m * torch.outer(xm, xm))
        evals = evals.clamp_min(0)
        z = evecs.T @ (b - m * torch.outer(xm, tm))
        return xm, tm, evals, evecs, z

    full = stats(xs, target)
    alpha = grid[len(grid) // 2]
    if len(grid) > 1 and n >= 10:
        g = torch.Generator().manual_seed(seed)
        if groups is not None:
            ug = torch.unique(groups)
            val_groups = ug[torch.randperm(len(ug), generator=g)[: max(1, round(val_fraction * len(ug)))]]
            val = torch.isin(groups, val_groups).to(device)
        else:
            val = (torch.rand(n, generator=g) < val_fraction).to(device)
        n_val = int(val.sum())
        if 0 < n_val < n - 1:
            val_idx = torch.nonzero(val).flatten()
            xv, tv = xs[val_idx], target[val_idx]
            fit_stats = [a - b for a, b in zip(full, stats(xv, tv))]
            xm, tm, evals, evecs, z = solve(fit_stats)
            proj = (xv - xm) @ evecs
            mean_eval = float(evals.mean()) or 1.0
            best = None
            for a in grid:
                pred = proj @ (z / (evals + a * mean_eval)[:, None]) + tm
                if classify:
                    score = float((pred.argmax(1) == y_ids[val_idx]).to(dt).mean())
                else:
                    score = -float(((pred - tv) ** 2).mean())
                if best is None or score > best[0] + 1e-12:
                    best = (score, a)
            alpha = best[1]  # type: ignore[index]
    xm, tm, evals, evecs, z = solve(full)
    mean_eval = float(evals.mean()) or 1.0
    w = evecs @ (z / (evals + alpha * mean_eval)[:, None])
    bias = tm - xm @ w
    return RidgeFit(w, bias, mean, scale, float(alpha))


# ----------------------------------------------------------------------------------------------- probes
def _local_metrics(train: dict[str, torch.Tensor], test: dict[str, torch.Tensor], grid: tuple[int, int],
                   device: torch.device, seed: int) -> dict[str, float]:
    gh, gw = grid
    pos_fit = fit_ridge(train["feat"], train["pos"], train["img"], classify=True, device=device, seed=seed)
    scores = pos_fit.predict(test["feat"])
    n_cls = scores.shape[1]
    pred = scores.argmax(1).cpu()
    true = test["pos"]
    top1 = float((pred == true).double().mean())
    majority = int(torch.bincount(train["pos"], minlength=n_cls).argmax())
    chance = float((true == majority).double().mean())
    dist = torch.sqrt(((pred // gw - true // gw) ** 2 + (pred % gw - true % gw) ** 2).double()).mean()
    rec_fit = fit_ridge(train["feat"], train["pix"], train["img"], device=device, seed=seed)
    rec = rec_fit.predict(test["feat"]).cpu()
    target = test["pix"].to(rec.dtype)
    err = ((rec - target) ** 2).sum(1)
    base = ((target - train["pix"].to(rec.dtype).mean(0)) ** 2).sum(1)
    return {"position_top1": top1, "position_chance": chance, "position_distance": float(dist),
            "reconstruction_l2": float(err.mean() / target.shape[1]),
            "reconstruction_fvu": float(err.sum() / base.sum().clamp_min(1e-12))}


def _median_from_hist(counts: torch.Tensor, edges: torch.Tensor) -> float | None:
    total = int(counts.sum())
    if total == 0:
        return None
    c = torch.cumsum(counts, 0).double()
    i = int(torch.searchsorted(c, torch.tensor([total / 2], dtype=torch.float64)).clamp(max=len(counts) - 1))
    prev = float(c[i - 1]) if i else 0.0
    frac = (total / 2 - prev) / max(float(counts[i]), 1.0)
    return float(edges[i] + frac * (edges[i + 1] - edges[i]))


def _global_probe(store: _ImageStore, kind: str, is_out: Callable[[torch.Tensor], torch.Tensor] | None,
                  draws: int, test_fraction: float, device: torch.device, seed: int, min_images: int = 0
                  ) -> tuple[int, list[float], float | None]:
    """Top-1 per draw of a linear classifier on one token per image (``kind``: normal/outlier/cls/registers)."""
    rec = store.parts
    assert rec is not None
    accs: list[float] = []
    chance = []
    n_avail = 0
    for d in range(draws):
        if kind in ("cls", "registers"):
            feats = rec["cls" if kind == "cls" else "reg"]
            ok = torch.ones(len(feats), dtype=torch.bool)
        else:
            cand, lv = (rec["rand"], rec["rand_level"]) if kind == "normal" else (rec["top"], rec["top_level"])
            valid = ~is_out(lv) if kind == "normal" else is_out(lv)  # type: ignore[misc]
            ok = valid.any(1)
            # a uniformly random valid candidate per image: random keys, invalid ones pushed to +inf
            keys = _hash_keys(seed * 1000 + d, _S_DRAW_TOKEN, rec["img"][:, None],
                              torch.arange(valid.shape[1])[None, :]).masked_fill(~valid, float("inf"))
            pick = keys.argmin(1)
            feats = cand[torch.arange(len(cand)), pick]
        labels = rec["label"]
        idx = torch.nonzero(ok).flatten()
        n_avail = len(idx)
        if n_avail < max(4, min_images) or len(torch.unique(labels[idx])) < 2:
            return n_avail, [], None
        split_key = _hash_keys(seed * 1000 + d, _S_DRAW_SPLIT, rec["img"][idx])
        perm = idx[torch.argsort(split_key, stable=True)]  # a random image order that depends only on the indices
        n_test = max(1, round(test_fraction * len(perm)))
        te, tr = perm[:n_test], perm[n_test:]
        # relabel classes to 0..C-1 on the train set
        classes, y_tr = torch.unique(labels[tr], return_inverse=True)
        fit = fit_ridge(feats[tr], y_tr, rec["img"][tr], classify=True, device=device, seed=seed + d)
        pred = classes[fit.predict(feats[te]).argmax(1).cpu()]
        accs.append(float((pred == labels[te]).double().mean()))
        majority = classes[torch.bincount(y_tr).argmax()]
        chance.append(float((labels[te] == majority).double().mean()))
    return n_avail, accs, float(sum(chance) / len(chance)) if chance else None


# ----------------------------------------------------------------------------------------------- labels
def _resolve_labels(images: Any, source: Any, labels: Sequence[int] | None) -> tuple[torch.Tensor | None, LabelInfo]:
    n = source.num_found
    if labels is not None:
        if len(labels) != n:
            raise InputError(f"labels has {len(labels)} entries for {n} images")
        lab = torch.as_tensor(list(labels), dtype=torch.long)
        return lab, LabelInfo("given", int(len(torch.unique(lab))), [], True, "")
    inner = getattr(source.dataset, "source", None)
    from .synthetic import SyntheticShapes

    if isinstance(inner, SyntheticShapes):
        lab = torch.tensor([inner.label(i) for i in range(n)], dtype=torch.long)
        return lab, LabelInfo("synthetic", int(len(torch.unique(lab))), list(inner.classes), True, "")
    if isinstance(inner, Dataset) and hasattr(inner, "targets"):
        lab = torch.as_tensor(list(inner.targets), dtype=torch.long)  # type: ignore[attr-defined]
        return lab, LabelInfo("dataset.targets", int(len(torch.unique(lab))), [], True, "")
    if isinstance(images, (str, Path)) and Path(images).expanduser().is_dir():
        ids, names = image_folder_labels(images, source.names)
        if ids is None:
            return None, LabelInfo("none", 0, [], False,
                                   "global probe skipped: the images are not in class sub-folders (ImageFolder layout "
                                   "root/<class>/img.jpg), so there are no labels; local probes ran")
        return torch.tensor(ids, dtype=torch.long), LabelInfo("folders", len(names or []), list(names or []), True, "")
    return None, LabelInfo("none", 0, [], False,
                           "global probe skipped: these images carry no class labels (use an ImageFolder layout or "
                           "pass labels=); local probes ran")


# ----------------------------------------------------------------------------------------------- verdict
def _verdict(rows: dict[str, TokenTypeRow], n_out: int, min_tokens: int, layer: int) -> Verdict:
    out, norm = rows.get("outlier"), rows.get("normal (n-matched)") or rows.get("normal")
    normal_full = rows.get("normal")
    nums: dict[str, float | None] = {}
    if n_out == 0:
        return Verdict("clean", f"No outlier tokens at block {layer}: by the threshold rule the model looks clean at "
                       "this layer (probes still ran on normal tokens and prefix tokens).", [], nums)
    assert out is not None and norm is not None and normal_full is not None
    nums.update(outlier_position_top1=out.position_top1, normal_position_top1=norm.position_top1,
                outlier_reconstruction_fvu=out.reconstruction_fvu, normal_reconstruction_fvu=norm.reconstruction_fvu,
                outlier_neighbour_similarity=out.neighbour_similarity_median,
                normal_neighbour_similarity=normal_full.neighbour_similarity_median,
                outlier_global_top1=out.global_top1, normal_global_top1=normal_full.global_top1)
    if out.local_status != "ok" or norm.local_status != "ok":
        return Verdict("inconclusive", f"Too few outlier tokens at block {layer} to probe them "
                       f"({out.local_status}; the minimum is {min_tokens} held-out tokens).",
                       [f"outlier row: {out.local_status}"], nums)
    reasons = []
    so, sn = out.neighbour_similarity_median, normal_full.neighbour_similarity_median
    redundant = so is not None and sn is not None and so - sn > REDUNDANCY_MARGIN
    if so is None or sn is None:
        reasons.append("neighbour similarity unavailable (no separable patch embedding)")
    else:
        reasons.append(f"neighbour similarity of input patches: outlier median {so:.3f} vs normal {sn:.3f} -> "
                       + ("more redundant" if redundant else "not more redundant"))
    po, pn = out.position_top1 or 0.0, norm.position_top1 or 0.0
    pos_worse = po <= POSITION_RATIO * pn and pn - po >= POSITION_MIN_DROP
    reasons.append(f"position top-1: outlier {po:.1%} (chance {out.position_chance:.1%}) vs normal n-matched {pn:.1%} -> "
                   + ("worse" if pos_worse else "kept"))
    fo, fn = out.reconstruction_fvu or 0.0, norm.reconstruction_fvu or 0.0
    rec_worse = fo >= RECONSTRUCTION_RATIO * fn and fo - fn >= RECONSTRUCTION_MIN_RISE
    reasons.append(f"reconstruction FVU: outlier {fo:.3f} vs normal n-matched {fn:.3f} -> "
                   + ("worse" if rec_worse else "kept"))
    if out.global_top1 is not None and normal_full.global_top1 is not None:
        reasons.append(f"global top-1 (supporting, not decisive): outlier {out.global_top1:.1%} vs normal "
                       f"{normal_full.global_top1:.1%}")
    lost = pos_worse or rec_worse
    if redundant and lost:
        label = "artifact-like"
        summary = (f"Flagged tokens at block {layer} look like the paper's artifacts: they sit on redundant patches "
                   f"and lost local information ({'position' if pos_worse else ''}"
                   f"{' and ' if pos_worse and rec_worse else ''}{'pixels' if rec_worse else ''}).")
    elif not lost:
        label = "content-like"
        summary = (f"Flagged tokens at block {layer} keep their local information (position and pixels as readable "
                   "as from normal tokens): they look like content tokens with a large norm, not artifacts.")
    else:
        label = "inconclusive"
        summary = (f"Mixed signals at block {layer}: the flagged tokens lost local information but do not sit on "
                   "more redundant patches than normal tokens.")
    return Verdict(label, summary, reasons, nums)


# ----------------------------------------------------------------------------------------------- probe()
def probe(
    model: str | Path | LoadedModel | torch.nn.Module | None = None,
    data: str | Path | Dataset | torch.Tensor | None = None,
    *,
    layer: int = -1,
    threshold: str | float | None = "auto",
    labels: Sequence[int] | None = None,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    trust_checkpoint: bool = False,
    img_size: int | None = None,
    device: str | None = "auto",
    batch_size: int = 64,
    num_workers: int = 0,
    min_tokens: int = MIN_LOCAL_TOKENS,
    min_images: int = MIN_GLOBAL_IMAGES,
    draws: int = GLOBAL_DRAWS,
    test_fraction: float = TEST_FRACTION,
    max_train_tokens: int = MAX_TRAIN_TOKENS,
    max_test_tokens: int = MAX_TEST_TOKENS,
    max_global_images: int = MAX_GLOBAL_IMAGES,
    seed: int = 0,
    rule: AutoRule | None = None,
    progress: bool = False,
    warn: Callable[[str], None] | None = None,
) -> ProbeReport:
    """Run the paper's probes (position, reconstruction, global, neighbour similarity) at one layer.

    Args:
        model: anything :func:`artifactscan.load_model` accepts (``None``: the embedded default).
        data: an image folder (labels from class sub-folders when present), ``"synthetic:N"``, a Dataset of
            ``[0, 1]`` tensors (labels from ``.targets`` / ``.label(i)``) or an ``[N, 3, H, W]`` tensor (pass
            ``labels``). ``None``: ``synthetic:2000``, the built-in labelled set.
        layer: block index, 0-based; negative counts from the end (-1 = last block). Only blocks ``0..layer`` run.
        threshold: ``"auto"`` or a number, exactly as ``artifactscan norms``.
        min_tokens / min_images: below these, a row says "too few (n=...)" instead of a number.
        draws: random draws of the global probe. seed: makes every random choice repeatable.

    Returns:
        A :class:`ProbeReport` (``.verdict.label``: artifact-like / content-like / inconclusive / clean).

    Raises:
        InputError for a layer out of range, too few images for the split, bad thresholds or options.
    """
    try:
        fixed = parse_threshold(threshold)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    for name, value in (("--batch-size", batch_size), ("--draws", draws), ("--min-tokens", min_tokens),
                        ("--min-images", min_images), ("max_train_tokens", max_train_tokens),
                        ("max_test_tokens", max_test_tokens), ("max_global_images", max_global_images)):
        if value <= 0:
            raise InputError(f"{name} must be positive, got {value}")
    if not 0 < test_fraction < 1:
        raise InputError(f"--test-fraction must be between 0 and 1, got {test_fraction}")
    rule = rule or AutoRule()
    loaded = load_model(model, arch=arch, arch_kwargs=arch_kwargs, trust_checkpoint=trust_checkpoint,
                        img_size=img_size)
    num_blocks = len(loaded.blocks)
    k = resolve_layer(layer, num_blocks)
    dev = resolve_device(device)
    loaded.model.to(dev)
    if data is None:
        data = f"synthetic:{DEFAULT_PROBE_IMAGES}"
    source = make_image_source(data, loaded)
    n = source.num_found
    if n < MIN_IMAGES:
        raise InputError(f"probe needs at least {MIN_IMAGES} images to split them into train and held-out test "
                         f"images; got {n}")
    lab, label_info = _resolve_labels(data, source, labels)
    if lab is not None and label_info.num_classes < 2:
        lab = None
        label_info.global_probe = False
        label_info.message = ("global probe skipped: all images have the same class label (one class); "
                              "local probes ran")
    gen = torch.Generator().manual_seed(seed)
    n_test = max(1, round(test_fraction * n))
    if n - n_test < 3:
        raise InputError(f"probe needs at least {MIN_IMAGES} images to split them into train and held-out test "
                         f"images; got {n}")
    test_mask = torch.zeros(n, dtype=torch.bool)
    test_mask[torch.randperm(n, generator=gen)[:n_test]] = True

    world, rank = distributed_world()
    local = source
    if world > 1:  # each rank probes every world-th image; statistics and samples merge exactly (_merge_collected)
        from dataclasses import replace

        from torch.utils.data import Subset

        shard = Subset(source.dataset, range(rank, n, world))
        local = replace(source, dataset=shard, num_found=len(shard))
    col = _collect(loaded, local, k, dev, fixed, test_mask, lab, batch_size, num_workers, seed, progress and rank == 0,
                   max_global_images, world)
    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
    for idx, reason in col.skipped if rank == 0 else []:
        warn(f"skipped {source.names[idx]}: {reason}")
    if col.num_images < MIN_IMAGES:
        raise InputError(f"only {col.num_images} of {n} images could be read; probe needs at least {MIN_IMAGES}")

    # --- threshold: the same rule as `norms`, on the exact histogram of this layer
    all_counts = col.counts.sum(0)
    if fixed is not None:
        decision = fixed_threshold(fixed)
        edge: int | None = 1
    else:
        decision = auto_threshold(all_counts, rule)
        edge = decision.edge_index if decision.value is not None else None
    big = col.capped.shape[1] + 1

    def is_out(levels: torch.Tensor) -> torch.Tensor:
        return levels >= (edge if edge is not None else big)

    level_ids = torch.arange(col.counts.shape[1])
    out_levels = is_out(level_ids)
    n_tokens = int(all_counts.sum())
    n_out = int(all_counts[out_levels].sum())
    n_img_out = int(col.image_max_counts[out_levels].sum())

    # --- local probes
    gh, gw = loaded.grid_size
    rows: dict[str, TokenTypeRow] = {}
    samples = {}
    for cname, is_o in (("normal", False), ("outlier", True)):
        tr = _class_sample(col, 0, is_out, is_o, max_train_tokens)
        te = _class_sample(col, 1, is_out, is_o, max_test_tokens)
        samples[cname] = (tr, te)
    n_norm_tokens = n_tokens - n_out
    for cname, total in (("normal", n_norm_tokens), ("outlier", n_out)):
        tr, te = samples[cname]
        row = TokenTypeRow(cname, tokens_total=total)
        row.local_train_tokens = 0 if tr is None else len(tr["key"])
        row.local_test_tokens = 0 if te is None else len(te["key"])
        rows[cname] = row
    if n_out > 0:
        # the n-matched control: the normal probe fitted on as many train tokens as the outlier probe gets
        tr_n, te_n = samples["normal"]
        tr_o = samples["outlier"][0]
        if tr_n is not None and tr_o is not None and len(tr_o["key"]) < len(tr_n["key"]):
            mkey = _hash_keys(seed, _S_MATCHED, tr_n["img"], tr_n["pos"])
            keep = _canonical_order({"key": mkey, "img": tr_n["img"], "pos": tr_n["pos"]})[: len(tr_o["key"])]
            samples["normal (n-matched)"] = ({k2: v[keep] for k2, v in tr_n.items()}, te_n)
        else:
            samples["normal (n-matched)"] = samples["normal"]
        matched = TokenTypeRow("normal (n-matched)", tokens_total=n_norm_tokens)
        m_tr, m_te = samples["normal (n-matched)"]
        matched.local_train_tokens = 0 if m_tr is None else len(m_tr["key"])
        matched.local_test_tokens = 0 if m_te is None else len(m_te["key"])
        rows = {"normal": rows["normal"], "normal (n-matched)": matched, "outlier": rows["outlier"]}
    for name, row in rows.items():
        tr, te = samples[name]
        if row.tokens_total == 0:
            row.local_status = "none"
            continue
        n_tr, n_te = row.local_train_tokens, row.local_test_tokens
        if n_te < min_tokens or n_tr < min_tokens:
            row.local_status = f"too few (n={min(n_tr, n_te)})"
            continue
        if len(torch.unique(tr["img"])) < 2:
            row.local_status = f"too few (n={n_tr} tokens from 1 image)"
            continue
        for key_name, value in _local_metrics(tr, te, (gh, gw), dev, seed).items():
            setattr(row, key_name, value)
        row.local_status = "ok"

    # --- neighbour similarity (exact histograms)
    edges = torch.linspace(-1, 1, SIM_BINS + 1, dtype=torch.float64)
    h_norm = col.sim_hist[~out_levels].sum(0)
    h_out = col.sim_hist[out_levels].sum(0)
    neighbours = NeighbourHistogram([float(e) for e in edges], h_norm.tolist(), h_out.tolist(),
                                    _median_from_hist(h_norm, edges), _median_from_hist(h_out, edges), col.has_pe)
    rows["normal"].neighbour_tokens = int(h_norm.sum())
    rows["normal"].neighbour_similarity_median = neighbours.normal_median
    if "outlier" in rows:
        rows["outlier"].neighbour_tokens = int(h_out.sum())
        rows["outlier"].neighbour_similarity_median = neighbours.outlier_median if col.has_pe else None
    if n_out and int(h_out.sum()) < min_tokens:
        rows["outlier"].neighbour_similarity_median = None

    # --- prefix rows and the global probe
    if loaded.num_cls_tokens:
        rows["cls"] = TokenTypeRow("cls")
    if loaded.num_register_tokens:
        rows["registers"] = TokenTypeRow("registers")
    for name, row in rows.items():
        if name == "normal (n-matched)":
            row.global_status = "n/a"
            continue
        if col.images is None or col.images.parts is None:
            row.global_status = "skipped (no labels)" if not label_info.global_probe else "skipped"
            continue
        if name == "outlier" and n_out == 0:
            row.global_status = "none"
            continue
        kind = name
        n_avail, accs, chance = _global_probe(col.images, kind, is_out, draws, test_fraction, dev, seed,
                                              min_images)
        row.global_images = n_avail
        if n_avail < min_images or not accs:
            row.global_status = f"too few (n={n_avail})" if n_avail < min_images else "skipped (one class)"
            continue
        acc = torch.tensor(accs, dtype=torch.float64)
        row.global_top1 = float(acc.mean())
        row.global_top1_std = float(acc.std()) if len(accs) > 1 else 0.0
        row.global_chance = chance
        row.global_status = "ok"
    verdict = _verdict(rows, n_out, min_tokens, k)
    folder = source.folder_dataset
    skipped_records = (folder.skipped_images(col.skipped) if folder else
                       [SkippedImage(source.names[i], r) for i, r in col.skipped])
    notes = list(loaded.notes)
    if label_info.message:
        notes.append(label_info.message)
    if not col.has_pe:
        notes.append("neighbour similarity unavailable: the patch embedding output is not one token per patch")
    threshold_reason = decision.reason
    return ProbeReport(
        model=_model_summary(loaded),
        images=ImageSummary(source.description, n, col.num_images, skipped_records),
        layer=k, layer_requested=layer, num_blocks=num_blocks,
        layer_description=(f"residual-stream output of block {k} (0-based; {k + 1} of {num_blocks} blocks run), "
                           "before the final norm"),
        threshold_mode="fixed" if fixed is not None else "auto", threshold=decision.value,
        threshold_reason=threshold_reason, num_patch_tokens=n_tokens, num_outliers=n_out,
        outlier_fraction=n_out / n_tokens if n_tokens else 0.0, images_with_outliers=n_img_out,
        rows=list(rows.values()), neighbours=neighbours, labels=label_info, verdict=verdict,
        settings={"seed": seed, "test_fraction": test_fraction, "draws": draws, "min_tokens": min_tokens,
                  "min_images": min_images, "max_train_tokens": max_train_tokens, "max_test_tokens": max_test_tokens,
                  "max_global_images": max_global_images, "tokens_per_image_per_band": TOKENS_PER_IMAGE,
                  "band_width_log10": BAND_BINS * BIN_WIDTH_LOG10, "ridge_grid": list(RIDGE_GRID),
                  "device": str(dev)},
        protocol=PROTOCOL, notes=notes)


# ----------------------------------------------------------------------------------------------- output
def _fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def render_probe(report: ProbeReport, console: Any) -> None:
    """The paper-shaped table (rows: token types; columns: metrics with token counts) and the verdict."""
    from rich.panel import Panel
    from rich.table import Table

    m = report.model
    title = (f"{m.name} - probes at {report.layer_description} - {report.images.num_scanned} images, "
             f"{report.num_outliers}/{report.num_patch_tokens} patch tokens flagged "
             f"({_fmt_pct(report.outlier_fraction)}, threshold {report.threshold_mode}"
             f"{'' if report.threshold is None else f' {report.threshold:.4g}'})")
    table = Table(title=title, title_justify="left", header_style="bold")
    for col, just in (("tokens", "left"), ("position top-1 (chance)", "right"), ("pos. dist [patches]", "right"),
                      ("recon. L2 (FVU)", "right"), ("local n train/test", "right"), ("nbr. cos median", "right"),
                      ("global top-1", "right"), ("global n img", "right")):
        table.add_column(col, justify=just)
    for r in report.rows:
        if r.local_status == "ok":
            pos = f"{_fmt_pct(r.position_top1)} ({_fmt_pct(r.position_chance)})"
            dist = f"{r.position_distance:.2f}"
            rec = f"{r.reconstruction_l2:.4f} ({r.reconstruction_fvu:.3f})"
        elif r.local_status == "n/a":
            pos = dist = rec = "-"
        else:
            pos, dist, rec = r.local_status, "", ""
        nloc = "-" if r.local_status == "n/a" else f"{r.local_train_tokens}/{r.local_test_tokens}"
        nbr = "-" if r.neighbour_similarity_median is None else f"{r.neighbour_similarity_median:.3f} (n={r.neighbour_tokens})"
        if r.global_status == "ok":
            glob = f"{_fmt_pct(r.global_top1)} ± {100 * (r.global_top1_std or 0):.1f}"
            if r.global_chance is not None:
                glob += f" (chance {_fmt_pct(r.global_chance)})"
        else:
            glob = r.global_status if r.global_status != "n/a" else "-"
        style = "bold red" if r.name == "outlier" else ("dim" if r.name == "normal (n-matched)" else "")
        table.add_row(r.name, pos, dist, rec, nloc, nbr, glob, str(r.global_images) if r.global_images else "-",
                      style=style)
    console.print(table)
    if m.kind == "phantom":
        console.print(Panel(m.calibration_note or "", title="calibration phantom", style="yellow"))
    colour = {"artifact-like": "red", "content-like": "green", "clean": "green"}.get(report.verdict.label, "yellow")
    body = report.verdict.summary + ("\n" + "\n".join(f"- {r}" for r in report.verdict.reasons)
                                     if report.verdict.reasons else "")
    console.print(Panel(body, title=f"verdict: {report.verdict.label}", style=f"bold {colour}"))
    for note in report.notes:
        if note != m.calibration_note:
            console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    console.print(f"[dim]Threshold - {report.threshold_reason}. Protocol: artifactscan probe --help, or "
                  "'protocol' in report.json.[/dim]")


def write_probe_outputs(report: ProbeReport, out_dir: str | Path, figures: bool = True) -> list[Path]:
    """Write ``report.json`` and the probe figures into ``out_dir``; return the paths written."""
    from .report import atomic_write_text

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create output folder {out}: {exc.strerror}") from None
    written = [out / "report.json"]
    atomic_write_text(written[0], report.to_json())
    if figures:
        from .plots_probe import save_probe_figures

        written += save_probe_figures(report, out)
    return written


def load_probe_report(path: str | Path) -> ProbeReport:
    import json

    return ProbeReport.from_dict(json.loads(Path(path).read_text()))
