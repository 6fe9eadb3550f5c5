"""``attention_report()``: where the CLS token (or a register, or a chosen patch) looks, and how much attention the
flagged high-norm outlier tokens attract, block by block (Darcet et al. 2024, Fig 2 and Fig 9).

Two passes over the images:

1. the norms scan (:func:`artifactscan.scan.scan`, same threshold rule) flags the outlier patch tokens; its
   per-outlier records give, per image and per block output, which patches are outliers;
2. an attention pass with :class:`artifactscan.analysis.attention.AttentionCapture` on the chosen blocks only (the
   capture layer's ``blocks.{i}.attn.pattern`` points: the forward itself is unchanged). Each
   block's ``[B, heads, T, T]`` probabilities are reduced as soon as they exist, so memory does not grow with the
   number of images: per-block mass sums stream over every image, and attention maps over the patch grid are kept
   only for the first ``maps`` images.

Which tokens count as outliers for block ``b``: the patches flagged at the *input* of that block, i.e. the norms
scan's row ``b - 1`` (the output of block ``b - 1``) — those are the tokens this block's attention reads as keys.
Block 0 reads the patch embedding, which the norms scan does not measure, so it has no outlier mass.

The query: the CLS token when the model has one; otherwise the first register; otherwise (no prefix tokens at all)
the *mean query* — the attention distribution averaged over all patch queries. The report says which, and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset

from artifactscan.core.numbers import times
from artifactscan.core.blocks import ALL_BLOCKS, parse_blocks, renamed_keyword
from artifactscan.core.defaults import BATCH_SIZE, DEVICE, MAPS, THRESHOLD, WORKERS
from artifactscan.core.numerics import measurement_mode
from artifactscan.analysis.attention import AttentionCapture
from artifactscan.core.errors import InputError, NonFiniteError, NotAViTError, option
from artifactscan.analysis.passes import OpenedPass, PassSettings, open_pass
from artifactscan.models.loading import LoadedModel
from artifactscan.core.summaries import AnalysisResult
from artifactscan.analysis.scan import ScanReport, measure_norms
from artifactscan.core.thresholds import AutoRule, threshold_option

# /3: the common header first (core/summaries.py); /2 files hold the same keys in another order.
SCHEMA = "artifactscan.attention/3"
OLDER_SCHEMAS = ("artifactscan.attention/1", "artifactscan.attention/2")
HEADS_MODES = ("mean", "all")


# ----------------------------------------------------------------------------------------------- result types
@dataclass
class QueryInfo:
    """The query whose attention is reported: ``cls``, ``regK`` (a register) or ``mean`` (all patch queries)."""

    name: str
    kind: str  # "cls" | "register" | "mean"
    token_index: int | None  # position in the token sequence; None for the mean query
    reason: str


@dataclass
class MassStats:
    """Where one query sends its attention, averaged over heads and over every scanned image. All values are
    fractions of the query's total attention (each attention row sums to 1).

    Attributes:
        prefix: mass on each prefix token (``cls``, ``reg0`` ...).
        patches: mass on all patch tokens together.
        outliers: mass on the flagged outlier patches (images without outliers count 0); None for a block without
            an outlier mask (block 0).
        outliers_where_present: the same, averaged over the images that have >= 1 outlier at this block only.
        spike: ``(outliers / patches) / outlier_fraction``: the outliers' share of the attention that goes to
            patches, over their share of the patches. 1 = no preference; >> 1 = the paper's attention spikes.
    """

    prefix: dict[str, float]
    patches: float
    outliers: float | None
    outliers_where_present: float | None
    spike: float | None


@dataclass
class LayerAttention:
    """One captured block. ``outlier_row`` is the norms-scan row whose flags define the outliers (``block - 1``)."""

    block: int
    outlier_row: int | None
    num_images: int
    images_with_outliers: int
    outlier_fraction: float | None  # fraction of patch tokens flagged, over all images
    query: MassStats  # the selected query (CLS / register / mean query)
    patch_queries: MassStats  # the mean over all patch queries
    query_outlier_mass_per_head: list[float] | None


@dataclass
class AttentionMap:
    """Attention of one query over the patch grid of one image, per captured block.

    ``maps[l][h][row][col]``: block ``blocks[l]``, head ``h`` (a single entry, the mean over heads, when
    ``heads == "mean"``); values are fractions of the query's total attention. ``flagged[l][row][col]``: the
    outlier patches for that block (False everywhere for block 0, which has no outlier mask).
    """

    image: str
    image_index: int
    query: str  # cls / regK / mean / patch(ROW,COL)
    blocks: list[int]
    heads: str
    maps: list[list[list[list[float]]]]
    flagged: list[list[list[bool]]]


@dataclass
class AttentionReport(AnalysisResult):
    """Everything ``artifactscan attention`` found. Serialises to ``attention.json``."""

    SCHEMA = SCHEMA
    OLDER_SCHEMAS = OLDER_SCHEMAS

    query: QueryInfo
    query_patch: list[int] | None
    heads: str
    blocks: list[int]
    threshold_mode: str
    threshold_rule: str
    outlier_rule: str
    layers: list[LayerAttention]
    maps: list[AttentionMap]
    notes: list[str]

    def maps_for(self, query: str | None = None) -> list[AttentionMap]:
        """The kept maps of one query (default: the selected query), one per kept image."""
        q = query or self.query.name
        return [m for m in self.maps if m.query == q]


# ----------------------------------------------------------------------------------------------- parsing
def parse_query_patch(spec: str | Sequence[int] | None, grid: tuple[int, int]) -> tuple[int, int] | None:
    """``"ROW,COL"`` (or a pair of ints) on the patch grid, 0-based; None -> None. Bad -> InputError."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return None
    gh, gw = grid
    shape = f"the patch grid is {gh}x{gw}: rows 0..{gh - 1}, columns 0..{gw - 1}"
    try:
        parts = [int(p) for p in spec.split(",")] if isinstance(spec, str) else [int(p) for p in spec]
    except (TypeError, ValueError):
        raise InputError(f"{option('query_patch', repr(spec))}: write ROW,COL with two integers, e.g. 3,7 "
                         f"({shape})") from None
    if len(parts) != 2:
        raise InputError(f"{option('query_patch', repr(spec))}: write ROW,COL with two integers, e.g. 3,7 ({shape})")
    r, c = parts
    if not (0 <= r < gh and 0 <= c < gw):
        raise InputError(f"{option('query_patch', f'{r},{c}')} is off the grid; {shape}")
    return r, c


def select_query(loaded: LoadedModel, query: str = "auto") -> QueryInfo:
    """Resolve ``auto`` / ``cls`` / ``regK`` / ``mean`` against the model's token layout (never assumes token 0
    is CLS: the CLS token's position and the registers' come from :class:`LoadedModel`)."""
    names = loaded.prefix_names
    q = (query or "auto").strip().lower()
    layout = (f"{loaded.num_cls_tokens} CLS + {loaded.num_register_tokens} register tokens"
              if loaded.num_prefix_tokens else "no CLS and no register tokens")
    if q == "auto":
        if loaded.num_cls_tokens:
            return QueryInfo("cls", "cls", names.index("cls"), "the CLS token")
        if loaded.num_register_tokens:
            return QueryInfo("reg0", "register", names.index("reg0"),
                             "this model has no CLS token: its first register (reg0) is the query")
        return QueryInfo("mean", "mean", None, "this model has no CLS and no register tokens: the query is the mean "
                                               "of all patch queries' attention (the mean query)")
    if q == "mean":
        return QueryInfo("mean", "mean", None, "the mean of all patch queries' attention (the mean query), as asked")
    if q in names:
        kind = "cls" if q == "cls" else "register"
        return QueryInfo(q, kind, names.index(q), f"the {'CLS token' if kind == 'cls' else 'register ' + q}, as asked")
    choices = ", ".join(["auto", *names, "mean"])
    raise InputError(f"{option('query', repr(query))} is not a token of this model ({layout}); choose one of: "
                     f"{choices}")


# ----------------------------------------------------------------------------------------------- the pass
class _MassSums:
    """Streaming sums for one query kind at one block (float64 on the CPU)."""

    def __init__(self, num_prefix: int, per_head: bool):
        self.prefix = torch.zeros(num_prefix, dtype=torch.float64)
        self.patches = 0.0
        self.outliers = 0.0
        self.outliers_present = 0.0
        self.want_per_head = per_head
        self.per_head: torch.Tensor | None = None

    def add(self, rows: torch.Tensor, P: int, mask: torch.Tensor | None) -> None:
        """``rows``: ``[B, H, T]`` attention distributions (one per image and head)."""
        mean = rows.mean(dim=1)  # [B, T], over heads
        if P:
            self.prefix += mean[:, :P].sum(dim=0).double().cpu()
        self.patches += float(mean[:, P:].sum())
        if mask is not None:
            m = mask.to(rows.dtype)
            onto = (mean[:, P:] * m).sum(dim=-1)  # [B]
            self.outliers += float(onto.sum())
            self.outliers_present += float(onto[mask.any(dim=1)].sum())
            if self.want_per_head:
                if self.per_head is None:
                    self.per_head = torch.zeros(rows.shape[1], dtype=torch.float64)
                self.per_head += (rows[:, :, P:] * m[:, None, :]).sum(dim=(0, 2)).double().cpu()

    def stats(self, names: list[str], n_images: int, n_present: int, fraction: float | None,
              has_mask: bool) -> MassStats:
        n = max(n_images, 1)
        outliers = self.outliers / n if has_mask else None
        present = self.outliers_present / n_present if has_mask and n_present else None
        patches = self.patches / n
        spike = None
        if has_mask and fraction and patches > 0:
            spike = (self.outliers / self.patches) / fraction
        return MassStats({name: float(self.prefix[i]) / n for i, name in enumerate(names)}, patches, outliers,
                         present, spike)


class _BlockState:
    def __init__(self, P: int):
        self.query = _MassSums(P, per_head=True)
        self.patch_queries = _MassSums(P, per_head=False)
        self.mask_count = 0
        self.images_with_outliers = 0


def _outlier_index(report: ScanReport) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """image index -> (rows, flat patch indices) of its flagged tokens."""
    by_image: dict[int, tuple[list[int], list[int]]] = {}
    gw = report.model.grid_size[1]
    for o in report.outliers:
        rows, patches = by_image.setdefault(o.image_index, ([], []))
        rows.append(o.layer)
        patches.append(o.row * gw + o.col)
    return {i: (torch.tensor(r, dtype=torch.long), torch.tensor(p, dtype=torch.long)) for i, (r, p) in by_image.items()}


def _check_scan_report(report: ScanReport, loaded: LoadedModel) -> None:
    m = report.model
    if m.num_blocks != len(loaded.blocks) or list(m.grid_size) != list(loaded.grid_size) \
            or m.num_prefix_tokens != loaded.num_prefix_tokens:
        raise InputError(f"the given norms report is of another model ({m.name}: {m.num_blocks} blocks, grid "
                         f"{m.grid_size[0]}x{m.grid_size[1]}, {m.num_prefix_tokens} prefix tokens); scan this one")
    if not report.outlier_records_complete:
        raise InputError("the given norms report does not hold every outlier record; scan again")


@dataclass
class _AttentionPlan:
    """What the attention pass measures: which blocks, which query, which maps (checked before any image)."""

    blocks: list[int]
    query: QueryInfo
    query_patch: tuple[int, int] | None
    heads: str
    capture: AttentionCapture

    @classmethod
    def of(cls, loaded: LoadedModel, spec: str | int | Sequence[int] | None, query: str,
           query_patch: str | Sequence[int] | None, heads: str) -> "_AttentionPlan":
        blocks = parse_blocks(spec, len(loaded.blocks), loaded.layer_range_hint())
        gh, gw = loaded.grid_size
        # AttentionCapture raises NotAViTError before any work when a block cannot be captured
        return cls(blocks, select_query(loaded, query), parse_query_patch(query_patch, (gh, gw)), heads,
                   AttentionCapture(loaded, blocks))

    def map_queries(self, loaded: LoadedModel) -> list[tuple[str, int | None]]:
        """``(name, query row)`` of every map kept (row ``None``: the mean over patch queries)."""
        out: list[tuple[str, int | None]] = [(self.query.name, self.query.token_index)]
        out += [(n, i) for i, n in enumerate(loaded.prefix_names) if n != self.query.name]
        if self.query_patch is not None:
            r, c = self.query_patch
            out.append((f"patch({r},{c})", loaded.num_prefix_tokens + r * loaded.grid_size[1] + c))
        return out


class _AttentionSums:
    """The attention pass's reductions, fed block by block as the probabilities appear: per-block mass sums over
    every image, and the maps of the first ``num_maps`` images."""

    def __init__(self, loaded: LoadedModel, plan: _AttentionPlan, num_maps: int):
        self.plan, self.num_maps = plan, num_maps
        self.P = loaded.num_prefix_tokens
        self.grid = tuple(loaded.grid_size)
        self.num_blocks = len(loaded.blocks)
        self.map_queries = plan.map_queries(loaded)
        self.state = {b: _BlockState(self.P) for b in plan.blocks}
        self.kept: dict[tuple[int, str], list[torch.Tensor]] = {}
        self.kept_flags: dict[int, list[torch.Tensor]] = {}
        self.seen: set[int] = set()
        self.n_images = 0
        self.masks = torch.zeros(0)
        self.indices: list[int] = []
        self.map_rows: list[int] = []

    def begin_batch(self, indices: torch.Tensor, flagged: dict[int, tuple[torch.Tensor, torch.Tensor]],
                    device: torch.device) -> None:
        """The batch's outlier masks ``[B, rows, N]`` (the norms scan's flags) and which images keep maps."""
        self.indices = indices.tolist()
        gh, gw = self.grid
        masks = torch.zeros(len(self.indices), self.num_blocks + 1, gh * gw, dtype=torch.bool)
        for j, i in enumerate(self.indices):
            if i in flagged:
                rows, pats = flagged[i]
                masks[j, rows, pats] = True
        self.masks = masks.to(device)
        self.map_rows = [j for j, i in enumerate(self.indices) if i < self.num_maps]
        self.seen.clear()

    def on_probs(self, block: int, probs: torch.Tensor) -> None:
        P, (gh, gw) = self.P, self.grid
        probs = probs.float()
        if probs.shape[-1] != P + gh * gw:
            raise InputError(f"block {block}'s attention covers {probs.shape[-1]} tokens, expected {P} prefix + "
                             f"{gh}x{gw} patches; pass {option('img_size')} to match the model")
        self.seen.add(block)
        row = block - 1
        mask = self.masks[:, row] if row >= 0 else None  # [B, N] bool on device
        pq = probs[:, :, P:, :].mean(dim=2)  # [B, H, T]: the mean over patch queries
        qi = self.plan.query.token_index
        qrows = pq if qi is None else probs[:, :, qi, :]
        st = self.state[block]
        st.query.add(qrows, P, mask)
        st.patch_queries.add(pq, P, mask)
        if mask is not None:
            st.mask_count += int(mask.sum())
            st.images_with_outliers += int(mask.any(dim=1).sum())
        self._keep_maps(probs, pq, mask)

    def _keep_maps(self, probs: torch.Tensor, pq: torch.Tensor, mask: torch.Tensor | None) -> None:
        gh, gw = self.grid
        for j in self.map_rows:
            for name, qi in self.map_queries:
                r = pq[j] if qi is None else probs[j, :, qi, :]
                m = r[:, self.P:].reshape(-1, gh, gw)
                if self.plan.heads == "mean":
                    m = m.mean(dim=0, keepdim=True)
                self.kept.setdefault((self.indices[j], name), []).append(m.cpu())
            flags = mask[j].reshape(gh, gw).cpu() if mask is not None else torch.zeros(gh, gw, dtype=torch.bool)
            self.kept_flags.setdefault(self.indices[j], []).append(flags)

    def end_batch(self) -> None:
        missing = [b for b in self.plan.blocks if b not in self.seen]
        if missing:
            raise NotAViTError(f"block {missing[0]}'s attention probabilities were not captured during the "
                               "forward; this model's attention cannot be mapped")
        self.n_images += len(self.indices)

    def layer_reports(self, names: list[str]) -> list[LayerAttention]:
        n_images, N = self.n_images, self.grid[0] * self.grid[1]
        out = []
        for b in self.plan.blocks:
            st = self.state[b]
            has_mask = b >= 1
            fraction = st.mask_count / (n_images * N) if has_mask else None
            q = st.query.stats(names, n_images, st.images_with_outliers, fraction, has_mask)
            pq_stats = st.patch_queries.stats(names, n_images, st.images_with_outliers, fraction, has_mask)
            per_head = None
            if has_mask and st.query.per_head is not None:
                per_head = [float(v) / n_images for v in st.query.per_head]
            out.append(LayerAttention(b, b - 1 if has_mask else None, n_images,
                                      st.images_with_outliers if has_mask else 0, fraction, q, pq_stats, per_head))
        return out

    def maps(self, image_names: list[str]) -> list[AttentionMap]:
        out = []
        for i in sorted(self.kept_flags):
            flags = torch.stack(self.kept_flags[i]).tolist()
            for name, _ in self.map_queries:
                grid = torch.stack(self.kept[(i, name)])  # [L, H', gh, gw]
                out.append(AttentionMap(image_names[i], i, name, list(self.plan.blocks), self.plan.heads,
                                        grid.tolist(), flags))
        return out


def _attention_pass(opened: OpenedPass, plan: _AttentionPlan, sums: _AttentionSums,
                    flagged: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Pass 2: every image (on every rank: this pass does not merge across ranks), the captured blocks' attention
    reduced as it appears."""
    plan.capture.on_probs = sums.on_probs
    with measurement_mode(), plan.capture:
        for x, indices, _ in opened.batches("attention", every_rank_all=True):
            if x is None:
                continue
            sums.begin_batch(indices, flagged, opened.device)
            plan.capture.forward(x)
            sums.end_batch()


# ----------------------------------------------------------------------------------------------- attention_report()
def attention_report(
    model: str | Path | LoadedModel | torch.nn.Module | None = None,
    images: str | Path | Sequence[str | Path] | Dataset | torch.Tensor | None = None,
    *,
    blocks: str | int | Sequence[int] | None = ALL_BLOCKS,
    threshold: str | float | None = THRESHOLD,
    query: str = "auto",
    query_patch: str | Sequence[int] | None = None,
    heads: str = "mean",
    maps: int = MAPS,
    device: str | None = DEVICE,
    batch_size: int = BATCH_SIZE,
    num_workers: int | str = WORKERS,
    exact_decode: bool = False,
    gpu_decode: bool = False,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    trust_checkpoint: bool = False,
    img_size: int | None = None,
    weights: str | None = None,
    precision: str = "auto",
    scan_report: ScanReport | None = None,
    progress: bool = False,
    warn: Callable[[str], None] | None = None,
    layers: str | Sequence[int] | None = None,
) -> AttentionReport:
    """Attention maps of the CLS token / registers / a chosen patch, and the attention mass on outlier tokens.

    Args:
        model, images: as for :func:`artifactscan.scan` (a name, a checkpoint, a LoadedModel or nn.Module; a folder,
            files, ``synthetic:N``, a Dataset or an ``[N, 3, H, W]`` tensor in [0, 1]).
        blocks: blocks to capture: ``"all"`` (default), ``"0,5,-1"``, ``"2:8"`` or a list of ints
            (:func:`artifactscan.core.blocks.parse_blocks`). Only these blocks lose the fused attention kernel, and
            only during the pass. (``layers=``: its old name, deprecated.)
        threshold: the norms scan's rule that flags outliers: ``"auto"`` or a number (e.g. the paper's 150).
        query: ``auto`` (CLS; the first register when there is no CLS; the mean query when there are no prefix
            tokens), ``cls``, ``regK`` or ``mean``.
        query_patch: ``(row, col)`` / ``"ROW,COL"``: also keep the maps of that patch's attention.
        heads: ``mean`` (maps averaged over heads) or ``all`` (one map per head, the paper's Fig 9).
        maps: keep maps for the first ``maps`` images (the mass statistics use every image).
        scan_report: reuse a norms :class:`ScanReport` of this model on these images (same order) instead of
            scanning again.

    Returns:
        An :class:`AttentionReport`.

    Raises:
        InputError on bad arguments; NotAViTError when a block has no attention module timm can expose.
    """
    if maps < 0:
        raise InputError(f"{option('maps')} must be >= 0, got {maps}")
    heads = (heads or "mean").strip().lower()
    if heads not in HEADS_MODES:
        raise InputError(f"{option('heads', repr(heads))}: use 'mean' (average over heads) or 'all' (one map per head)")
    settings = PassSettings(device=device, batch_size=batch_size, num_workers=num_workers, exact_decode=exact_decode,
                            gpu_decode=gpu_decode, progress=progress, warn=warn)
    fixed = threshold_option(threshold) if scan_report is None else None
    load = dict(arch=arch, arch_kwargs=arch_kwargs, trust_checkpoint=trust_checkpoint, img_size=img_size,
                weights=weights, precision=precision)

    spec = renamed_keyword(blocks, layers, "blocks", "layers", ALL_BLOCKS)

    def plan_of(loaded: LoadedModel) -> _AttentionPlan:  # said before anything about the images
        return _AttentionPlan.of(loaded, spec, query, query_patch, heads)

    # captured blocks hold heads x T x T probabilities: the memory check counts them
    with open_pass(model, images, settings=settings, load=load, explicit_attention=True,
                   after_load=plan_of) as opened:
        plan = plan_of(opened.loaded)
        if scan_report is None:  # pass 1: the norms scan flags outliers (or a given report is reused)
            scan_report = measure_norms(opened, fixed, AutoRule(), 0)
        else:
            _check_scan_report(scan_report, opened.loaded)
        problem = scan_report.nonfinite_problem()
        if problem:
            raise NonFiniteError(f"{opened.loaded.name}: {problem}; attention maps of such a pass mean nothing "
                                 "(artifactscan norms --allow-nonfinite shows where the values start)")
        sums = _AttentionSums(opened.loaded, plan, maps)
        _attention_pass(opened, plan, sums, _outlier_index(scan_report))
    if sums.n_images == 0:
        raise InputError("none of the images could be read; nothing to measure")
    return _attention_result(opened, plan, sums, scan_report)


def _attention_result(opened: OpenedPass, plan: _AttentionPlan, sums: _AttentionSums,
                      scan_report: ScanReport) -> AttentionReport:
    loaded = opened.loaded
    outlier_rule = (f"outliers for block b are the patch tokens the norms scan flagged at the input of block b "
                    "(norms-scan row b-1, the keys this block reads); block 0 reads the patch embedding and has no "
                    "outlier mass")
    report = AttentionReport(
        model=loaded.summary(), images=scan_report.images, query=plan.query,
        query_patch=list(plan.query_patch) if plan.query_patch else None, heads=plan.heads,
        blocks=list(plan.blocks), threshold_mode=scan_report.threshold_mode,
        threshold_rule=scan_report.threshold_rule, outlier_rule=outlier_rule,
        layers=sums.layer_reports(loaded.prefix_names), maps=sums.maps(opened.source.names), headline="",
        notes=list(loaded.notes))
    if sums.n_images != scan_report.images.num_scanned:
        report.notes.append(f"the norms scan read {scan_report.images.num_scanned} images, the attention pass "
                            f"{sums.n_images}")
    report.headline = attention_headline(report)
    if scan_report.inconclusive_layers:  # fewer outliers to measure than there may be: said, never read as clean
        report.headline += f" The norms scan is {scan_report.inconclusive_problem()}."
    return report


def _q_label(q: QueryInfo) -> str:
    return {"cls": "CLS", "mean": "the mean query"}.get(q.kind, q.name)


def attention_headline(report: AttentionReport) -> str:
    """One or two sentences: the strongest attention spike on outliers, or why there is none to measure."""
    q = _q_label(report.query)
    with_outliers = [lay for lay in report.layers if lay.outlier_fraction]
    if not with_outliers:
        measurable = [lay for lay in report.layers if lay.outlier_row is not None]
        why = ("no captured block has an outlier mask (block 0 reads the patch embedding)" if not measurable else
               "the norms scan flagged no outlier tokens at the input of the captured blocks")
        last = report.layers[-1]
        prefix = "".join(f", {v:.1%} on {k}" for k, v in last.query.prefix.items())
        tail = f"; at block {last.block} {q} puts {last.query.patches:.1%} of its attention on patches{prefix}"
        return f"No attention on outliers to measure: {why}{tail}."
    best = max(with_outliers, key=lambda lay: lay.query.spike or 0.0)
    s = best.query
    text = (f"Block {best.block}: {q} puts {s.outliers:.1%} of its attention on the {best.outlier_fraction:.2%} of "
            f"patch tokens flagged as outliers ({_ratio(s.spike)} their share of the patches)")
    pq = best.patch_queries
    text += f"; patch queries put {pq.outliers:.1%} there ({_ratio(pq.spike)})."
    if s.spike is not None and s.spike >= 5:
        text += " An attention spike on the high-norm tokens, as in the paper's Fig 2."
    return text


def _ratio(x: float | None) -> str:
    return times(x)
