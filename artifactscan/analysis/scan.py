"""``scan()``: per-layer patch-token norms of a ViT over a set of images, with outliers flagged.

The whole pass streams: per batch the model runs once, the hooks keep only token norms, and those go into fixed-size
histograms (:mod:`artifactscan.core.stats`). Per-outlier records are the only thing that grows, and only with the number
of outliers. With the adaptive threshold the final value is known only at the end, so records are collected above a
provisional bar (half the running estimate) and filtered at the end; if the final threshold falls below a bar that
was used, the records are re-collected in a second pass, so they are always exact.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch.utils.data import Dataset

from artifactscan.core.numbers import percent as _pct
from artifactscan.core.defaults import BATCH_SIZE, DEVICE, MAPS, THRESHOLD, WORKERS
from artifactscan.analysis.capture import NormCapture, row_names
from artifactscan.analysis.memory import check_fits
from artifactscan.core.errors import InputError, option
from artifactscan.core.files import display_name, name_hex
from artifactscan.core.progress import ProgressBar
from artifactscan.core.distributed import distributed_world, gather
from artifactscan.core.devices import resolve_device
from artifactscan.inputs.images import UNDECODED_IMAGE_SUFFIXES
from artifactscan.inputs.sources import ImageSource, effective_batch_size, image_batches, parse_workers
from artifactscan.models.loading import LoadedModel
from artifactscan.models.phantom_notice import PHANTOM_HEADLINE_TAG, is_phantom
from artifactscan.analysis.opening import load_with_images
from artifactscan.core.stats import NormStatistics, PrefixTokenStats, bin_index, NUM_BINS, LOG10_MIN, BIN_WIDTH_LOG10
from artifactscan.core.thresholds import (
    PAPER_THRESHOLD,
    AutoRule,
    auto_threshold,
    fixed_threshold,
    images_to_decide,
    threshold_option,
)
from artifactscan.core.summaries import AnalysisResult, ImageSummary, ModelSummary  # noqa: F401  (also named here)

# /2: layers[].bimodality describes the separated-group rule's accepted group or its strongest rejected candidate
# (keys: group_tokens, group_share, ratio, gap, log10_gap_chance, tail_expected_tokens, log10_tail_chance, tail_shape,
# threshold | rejected). /1 files (the old mixture rule's keys) are read as they are.
# /3: model.weights, model.layout, model.inferred (how a checkpoint was loaded), layers[].num_nonfinite,
# nonfinite_weights, images.num_other_files, and *_hex beside file names that are not printable UTF-8
# (outliers[].image_hex, maps[].image_hex, images.skipped[].path_hex). /1 and /2 read with defaults.
# /4: layers[].inconclusive and layers[].images_to_decide (a group that failed only the minimum group size).
# /5: the common header first (schema, artifactscan_version, model, images, headline: core/summaries.py); /4 files
# hold the same keys, in another order. 0.3: layers[].bimodality renamed layers[].separation; both keys written
# for one version, either one read.
SCHEMA = "artifactscan.scan/5"
READABLE_SCHEMAS = tuple(f"artifactscan.scan/{n}" for n in range(1, 5)) + (SCHEMA,)
# ----------------------------------------------------------------------------------------------- result types


@dataclass
class OutlierRecord:
    """One flagged patch token: which image, which layer (block index), where on the patch grid, how large."""

    image: str
    image_index: int
    layer: int
    row: int
    col: int
    norm: float
    image_hex: str | None = None  # the file name's exact bytes when ``image`` had to be escaped


@dataclass
class Histogram:
    """Sparse log-spaced histogram of patch-token norms: bin ``i`` spans
    ``10**(log10_min + i*bin_width)`` to ``10**(log10_min + (i+1)*bin_width)``."""

    log10_min: float
    bin_width: float
    bins: list[int]
    counts: list[int]

    @classmethod
    def from_counts(cls, counts: torch.Tensor) -> "Histogram":
        nz = torch.nonzero(counts).flatten()
        return cls(LOG10_MIN, BIN_WIDTH_LOG10, nz.tolist(), counts[nz].tolist())

    def dense(self) -> torch.Tensor:
        if (self.log10_min, self.bin_width) != (LOG10_MIN, BIN_WIDTH_LOG10):
            raise ValueError("this histogram was written with other bins than this version of artifactscan uses")
        out = torch.zeros(NUM_BINS, dtype=torch.int64)
        out[torch.tensor(self.bins, dtype=torch.long)] = torch.tensor(self.counts, dtype=torch.int64)
        return out


@dataclass
class LayerReport:
    """Statistics of one captured row. ``index`` is the block index; the final normalised output has
    ``index == num_blocks`` and ``is_final_norm``. Fractions are of patch tokens (prefix tokens are apart)."""

    index: int
    name: str
    is_final_norm: bool
    median: float
    p99: float
    max: float
    max_over_median: float
    threshold: float | None
    threshold_reason: str
    num_outliers: int
    outlier_fraction: float
    images_with_outliers: int
    image_fraction_with_outliers: float
    fraction_above_150: float
    prefix: list[PrefixTokenStats]
    histogram: Histogram
    # The separated-group rule's accepted group or its strongest rejected candidate (core/thresholds.py).
    separation: dict[str, Any] = field(default_factory=dict)
    num_nonfinite: int = 0  # token norms (prefix included) that were NaN or Inf
    # The rule could not decide: its candidate group (``separation``) passed every test but the minimum group size.
    inconclusive: bool = False
    images_to_decide: int | None = None  # images that would give that group the minimum size, at its rate

    # ``separation`` was ``bimodality`` before 0.3 (named after an older mixture rule): both keys are written.
    RENAMED_KEYS: ClassVar[dict[str, str]] = {"separation": "bimodality"}

    @property
    def bimodality(self) -> dict[str, Any]:
        """``separation`` under its name before 0.3."""
        return self.separation


@dataclass
class NormMap:
    """Patch-norm grid of one image at one layer, with the flagged patches (for the per-image figures)."""

    image: str
    image_index: int
    layer: int
    norms: list[list[float]]
    flagged: list[list[bool]]
    image_hex: str | None = None


@dataclass
class ScanReport(AnalysisResult):
    """Everything ``artifactscan norms`` found. Serialises to ``report.json`` (schema: docs/json-schemas.md)."""

    SCHEMA = SCHEMA
    OLDER_SCHEMAS = READABLE_SCHEMAS[:-1]

    threshold_mode: str
    threshold_rule: str
    layers: list[LayerReport]
    onset_layer: int | None
    outliers: list[OutlierRecord]
    outlier_records_complete: bool
    maps: list[NormMap]
    notes: list[str]
    nonfinite_weights: list[str] = field(default_factory=list)  # tensors with NaN/Inf (--allow-nonfinite)

    @property
    def last_block(self) -> LayerReport:
        return [lay for lay in self.layers if not lay.is_final_norm][-1]

    @property
    def inconclusive_layers(self) -> list[LayerReport]:
        """Rows where the threshold rule could not decide (too few tokens in an otherwise separated group)."""
        return [lay for lay in self.layers if lay.inconclusive]

    def inconclusive_problem(self) -> str | None:
        """One line saying where the scan could not decide and how many images would, or ``None``."""
        rows = self.inconclusive_layers
        if not rows:
            return None
        n_img = self.images.num_scanned
        sparsest = max(rows, key=lambda lay: lay.images_to_decide or 0)
        tokens = sorted({int(lay.separation.get("group_tokens", 0)) for lay in rows})
        shown = str(tokens[0]) if len(tokens) == 1 else f"{tokens[0]}-{tokens[-1]}"
        rate = f"{sparsest.separation.get('group_tokens', 0) / max(n_img, 1):.2g} per image"
        if len(tokens) > 1:
            rate += f" at {sparsest.name}"
        ratio = max(lay.separation.get("ratio", 0.0) for lay in rows)
        needed = sparsest.separation.get("min_group_tokens", AutoRule().min_group_tokens)
        return (f"inconclusive at {_row_list(rows)}: a separated high-norm group (up to {ratio:.1f}x the bulk) "
                f"passes every test of the threshold rule except the minimum group size: {shown} token(s) in "
                f"{n_img} image(s), {rate}; {sparsest.images_to_decide} images would give the {needed} tokens "
                "needed to decide")

    @property
    def num_nonfinite(self) -> int:
        return sum(lay.num_nonfinite for lay in self.layers)

    def nonfinite_problem(self) -> str | None:
        """One line saying what is not finite (weights named, activations counted per layer), or ``None``."""
        parts = []
        if self.nonfinite_weights:
            shown = ", ".join(self.nonfinite_weights[:4]) + (f" (+{len(self.nonfinite_weights) - 4} more)"
                                                             if len(self.nonfinite_weights) > 4 else "")
            parts.append(f"non-finite weights in {len(self.nonfinite_weights)} tensor(s): {shown}")
        bad = [lay for lay in self.layers if lay.num_nonfinite]
        if bad:
            parts.append(f"{self.num_nonfinite} non-finite token norms (NaN/Inf) in {len(bad)} of {len(self.layers)} "
                         f"rows, from {bad[0].name} on")
        return "; ".join(parts) or None


# ----------------------------------------------------------------------------------------------- inputs
# ----------------------------------------------------------------------------------------------- the pass
@dataclass
class _Candidates:
    """Per-row candidate outlier tokens: (image index, patch index, norm)."""

    image: list[torch.Tensor] = field(default_factory=list)
    patch: list[torch.Tensor] = field(default_factory=list)
    norm: list[torch.Tensor] = field(default_factory=list)

    def add(self, norms: torch.Tensor, image_ids: torch.Tensor, bar: float) -> None:
        hit = torch.nonzero(norms > bar)
        if len(hit):
            self.image.append(image_ids[hit[:, 0]])
            self.patch.append(hit[:, 1])
            self.norm.append(norms[hit[:, 0], hit[:, 1]])

    def prune(self, bar: float) -> None:
        if not self.norm:
            return
        img, pat, nrm = (torch.cat(x) for x in (self.image, self.patch, self.norm))
        keep = nrm > bar
        self.image, self.patch, self.norm = [img[keep]], [pat[keep]], [nrm[keep]]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.norm:
            e = torch.empty(0)
            return e.long(), e.long(), e.double()
        return torch.cat(self.image), torch.cat(self.patch), torch.cat(self.norm)


def _refresh_bars(stats: NormStatistics, rule: AutoRule, bars: torch.Tensor, max_bar: torch.Tensor,
                  cands: list[_Candidates]) -> None:
    for r in range(stats.num_rows):
        estimate = auto_threshold(stats.patch_counts[r], rule).value
        # Half the running estimate leaves room for it to move; without an estimate keep only new extremes.
        bar = 0.5 * estimate if estimate is not None else float(stats.patch_max[r])
        bars[r] = bar
        max_bar[r] = max(float(max_bar[r]), bar)
        cands[r].prune(bar)


def _scan_pass(loaded: LoadedModel, source: ImageSource, device: torch.device, batch_size: int, num_workers: int | str,
               stats: NormStatistics | None, bars: torch.Tensor, rule: AutoRule | None, adaptive: bool,
               max_bar: torch.Tensor, map_indices: set[int], maps: dict[int, torch.Tensor],
               skipped: list[tuple[int, str]], progress: bool, label: str) -> list[_Candidates]:
    P = loaded.num_prefix_tokens
    gh, gw = loaded.grid_size
    L = len(loaded.blocks) + 1
    cands = [_Candidates() for _ in range(L)]
    seen_batches = 0
    with NormCapture(loaded) as cap, ProgressBar(progress, source.num_found, label) as bar:
        for images, indices, bad in image_batches(source, batch_size, num_workers, device):
            skipped.extend(bad)
            bar.advance(len(indices) + len(bad))
            if images is None:
                continue
            norms = cap.run(images.to(device, non_blocking=True)).cpu()  # [L, B, T]
            if norms.shape[-1] != P + gh * gw:
                raise InputError(f"model produced {norms.shape[-1]} tokens, expected {P} prefix + {gh}x{gw} patches; "
                                 f"pass {option('img_size')} to match the model")
            if stats is not None:
                stats.update(norms)
            patches = norms[:, :, P:].double()
            for r in range(L):
                cands[r].add(patches[r], indices, float(bars[r]))
            for j, idx in enumerate(indices.tolist()):
                if idx in map_indices:
                    maps[idx] = patches[:, j].reshape(L, gh, gw).float()
            seen_batches += 1
            # Provisional bars at batches 1, 2, 4, 8, ...: a handful of cheap fits per scan, however long.
            if adaptive and stats is not None and seen_batches & (seen_batches - 1) == 0:
                _refresh_bars(stats, rule, bars, max_bar, cands)  # type: ignore[arg-type]
    return cands


# ----------------------------------------------------------------------------------------------- torch.distributed
def _merge_across_ranks(stats: NormStatistics, max_bar: torch.Tensor, device: torch.device) -> None:
    """Exact merge: counts and sums add, maxima take the max; every rank ends with the global statistics."""
    import torch.distributed as dist

    comm = device if dist.get_backend() == "nccl" else torch.device("cpu")
    for name, tensor in stats.tensors().items():
        t = tensor.to(comm)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if name in NormStatistics._MAXED else dist.ReduceOp.SUM)
        tensor.copy_(t.cpu())
    bar = max_bar.to(comm)
    dist.all_reduce(bar, op=dist.ReduceOp.MAX)
    max_bar.copy_(bar.cpu())
    counts = torch.tensor([stats.num_images, stats.num_patches_per_image or 0], dtype=torch.int64, device=comm)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    patches = torch.tensor([stats.num_patches_per_image or 0], dtype=torch.int64, device=comm)
    dist.all_reduce(patches, op=dist.ReduceOp.MAX)
    stats.num_images = int(counts[0])
    stats.num_patches_per_image = int(patches[0]) or None


# ----------------------------------------------------------------------------------------------- scan()
def scan(
    model: str | Path | LoadedModel | torch.nn.Module | None = None,
    images: str | Path | Sequence[str | Path] | Dataset | torch.Tensor | None = None,
    *,
    threshold: str | float | None = THRESHOLD,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    trust_checkpoint: bool = False,
    img_size: int | None = None,
    weights: str | None = None,
    device: str | None = DEVICE,
    batch_size: int = BATCH_SIZE,
    num_workers: int | str = WORKERS,
    num_maps: int = MAPS,
    rule: AutoRule | None = None,
    progress: bool = False,
    warn: Callable[[str], None] | None = None,
    exact_decode: bool = False,
    gpu_decode: bool = False,
    allow_nonfinite: bool = False,
) -> ScanReport:
    """Scan a ViT's patch-token norms, layer by layer, and flag the high-norm outliers.

    Args:
        model: anything :func:`artifactscan.load_model` accepts (``None``: the embedded default, the calibration
            phantom), or an already loaded model.
        images: a folder or file, a list of files, ``"synthetic:N"`` (the built-in labelled data set), a Dataset of
            ``[0, 1]`` tensors or an ``[N, 3, H, W]`` tensor. ``None``: the photos in ``sample_images/``.
        threshold: ``"auto"`` (the separated-group rule, per layer) or a number (fixed, e.g. the paper's 150).
        batch_size / num_workers / device: the pass's DataLoader and device (``auto``: CUDA when available;
            ``num_workers="auto"``: :func:`artifactscan.inputs.sources.auto_workers`).
        exact_decode: decode image files in full (default: only as large as the model needs, docs/data-path.md).
        gpu_decode: with a CUDA device, decode JPEGs on it (TorchCodec / nvJPEG; per-file Pillow fallback).
        num_maps: how many images keep their norm grids for the per-image figures.
        progress: draw a progress bar on stderr.
        warn: called with a one-line message for each skipped image (default: print to stderr).
        allow_nonfinite: scan a model with NaN/Inf weights instead of refusing it (:class:`NonFiniteError`).
            Non-finite token norms are always counted per layer (``num_nonfinite``) and put first in the headline;
            :meth:`ScanReport.nonfinite_problem` says what was found.

    Returns:
        A :class:`ScanReport`.
    """
    fixed = threshold_option(threshold)
    if batch_size <= 0:
        raise InputError(f"{option('batch_size')} must be positive, got {batch_size}")
    parse_workers(num_workers)
    if num_maps < 0:
        raise InputError(f"{option('num_maps')} must be 0 or more (the number of images that keep a norm map), "
                         f"got {num_maps}")
    rule = rule or AutoRule()
    dev = resolve_device(device)
    world, rank = distributed_world()
    load = dict(arch=arch, arch_kwargs=arch_kwargs, trust_checkpoint=trust_checkpoint, img_size=img_size,
                weights=weights, allow_nonfinite=allow_nonfinite)
    loaded, source = load_with_images(model, images, load=load, device=dev, batch_size=batch_size,
                                      num_workers=num_workers, exact_decode=exact_decode, gpu_decode=gpu_decode,
                                      early=world == 1)  # under torchrun each rank takes a shard: no early pass
    try:
        check_fits(loaded, effective_batch_size(source, batch_size), dev)
    except BaseException:
        source.close()
        raise
    loaded.model.to(dev)
    local = source
    if world > 1:  # each rank scans every world-th image; the statistics merge exactly afterwards
        from dataclasses import replace

        from torch.utils.data import Subset

        shard = Subset(source.dataset, range(rank, source.num_found, world))
        local = replace(source, dataset=shard, num_found=len(shard))
    num_blocks = len(loaded.blocks)
    L = num_blocks + 1
    fixed_list = (PAPER_THRESHOLD,) + ((fixed,) if fixed is not None and fixed != PAPER_THRESHOLD else ())
    stats = NormStatistics(L, loaded.prefix_names, fixed_list)

    # Pass 1: statistics + candidate records above a provisional bar.
    adaptive = fixed is None
    bars = torch.zeros(L, dtype=torch.float64) if adaptive else torch.full((L,), float(fixed), dtype=torch.float64)
    max_bar = bars.clone()
    map_indices = set(range(min(num_maps, source.num_found)))
    maps: dict[int, torch.Tensor] = {}
    skipped: list[tuple[int, str]] = []
    cands = _scan_pass(loaded, local, dev, batch_size, num_workers, stats, bars, rule, adaptive, max_bar,
                       map_indices, maps, skipped, progress and rank == 0, "scanning")
    if world > 1:
        _merge_across_ranks(stats, max_bar, dev)
        skipped = sorted(s for part in gather(skipped) for s in part)
        maps = {k: v for part in gather(maps) for k, v in part.items()}
    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
    for idx, reason in skipped if rank == 0 else []:
        warn(f"skipped {display_name(source.names[idx])}: {reason}")
    if rank == 0 and any(s in UNDECODED_IMAGE_SUFFIXES for s in source.other_files):
        # Said once when something looks like an image we leave out (.svg, .heic ...); a README beside the photos
        # is only counted (images.num_other_files).
        n_other = sum(source.other_files.values())
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(source.other_files.items(), key=lambda kv: -kv[1])[:6])
        warn(f"ignored {n_other} file(s) that are not images ({kinds})")
    if stats.num_images == 0:
        raise InputError(f"none of the {source.num_found} images could be read ({len(skipped)} skipped); "
                         "nothing to scan")

    decisions = [fixed_threshold(fixed) if fixed is not None else auto_threshold(stats.patch_counts[r], rule)
                 for r in range(L)]

    # Pass 2 only when a final auto threshold fell below a provisional bar: re-collect those rows exactly.
    redo = [r for r, d in enumerate(decisions) if adaptive and d.value is not None and d.value <= float(max_bar[r])]
    if redo:
        exact_bars = torch.full((L,), float("inf"), dtype=torch.float64)
        for r in redo:
            exact_bars[r] = decisions[r].value * (1 - 1e-9)  # type: ignore[operator]
        again = _scan_pass(loaded, local, dev, batch_size, num_workers, None, exact_bars, None, False,
                           exact_bars.clone(), set(), {}, [], progress and rank == 0, "collecting outliers")
        for r in redo:
            cands[r] = again[r]

    names = row_names(num_blocks)
    gh, gw = loaded.grid_size
    shown_cache: dict[int, tuple[str, str | None]] = {}

    def shown(i: int) -> tuple[str, str | None]:
        """An image's printable name and, when that had to escape it, its exact bytes as hex."""
        if i not in shown_cache:
            shown_cache[i] = (display_name(source.names[i]), name_hex(source.names[i]))
        return shown_cache[i]

    layers: list[LayerReport] = []
    records: list[OutlierRecord] = []
    flagged_maps: dict[int, torch.Tensor] = {i: torch.zeros(L, gh, gw, dtype=torch.bool) for i in maps}
    n_img, n_tok = stats.num_images, stats.num_patch_tokens
    for r, d in enumerate(decisions):
        img, pat, nrm = cands[r].tensors()
        if d.value is None:
            keep = torch.zeros_like(nrm, dtype=torch.bool)
            n_out, n_img_out = 0, 0
        elif d.method == "fixed":
            keep = nrm > d.value
            n_out, n_img_out = stats.fixed_hits(r, d.value)
        else:
            keep = bin_index(nrm) >= d.edge_index  # same rule the histogram counts use: records == counts
            n_out, n_img_out = stats.tokens_above_bin(r, d.edge_index), stats.images_above_bin(r, d.edge_index)
        for i, p, v in zip(img[keep].tolist(), pat[keep].tolist(), nrm[keep].tolist()):
            name, hex_name = shown(i)
            records.append(OutlierRecord(name, i, r, p // gw, p % gw, float(v), hex_name))
            if i in flagged_maps:
                flagged_maps[i][r, p // gw, p % gw] = True
        # Quantiles interpolate inside a 0.58%-wide bin; never report one above the exact maximum.
        row_max = float(stats.patch_max[r])
        median = min(stats.median(r), row_max)
        above_paper, _ = stats.fixed_hits(r, PAPER_THRESHOLD)
        layers.append(LayerReport(
            index=r, name=names[r], is_final_norm=r == num_blocks, median=median, p99=min(stats.quantile(r, 0.99), row_max),
            max=row_max, max_over_median=row_max / median if median else math.nan,
            threshold=d.value, threshold_reason=d.reason, num_outliers=n_out, outlier_fraction=n_out / n_tok,
            images_with_outliers=n_img_out, image_fraction_with_outliers=n_img_out / n_img,
            fraction_above_150=above_paper / n_tok, prefix=stats.prefix_stats(r),
            histogram=Histogram.from_counts(stats.patch_counts[r]), separation=d.details,
            num_nonfinite=int(stats.nonfinite[r]), inconclusive=d.inconclusive,
            images_to_decide=images_to_decide(d.details["group_tokens"], n_img, rule) if d.inconclusive else None))
    if world > 1:  # per-outlier records gather to every rank (rank 0 reports); maps' flags are rebuilt from them
        records = [o for part in gather(records) for o in part]
        for o in records:
            if o.image_index in flagged_maps:
                flagged_maps[o.image_index][o.layer, o.row, o.col] = True
    records.sort(key=lambda o: (o.image_index, o.layer, o.row, o.col))

    onset = next((lay.index for lay in layers if not lay.is_final_norm and lay.num_outliers > 0), None)
    map_layer = num_blocks - 1
    norm_maps = [NormMap(shown(i)[0], i, map_layer, maps[i][map_layer].tolist(),
                         flagged_maps[i][map_layer].tolist(), shown(i)[1]) for i in sorted(maps)]
    report = ScanReport(
        model=loaded.summary(), images=source.summary(stats.num_images, skipped),
        threshold_mode="fixed" if fixed is not None else "auto",
        threshold_rule=f"fixed: norm > {fixed:g}" if fixed is not None else rule.describe(),
        layers=layers, onset_layer=onset, headline="", outliers=records, outlier_records_complete=True,
        maps=norm_maps, notes=list(loaded.notes), nonfinite_weights=list(loaded.nonfinite_tensors))
    report.headline = headline(report)
    return report


def model_summary(loaded: LoadedModel) -> ModelSummary:
    """``loaded.summary()``, under the name the measurements have imported from here."""
    return loaded.summary()


# ----------------------------------------------------------------------------------------------- words
def _row_list(rows: list[LayerReport]) -> str:
    """``blocks 2, 3, 5`` (and ``the final norm``): the rows named as one phrase."""
    blocks = [str(lay.index) for lay in rows if not lay.is_final_norm]
    words = [("block " if len(blocks) == 1 else "blocks ") + ", ".join(blocks)] if blocks else []
    words += ["the final norm" for lay in rows if lay.is_final_norm]
    return " and ".join(words)


def headline(report: ScanReport) -> str:
    """The one-paragraph verdict shown first in the terminal and stored in the JSON."""
    last = report.last_block
    parts = []
    problem = report.nonfinite_problem()
    if problem:  # never "clean": NaN norms fall outside every histogram bin and every threshold test
        parts.append(f"NON-FINITE VALUES - THESE STATISTICS ARE NOT VALID: {problem}.")
    if is_phantom(report):
        parts.append(PHANTOM_HEADLINE_TAG)
    undecided = report.inconclusive_problem()
    if problem:
        pass  # no verdict on outliers: the numbers below are about a broken pass
    elif report.onset_layer is None and undecided:  # "could not decide" is never "clean"
        parts.append(f"INCONCLUSIVE, NOT CLEAN: nothing was flagged in the {report.model.num_blocks} blocks "
                     f"({report.images.num_scanned} images, {report.threshold_mode} threshold), but the scan is "
                     f"{undecided}.")
    elif report.onset_layer is None:
        parts.append(f"No high-norm outlier tokens in any of the {report.model.num_blocks} blocks "
                     f"({report.images.num_scanned} images, {report.threshold_mode} threshold).")
        if report.threshold_mode == "auto":
            parts.append("No layer has a separated high-norm group above its bulk.")
    else:
        parts.append(
            f"Outliers appear from block {report.onset_layer} of {report.model.num_blocks} (0-based). "
            f"Last block: {_pct(last.outlier_fraction)} of patch tokens flagged, in "
            f"{_pct(last.image_fraction_with_outliers)} of images; max/median norm {last.max_over_median:.1f}x.")
        if undecided:
            parts.append(f"The scan is {undecided}.")
    if report.threshold_mode == "auto":
        thr = ("none (inconclusive)" if last.inconclusive else "none (no separated group)" if last.threshold is None
               else f"{last.threshold:.4g}")
        parts.append(f"Threshold: separated-group rule per layer (last block: {thr}).")
    else:
        parts.append(f"Threshold: fixed, norm > {last.threshold:g}.")
    parts.append(f"Paper's fixed {PAPER_THRESHOLD:g} would flag {_pct(last.fraction_above_150)} at the last block.")
    if report.images.skipped:
        parts.append(f"{len(report.images.skipped)} unreadable image(s) skipped.")
    return " ".join(parts)


def load_scan_report(path: str | Path) -> ScanReport:
    """A scan's ``report.json`` read back (a probe writes a ``report.json`` too: see ``load_probe_report``)."""
    return ScanReport.from_dict(json.loads(Path(path).read_text()))


load_report = load_scan_report  # its name before 0.3 ("report" alone also names the HTML page and the probe's)
