"""``discover()``: unsupervised object discovery with LOST, scored with CorLoc, and whether artifacts break it.

Darcet et al. (2024, Table 3) show the artifact tokens' most practical cost downstream: LOST (Siméoni et al. 2021)
picks as its seed the patch with the fewest positive key correlations, and a high-norm artifact token is exactly
such a patch, so the box lands on background (DINOv2: 35.3 CorLoc on VOC 2007, 55.4 with registers). This module
measures that on any model and data set:

* **LOST** (:mod:`artifactscan.analysis.lost`) on one block's keys (default: the last block; or queries, values,
  output tokens), the similarity graphs of a whole batch at once on the model's device;
* **CorLoc**: the fraction of images whose box has IoU >= 0.5 with any ground-truth box (images without a box are
  left out of it), beside two baselines: a centred box (the middle half of each side) and a random box (seeded,
  on the patch grid);
* **why, per image**: was the seed on an outlier token? The residual stream that feeds the features (the block's
  input for q/k/v, its output for tokens) goes through the norms scan's threshold rule (same histogram bins, same
  ``--threshold``), and the rate of seeds on flagged tokens is set against the flagged tokens' share;
* **before / after**: several models side by side, or one model with a test-time register installed
  (:func:`artifactscan.analysis.fix.find_register_neurons` on the same images) as ``compare=["fix"]``.

Memory: the per-image records (a box, a seed, a few numbers) and one norm histogram; pixels, features and
similarity graphs live for one batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from artifactscan.core.numbers import percent
from artifactscan.core.blocks import parse_block, renamed_keyword
from artifactscan.core.defaults import BATCH_SIZE, BLOCK, DEVICE, MAPS, THRESHOLD, TOP_K, WORKERS
from artifactscan.core.numerics import measurement_mode
from artifactscan.analysis.fix import find_register_neurons
from artifactscan.analysis.lost import FEATURES, FeatureCapture, default_k, feature_points, lost_batched
from artifactscan.analysis.scan import ModelSummary, model_summary, scan
from artifactscan.core.errors import InputError, option
from artifactscan.analysis.passes import OpenedPass, PassSettings, open_loaded
from artifactscan.core.devices import resolve_device
from artifactscan.core.results import from_jsonable
from artifactscan.core.summaries import ImageSummary, MultiModelResult, SkippedImage
from artifactscan.core.stats import NormStatistics, bin_index
from artifactscan.core.thresholds import PAPER_THRESHOLD, AutoRule, auto_threshold, fixed_threshold, threshold_option
from artifactscan.inputs.boxes import DEFAULT_OBJECT_IMAGES, BoxedData, load_box_data
from artifactscan.models.loading import LoadedModel, load_model
from artifactscan.models.phantom_notice import PHANTOM_HEADLINE_TAG, is_phantom
from artifactscan.models.interventions import EXTRA_KEY, apply_test_time_register, check_supported

# /3: the common header first (core/summaries.py): ``model`` (one summary per model, the fixed runs not counted
# again) and ``images`` (from ``data``) are new; /2 files are read with them rebuilt from ``runs`` and ``data``.
SCHEMA = "artifactscan.discover/3"
OLDER_SCHEMAS = ("artifactscan.discover/1", "artifactscan.discover/2")
CORLOC_IOU = 0.5
COMPARE_CHOICES = ("fix",)


# ----------------------------------------------------------------------------------------------- result types
@dataclass
class ImageDiscovery:
    """One image of one run. Boxes are ``[x0, y0, x1, y1]`` in the image's annotated pixels (the model-input
    pixels for images without a known size); ``box_patches`` is the same box on the patch grid."""

    image: str
    index: int
    path: str | None
    size: list[int]  # [width, height] of the image the boxes are in
    box: list[float]
    box_patches: list[int]
    seed: list[int]  # [row, col] on the patch grid
    seed_norm: float
    seed_flagged: bool
    seed_outside_mask: bool
    gt_boxes: list[list[float]] | None
    iou: float | None  # best IoU with a ground-truth box
    correct: bool | None
    centre_correct: bool | None
    random_correct: bool | None
    outliers: list[list[int]] | None = None  # flagged [row, col] patches, for the first images only


@dataclass
class DiscoveryRun:
    """LOST with one model (or one model + fix). CorLoc values are fractions; None without ground truth."""

    label: str
    model: ModelSummary
    block: int
    features: str
    k: int
    outlier_source: str
    threshold: float | None
    threshold_reason: str
    num_images: int
    num_scored: int  # images with >= 1 ground-truth box: CorLoc's denominator
    corloc: float | None
    corloc_centre: float | None
    corloc_random: float | None
    mean_iou: float | None
    seeds_on_outliers: int
    seed_outlier_rate: float  # fraction of images whose seed is a flagged token
    outlier_share: float  # fraction of all patch tokens flagged
    seed_outlier_enrichment: float | None  # rate / share (1 = seeds land on outliers as often as chance)
    corloc_seed_on_outlier: float | None
    corloc_seed_elsewhere: float | None
    seed_outside_mask: int
    images: list[ImageDiscovery]
    notes: list[str] = field(default_factory=list)
    repairs: str | None = None  # the label of the run this one repairs (with --compare fix)


@dataclass
class DataSummary:
    kind: str  # synthetic-objects / synthetic / voc / coco / images
    spec: str
    description: str
    num_images: int
    with_boxes: bool
    synthetic_img_size: int | None
    skipped: list[str]  # "NAME: reason"

    def image_summary(self) -> ImageSummary:
        """The same images in every result's words (the header's ``images``)."""
        skipped = [SkippedImage(*s.split(": ", 1)) if ": " in s else SkippedImage(s, "skipped") for s in self.skipped]
        return ImageSummary(self.description, self.num_images + len(skipped), self.num_images, skipped)


@dataclass
class DiscoverReport(MultiModelResult):
    """Everything ``artifactscan discover`` found: one run per model (and per fix). Serialises to discover.json.
    ``model`` lists the models' summaries (a fixed run is the model of the run it repairs)."""

    SCHEMA = SCHEMA
    OLDER_SCHEMAS = OLDER_SCHEMAS

    data: DataSummary
    threshold_mode: str
    threshold_rule: str
    corloc_rule: str
    baselines: str
    runs: list[DiscoveryRun]
    notes: list[str]

    @classmethod
    def upgrade(cls, data: dict[str, Any], schema: str) -> dict[str, Any]:
        data["model"] = [run["model"] for run in data.get("runs", []) if run.get("repairs") is None]
        data["images"] = asdict(from_jsonable(DataSummary, data["data"]).image_summary())
        return data


# ----------------------------------------------------------------------------------------------- helpers
def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``[x0, y0, x1, y1]`` boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def best_iou(box: Sequence[float], gts: Sequence[Sequence[float]]) -> float:
    return max((iou(box, g) for g in gts), default=0.0)


def centre_box(w: float, h: float) -> list[float]:
    """The centred baseline: the middle half of each side (a quarter of the image)."""
    return [w / 4, h / 4, 3 * w / 4, 3 * h / 4]


def random_box(grid: tuple[int, int], seed: int, index: int) -> list[int]:
    """The random baseline on the patch grid: two distinct edges per axis, uniform, from ``(seed, index)``."""
    gh, gw = grid
    rng = np.random.default_rng([int(seed), int(index)])
    x0, x1 = sorted(int(v) for v in rng.choice(gw + 1, size=2, replace=False))
    y0, y1 = sorted(int(v) for v in rng.choice(gh + 1, size=2, replace=False))
    return [x0, y0, x1, y1]


def _rate(hits: int, n: int) -> float | None:
    return hits / n if n else None


# ----------------------------------------------------------------------------------------------- one run
@dataclass
class _SeedRow:
    """Where LOST's seed and box fell in one image (patch-grid units), and the seed's norm."""

    index: int
    seed: int
    box: list[int]
    outside: bool
    norm: float


class _OutlierRule:
    """The norms scan's threshold on the residual stream that feeds the features: which norms are flagged."""

    def __init__(self, stats: NormStatistics, fixed: float | None, rule: AutoRule):
        self.fixed = fixed
        if fixed is not None:
            self.decision = fixed_threshold(fixed)
            self.edge = None
            self.num_flagged = stats.fixed_hits(0, fixed)[0]
        else:
            self.decision = auto_threshold(stats.patch_counts[0], rule)
            self.edge = self.decision.edge_index
            self.num_flagged = stats.tokens_above_bin(0, self.edge) if self.edge is not None else 0

    def flags(self, norms: torch.Tensor) -> torch.Tensor:
        if self.fixed is not None:
            return norms > self.fixed
        return bin_index(norms) >= self.edge if self.edge is not None else torch.zeros(norms.shape, dtype=torch.bool)


def _lost_pass(opened: OpenedPass, b: int, features: str, kk: int, keep: int, stats: NormStatistics,
               label: str) -> tuple[list[_SeedRow], dict[int, torch.Tensor]]:
    """LOST on every image: the seed rows, the norm histogram of the feeding residual stream (into ``stats``) and
    the patch norms of the first ``keep`` images."""
    loaded = opened.loaded
    P, (gh, gw) = loaded.num_prefix_tokens, loaded.grid_size
    rows: list[_SeedRow] = []
    kept_norms: dict[int, torch.Tensor] = {}
    with measurement_mode(), FeatureCapture(loaded, b, features) as cap:
        for x, indices, bad in opened.batches(f"discover {label}"):
            opened.skipped.extend(bad)
            if x is None:
                continue
            feats, resid = cap.run(x)
            if feats.shape[1] != P + gh * gw:
                raise InputError(f"block {b} has {feats.shape[1]} tokens, expected {P} prefix + {gh}x{gw} patches; "
                                 f"pass {option('img_size')} to match the model")
            boxes = lost_batched(feats[:, P:], (gh, gw), kk)
            norms = resid[:, P:].float().norm(dim=-1)  # [B, N]
            stats.update(norms[None].cpu())
            seed_norm = norms.gather(1, boxes.seed[:, None])[:, 0].double().cpu()
            seed, box, outside = boxes.seed.cpu(), boxes.box.cpu(), boxes.seed_outside_mask.cpu()
            for j, i in enumerate(indices.tolist()):
                rows.append(_SeedRow(i, int(seed[j]), box[j].tolist(), bool(outside[j]), float(seed_norm[j])))
                if i < keep:
                    kept_norms[i] = norms[j].cpu()
    return rows, kept_norms


def _image_discovery(r: _SeedRow, data: BoxedData, loaded: LoadedModel, flagged: _OutlierRule,
                     kept_norms: dict[int, torch.Tensor], random_seed: int) -> ImageDiscovery:
    """One image's box in its own pixels, scored against its ground truth and the two baselines."""
    H_in, W_in = loaded.input_size
    ph, pw = loaded.patch_size
    gh, gw = loaded.grid_size
    item = data.items[r.index]
    w, h = (item.width, item.height) if item.width and item.height else (W_in, H_in)
    sx, sy = w / W_in, h / H_in
    bp = r.box
    box = [bp[0] * pw * sx, bp[1] * ph * sy, bp[2] * pw * sx, bp[3] * ph * sy]
    seed_flagged = bool(flagged.flags(torch.tensor([r.norm], dtype=torch.float64))[0])
    gts = item.boxes
    best = correct = c_ok = r_ok = None
    if gts:
        best = best_iou(box, gts)
        correct = best >= CORLOC_IOU
        c_ok = best_iou(centre_box(w, h), gts) >= CORLOC_IOU
        rb = random_box((gh, gw), random_seed, r.index)
        r_ok = best_iou([rb[0] * pw * sx, rb[1] * ph * sy, rb[2] * pw * sx, rb[3] * ph * sy], gts) >= CORLOC_IOU
    out = None
    if r.index in kept_norms:
        m = flagged.flags(kept_norms[r.index].double())
        out = [[p // gw, p % gw] for p in torch.nonzero(m).flatten().tolist()]
    return ImageDiscovery(item.name, r.index, item.path, [int(w), int(h)], box, bp, [r.seed // gw, r.seed % gw],
                          r.norm, seed_flagged, r.outside, gts, best, correct, c_ok, r_ok, out)


def _outlier_source(features: str, b: int) -> str:
    return (f"the output of block {b} (norms-scan row {b})" if features == "tokens" else
            f"the input of block {b} (norms-scan row {b - 1}: the tokens its q/k/v are computed from)"
            if b > 0 else "the input of block 0 (the patch embedding; not a norms-scan row, same rule)")


def discovery_run(loaded: LoadedModel, data: BoxedData, *, label: str, block: int = -1, features: str = "keys",
                  k: int | None = None, threshold: str | float | None = "auto", rule: AutoRule | None = None,
                  device: str | torch.device = "auto", batch_size: int = 32, num_workers: int | str = "auto",
                  keep: int = 6,
                  random_seed: int = 0, progress: bool = False, skipped: list[str] | None = None) -> DiscoveryRun:
    """LOST with ``loaded`` on every image of ``data``; CorLoc, baselines and where the seeds fell."""
    fixed = threshold_option(threshold)
    b = parse_block(block, len(loaded.blocks), loaded.layer_range_hint())
    N = loaded.grid_size[0] * loaded.grid_size[1]
    kk = default_k(N) if k is None else int(k)
    if kk < 1:
        raise InputError(f"{option('k')} must be at least 1, got {kk}")
    kk = min(kk, N)
    fixed_list = (PAPER_THRESHOLD,) + ((fixed,) if fixed is not None and fixed != PAPER_THRESHOLD else ())
    stats = NormStatistics(1, [], fixed_list)
    settings = PassSettings(device=device, batch_size=batch_size, num_workers=num_workers, progress=progress)
    with open_loaded(loaded, data.image_source(loaded), settings) as opened:
        rows, kept_norms = _lost_pass(opened, b, features, kk, keep, stats, label)
    if skipped is not None:
        skipped.extend(f"{opened.source.names[i]}: {reason}" for i, reason in opened.skipped)
    if not rows:
        raise InputError(f"none of the {opened.source.num_found} images could be read; nothing to discover")
    flagged = _OutlierRule(stats, fixed, rule or AutoRule())
    images = sorted((_image_discovery(r, data, loaded, flagged, kept_norms, random_seed) for r in rows),
                    key=lambda d: d.index)
    scored = [d for d in images if d.correct is not None]
    n = len(images)
    on = [d for d in scored if d.seed_flagged]
    off = [d for d in scored if not d.seed_flagged]
    seeds_on = sum(d.seed_flagged for d in images)
    share = flagged.num_flagged / stats.num_patch_tokens if stats.num_patch_tokens else 0.0
    rate = seeds_on / n
    notes = []
    if n - len(scored) and scored:
        notes.append(f"{n - len(scored)} image(s) without a ground-truth box are left out of CorLoc")
    return DiscoveryRun(
        label=label, model=model_summary(loaded), block=b, features=features, k=kk,
        outlier_source=_outlier_source(features, b), threshold=flagged.decision.value,
        threshold_reason=flagged.decision.reason, num_images=n, num_scored=len(scored),
        corloc=_rate(sum(bool(d.correct) for d in scored), len(scored)),
        corloc_centre=_rate(sum(bool(d.centre_correct) for d in scored), len(scored)),
        corloc_random=_rate(sum(bool(d.random_correct) for d in scored), len(scored)),
        mean_iou=float(np.mean([d.iou for d in scored])) if scored else None,
        seeds_on_outliers=seeds_on, seed_outlier_rate=rate, outlier_share=share,
        seed_outlier_enrichment=rate / share if share > 0 else None,
        corloc_seed_on_outlier=_rate(sum(bool(d.correct) for d in on), len(on)),
        corloc_seed_elsewhere=_rate(sum(bool(d.correct) for d in off), len(off)),
        seed_outside_mask=sum(d.seed_outside_mask for d in images), images=images, notes=notes)


# ----------------------------------------------------------------------------------------------- discover()
def _check_discover_options(features: str, compare: Sequence[str], batch_size: int, num_workers: int | str
                            ) -> tuple[str, list[str]]:
    """The options, checked before any model loads; ``(features, compare)`` in their canonical spelling."""
    features = (features or "keys").strip().lower()
    if features not in FEATURES:
        raise InputError(f"{option('features', repr(features))}: choose one of {', '.join(FEATURES)}")
    compare = [c.strip().lower() for c in compare if c and c.strip()]
    bad = [c for c in compare if c not in COMPARE_CHOICES]
    if bad:
        raise InputError(f"{option('compare', repr(bad[0]))}: the only comparison is 'fix' (a test-time register); to compare "
                         "models pass several: artifactscan discover MODEL_A MODEL_B DATA")
    PassSettings(batch_size=batch_size, num_workers=num_workers).check()  # a bad --workers fails before any load
    return features, compare


def discover(
    models: str | Path | LoadedModel | torch.nn.Module | Sequence[Any] | None = None,
    data: str | Path | BoxedData | None = None,
    *,
    compare: Sequence[str] = (),
    blocks: int | str = BLOCK,
    features: str = "keys",
    k: int | None = None,
    threshold: str | float | None = THRESHOLD,
    image_root: str | Path | None = None,
    device: str | None = DEVICE,
    batch_size: int = BATCH_SIZE,
    num_workers: int | str = WORKERS,
    maps: int = MAPS,
    random_seed: int = 0,
    fix_top_k: int = TOP_K,
    img_size: int | None = None,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    trust_checkpoint: bool = False,
    weights: str | None = None,
    precision: str = "auto",
    progress: bool = False,
    warn: Callable[[str], None] | None = None,
    block: int | None = None, keep: int | None = None,  # the old names of blocks= and maps= (deprecated)
) -> DiscoverReport:
    """LOST object discovery and CorLoc for one or more models on one data set.

    Args:
        models: one model (anything :func:`artifactscan.load_model` takes; None: the default model) or a list of
            them, compared side by side on the same images.
        data: ``synthetic-objects[:N]`` (default, 128 images), ``synthetic[:N]``, a VOC-style folder, a COCO-style
            ``.json`` (images under ``image_root``), an image folder without boxes, or a :class:`BoxedData`.
        compare: ``["fix"]``: also run each model with a test-time register installed (register neurons found on
            the same images with the fix's machinery).
        blocks: the one block whose features LOST reads (:func:`artifactscan.core.blocks.parse_block`).
        features: ``keys`` (LOST's default), ``queries``, ``values`` or ``tokens`` (the block's output).
        k: seed-expansion patches; default LOST's 100 scaled to the grid (:func:`default_k`).
        threshold: the norms scan's rule that flags outlier tokens: ``"auto"`` or a number.
        maps: images whose outlier maps are kept for figures.
        random_seed: the random-box baseline's seed.
        fix_top_k: with ``compare=["fix"]``, the register neurons moved onto the register.
        img_size, arch, arch_kwargs, trust_checkpoint, weights, precision: as for :func:`artifactscan.load_model`, for
            every model.

    Returns:
        A :class:`DiscoverReport` with one :class:`DiscoveryRun` per model (and per fix).
    """
    features, compare = _check_discover_options(features, compare, batch_size, num_workers)
    block = renamed_keyword(blocks, block, "blocks", "block", BLOCK)
    keep = renamed_keyword(maps, keep, "maps", "keep", MAPS)
    if keep < 0:
        raise InputError(f"{option('maps')} must be >= 0, got {keep}")
    fixed = threshold_option(threshold)
    specs = list(models) if isinstance(models, (list, tuple)) else [models]
    dev = resolve_device(device)
    load_options = dict(img_size=img_size, arch=arch, arch_kwargs=arch_kwargs, trust_checkpoint=trust_checkpoint,
                        weights=weights, precision=precision)
    loaded_first = load_model(specs[0], **load_options)
    if isinstance(data, BoxedData):
        boxed = data
    else:
        boxed = load_box_data(data, img_size=loaded_first.input_size[0], image_root=image_root)
    runs: list[DiscoveryRun] = []
    skipped: list[str] = []
    notes: list[str] = list(boxed.notes) + list(boxed.warnings)
    for line in boxed.warnings if warn is not None else []:
        warn(line)
    options = dict(block=block, features=features, k=k, threshold=threshold, device=dev, batch_size=batch_size,
                   num_workers=num_workers, keep=keep, random_seed=random_seed, progress=progress)
    for i, spec in enumerate(specs):
        loaded = loaded_first if i == 0 else load_model(spec, **load_options)
        if features != "tokens":
            feature_points(loaded, parse_block(block, len(loaded.blocks)), features)  # refuse before any pass
        runs.append(discovery_run(loaded, boxed, label=loaded.name, skipped=skipped if i == 0 else None, **options))
        notes += [f"{loaded.name}: {n}" for n in loaded.notes if n not in notes and not loaded.is_phantom]
        if "fix" in compare:
            fixed_run = _with_fix(loaded, boxed, fixed, dev, batch_size, fix_top_k, options)
            if isinstance(fixed_run, str):
                notes.append(fixed_run)
            else:
                runs.append(fixed_run)
    if skipped and warn is not None:
        for s in skipped:
            warn(f"skipped {s}")
    data_summary = DataSummary(boxed.kind, boxed.kind if isinstance(data, BoxedData) else
                               str(data) if data is not None else f"synthetic-objects:{DEFAULT_OBJECT_IMAGES}",
                               boxed.description, len(boxed.items), boxed.has_boxes,
                               boxed.items[0].width if boxed.synthetic is not None else None, skipped)
    report = DiscoverReport(
        model=[run.model for run in runs if run.repairs is None], images=data_summary.image_summary(),
        data=data_summary,
        threshold_mode="fixed" if fixed is not None else "auto",
        threshold_rule=f"fixed: norm > {fixed:g}" if fixed is not None else AutoRule().describe(),
        corloc_rule=f"an image counts when its box has IoU >= {CORLOC_IOU:g} with any ground-truth box; images "
                    "without a ground-truth box are left out",
        baselines="centre: the middle half of each side (a quarter of the image); random: two distinct patch-grid "
                  f"edges per axis, uniform, seeded by (--seed {random_seed}, image index)",
        runs=runs, headline="", notes=notes)
    report.headline = discover_headline(report)
    return report


def _with_fix(loaded: LoadedModel, boxed: BoxedData, fixed: float | None, dev: torch.device, batch_size: int,
              top_k: int, options: dict[str, Any]) -> DiscoveryRun | str:
    """The same discovery with a test-time register installed, or a note saying why there is none."""
    check_supported(loaded)
    if loaded.meta is not None and EXTRA_KEY in loaded.meta.extra:
        return f"{loaded.name} already carries a test-time register; --compare fix adds none"
    images = boxed.scan_images()
    before = scan(loaded, images, threshold=fixed if fixed is not None else "auto", device=str(dev),
                  batch_size=batch_size, num_maps=0)
    if before.onset_layer is None:
        return f"{loaded.name}: the norms scan found no outlier tokens, so there is nothing to fix (no fix row)"
    register = find_register_neurons(loaded, images, before, device=dev, batch_size=batch_size, top_k=top_k)
    name = loaded.name
    apply_test_time_register(loaded, register)
    run = discovery_run(loaded, boxed, label=f"{name} + test-time register", **options)
    run.repairs = name
    return run


# ----------------------------------------------------------------------------------------------- words
def _pct(x: float | None) -> str:
    return percent(x, 1, missing="n/a")


def run_sentence(run: DiscoveryRun) -> str:
    """One sentence for one run: CorLoc beside the baselines, and where the seeds fell."""
    feats = {"keys": "keys", "queries": "queries", "values": "values", "tokens": "output tokens"}[run.features]
    text = f"{run.label} ({feats} of block {run.block}): "
    if run.corloc is not None:
        text += (f"CorLoc {_pct(run.corloc)} (centred box {_pct(run.corloc_centre)}, random box "
                 f"{_pct(run.corloc_random)}; mean IoU {run.mean_iou:.2f})")
    else:
        text += "no ground-truth boxes, no CorLoc"
    if run.threshold is None:
        text += "; no outlier tokens flagged where the features are read, so no seed can fall on one"
    else:
        enrich = f", {run.seed_outlier_enrichment:.1f}x their share" if run.seed_outlier_enrichment else ""
        text += (f"; the seed is an outlier token in {_pct(run.seed_outlier_rate)} of images, where outliers are "
                 f"{_pct(run.outlier_share)} of patch tokens{enrich}")
        if run.corloc_seed_on_outlier is not None and run.corloc_seed_elsewhere is not None:
            text += (f" (CorLoc {_pct(run.corloc_seed_on_outlier)} with the seed on an outlier vs "
                     f"{_pct(run.corloc_seed_elsewhere)} elsewhere)")
    return text + "."


def fix_effect(before: DiscoveryRun, after: DiscoveryRun) -> str | None:
    """What the repair did to the images whose seed was an outlier token before it, in one sentence."""
    hit = [(a, b) for a, b in zip(before.images, after.images) if a.seed_flagged and a.index == b.index]
    if not hit or before.corloc is None:
        return None
    moved = sum(a.seed != b.seed for a, b in hit)
    ok = sum(bool(b.correct) for _, b in hit)
    iou_a = float(np.mean([a.iou for a, _ in hit]))
    iou_b = float(np.mean([b.iou for _, b in hit]))
    return (f"On the {len(hit)} image(s) whose seed was an outlier token in {before.label}, the test-time register "
            f"moved {moved} seed(s) elsewhere; mean IoU there {iou_a:.2f} -> {iou_b:.2f}, {ok} of them now found "
            f"(IoU >= {CORLOC_IOU:g}).")


def discover_headline(report: DiscoverReport) -> str:
    parts = []
    if any(is_phantom(r) for r in report.runs):
        parts.append(PHANTOM_HEADLINE_TAG)
    by_label = {r.label: r for r in report.runs}
    for r in report.runs:
        parts.append(run_sentence(r))
        effect = fix_effect(by_label[r.repairs], r) if r.repairs in by_label else None
        if effect:
            parts.append(effect)
    scored = [r for r in report.runs if r.corloc is not None]
    if len(scored) >= 2:
        parts.append("CorLoc side by side: " + ", ".join(f"{r.label} {_pct(r.corloc)}" for r in scored) + ".")
    return " ".join(parts)
