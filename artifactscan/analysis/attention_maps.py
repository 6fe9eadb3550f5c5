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
from artifactscan.analysis.memory import check_fits
from artifactscan.models.loading import LoadedModel, load_model
from artifactscan.core.summaries import AnalysisResult
from artifactscan.analysis.scan import ScanReport, scan
from artifactscan.inputs.sources import effective_batch_size, image_batches, make_image_source
from artifactscan.core.progress import ProgressBar
from artifactscan.core.devices import resolve_device

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
    if batch_size <= 0:
        raise InputError(f"{option('batch_size')} must be positive, got {batch_size}")
    if maps < 0:
        raise InputError(f"{option('maps')} must be >= 0, got {maps}")
    heads = (heads or "mean").strip().lower()
    if heads not in HEADS_MODES:
        raise InputError(f"{option('heads', repr(heads))}: use 'mean' (average over heads) or 'all' (one map per head)")
    loaded = load_model(model, arch=arch, arch_kwargs=arch_kwargs, trust_checkpoint=trust_checkpoint,
                        img_size=img_size, weights=weights)
    num_blocks = len(loaded.blocks)
    blocks = parse_blocks(renamed_keyword(blocks, layers, "blocks", "layers", ALL_BLOCKS), num_blocks,
                          loaded.layer_range_hint())
    qinfo = select_query(loaded, query)
    gh, gw = loaded.grid_size
    qpatch = parse_query_patch(query_patch, (gh, gw))
    capture = AttentionCapture(loaded, blocks)  # raises NotAViTError before any work when a block cannot be captured
    dev = resolve_device(device)
    source = make_image_source(images, loaded, exact_decode=exact_decode, gpu_decode=gpu_decode)  # for pass 2
    # captured blocks hold heads x T x T probabilities
    check_fits(loaded, effective_batch_size(source, batch_size), dev, explicit_attention=True)

    # Pass 1: the norms scan flags outliers (or a given report is reused).
    if scan_report is None:
        scan_report = scan(loaded, images, threshold=threshold, device=str(dev), batch_size=batch_size,
                           num_workers=num_workers, num_maps=0, progress=progress, warn=warn,
                           exact_decode=exact_decode, gpu_decode=gpu_decode)
    else:
        _check_scan_report(scan_report, loaded)
    problem = scan_report.nonfinite_problem()
    if problem:
        raise NonFiniteError(f"{loaded.name}: {problem}; attention maps of such a pass mean nothing "
                             "(artifactscan norms --allow-nonfinite shows where the values start)")
    loaded.model.to(dev)
    flagged = _outlier_index(scan_report)

    # Pass 2: attention, reduced block by block as the probabilities appear.
    P = loaded.num_prefix_tokens
    N = gh * gw
    names = loaded.prefix_names
    map_queries: list[tuple[str, int | None]] = []  # (name, query row; None = mean over patch queries)
    map_queries.append((qinfo.name, qinfo.token_index))
    map_queries += [(n, i) for i, n in enumerate(names) if n != qinfo.name]
    if qpatch is not None:
        map_queries.append((f"patch({qpatch[0]},{qpatch[1]})", P + qpatch[0] * gw + qpatch[1]))
    state = {b: _BlockState(P) for b in blocks}
    kept: dict[tuple[int, str], list[torch.Tensor]] = {}
    kept_flags: dict[int, list[torch.Tensor]] = {}
    seen: set[int] = set()
    batch: dict[str, Any] = {}

    def on_probs(block: int, probs: torch.Tensor) -> None:
        probs = probs.float()
        if probs.shape[-1] != P + N:
            raise InputError(f"block {block}'s attention covers {probs.shape[-1]} tokens, expected {P} prefix + "
                             f"{gh}x{gw} patches; pass {option('img_size')} to match the model")
        seen.add(block)
        row = block - 1
        mask = batch["masks"][:, row] if row >= 0 else None  # [B, N] bool on device
        pq = probs[:, :, P:, :].mean(dim=2)  # [B, H, T]: the mean over patch queries
        qrows = pq if qinfo.token_index is None else probs[:, :, qinfo.token_index, :]
        st = state[block]
        st.query.add(qrows, P, mask)
        st.patch_queries.add(pq, P, mask)
        if mask is not None:
            st.mask_count += int(mask.sum())
            st.images_with_outliers += int(mask.any(dim=1).sum())
        for j in batch["map_rows"]:
            for name, qi in map_queries:
                r = pq[j] if qi is None else probs[j, :, qi, :]
                m = r[:, P:].reshape(-1, gh, gw)
                if heads == "mean":
                    m = m.mean(dim=0, keepdim=True)
                kept.setdefault((batch["indices"][j], name), []).append(m.cpu())
            if mask is not None:
                kept_flags.setdefault(batch["indices"][j], []).append(mask[j].reshape(gh, gw).cpu())
            else:
                kept_flags.setdefault(batch["indices"][j], []).append(torch.zeros(gh, gw, dtype=torch.bool))

    n_images = 0
    capture.on_probs = on_probs
    with measurement_mode(), capture, ProgressBar(progress, source.num_found, "attention") as bar:
        for x, indices, bad in image_batches(source, batch_size, num_workers, dev):
            bar.advance(len(indices) + len(bad))
            if x is None:
                continue
            idx = indices.tolist()
            masks = torch.zeros(len(idx), num_blocks + 1, N, dtype=torch.bool)
            for j, i in enumerate(idx):
                if i in flagged:
                    rows, pats = flagged[i]
                    masks[j, rows, pats] = True
            batch.update(masks=masks.to(dev), indices=idx, map_rows=[j for j, i in enumerate(idx) if i < maps])
            seen.clear()
            capture.forward(x.to(dev, non_blocking=True))
            missing = [b for b in blocks if b not in seen]
            if missing:
                raise NotAViTError(f"block {missing[0]}'s attention probabilities were not captured during the "
                                   "forward; this model's attention cannot be mapped")
            n_images += len(idx)
    if n_images == 0:
        raise InputError("none of the images could be read; nothing to measure")

    layer_reports = []
    for b in blocks:
        st = state[b]
        has_mask = b >= 1
        fraction = st.mask_count / (n_images * N) if has_mask else None
        q = st.query.stats(names, n_images, st.images_with_outliers, fraction, has_mask)
        pq_stats = st.patch_queries.stats(names, n_images, st.images_with_outliers, fraction, has_mask)
        per_head = None
        if has_mask and st.query.per_head is not None:
            per_head = [float(v) / n_images for v in st.query.per_head]
        layer_reports.append(LayerAttention(b, b - 1 if has_mask else None, n_images,
                                            st.images_with_outliers if has_mask else 0, fraction, q, pq_stats,
                                            per_head))

    attention_maps = []
    for i in sorted(kept_flags):
        flags = torch.stack(kept_flags[i]).tolist()
        for name, _ in map_queries:
            grid = torch.stack(kept[(i, name)])  # [L, H', gh, gw]
            attention_maps.append(AttentionMap(source.names[i], i, name, list(blocks), heads, grid.tolist(), flags))

    outlier_rule = (f"outliers for block b are the patch tokens the norms scan flagged at the input of block b "
                    "(norms-scan row b-1, the keys this block reads); block 0 reads the patch embedding and has no "
                    "outlier mass")
    report = AttentionReport(
        model=loaded.summary(), images=scan_report.images, query=qinfo,
        query_patch=list(qpatch) if qpatch else None, heads=heads, blocks=list(blocks),
        threshold_mode=scan_report.threshold_mode, threshold_rule=scan_report.threshold_rule,
        outlier_rule=outlier_rule, layers=layer_reports, maps=attention_maps, headline="",
        notes=list(loaded.notes))
    if n_images != scan_report.images.num_scanned:
        report.notes.append(f"the norms scan read {scan_report.images.num_scanned} images, the attention pass "
                            f"{n_images}")
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
