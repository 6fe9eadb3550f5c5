"""Publication-quality figures of a scan: norm histograms, per-layer distributions, per-image maps.

Every plotting function draws into the ``ax`` / ``axes`` it is given, or builds its own figure, and returns
``(fig, ax)`` (``(fig, axes)`` for the two-panel figures, with ``axes`` a list). Figures are built as bare
:class:`matplotlib.figure.Figure` objects, not through ``pyplot``: nothing is shown, no GUI backend is touched
(saving renders with Agg), and a figure that goes out of scope is freed — ``pyplot``'s figure list never grows.

Conventions: 8-pt fonts and widths of one paper column (3.5 in) or two (7.0 in); the Okabe-Ito colour-blind-safe
palette, and *viridis* for heatmaps; every axis names its quantity and unit (token norms are L2 norms of the
block's output tokens, in the model's own units).

Figures of the calibration phantom carry ``PHANTOM_TAG`` in their title, so a figure cut out of its report
cannot pass for a finding about a real model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from artifactscan.core.files import name_from_hex
from artifactscan.render.style import (
    BLACK,
    BLUE,
    COLUMN_WIDTH_IN,
    HEATMAP_CMAP,
    ORANGE,
    PAPER_THRESHOLD,
    PHANTOM_TAG,
    SKY,
    VERMILLION,
    as_float,
    close_figure,
    format_number,
    format_pct,
    is_phantom,
    load_display_image,
    new_figure,
    no_data,
    one_ax,
    outline_cells,
    plain_log_ticks,
    plot_style,
    save_figure,
    tag_phantom,
    unique_stems,
    wrap_text,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from artifactscan.analysis.scan import Histogram, LayerReport, NormMap, ScanReport

__all__ = [
    "PHANTOM_TAG",
    "PAPER_THRESHOLD",
    "plot_norm_histogram",
    "plot_layer_distributions",
    "plot_image_map",
    "save_scan_figures",
]

# ----------------------------------------------------------------------------------------------- helpers


def _hist_arrays(hist: Histogram) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(bin indices, counts) of the non-empty bins, sorted, plus ``log10_min`` and ``bin_width``.

    Works from the sparse form, so it does not depend on the bin count of the running version."""
    bins = np.asarray(hist.bins, dtype=np.int64)
    counts = np.asarray(hist.counts, dtype=np.float64)
    order = np.argsort(bins, kind="stable")
    bins, counts = bins[order], counts[order]
    keep = counts > 0
    return bins[keep], counts[keep], float(hist.log10_min), float(hist.bin_width)


def histogram_quantiles(hist: Histogram, qs: Sequence[float]) -> list[float]:
    """Quantiles of a log-spaced histogram, interpolated geometrically inside the bin (as ``stats`` does)."""
    bins, counts, lo, bw = _hist_arrays(hist)
    total = counts.sum()
    if total <= 0:
        return [math.nan for _ in qs]
    cum = np.cumsum(counts)
    out = []
    for q in qs:
        target = min(max(q, 0.0), 1.0) * total
        i = int(np.searchsorted(cum, target, side="left"))
        i = min(i, len(bins) - 1)
        before = cum[i - 1] if i > 0 else 0.0
        frac = min(max((target - before) / counts[i], 0.0), 1.0)
        out.append(10 ** (lo + (bins[i] + frac) * bw))
    return out


def _rebin(hist: Histogram, target_bars: int = 100, align_to: float | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """Re-aggregate the fine histogram over its occupied range into about ``target_bars`` bars.

    Returns ``(edges, counts)`` in norm units. When ``align_to`` (a norm) is given, one coarse edge falls on the
    fine edge nearest to it, so bars do not straddle the threshold."""
    bins, counts, lo, bw = _hist_arrays(hist)
    if len(bins) == 0:
        return np.array([]), np.array([])
    first, last = int(bins[0]), int(bins[-1])
    span = last - first + 1
    k = max(1, math.ceil(span / target_bars))
    start = first
    if align_to is not None and align_to > 0 and math.isfinite(align_to):
        t = int(round((math.log10(align_to) - lo) / bw))
        start = first - ((first - t) % k)
    n_groups = (last - start) // k + 1
    grouped = np.zeros(n_groups)
    np.add.at(grouped, (bins - start) // k, counts)
    edges = 10 ** (lo + (start + k * np.arange(n_groups + 1)) * bw)
    return edges, grouped


def _threshold_mode(layer: LayerReport) -> str:
    return "fixed" if str(layer.threshold_reason).lower().startswith("fixed") else "auto"


def block_layers(report: ScanReport) -> list[LayerReport]:
    return [lay for lay in report.layers if not lay.is_final_norm]


# ----------------------------------------------------------------------------------------------- 1. histogram
def plot_norm_histogram(layer: LayerReport, ax: Axes | None = None, title: str | None = None, *,
                        mode: str | None = None, target_bars: int = 100) -> tuple[Figure, Axes]:
    """Histogram of one layer's patch-token norms (Darcet et al., Fig. 3): log-x so the artifact mode shows as a
    separate bump, log-y so a 2 % minority is visible next to the bulk.

    Bars above the layer's threshold are drawn in vermillion; a dashed line marks the threshold
    ("threshold (auto|fixed) = X"), a dotted one the paper's 150 when it lies in the plotted range, and the
    legend gives the outlier fraction. ``mode`` ("auto"/"fixed") overrides the mode read from the layer's
    ``threshold_reason``. ``title`` defaults to ``"<layer name>: patch-token norms"``.
    """
    with plot_style():
        fig, ax = one_ax(ax, COLUMN_WIDTH_IN, 2.5)
        thr = as_float(layer.threshold)
        thr = thr if math.isfinite(thr) and thr > 0 else None
        edges, counts = _rebin(layer.histogram, target_bars, align_to=thr)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("patch-token norm (L2, log scale)")
        ax.set_ylabel("tokens per bin (log scale)")
        ax.set_title(wrap_text(title if title is not None else f"{layer.name}: patch-token norms"))
        if counts.size == 0:
            no_data(ax, "no patch tokens recorded")
            return fig, ax
        widths = np.diff(edges)
        centres = np.sqrt(edges[:-1] * edges[1:])
        above = (centres > thr) if thr is not None else np.zeros(len(counts), dtype=bool)
        nz = counts > 0
        handles: list[Any] = []
        for sel, colour, label in ((nz & ~above, BLUE, "patch tokens"), (nz & above, VERMILLION, "above threshold")):
            if sel.any():
                ax.bar(edges[:-1][sel], counts[sel], width=widths[sel], align="edge", color=colour,
                       edgecolor=colour, linewidth=0.3, label=label)
        x_lo, x_hi = edges[0], edges[-1]
        # Pad the x range a little (in log space), and include the threshold so its line is never off-axis.
        lo_pad = 10 ** (math.log10(x_lo) - 0.05 * max(math.log10(x_hi / x_lo), 0.2))
        hi_pad = 10 ** (math.log10(x_hi) + 0.05 * max(math.log10(x_hi / x_lo), 0.2))
        if thr is not None:
            lo_pad, hi_pad = min(lo_pad, thr / 1.2), max(hi_pad, thr * 1.2)
        ax.set_xlim(lo_pad, hi_pad)
        # Head-room (in log space) above the tallest bar for the legend.
        top = math.log10(counts.max())
        ax.set_ylim(0.6, 10 ** (top + 0.8 * (top - math.log10(0.6)) + 0.3))
        if thr is not None:
            ax.axvline(thr, color=BLACK, linestyle="--", linewidth=1.0,
                       label=f"threshold ({mode or _threshold_mode(layer)}) = {format_number(thr)}")
        if lo_pad <= PAPER_THRESHOLD <= hi_pad and (thr is None or abs(thr - PAPER_THRESHOLD) > 1e-9):
            ax.axvline(PAPER_THRESHOLD, color="0.45", linestyle=":", linewidth=1.1, label="paper's 150")
        frac = as_float(layer.outlier_fraction)
        summary = f"outliers: {format_pct(frac)} ({int(layer.num_outliers):,} tokens)"
        if thr is None:
            summary = "no outliers (no separated group)" if _threshold_mode(layer) == "auto" else summary
        handles, labels = ax.get_legend_handles_labels()
        handles.append(Line2D([], [], linestyle="none"))
        labels.append(summary)
        ax.legend(handles, labels, loc="upper center", ncols=2, handlelength=1.5, columnspacing=0.8,
                  borderaxespad=0.3)
        ax.grid(True, which="major", axis="y", linewidth=0.3, alpha=0.5)
        plain_log_ticks(ax.xaxis)
    return fig, ax


# ----------------------------------------------------------------------------------------------- 2. per layer
def plot_layer_distributions(report: ScanReport, ax: Axes | None = None, title: str | None = None
                             ) -> tuple[Figure, Axes]:
    """Patch-token norm distribution per layer (Darcet et al., Fig. 4a): p1–p99 and p25–p75 bands and the median
    (from each layer's histogram), the per-layer maximum as markers, the per-layer threshold as short horizontal
    ticks; log-y. The last column is the model's final norm (labelled "norm"), drawn apart: its scale differs."""
    with plot_style():
        fig, ax = one_ax(ax, COLUMN_WIDTH_IN, 2.6)
        layers = list(report.layers)
        qs = np.array([histogram_quantiles(lay.histogram, (0.01, 0.25, 0.5, 0.75, 0.99)) for lay in layers]
                      ).reshape(len(layers), 5)
        xs = np.arange(len(layers), dtype=float)
        finals = np.array([lay.is_final_norm for lay in layers], dtype=bool)
        blocks = ~finals
        band_outer = dict(color=SKY, alpha=0.35, linewidth=0)
        band_inner = dict(color=BLUE, alpha=0.45, linewidth=0)
        if blocks.any():
            xb = xs[blocks]
            ax.fill_between(xb, qs[blocks, 0], qs[blocks, 4], label="p1–p99", **band_outer)
            ax.fill_between(xb, qs[blocks, 1], qs[blocks, 3], label="p25–p75", **band_inner)
            ax.plot(xb, qs[blocks, 2], color=BLUE, linewidth=1.3, label="median")
        for x in xs[finals]:
            i = int(x)
            span = [x - 0.3, x + 0.3]
            ax.fill_between(span, [qs[i, 0]] * 2, [qs[i, 4]] * 2, **band_outer)
            ax.fill_between(span, [qs[i, 1]] * 2, [qs[i, 3]] * 2, **band_inner)
            ax.plot(span, [qs[i, 2]] * 2, color=BLUE, linewidth=1.3)
            ax.axvline(x - 0.5, color="0.6", linestyle=":", linewidth=0.7)
        maxes = np.array([as_float(lay.max) for lay in layers])
        ax.plot(xs, maxes, linestyle="none", marker="^", color=VERMILLION, markersize=3.5 if len(xs) <= 26 else 2.5,
                label="max")
        thr = np.array([as_float(lay.threshold) for lay in layers])
        has_thr = np.isfinite(thr) & (thr > 0)
        if has_thr.any():
            tick = float(np.clip(130 / max(len(layers), 1), 3, 9))  # narrower than a layer's slot
            ax.plot(xs[has_thr], thr[has_thr], linestyle="none", marker="_", color=BLACK, markersize=tick,
                    markeredgewidth=1.4, label=f"threshold ({report.threshold_mode})")
        ax.set_yscale("log")
        ax.set_xlim(-0.6, len(layers) - 0.4)
        step = max(1, math.ceil(len(layers) / 13))
        ticks = [i for i in range(len(layers)) if i % step == 0 or finals[i]]
        if len(ticks) >= 2 and finals[ticks[-1]] and ticks[-1] - ticks[-2] < step:
            ticks.pop(-2)  # keep the "norm" label from colliding with its neighbour
        ax.set_xticks(ticks)
        ax.set_xticklabels(["norm" if finals[i] else str(layers[i].index) for i in ticks])
        ax.set_xlabel("layer (block index; norm = final norm)")
        ax.set_ylabel("patch-token norm (L2, log scale)")
        if report.onset_layer is not None:
            ax.axvspan(report.onset_layer - 0.5, (xs[finals][0] - 0.5) if finals.any() else len(layers) - 0.5,
                       color=ORANGE, alpha=0.08, linewidth=0, label=f"outliers from block {report.onset_layer}")
        ax.legend(loc="upper left", ncols=2, handlelength=1.4, columnspacing=0.8, borderaxespad=0.3)
        finite = np.concatenate([qs[np.isfinite(qs)], maxes[np.isfinite(maxes)]])
        if finite.size and (finite > 0).any():
            pos = finite[finite > 0]
            # Head-room above for the legend.
            ax.set_ylim(pos.min() / 1.6, pos.max() * 10 ** (0.45 * max(math.log10(pos.max() / pos.min()), 0.5)))
        ax.grid(True, which="major", axis="y", linewidth=0.3, alpha=0.5)
        plain_log_ticks(ax.yaxis)
        default = f"{report.model.name}: patch-token norms per layer"
        ax.set_title(wrap_text(tag_phantom(title if title is not None else default, is_phantom(report)) or ""))
    return fig, ax


# ----------------------------------------------------------------------------------------------- 3. per image
def plot_image_map(norm_map: NormMap, image_path: str | None, data_size: tuple[int, int] | None = None,
                   axes: Sequence[Axes] | Axes | None = None, *, title: str | None = None,
                   threshold: float | None = None) -> tuple[Figure, list[Axes]]:
    """Per-image figure: the image (centre-cropped to the model's input aspect ``data_size`` = (H, W)) with the
    flagged patches outlined on the patch grid, and the patch-norm heatmap (colourbar "token norm") with the same
    cells outlined. When ``image_path`` is None or cannot be read (synthetic / tensor inputs) only the heatmap
    is drawn.

    ``axes``: two Axes (image, heatmap), or one (heatmap only). Returns ``(fig, axes_used)``; an image Axes
    given but left without an image is turned off with a note. ``threshold`` (optional) is drawn on the colourbar.
    """
    norms = np.asarray(norm_map.norms, dtype=float)
    if norms.ndim != 2:
        norms = np.atleast_2d(norms)
    flagged = np.asarray(norm_map.flagged, dtype=bool) if norm_map.flagged else np.zeros(norms.shape, bool)
    if flagged.shape != norms.shape:
        flagged = np.zeros(norms.shape, bool)
    gh, gw = norms.shape
    aspect_hw = tuple(data_size) if data_size else (gh, gw)
    with plot_style():
        img = load_display_image(image_path, aspect_hw)  # type: ignore[arg-type]
        if axes is None:
            panels = 2 if img is not None else 1
            width = 4.7 if panels == 2 else COLUMN_WIDTH_IN
            height = 2.45 if panels == 2 else 2.6
            fig, ax_list = new_figure(width, height, panels)
        else:
            ax_list = [axes] if not isinstance(axes, (list, tuple, np.ndarray)) else list(np.ravel(axes))
            fig = ax_list[0].figure
            if len(ax_list) >= 2 and img is None:
                ax_list[0].set_axis_off()
                ax_list[0].text(0.5, 0.5, "no image file\n(synthetic or tensor input)", ha="center",
                                va="center", color="0.4", transform=ax_list[0].transAxes)
                ax_list = ax_list[1:]
            elif len(ax_list) == 1:
                img = None
        n_flag = int(flagged.sum())
        extent = (-0.5, gw - 0.5, gh - 0.5, -0.5)
        # Cells are square in the model's input when patches are square: keep that aspect on screen.
        cell_aspect = (aspect_hw[0] / gh) / (aspect_hw[1] / gw)
        name = Path(str(norm_map.image)).name or str(norm_map.image)
        used = []
        if img is not None:
            _draw_image_panel(ax_list[0], img, flagged, extent, cell_aspect, name)
            used.append(ax_list[0])
        ax_h = ax_list[-1]
        _draw_heatmap_panel(fig, ax_h, norms, flagged, extent, cell_aspect, threshold)
        layer_txt = f"block {norm_map.layer}"
        thr_txt = f" (> {format_number(as_float(threshold))})" if threshold is not None and math.isfinite(as_float(threshold)) else ""
        heat_title = f"{layer_txt} norms, {n_flag} flagged{thr_txt}"
        ax_h.set_title(heat_title if img is not None else f"{heat_title}\n{wrap_text(name, 40)}")
        used.append(ax_h)
        if title is not None:
            if axes is None:
                fig.suptitle(wrap_text(title, 90))
            else:
                used[0].set_title(wrap_text(title, 60) + "\n" + used[0].get_title())
    return fig, used


def _draw_image_panel(ax: Axes, img: Any, flagged: np.ndarray, extent: tuple[float, float, float, float],
                      cell_aspect: float, name: str) -> None:
    """The image under the patch grid, its flagged cells outlined, titled with its file name."""
    ax.imshow(img, extent=extent, aspect=cell_aspect, interpolation="lanczos")
    outline_cells(ax, flagged)
    ax.set_title(wrap_text(name, 40))
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)


def _draw_heatmap_panel(fig: Figure, ax: Axes, norms: np.ndarray, flagged: np.ndarray,
                        extent: tuple[float, float, float, float], cell_aspect: float,
                        threshold: float | None) -> None:
    """The patch-norm heatmap with the flagged cells outlined, its colourbar (the threshold marked on it when it
    falls in the range shown) and patch row/column ticks, at most about eight per axis."""
    gh, gw = norms.shape
    finite = norms[np.isfinite(norms)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    im = ax.imshow(norms, cmap=HEATMAP_CMAP, extent=extent, aspect=cell_aspect, vmin=vmin,
                   vmax=vmax if vmax > vmin else vmin + 1, interpolation="nearest")
    outline_cells(ax, flagged)
    cb = fig.colorbar(im, ax=ax, shrink=0.9, pad=0.02, fraction=0.06)
    cb.set_label("token norm (L2)")
    cb.outline.set_linewidth(0.4)
    if threshold is not None and math.isfinite(as_float(threshold)) and vmin <= threshold <= vmax:
        cb.ax.axhline(threshold, color=BLACK, linewidth=2.0)
        cb.ax.axhline(threshold, color="white", linewidth=0.7)
    ax.set_xticks(range(0, gw, max(1, math.ceil(gw / 8))))
    ax.set_yticks(range(0, gh, max(1, math.ceil(gh / 8))))
    ax.set_xlabel("patch column")
    ax.set_ylabel("patch row")
    ax.spines["top"].set_visible(True)
    ax.spines["right"].set_visible(True)


# ----------------------------------------------------------------------------------------------- 4. compare
# ----------------------------------------------------------------------------------------------- 5. registers
# ----------------------------------------------------------------------------------------------- 6. files
def save_scan_figures(report: ScanReport, out_dir: str | Path, fmt: str = "png", dpi: int = 150) -> list[Path]:
    """Write the standard figures of a scan and return their paths:

    * ``norm_histogram.<fmt>`` — the last block's norm histogram;
    * ``layer_norms.<fmt>`` — the norm distribution per layer;
    * ``maps/<stem>.<fmt>`` — one per kept norm map (stems from the image names, sanitised, unique).

    Every figure is closed after saving. A phantom report's titles carry :data:`PHANTOM_TAG`.
    """
    fmt = fmt.lower().lstrip(".")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    phantom = is_phantom(report)
    written: list[Path] = []
    model = report.model.name

    last = report.last_block
    fig, _ = plot_norm_histogram(last, title=tag_phantom(f"{model}, {last.name}: patch-token norms", phantom),
                                 mode=report.threshold_mode)
    try:
        written.append(save_figure(fig, out / f"norm_histogram.{fmt}", dpi))
    finally:
        close_figure(fig)

    fig, _ = plot_layer_distributions(report)
    try:
        written.append(save_figure(fig, out / f"layer_norms.{fmt}", dpi))
    finally:
        close_figure(fig)

    input_size = tuple(report.model.input_size) if report.model.input_size else None
    by_index = {lay.index: lay for lay in report.layers}
    for m, stem in zip(report.maps, unique_stems(report.maps)):
        layer = by_index.get(m.layer)
        thr = as_float(layer.threshold) if layer is not None else math.nan
        source = name_from_hex(m.image_hex) if getattr(m, "image_hex", None) else str(m.image)
        fig, _ = plot_image_map(m, source, input_size,  # type: ignore[arg-type]
                                title=tag_phantom(model, phantom),
                                threshold=thr if math.isfinite(thr) else None)
        try:
            written.append(save_figure(fig, out / "maps" / f"{stem}.{fmt}", dpi))
        finally:
            close_figure(fig)
    return written


# ----------------------------------------------------------------------------------------------- 7. over training
