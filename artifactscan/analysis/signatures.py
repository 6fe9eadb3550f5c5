"""``signatures()``: the known artifact signatures of a ViT, block by block, each read against its own null.

High norm is one signature among several. This measurement puts them side by side, and never calls one present
without a null to beat (docs/signatures.md):

1. **High norm** (the reference column): the norms scan's outlier fraction and max/median, per block.
2. **Position-only component** (Denoising ViTs, ECCV 2024): the share of patch-token variance explained by grid
   position alone, against the same tokens with their positions shuffled within each image.
3. **Weights-only defect direction** (SINDER, ECCV 2024): the leading left singular vector of the linearised blocks
   up to each block, its singular value against a random matrix's, and its ``|cos|`` with the mean of the tokens
   flagged there, against the ``|cos|`` of a random direction.
4. **Register neurons** (Jiang et al. 2025): MLP units ranked per block by mean ``|activation|`` at flagged
   positions, against the rest.
5. **Lazy aggregation** (LaSt-ViT, CVPR 2026): the patch most similar to CLS, its box hit ratio against the share
   of patches in boxes *and* a random-init model of the same architecture on the same images.
6. **Shift consistency** (PH-Reg, NeurIPS 2025): per patch, ``1 -`` cosine with its average over shifted and
   flipped views, flagged against unflagged patches (:mod:`artifactscan.analysis.signatures_shift`).

Passes: the norms scan's first forward also feeds every signature that does not depend on which tokens are
flagged, and keeps the first images for the shift views (the scan makes a second forward only when its auto
threshold needs the records again); then one pass over the images holding flagged tokens (none on a model without
them); then the shift views on the kept images; then, with boxes only, one pass per random-init seed over
``null_images`` of the images (32 by default, spread over the set).
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from artifactscan.analysis.scan import ScanReport, scan
from artifactscan.analysis.signatures_shift import (SHIFT_IMAGES, SHIFT_LEVEL, SHIFT_VIEWS, ShiftSummary,
                                                    reuse_decision, shift_call, shift_consistency, view_plan)
from artifactscan.analysis.signatures_stats import (POSITION_FACTOR, PositionShare, abs_cos, defect_directions,
                                                    hit_null_interval, linearisation_problem,
                                                    patch_centres_in_boxes, random_cos_quantile)
from artifactscan.core.defaults import BATCH_SIZE, DEVICE, THRESHOLD, WORKERS
from artifactscan.core.devices import resolve_device
from artifactscan.core.errors import InputError, option
from artifactscan.core.numerics import measurement_mode
from artifactscan.core.summaries import AnalysisResult
from artifactscan.inputs.boxes import load_box_data, names_boxed_data
from artifactscan.inputs.sources import image_batches, make_image_source
from artifactscan.models.hooks import block_of, block_point, capture, unit_points
from artifactscan.models.loading import LoadedModel, load_model

#: The data the command reads when none is named: the object set, so the hit ratio has boxes to hit.
DEFAULT_DATA = "synthetic-objects:256"
#: Random-init models the hit ratio's null is drawn from.
NULL_SEEDS = 3
#: Images (spread over the set) each random-init model is run on: the null's cost is null_seeds x this many
#: forwards, not null_seeds passes over the whole set; its 99% range is widened by the binomial error of this count.
NULL_IMAGES = 32
#: Register-neuron candidates listed per block.
UNITS_LISTED = 3
NO_BOXES = "n/a (no boxes: synthetic-objects, VOC and COCO carry them)"


# ----------------------------------------------------------------------------------------------- result types
@dataclass
class UnitScore:
    """One MLP unit: mean ``|activation|`` at flagged positions and elsewhere, and their ratio."""

    point: str
    unit: int
    flagged_mean: float
    other_mean: float
    ratio: float | None


@dataclass
class BlockSignatures:
    """Every signature at one block (``block`` 0-based; the position share of the embedding is its own field)."""

    block: int
    outlier_fraction: float
    max_over_median: float
    num_flagged: int
    position_share: float
    position_null: float
    position_map: list[list[float]]
    defect_singular_value: float | None = None
    defect_random_singular_value: float | None = None
    defect_cos_flagged: float | None = None
    defect_cos_all: float | None = None
    units: list[UnitScore] = field(default_factory=list)
    hit_ratio: float | None = None
    null_hit_ratios: list[float] = field(default_factory=list)
    null_interval: list[float] | None = None
    top_patch_flagged_share: float | None = None
    shift: ShiftSummary | None = None


@dataclass
class SignatureCall:
    """The verdict on one signature: ``present`` (None: not measurable here), the rule, and the evidence."""

    signature: str
    present: bool | None
    rule: str
    evidence: str


@dataclass(kw_only=True)
class SignaturesReport(AnalysisResult):
    """What ``artifactscan signatures`` found (schema ``artifactscan.signatures/1``, docs/signatures.md)."""

    SCHEMA = "artifactscan.signatures/1"

    blocks: list[BlockSignatures]
    embedding_position_share: float
    embedding_position_null: float
    embedding_position_map: list[list[float]]
    random_cos_99: float
    defect_note: str | None
    boxes_note: str | None
    chance_hit_ratio: float | None
    null_seeds: list[int]
    verdict: list[SignatureCall]
    threshold_rule: str
    notes: list[str] = field(default_factory=list)
    null_images: int | None = None  # the images each random-init model ran on (None: no boxes, no null run)
    shift_views: list[str] = field(default_factory=list)  # the views the shift residual averages, in order
    shift_images: int = 0  # images the views ran on
    shift_level: float = SHIFT_LEVEL  # the level the shares of shift residuals are counted above


# ----------------------------------------------------------------------------------------------- the data passes
class _PassState:
    """What the passes accumulate; the reducers run on one block's tokens at a time.

    Two passes feed it. The scan's own first forward (:class:`_SharedPass`) takes everything that does not depend
    on which tokens are flagged: the position shares, the mean token, the top patch of every image at every block
    (so its hit and, once the scan has decided, whether it was flagged) and every unit's total ``|activation|``.
    The flagged tokens are known only when the scan's threshold is; :func:`_flagged_pass` then reads their sums
    on the images that hold any (none at all on a model without high-norm tokens), and a unit's mean elsewhere is
    its total less its flagged part."""

    def __init__(self, loaded: LoadedModel, boxes: list[list[list[float]]] | None):
        self.P, self.grid = loaded.num_prefix_tokens, tuple(loaded.grid_size)
        self.has_cls = loaded.num_cls_tokens > 0
        self.boxes = boxes
        self.inside: list[torch.Tensor] = []  # per image: which patches' centres lie in a box
        self.positions: dict[str, PositionShare] = {}
        self.flagged_sum: dict[int, torch.Tensor] = {}
        self.flagged_count: dict[int, int] = {}
        self.all_sum: dict[int, torch.Tensor] = {}
        self.unit_total: dict[str, torch.Tensor] = {}  # float64: a silent unit's total less its flagged part is 0
        self.unit_flagged: dict[str, torch.Tensor] = {}
        self.unit_counts = [0, 0]  # patch positions flagged at any block / all patch positions seen
        self.hits: dict[int, list[int]] = {}  # block -> [hits, images, top patch flagged]
        self.tops: dict[int, dict[int, int]] = {}  # block -> image index -> its top patch
        self.masks: dict[int, torch.Tensor] = {}  # the batch's flagged masks, by block
        self.any_mask = torch.zeros(0)
        self.batch_indices: list[int] = []
        self.shift_images = 0  # how many of the first images to keep for the shift views
        self.shift_inputs: list[tuple[torch.Tensor, list[int]]] = []
        # their patch tokens at every block from the same forward (None: over REUSE_BYTES, forwarded again)
        self.shift_originals: dict[int, list[torch.Tensor]] | None = {}
        self.shift_note: str | None = None

    def keep_for_shift(self, x: torch.Tensor, indices: list[int], blocks: list[torch.Tensor]) -> None:
        """Keep the first ``shift_images`` images of the pass (a copy, on the device) for the shift views, and
        their patch tokens at every block (``blocks``: the forward's block outputs) when they fit the bound."""
        room = self.shift_images - sum(len(i) for _, i in self.shift_inputs)
        if room <= 0:
            return
        self.shift_inputs.append((x[:room].clone(), indices[:room]))
        if self.shift_note is None:
            fits, self.shift_note = reuse_decision(self.shift_images, len(blocks), blocks[0].shape[1] - self.P,
                                                   blocks[0].shape[2])
            self.shift_originals = {} if fits else None
        if self.shift_originals is not None:
            for b, tokens in enumerate(blocks):
                self.shift_originals.setdefault(b, []).append(tokens[:room, self.P:].detach().float().clone())

    def take_shift_originals(self) -> dict[int, torch.Tensor] | None:
        """The kept patch tokens per block, ``[n, N, D]`` in the order of ``shift_inputs`` (None: not kept)."""
        kept, self.shift_originals = self.shift_originals, None
        return None if not kept else {b: torch.cat(parts) for b, parts in kept.items()}

    def positions_of(self, name: str, x: torch.Tensor) -> torch.Tensor:
        patches = x[:, self.P:]
        acc = self.positions.setdefault(name, PositionShare(patches.shape[1], patches.shape[2]))
        acc.update(patches)
        return x.new_zeros(0)  # a reducer's result: nothing to keep

    def resid(self, block: int, x: torch.Tensor) -> None:
        """Pass 1 at one block: position share, mean token, top patch."""
        x = x.detach().float()
        self.positions_of(block_point(block, "resid_post"), x)
        self.all_sum[block] = self.all_sum.get(block, 0) + x[:, self.P:].sum(dim=(0, 1)).cpu()
        self.top_patch(block, x, None)

    def flagged_resid(self, block: int, x: torch.Tensor) -> None:
        """Pass 2 at one block: the sum of the flagged tokens."""
        mask = self.masks[block]
        patches = x.detach().float()[:, self.P:]
        self.flagged_sum[block] = self.flagged_sum.get(block, 0) + (patches * mask[..., None]).sum(dim=(0, 1)).cpu()
        self.flagged_count[block] = self.flagged_count.get(block, 0) + int(mask.sum())

    def top_patch(self, block: int, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        """LaSt-ViT's probe: the patch with the highest cosine to CLS (to the mean patch without a CLS token).
        The query's own norm is the same for every patch of an image, so the argmax needs only the patches'."""
        patches = x[:, self.P:]
        query = x[:, 0] if self.has_cls else patches.mean(dim=1)
        scores = torch.einsum("bnd,bd->bn", patches, query) / patches.norm(dim=-1).clamp_min(1e-30)
        top = scores.argmax(dim=1).cpu()
        acc = self.hits.setdefault(block, [0, 0, 0])
        acc[1] += len(top)
        if mask is not None:
            acc[2] += int(mask.cpu().gather(1, top[:, None]).sum())
        self.tops.setdefault(block, {}).update(zip(self.batch_indices, top.tolist()))
        if self.boxes is not None:
            for j, i in enumerate(self.batch_indices):
                acc[0] += bool(self.inside[i][top[j]])

    def unit_totals(self, name: str, act: torch.Tensor) -> torch.Tensor:
        """Pass 1's reducer at a unit point: each unit's ``|activation|`` summed over the batch's patches."""
        total = act[:, self.P:].detach().abs().sum(dim=(0, 1), dtype=torch.float64).cpu()
        self.unit_total[name] = self.unit_total.get(name, 0) + total
        return total[:0]

    def unit_flagged_sums(self, name: str, act: torch.Tensor) -> None:
        patches = act[:, self.P:].detach().abs()
        flagged = (patches * self.any_mask[..., None]).sum(dim=(0, 1), dtype=torch.float64).cpu()
        self.unit_flagged[name] = self.unit_flagged.get(name, 0) + flagged

    def set_batch(self, indices: list[int], flagged: dict[int, dict[int, set[int]]], num_blocks: int,
                  device: torch.device) -> None:
        N = self.grid[0] * self.grid[1]
        self.batch_indices = indices
        for b in range(num_blocks):
            m = torch.zeros(len(indices), N, dtype=torch.bool)
            for j, i in enumerate(indices):
                for p in flagged.get(b, {}).get(i, ()):
                    m[j, p] = True
            self.masks[b] = m.to(device)
        self.any_mask = torch.stack(list(self.masks.values())).any(dim=0)

    def count_flagged(self, flagged: dict[int, dict[int, set[int]]]) -> None:
        """The flagged share of top patches and the number of positions flagged at any block, once the scan has
        decided which tokens are flagged."""
        for b, acc in self.hits.items():
            tops = self.tops.get(b, {})
            acc[2] = sum(tops.get(i, -1) in where for i, where in flagged.get(b, {}).items())
        per_image: dict[int, set[int]] = {}
        for by_image in flagged.values():
            for i, where in by_image.items():
                per_image.setdefault(i, set()).update(where)
        self.unit_counts[0] = sum(len(v) for v in per_image.values())


class _SharedPass:
    """The signatures' part of the scan's first forward (a ``passes.Measurement``): the block outputs it reads
    whole after the forward (the scan reduces the same points to norms), the embedding and the unit points reduced
    inside their hooks."""

    def __init__(self, loaded: LoadedModel, state: _PassState):
        self.loaded, self.state = loaded, state
        # built once: the runner tells a reducer it already applied from one it must still apply by equality, and
        # a new lambda at every call would be a different reducer each time
        self.names: dict[str, Any] = {"blocks.0.resid_pre": lambda x: state.positions_of("embedding", x.float())}
        self.names.update({block_point(b, "resid_post"): None for b in range(len(loaded.blocks))})
        for name in unit_points(loaded):
            self.names[name] = lambda act, name=name: state.unit_totals(name, act)

    def hook_names(self) -> dict[str, Any]:
        return self.names

    def stop_after(self) -> int | None:
        return None

    def on_batch(self, batch: Any) -> None:
        self.state.batch_indices = batch.indices.tolist()
        blocks = [batch.captured[block_point(b, "resid_post")] for b in range(len(self.loaded.blocks))]
        self.state.keep_for_shift(batch.images, self.state.batch_indices, blocks)
        self.state.unit_counts[1] += len(batch.indices) * self.state.grid[0] * self.state.grid[1]
        for b, tokens in enumerate(blocks):
            self.state.resid(b, tokens)

    def finish(self) -> None:
        return None


def _flagged_positions(report: ScanReport, num_blocks: int) -> dict[int, dict[int, set[int]]]:
    """block -> image index -> flagged patch positions (row-major), from the scan's outlier records."""
    gw = report.model.grid_size[1]
    out: dict[int, dict[int, set[int]]] = {}
    for o in report.outliers:
        if o.layer < num_blocks:
            out.setdefault(o.layer, {}).setdefault(o.image_index, set()).add(o.row * gw + o.col)
    return out


def _image_subset(images: Any, loaded: LoadedModel, indices: list[int], decode: dict[str, Any]) -> Any:
    """The images at ``indices`` (their indices kept), prepared for ``loaded`` as the scan prepared them all."""
    from dataclasses import replace

    from torch.utils.data import Subset

    source = make_image_source(images, loaded, exact_decode=decode["exact_decode"], gpu_decode=decode["gpu_decode"])
    if len(indices) == source.num_found:
        return source
    return replace(source, dataset=Subset(source.dataset, indices), num_found=len(indices))


@measurement_mode()
def _flagged_pass(loaded: LoadedModel, images: Any, flagged: dict[int, dict[int, set[int]]], state: _PassState,
                  dev: torch.device, batch_size: int, decode: dict[str, Any]) -> None:
    """Pass 2: the flagged tokens' sums and the units' ``|activation|`` at them, over the images holding any."""
    num_blocks = len(loaded.blocks)
    holding = sorted({i for by_image in flagged.values() for i in by_image})
    if not holding:
        return
    requests: dict[str, Any] = {block_point(b, "resid_post"): lambda x, b=b: state.flagged_resid(b, x)
                                for b in range(num_blocks)}
    for name in unit_points(loaded):
        requests[name] = lambda act, name=name: state.unit_flagged_sums(name, act)
    source = _image_subset(images, loaded, holding, decode)
    with capture(loaded, requests) as cap:
        for x, indices, _ in image_batches(source, batch_size, decode["num_workers"], dev):
            if x is not None:
                state.set_batch(indices.tolist(), flagged, num_blocks, dev)
                cap.forward(x.to(dev))


def random_init_copy(loaded: LoadedModel, seed: int) -> LoadedModel:
    """The same architecture with random weights (timm's own initialisation where the model has one), seeded; the
    caller's model is left as it was."""
    twin = copy.copy(loaded)
    twin.model = copy.deepcopy(loaded.model)
    torch.manual_seed(seed)
    if hasattr(twin.model, "init_weights"):
        # A timm ViT built to receive a checkpoint (weight_init="skip", as the loader builds it) keeps "reset" as
        # its init mode, which gives PyTorch's default Linear init (std 0.072 at width 64, not timm's 0.02): the
        # copy would not be the random model a timm training run starts from
        if getattr(twin.model, "weight_init_mode", None) == "reset":
            twin.model.weight_init_mode = ""
        twin.model.init_weights()
    else:
        for m in twin.model.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    return twin


def null_subset(num_images: int, null_images: int) -> list[int]:
    """The images the random-init models see: ``null_images`` of the ``num_images`` spread evenly over the set (all
    of them when ``null_images`` is 0 or at least ``num_images``)."""
    if null_images <= 0 or null_images >= num_images:
        return list(range(num_images))
    return [k * num_images // null_images for k in range(null_images)]


@measurement_mode()
def _null_hits(loaded: LoadedModel, images: Any, state: _PassState, seed: int, dev: torch.device,
               batch_size: int, decode: dict[str, Any], subset: list[int]) -> tuple[dict[int, float], int]:
    """Per block, the hit ratio of a random-init copy of ``loaded`` on the images at ``subset``, and the number of
    images it was measured on."""
    twin = random_init_copy(loaded, seed)
    null = _PassState(twin, state.boxes)
    null.inside = state.inside
    requests = {block_point(b, "resid_post"): (lambda x, b=b: null.top_patch(b, x.float(), None))
                for b in range(len(twin.blocks))}
    source = _image_subset(images, twin, subset, decode)
    with capture(twin, requests) as cap:
        for x, indices, _ in image_batches(source, batch_size, decode["num_workers"], dev):
            if x is not None:
                null.batch_indices = indices.tolist()
                cap.forward(x.to(dev))
    return {b: h / n for b, (h, n, _) in null.hits.items()}, next(iter(null.hits.values()))[1]


# ----------------------------------------------------------------------------------------------- assembling
def _units_of_block(state: _PassState, block: int) -> list[UnitScore]:
    n_flag, n_all = state.unit_counts
    scores = []
    if n_flag == 0:
        return scores
    for name, total in state.unit_total.items():
        if block_of(name) != block:
            continue
        flagged = state.unit_flagged.get(name, torch.zeros_like(total))
        # elsewhere = the total less the flagged part; a difference below float64's rounding of the total is 0 (a
        # unit silent elsewhere, as a planted one is, must not read as a huge ratio)
        other = total - flagged
        other = torch.where(other > 1e-9 * total, other, torch.zeros_like(other))
        f, o = (flagged / n_flag).float(), (other / max(n_all - n_flag, 1)).float()
        for u in torch.argsort(f, descending=True)[:UNITS_LISTED].tolist():
            # ratio None: the unit is silent everywhere else (only at flagged positions), as a planted unit is
            scores.append(UnitScore(name, u, float(f[u]), float(o[u]), float(f[u] / o[u]) if o[u] > 0 else None))
    return sorted(scores, key=lambda s: -s.flagged_mean)[:UNITS_LISTED]


def _block_rows(loaded: LoadedModel, report: ScanReport, state: _PassState) -> list[BlockSignatures]:
    rows = []
    for b in range(len(loaded.blocks)):
        layer = report.layers[b]
        pos = state.positions[block_point(b, "resid_post")]
        hits, n, top_flagged = state.hits[b]
        rows.append(BlockSignatures(
            b, layer.outlier_fraction, layer.max_over_median, layer.num_outliers, pos.share, pos.shuffled_share,
            pos.position_map(state.grid), units=_units_of_block(state, b),
            hit_ratio=hits / n if state.boxes is not None else None, top_patch_flagged_share=top_flagged / n))
    return rows


def _add_defects(rows: list[BlockSignatures], loaded: LoadedModel, state: _PassState) -> str | None:
    blocks = list(loaded.blocks)
    problem = linearisation_problem(blocks)
    if problem is not None:
        return f"not available for this family: {problem}"
    for row, d in zip(rows, defect_directions(blocks)):
        row.defect_singular_value, row.defect_random_singular_value = d.singular_value, d.random_singular_value
        if state.flagged_count.get(row.block, 0):
            row.defect_cos_flagged = abs_cos(d.direction, state.flagged_sum[row.block])
        row.defect_cos_all = abs_cos(d.direction, state.all_sum[row.block])
    return None


def _verdict(report: SignaturesReport) -> list[SignatureCall]:
    rows = report.blocks
    calls = []
    flagged = [r.block for r in rows if r.num_flagged]
    calls.append(SignatureCall(
        "high norm", bool(flagged), "the norms scan's threshold rule flags tokens at some block (its own null: "
        "the separated-group rule, docs/thresholds)", f"flagged at blocks {flagged}" if flagged else
        "no block has flagged tokens"))
    pos = [r.block for r in rows if r.position_share >= POSITION_FACTOR * r.position_null and r.position_share > 0]
    emb = report.embedding_position_share >= POSITION_FACTOR * report.embedding_position_null
    calls.append(SignatureCall(
        "position-only component", bool(pos) or emb,
        f"position share >= {POSITION_FACTOR:g}x the same tokens' share with grid positions shuffled per image",
        f"embedding {report.embedding_position_share:.3f} vs null {report.embedding_position_null:.3f}; "
        f"blocks at >= {POSITION_FACTOR:g}x: {pos or 'none'}"))
    if report.defect_note is not None or not flagged:
        calls.append(SignatureCall("weights-only defect direction", None, "",
                                   report.defect_note or "no flagged tokens to align the direction with"))
    else:
        aligned = [r.block for r in rows if r.defect_cos_flagged is not None and
                   r.defect_cos_flagged > report.random_cos_99]
        calls.append(SignatureCall(
            "weights-only defect direction", bool(aligned),
            f"|cos| between the defect direction and the flagged tokens' mean above a random direction's 99% "
            f"quantile ({report.random_cos_99:.3f})", f"aligned at blocks {aligned or 'none'}"))
    units = [r.block for r in rows if r.units and (r.units[0].ratio is None or r.units[0].ratio >= POSITION_FACTOR)]
    calls.append(SignatureCall(
        "register neurons", bool(units) if flagged else None,
        f"a unit whose mean |activation| at flagged positions is >= {POSITION_FACTOR:g}x its mean elsewhere",
        f"blocks {units or 'none'}" if flagged else "no flagged tokens to rank units on"))
    calls.append(_lazy_call(report))
    calls.append(SignatureCall("shift consistency", *shift_call([r.shift for r in rows], report.shift_images)))
    return calls


def _lazy_call(report: SignaturesReport) -> SignatureCall:
    rule = ("hit ratio below the 99% range of random-init models of the same architecture on the same images "
            "(not merely below the share of patches in boxes)")
    if report.chance_hit_ratio is None:
        return SignatureCall("lazy aggregation", None, rule, NO_BOXES)
    rows = [r for r in report.blocks if r.null_interval is not None and r.hit_ratio is not None]
    below = [r.block for r in rows if r.hit_ratio < r.null_interval[0]]
    above = [r.block for r in rows if r.hit_ratio > r.null_interval[1]]
    last = report.blocks[-1]
    lo, hi = last.null_interval or (float("nan"), float("nan"))
    return SignatureCall("lazy aggregation", bool(below), rule,
                         f"last block {last.hit_ratio:.3f} (random-init 99% range {lo:.3f}-{hi:.3f} from "
                         f"{len(report.null_seeds)} seed(s) on {report.null_images} images, patches in "
                         f"boxes {report.chance_hit_ratio:.3f}); below the null at blocks {below or 'none'}"
                         + (f"; above it (the top patch finds objects more often than an untrained model: the "
                            f"opposite of lazy aggregation) at blocks {above}" if above else ""))


def _headline(report: SignaturesReport) -> str:
    present = [c.signature for c in report.verdict if c.present]
    absent = [c.signature for c in report.verdict if c.present is False]
    return (f"{report.model.name}: present against their nulls: {', '.join(present) or 'none'}; not shown: "
            f"{', '.join(absent) or 'none'}")


# ----------------------------------------------------------------------------------------------- the entry point
def _images_and_boxes(data: Any, loaded: LoadedModel, image_root: str | Path | None = None
                      ) -> tuple[Any, list[list[list[float]]] | None, str | None, list[str]]:
    """The images to pass to the scan and the data pass, their boxes in the model input's pixels (None without),
    why there are none, and what reading the annotations warned about. Boxes are read by the reader ``discover``
    uses (:func:`load_box_data`: synthetic-objects, synthetic, a VOC-style folder, a COCO-style JSON or folder) and
    mapped through the model's own preprocessing (:meth:`BoxedData.model_input_boxes`)."""
    spec = DEFAULT_DATA if data is None else data
    if not isinstance(spec, (str, Path)) or not names_boxed_data(spec):  # a tensor, an image folder or file
        return spec, None, NO_BOXES, []
    boxed = load_box_data(spec, img_size=loaded.input_size[0], image_root=image_root)
    boxes = boxed.model_input_boxes(loaded)
    if boxes is None:
        return boxed.scan_images(), None, NO_BOXES + (
            f" (this model's preprocessing, crop mode {loaded.data_config.get('crop_mode')!r}, is not one whose "
            "crop the boxes are mapped through yet)"), boxed.warnings
    return boxed.scan_images(), boxes, None, boxed.warnings


def signatures(model: str | Path | LoadedModel | None = None, data: Any = None, *, threshold: str | float = THRESHOLD,
               null_seeds: int = NULL_SEEDS, views: int = SHIFT_VIEWS, shift_images: int = SHIFT_IMAGES,
               device: str = DEVICE, batch_size: int = BATCH_SIZE,
               num_workers: int | str = WORKERS, exact_decode: bool = False, gpu_decode: bool = False,
               image_root: str | Path | None = None, null_images: int = NULL_IMAGES, **load: Any
               ) -> SignaturesReport:
    """Measure every artifact signature of ``model`` on ``data`` (default ``synthetic-objects:256``), each with its
    null (module docstring; docs/signatures.md). ``null_seeds``: random-init models for the hit ratio's null, each
    run on ``null_images`` of the images spread over the set (0: all of them). ``views``: shifted and flipped views
    per image for the shift residual, run on the first ``shift_images``.
    ``image_root``: the folder of a COCO-style JSON's images (default: beside it, or the split's folder).
    ``num_workers`` / ``exact_decode`` / ``gpu_decode``: how image files are decoded, and ``load``: ``arch`` /
    ``arch_kwargs`` / ``trust_checkpoint`` / ``img_size`` / ``weights``, as for :func:`artifactscan.scan`."""
    if null_images < 0:
        raise InputError(f"{option('null_images')} must be 0 (all images) or more, got {null_images}")
    if null_seeds < 1:
        raise InputError(f"{option('null_seeds')} must be at least 1 (the hit ratio needs a random-init null), "
                         f"got {null_seeds}")
    if shift_images < 1:
        raise InputError(f"{option('shift_images', shift_images)}: the shift views need at least 1 image")
    dev = resolve_device(device)
    loaded = model if isinstance(model, LoadedModel) else load_model(model, **load)
    plan = view_plan(tuple(loaded.grid_size), views)  # refused before any pass runs
    images, boxes, boxes_note, box_warnings = _images_and_boxes(data, loaded, image_root)
    for line in box_warnings:
        print(f"warning: {line}", file=sys.stderr)
    decode = dict(num_workers=num_workers, exact_decode=exact_decode, gpu_decode=gpu_decode)
    state = _PassState(loaded, boxes)
    state.shift_images = shift_images
    if boxes is not None:
        state.inside = [patch_centres_in_boxes(b, state.grid, tuple(loaded.input_size)) for b in boxes]
    report = scan(loaded, images, threshold=threshold, device=str(dev), batch_size=batch_size, num_maps=0,
                  also=[_SharedPass(loaded, state)], **decode)
    flagged = _flagged_positions(report, len(loaded.blocks))
    state.count_flagged(flagged)
    _flagged_pass(loaded, images, flagged, state, dev, batch_size, decode)
    rows = _block_rows(loaded, report, state)
    defect_note = _add_defects(rows, loaded, state)
    shifts = shift_consistency(loaded, state.shift_inputs, flagged, plan, batch_size, state.take_shift_originals())
    shifted = sum(len(i) for _, i in state.shift_inputs)
    state.shift_inputs.clear()
    for row, summary in zip(rows, shifts or []):
        row.shift = summary
    chance, null_count = None, None
    seeds = list(range(null_seeds)) if boxes is not None else []
    if boxes is not None:
        chance = float(torch.stack(state.inside).float().mean())
        subset = null_subset(len(boxes), null_images)
        nulls = [_null_hits(loaded, images, state, s, dev, batch_size, decode, subset) for s in seeds]
        for row in rows:
            row.null_hit_ratios = [n[row.block] for n, _ in nulls]
            row.null_interval = list(hit_null_interval(row.null_hit_ratios, nulls[0][1]))
        null_count = nulls[0][1]
    emb = state.positions["embedding"]
    out = SignaturesReport(
        model=report.model, images=report.images, headline="", blocks=rows, embedding_position_share=emb.share,
        embedding_position_null=emb.shuffled_share, embedding_position_map=emb.position_map(state.grid),
        random_cos_99=random_cos_quantile(int(state.all_sum[0].numel())), defect_note=defect_note,
        boxes_note=boxes_note, chance_hit_ratio=chance, null_seeds=seeds, null_images=null_count, verdict=[],
        threshold_rule=report.threshold_rule,
        notes=list(report.notes) + box_warnings + ([state.shift_note] if state.shift_note else []),
        shift_views=[v.describe() for v in plan], shift_images=shifted)
    out.verdict = _verdict(out)
    out.headline = _headline(out)
    return out
