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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch.utils.data import Dataset

from artifactscan.core.numbers import percent as _pct
from artifactscan.core.defaults import BATCH_SIZE, DEVICE, MAPS, THRESHOLD, WORKERS
from artifactscan.analysis.capture import row_names
from artifactscan.analysis.passes import (OUTPUT, Batch, Measurement, OpenedPass, PassSettings, block_output,
                                          open_pass, token_norms)
from artifactscan.core.errors import InputError, option
from artifactscan.core.files import display_name, name_hex
from artifactscan.core.distributed import gather
from artifactscan.models.loading import LoadedModel
from artifactscan.models.phantom_notice import PHANTOM_HEADLINE_TAG, is_phantom
from artifactscan.core.stats import NormStatistics, PrefixTokenStats, bin_index, NUM_BINS, LOG10_MIN, BIN_WIDTH_LOG10
from artifactscan.core.thresholds import (
    PAPER_THRESHOLD,
    AutoRule,
    auto_threshold,
    fixed_threshold,
    images_to_decide,
    threshold_option,
)
from artifactscan.core.summaries import AnalysisResult, ImageSummary, ModelSummary  # noqa: F401  (ModelSummary, ImageSummary: re-exported from their 0.2 home)

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


# ----------------------------------------------------------------------------------------------- the pass
@dataclass
class _Candidates:
    """Per-row candidate outlier tokens: (image index, patch index, norm, the width of that image's patch grid)."""

    image: list[torch.Tensor] = field(default_factory=list)
    patch: list[torch.Tensor] = field(default_factory=list)
    norm: list[torch.Tensor] = field(default_factory=list)
    width: list[torch.Tensor] = field(default_factory=list)

    def add(self, norms: torch.Tensor, image_ids: torch.Tensor, bar: float, widths: torch.Tensor) -> None:
        """``norms`` ``[B, N]`` (padding of NaFlex images at -inf: never a candidate); ``widths`` ``[B]``."""
        hit = torch.nonzero(norms > bar)
        if len(hit):
            self.image.append(image_ids[hit[:, 0]])
            self.patch.append(hit[:, 1])
            self.norm.append(norms[hit[:, 0], hit[:, 1]])
            self.width.append(widths[hit[:, 0]])

    def prune(self, bar: float) -> None:
        if not self.norm:
            return
        img, pat, nrm, wid = (torch.cat(x) for x in (self.image, self.patch, self.norm, self.width))
        keep = nrm > bar
        self.image, self.patch, self.norm, self.width = [img[keep]], [pat[keep]], [nrm[keep]], [wid[keep]]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.norm:
            e = torch.empty(0)
            return e.long(), e.long(), e.double(), e.long()
        return torch.cat(self.image), torch.cat(self.patch), torch.cat(self.norm), torch.cat(self.width)


def _refresh_bars(stats: NormStatistics, rule: AutoRule, bars: torch.Tensor, max_bar: torch.Tensor,
                  cands: list[_Candidates]) -> None:
    for r in range(stats.num_rows):
        estimate = auto_threshold(stats.patch_counts[r], rule).value
        # Half the running estimate leaves room for it to move; without an estimate keep only new extremes.
        bar = 0.5 * estimate if estimate is not None else float(stats.patch_max[r])
        bars[r] = bar
        max_bar[r] = max(float(max_bar[r]), bar)
        cands[r].prune(bar)


class NormsMeasurement:
    """Token norms of every block and of the final output, batch by batch: into the statistics (when given), as
    candidate records above each row's bar, and as the norm grids of the images in ``map_indices``. With ``rule``
    (the adaptive threshold) the bars are refreshed from the running statistics."""

    measures_naflex = True  # padded tokens of NaFlex batches (``Batch.valid``) are left out of everything

    def __init__(self, loaded: LoadedModel, bars: torch.Tensor, *, stats: NormStatistics | None = None,
                 rule: AutoRule | None = None, map_indices: range | set[int] = frozenset()):
        self.loaded, self.bars, self.stats, self.rule = loaded, bars, stats, rule
        self.max_bar = bars.clone()  # the highest bar each row used: below it, records may be missing
        self.map_indices = set(map_indices)
        self.maps: dict[int, torch.Tensor] = {}
        self.num_rows = len(loaded.blocks) + 1
        self.cands = [_Candidates() for _ in range(self.num_rows)]
        self.seen_batches = 0

    def hook_names(self) -> dict[str, Any]:
        return {**{block_output(i): token_norms for i in range(self.num_rows - 1)}, OUTPUT: token_norms}

    def stop_after(self) -> int | None:
        return None

    def on_batch(self, batch: Batch) -> None:
        P = self.loaded.num_prefix_tokens
        gh, gw = self.loaded.grid_size
        L = self.num_rows
        rows = [batch.captured[block_output(i)] for i in range(L - 1)] + [batch.captured[OUTPUT]]
        norms = torch.stack(rows).cpu()  # [L, B, T]
        grids = batch.grids if batch.grids is not None else torch.tensor([[gh, gw]]).expand(len(batch.indices), 2)
        if batch.valid is None and norms.shape[-1] != P + gh * gw:
            raise InputError(f"model produced {norms.shape[-1]} tokens, expected {P} prefix + {gh}x{gw} patches; "
                             f"pass {option('img_size')} to match the model")
        if self.stats is not None:
            self.stats.update(norms, batch.valid)
        patches = norms[:, :, P:].double()
        if batch.valid is not None:  # NaFlex padding: below every bar, out of every record and map
            patches = patches.masked_fill(~batch.valid[None], float("-inf"))
        for r in range(L):
            self.cands[r].add(patches[r], batch.indices, float(self.bars[r]), grids[:, 1])
        for j, idx in enumerate(batch.indices.tolist()):
            if idx in self.map_indices:
                rows, cols = (int(v) for v in grids[j])
                self.maps[idx] = patches[:, j, :rows * cols].reshape(L, rows, cols).float()
        self.seen_batches += 1
        # Provisional bars at batches 1, 2, 4, 8, ...: a handful of cheap fits per scan, however long.
        if self.rule is not None and self.stats is not None and self.seen_batches & (self.seen_batches - 1) == 0:
            _refresh_bars(self.stats, self.rule, self.bars, self.max_bar, self.cands)

    def finish(self) -> list[_Candidates]:
        return self.cands


def _first_pass(opened: OpenedPass, fixed: float | None, rule: AutoRule, num_maps: int,
                also: Sequence[Measurement] = ()
                ) -> tuple[NormStatistics, list[_Candidates], dict[int, torch.Tensor], torch.Tensor]:
    """Pass 1: the statistics, candidate records above a provisional bar and the maps, merged across ranks;
    ``also``: other measurements of the same images, on the same forward."""
    L = len(opened.loaded.blocks) + 1
    fixed_list = (PAPER_THRESHOLD,) + ((fixed,) if fixed is not None and fixed != PAPER_THRESHOLD else ())
    stats = NormStatistics(L, opened.loaded.prefix_names, fixed_list)
    adaptive = fixed is None
    bars = torch.zeros(L, dtype=torch.float64) if adaptive else torch.full((L,), float(fixed), dtype=torch.float64)
    norms = NormsMeasurement(opened.loaded, bars, stats=stats, rule=rule if adaptive else None,
                             map_indices=range(min(num_maps, opened.source.num_found)))
    cands, *_ = opened.run([norms, *also], "scanning")
    maps = norms.maps
    if opened.world > 1:  # each rank scanned its shard; the statistics merge exactly
        _merge_across_ranks(stats, norms.max_bar, opened.device)
        maps = {k: v for part in gather(maps) for k, v in part.items()}
    return stats, cands, maps, norms.max_bar


def _recollect_exactly(opened: OpenedPass, decisions: list[Any], max_bar: torch.Tensor,
                       cands: list[_Candidates]) -> None:
    """Pass 2, only for the rows whose final auto threshold fell below a provisional bar: their records again."""
    redo = [r for r, d in enumerate(decisions) if d.value is not None and d.value <= float(max_bar[r])]
    if not redo:
        return
    exact_bars = torch.full((len(decisions),), float("inf"), dtype=torch.float64)
    for r in redo:
        exact_bars[r] = decisions[r].value * (1 - 1e-9)
    again, = opened.run([NormsMeasurement(opened.loaded, exact_bars)], "collecting outliers", count_skipped=False)
    for r in redo:
        cands[r] = again[r]


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


# ----------------------------------------------------------------------------------------------- rows and records
def _printable_names(names: Sequence[str]) -> Callable[[int], tuple[str, str | None]]:
    """Image index -> its printable name and, when that had to escape it, its exact bytes as hex (each once)."""
    cache: dict[int, tuple[str, str | None]] = {}

    def shown(i: int) -> tuple[str, str | None]:
        if i not in cache:
            cache[i] = (display_name(names[i]), name_hex(names[i]))
        return cache[i]
    return shown


def _row_outliers(stats: NormStatistics, r: int, d: Any, cands: _Candidates
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """Row ``r``'s flagged tokens ``(image, patch, norm, its image's grid width)`` under decision ``d``, with the
    exact counts of flagged tokens and of images with one."""
    img, pat, nrm, wid = cands.tensors()
    if d.value is None:
        keep = torch.zeros_like(nrm, dtype=torch.bool)
    elif d.method == "fixed":
        keep = nrm > d.value
    else:
        keep = bin_index(nrm) >= d.edge_index  # same rule the histogram counts use: records == counts
    return (img[keep], pat[keep], nrm[keep], wid[keep], *decision_counts(stats, r, d))


def decision_counts(stats: NormStatistics, r: int, d: Any) -> tuple[int, int]:
    """The exact counts of tokens flagged at row ``r`` under decision ``d``, and of images with one: fixed
    thresholds as the tokens streamed by, auto ones on their histogram bin edge."""
    if d.value is None:
        return 0, 0
    if d.method == "fixed":
        return stats.fixed_hits(r, d.value)
    return stats.tokens_above_bin(r, d.edge_index), stats.images_above_bin(r, d.edge_index)


def layer_report(stats: NormStatistics, r: int, d: Any, name: str, is_final: bool, n_out: int, n_img_out: int,
                 rule: AutoRule) -> LayerReport:
    """Row ``r``'s report from the streamed statistics and its threshold decision ``d`` (the monitor builds its
    per-block rows with it too)."""
    n_img, n_tok = stats.num_images, stats.num_patch_tokens
    # Quantiles interpolate inside a 0.58%-wide bin; never report one above the exact maximum.
    row_max = float(stats.patch_max[r])
    median = min(stats.median(r), row_max)
    above_paper, _ = stats.fixed_hits(r, PAPER_THRESHOLD)
    return LayerReport(
        index=r, name=name, is_final_norm=is_final, median=median, p99=min(stats.quantile(r, 0.99), row_max),
        max=row_max, max_over_median=row_max / median if median else math.nan,
        threshold=d.value, threshold_reason=d.reason, num_outliers=n_out, outlier_fraction=n_out / n_tok,
        images_with_outliers=n_img_out, image_fraction_with_outliers=n_img_out / n_img,
        fraction_above_150=above_paper / n_tok, prefix=stats.prefix_stats(r),
        histogram=Histogram.from_counts(stats.patch_counts[r]), separation=d.details,
        num_nonfinite=int(stats.nonfinite[r]), inconclusive=d.inconclusive,
        images_to_decide=images_to_decide(d.details["group_tokens"], n_img, rule) if d.inconclusive else None)


def _layers_and_records(loaded: LoadedModel, stats: NormStatistics, decisions: list[Any],
                        cands: list[_Candidates], rule: AutoRule, shown: Callable[[int], tuple[str, str | None]],
                        flagged_maps: dict[int, torch.Tensor]) -> tuple[list[LayerReport], list[OutlierRecord]]:
    """Every row's report and this rank's outlier records (flagging them in ``flagged_maps``)."""
    num_blocks = len(loaded.blocks)
    names = row_names(num_blocks)
    layers: list[LayerReport] = []
    records: list[OutlierRecord] = []
    for r, d in enumerate(decisions):
        img, pat, nrm, wid, n_out, n_img_out = _row_outliers(stats, r, d, cands[r])
        for i, p, v, gw in zip(img.tolist(), pat.tolist(), nrm.tolist(), wid.tolist()):
            name, hex_name = shown(i)
            records.append(OutlierRecord(name, i, r, p // gw, p % gw, float(v), hex_name))
            if i in flagged_maps:
                flagged_maps[i][r, p // gw, p % gw] = True
        layers.append(layer_report(stats, r, d, names[r], r == num_blocks, n_out, n_img_out, rule))
    return layers, records


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
    precision: str = "auto",
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
    also: Sequence[Measurement] = (),
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
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16``: what the weights are held and the forward run in, as for
            :func:`artifactscan.load_model` (the statistics are float32 whatever it is).
            Non-finite token norms are always counted per layer (``num_nonfinite``) and put first in the headline;
            :meth:`ScanReport.nonfinite_problem` says what was found.
        also: other measurements of the same images (``analysis.passes.Measurement``) that share the scan's first
            forward; their results are their own ``finish()`` (``compare`` reads the attention on prefix tokens so).

    Returns:
        A :class:`ScanReport`.
    """
    fixed = threshold_option(threshold)
    settings = PassSettings(device=device, batch_size=batch_size, num_workers=num_workers, exact_decode=exact_decode,
                            gpu_decode=gpu_decode, progress=progress, warn=warn, allow_nonfinite=allow_nonfinite)
    settings.check()
    if num_maps < 0:
        raise InputError(f"{option('num_maps')} must be 0 or more (the number of images that keep a norm map), "
                         f"got {num_maps}")
    rule = rule or AutoRule()
    load = dict(arch=arch, arch_kwargs=arch_kwargs, trust_checkpoint=trust_checkpoint, img_size=img_size,
                weights=weights, precision=precision)
    attention = any(name.endswith(".attn.pattern") for m in also for name in m.hook_names())
    with open_pass(model, images, settings=settings, load=load, explicit_attention=attention) as opened:
        return measure_norms(opened, fixed, rule, num_maps, also)


def measure_norms(opened: OpenedPass, fixed: float | None, rule: AutoRule, num_maps: int,
                  also: Sequence[Measurement] = ()) -> ScanReport:
    """The norms scan of an opened pass (``fixed``: a fixed threshold, else ``rule``): one pass, and a second only
    for rows whose final threshold fell below a provisional bar (module doc). ``also``: measurements that share
    the first pass's forward (their results are their own ``finish()``). The unreadable files reported are this
    scan's."""
    opened.skipped.clear()
    stats, cands, maps, max_bar = _first_pass(opened, fixed, rule, num_maps, also)
    skipped = opened.all_skipped()
    opened.announce_skipped(skipped)
    if stats.num_images == 0:
        raise InputError(f"none of the {opened.source.num_found} images could be read ({len(skipped)} skipped); "
                         "nothing to scan")
    decisions = [fixed_threshold(fixed) if fixed is not None else auto_threshold(stats.patch_counts[r], rule)
                 for r in range(stats.num_rows)]
    if fixed is None:
        _recollect_exactly(opened, decisions, max_bar, cands)
    return _scan_report(opened, stats, decisions, cands, maps, skipped, fixed, rule)


def _scan_report(opened: OpenedPass, stats: NormStatistics, decisions: list[Any], cands: list[_Candidates],
                 maps: dict[int, torch.Tensor], skipped: list[tuple[int, str]], fixed: float | None,
                 rule: AutoRule) -> ScanReport:
    """The report of the passes: rows, records (gathered from every rank), maps and the headline."""
    loaded, source = opened.loaded, opened.source
    num_blocks = len(loaded.blocks)
    shown = _printable_names(source.names)
    flagged_maps = {i: torch.zeros(maps[i].shape, dtype=torch.bool) for i in maps}  # each image's own grid
    layers, records = _layers_and_records(loaded, stats, decisions, cands, rule, shown, flagged_maps)
    if opened.world > 1:  # per-outlier records gather to every rank (rank 0 reports); maps' flags are rebuilt from them
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
