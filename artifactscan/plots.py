"""Publication-quality figures of a scan: norm histograms, per-layer distributions, per-image maps, comparisons.

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
import re
import textwrap
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

try:
    import matplotlib
    import matplotlib.ticker
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle
    from matplotlib import patheffects
except ImportError as exc:  # pragma: no cover - exercised only without matplotlib
    raise ImportError(
        "artifactscan's figures need matplotlib, which is not installed: pip install 'matplotlib>=3.7' "
        "(or reinstall artifactscan, which depends on it)"
    ) from exc

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from .compare import CompareReport, EmergenceReport
    from .scan import Histogram, LayerReport, NormMap, ScanReport

__all__ = [
    "PHANTOM_TAG",
    "PAPER_THRESHOLD",
    "plot_norm_histogram",
    "plot_layer_distributions",
    "plot_image_map",
    "plot_compare",
    "plot_register_ablation",
    "save_scan_figures",
    "plot_emergence",
    "save_compare_figure",
    "save_emergence_figure",
]

#: Appended to the title of every figure of a calibration-phantom report.
PHANTOM_TAG = "calibration phantom (artifacts built in)"
#: The fixed threshold Darcet et al. use for DINOv2 ViT-g (their Fig. 3).
PAPER_THRESHOLD = 150.0

# Okabe & Ito (2008), safe for the common colour-vision deficiencies and distinct in greyscale by marker/linestyle.
OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"]
_BLUE, _ORANGE, _GREEN, _PURPLE, _SKY, _VERMILLION, _YELLOW, _BLACK = OKABE_ITO
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
_LINESTYLES = ["-", "--", "-.", ":"]
_HEATMAP_CMAP = "viridis"

COLUMN_WIDTH_IN = 3.5
DOUBLE_WIDTH_IN = 7.0

_STYLE = {
    "font.size": 8,
    "axes.titlesize": 8.5,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 6.5,
    "legend.title_fontsize": 7,
    "figure.titlesize": 9,
    "axes.linewidth": 0.6,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "xtick.minor.width": 0.4,
    "ytick.minor.width": 0.4,
    "lines.linewidth": 1.2,
    "lines.markersize": 4,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.frameon": True,
    "legend.framealpha": 0.9,
    "legend.edgecolor": "0.8",
    # No bbox="tight": constrained layout already fits everything in, and the saved size stays the column width.
    "figure.constrained_layout.h_pad": 0.03,
    "figure.constrained_layout.w_pad": 0.03,
    "image.cmap": _HEATMAP_CMAP,
}


# ----------------------------------------------------------------------------------------------- helpers
@contextmanager
def _style() -> Iterator[None]:
    with matplotlib.rc_context(_STYLE):
        yield


def _new_figure(width: float, height: float, ncols: int = 1, **subplot_kw: Any) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False, **subplot_kw)[0]
    return fig, list(axes)


def _one_ax(ax: Axes | None, width: float, height: float) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig, axes = _new_figure(width, height)
    return fig, axes[0]


def _f(x: Any) -> float:
    """A float, with ``None`` (how JSON stores NaN) read back as NaN."""
    try:
        return float(x) if x is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def _fmt(x: float) -> str:
    """Three significant digits, without an exponent between 1e-4 and 1e6 (1000, not 1e+03)."""
    return "n/a" if not math.isfinite(x) else f"{float(f'{x:.3g}'):g}"


def _pct(fraction: float) -> str:
    if not math.isfinite(fraction):
        return "n/a"
    p = 100 * fraction
    if p == 0:
        return "0%"
    return f"{p:.2g}%" if p < 1 else f"{p:.1f}%"


def _wrap(text: str, width: int = 50) -> str:
    return "\n".join(textwrap.fill(line, width) for line in text.split("\n"))


def is_phantom(report: ScanReport) -> bool:
    return getattr(report.model, "kind", None) == "phantom"


def _tagged(title: str | None, phantom: bool) -> str | None:
    """``title`` with the phantom tag on a line of its own (when ``phantom``)."""
    if not phantom:
        return title
    tag = f"[{PHANTOM_TAG}]"
    if title and PHANTOM_TAG in title:
        return title
    return f"{title}\n{tag}" if title else tag


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


def _blocks(report: ScanReport) -> list[LayerReport]:
    return [lay for lay in report.layers if not lay.is_final_norm]


def _style_for(i: int) -> dict[str, Any]:
    return {"color": OKABE_ITO[i % len(OKABE_ITO)], "marker": _MARKERS[i % len(_MARKERS)],
            "linestyle": _LINESTYLES[(i // len(OKABE_ITO)) % len(_LINESTYLES)]}


def _plain_log_ticks(axis: Any) -> None:
    """Ticks of a log axis written as plain numbers (20, 50, 100) rather than 2x10^1; density by decades shown."""
    lo, hi = sorted(axis.get_view_interval())
    if not (lo > 0 and hi > lo):
        return
    span = math.log10(hi / lo)
    if span > 4.5:
        return  # many decades: matplotlib's 10^k labels read best
    subs = (1.0, 2.0, 3.0, 5.0) if span <= 1.0 else (1.0, 2.0, 5.0) if span <= 2.2 else (1.0,)
    axis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=subs))
    axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _pos: f"{v:g}"))
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _no_data(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.4")


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
    with _style():
        fig, ax = _one_ax(ax, COLUMN_WIDTH_IN, 2.5)
        thr = _f(layer.threshold)
        thr = thr if math.isfinite(thr) and thr > 0 else None
        edges, counts = _rebin(layer.histogram, target_bars, align_to=thr)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("patch-token norm (L2, log scale)")
        ax.set_ylabel("tokens per bin (log scale)")
        ax.set_title(_wrap(title if title is not None else f"{layer.name}: patch-token norms"))
        if counts.size == 0:
            _no_data(ax, "no patch tokens recorded")
            return fig, ax
        widths = np.diff(edges)
        centres = np.sqrt(edges[:-1] * edges[1:])
        above = (centres > thr) if thr is not None else np.zeros(len(counts), dtype=bool)
        nz = counts > 0
        handles: list[Any] = []
        for sel, colour, label in ((nz & ~above, _BLUE, "patch tokens"), (nz & above, _VERMILLION, "above threshold")):
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
            ax.axvline(thr, color=_BLACK, linestyle="--", linewidth=1.0,
                       label=f"threshold ({mode or _threshold_mode(layer)}) = {_fmt(thr)}")
        if lo_pad <= PAPER_THRESHOLD <= hi_pad and (thr is None or abs(thr - PAPER_THRESHOLD) > 1e-9):
            ax.axvline(PAPER_THRESHOLD, color="0.45", linestyle=":", linewidth=1.1, label="paper's 150")
        frac = _f(layer.outlier_fraction)
        summary = f"outliers: {_pct(frac)} ({int(layer.num_outliers):,} tokens)"
        if thr is None:
            summary = "no outliers (unimodal)" if _threshold_mode(layer) == "auto" else summary
        handles, labels = ax.get_legend_handles_labels()
        handles.append(Line2D([], [], linestyle="none"))
        labels.append(summary)
        ax.legend(handles, labels, loc="upper center", ncols=2, handlelength=1.5, columnspacing=0.8,
                  borderaxespad=0.3)
        ax.grid(True, which="major", axis="y", linewidth=0.3, alpha=0.5)
        _plain_log_ticks(ax.xaxis)
    return fig, ax


# ----------------------------------------------------------------------------------------------- 2. per layer
def plot_layer_distributions(report: ScanReport, ax: Axes | None = None, title: str | None = None
                             ) -> tuple[Figure, Axes]:
    """Patch-token norm distribution per layer (Darcet et al., Fig. 4a): p1–p99 and p25–p75 bands and the median
    (from each layer's histogram), the per-layer maximum as markers, the per-layer threshold as short horizontal
    ticks; log-y. The last column is the model's final norm (labelled "norm"), drawn apart: its scale differs."""
    with _style():
        fig, ax = _one_ax(ax, COLUMN_WIDTH_IN, 2.6)
        layers = list(report.layers)
        qs = np.array([histogram_quantiles(lay.histogram, (0.01, 0.25, 0.5, 0.75, 0.99)) for lay in layers]
                      ).reshape(len(layers), 5)
        xs = np.arange(len(layers), dtype=float)
        finals = np.array([lay.is_final_norm for lay in layers], dtype=bool)
        blocks = ~finals
        band_outer = dict(color=_SKY, alpha=0.35, linewidth=0)
        band_inner = dict(color=_BLUE, alpha=0.45, linewidth=0)
        if blocks.any():
            xb = xs[blocks]
            ax.fill_between(xb, qs[blocks, 0], qs[blocks, 4], label="p1–p99", **band_outer)
            ax.fill_between(xb, qs[blocks, 1], qs[blocks, 3], label="p25–p75", **band_inner)
            ax.plot(xb, qs[blocks, 2], color=_BLUE, linewidth=1.3, label="median")
        for x in xs[finals]:
            i = int(x)
            span = [x - 0.3, x + 0.3]
            ax.fill_between(span, [qs[i, 0]] * 2, [qs[i, 4]] * 2, **band_outer)
            ax.fill_between(span, [qs[i, 1]] * 2, [qs[i, 3]] * 2, **band_inner)
            ax.plot(span, [qs[i, 2]] * 2, color=_BLUE, linewidth=1.3)
            ax.axvline(x - 0.5, color="0.6", linestyle=":", linewidth=0.7)
        maxes = np.array([_f(lay.max) for lay in layers])
        ax.plot(xs, maxes, linestyle="none", marker="^", color=_VERMILLION, markersize=3.5 if len(xs) <= 26 else 2.5,
                label="max")
        thr = np.array([_f(lay.threshold) for lay in layers])
        has_thr = np.isfinite(thr) & (thr > 0)
        if has_thr.any():
            tick = float(np.clip(130 / max(len(layers), 1), 3, 9))  # narrower than a layer's slot
            ax.plot(xs[has_thr], thr[has_thr], linestyle="none", marker="_", color=_BLACK, markersize=tick,
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
                       color=_ORANGE, alpha=0.08, linewidth=0, label=f"outliers from block {report.onset_layer}")
        ax.legend(loc="upper left", ncols=2, handlelength=1.4, columnspacing=0.8, borderaxespad=0.3)
        finite = np.concatenate([qs[np.isfinite(qs)], maxes[np.isfinite(maxes)]])
        if finite.size and (finite > 0).any():
            pos = finite[finite > 0]
            # Head-room above for the legend.
            ax.set_ylim(pos.min() / 1.6, pos.max() * 10 ** (0.45 * max(math.log10(pos.max() / pos.min()), 0.5)))
        ax.grid(True, which="major", axis="y", linewidth=0.3, alpha=0.5)
        _plain_log_ticks(ax.yaxis)
        default = f"{report.model.name}: patch-token norms per layer"
        ax.set_title(_wrap(_tagged(title if title is not None else default, is_phantom(report)) or ""))
    return fig, ax


# ----------------------------------------------------------------------------------------------- 3. per image
def _load_display_image(image_path: str | None, aspect_hw: tuple[int, int], max_side: int = 448):
    """The image as the model saw it (centre crop to the input aspect, resized), or None when unreadable."""
    if image_path is None:
        return None
    from .images import load_rgb  # local: plots must not need torch at import for this alone

    try:
        p = Path(image_path)
        if not p.is_file():
            return None
        img = load_rgb(p)
    except Exception:  # ImageSkipped, OSError, ...: a figure is still useful without the photo
        return None
    h, w = aspect_hw
    target = w / h
    iw, ih = img.size
    if iw / ih > target:
        cw, ch = round(ih * target), ih
    else:
        cw, ch = iw, round(iw / target)
    left, top = (iw - cw) // 2, (ih - ch) // 2
    img = img.crop((left, top, left + cw, top + ch))
    scale = min(1.0, max_side / max(cw, ch))
    if scale < 1.0:
        from PIL import Image

        img = img.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.Resampling.BICUBIC)
    return np.asarray(img)


def _outline_cells(ax: Axes, flagged: np.ndarray, colour: str = _VERMILLION) -> int:
    """Outline each flagged grid cell (grid coordinates: cell (r, c) spans c-0.5..c+0.5); returns the count."""
    rows, cols = np.nonzero(flagged)
    stroke = [patheffects.withStroke(linewidth=2.6, foreground="white")]
    for r, c in zip(rows.tolist(), cols.tolist()):
        rect = Rectangle((c - 0.5 + 0.06, r - 0.5 + 0.06), 0.88, 0.88, fill=False, edgecolor=colour,
                         linewidth=1.2, path_effects=stroke)
        ax.add_patch(rect)
    return len(rows)


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
    with _style():
        img = _load_display_image(image_path, aspect_hw)  # type: ignore[arg-type]
        if axes is None:
            panels = 2 if img is not None else 1
            width = 4.7 if panels == 2 else COLUMN_WIDTH_IN
            height = 2.45 if panels == 2 else 2.6
            fig, ax_list = _new_figure(width, height, panels)
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
            ax_img = ax_list[0]
            ax_img.imshow(img, extent=extent, aspect=cell_aspect, interpolation="lanczos")
            _outline_cells(ax_img, flagged)
            ax_img.set_title(_wrap(name, 40))
            ax_img.set_xticks([])
            ax_img.set_yticks([])
            for s in ax_img.spines.values():
                s.set_visible(False)
            used.append(ax_img)
        ax_h = ax_list[-1]
        finite = norms[np.isfinite(norms)]
        vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        im = ax_h.imshow(norms, cmap=_HEATMAP_CMAP, extent=extent, aspect=cell_aspect, vmin=vmin,
                         vmax=vmax if vmax > vmin else vmin + 1, interpolation="nearest")
        _outline_cells(ax_h, flagged)
        cb = fig.colorbar(im, ax=ax_h, shrink=0.9, pad=0.02, fraction=0.06)
        cb.set_label("token norm (L2)")
        cb.outline.set_linewidth(0.4)
        if threshold is not None and math.isfinite(_f(threshold)) and vmin <= threshold <= vmax:
            cb.ax.axhline(threshold, color=_BLACK, linewidth=2.0)
            cb.ax.axhline(threshold, color="white", linewidth=0.7)
        step_r = max(1, math.ceil(gh / 8))
        step_c = max(1, math.ceil(gw / 8))
        ax_h.set_xticks(range(0, gw, step_c))
        ax_h.set_yticks(range(0, gh, step_r))
        ax_h.set_xlabel("patch column")
        ax_h.set_ylabel("patch row")
        ax_h.spines["top"].set_visible(True)
        ax_h.spines["right"].set_visible(True)
        layer_txt = f"block {norm_map.layer}"
        thr_txt = f" (> {_fmt(_f(threshold))})" if threshold is not None and math.isfinite(_f(threshold)) else ""
        heat_title = f"{layer_txt} norms, {n_flag} flagged{thr_txt}"
        ax_h.set_title(heat_title if img is not None else f"{heat_title}\n{_wrap(name, 40)}")
        used.append(ax_h)
        if title is not None:
            if axes is None:
                fig.suptitle(_wrap(title, 90))
            else:
                used[0].set_title(_wrap(title, 60) + "\n" + used[0].get_title())
    return fig, used


# ----------------------------------------------------------------------------------------------- 4. compare
def _per_block(report: ScanReport) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    blocks = _blocks(report)
    xs = np.array([lay.index for lay in blocks], dtype=float)
    frac = np.array([100 * _f(lay.outlier_fraction) for lay in blocks])
    ratio = np.array([_f(lay.max_over_median) for lay in blocks])
    return xs, frac, ratio


def _model_label(key: Any, report: ScanReport) -> str:
    label = str(key)
    return f"{label} ({PHANTOM_TAG.split(' (')[0]})" if is_phantom(report) else label


def _two_axes(axes: Sequence[Axes] | None, width: float, height: float) -> tuple[Figure, list[Axes]]:
    if axes is None:
        return _new_figure(width, height, 2)
    ax_list = list(np.ravel(axes)) if isinstance(axes, (list, tuple, np.ndarray)) else [axes]
    if len(ax_list) != 2:
        raise ValueError(f"axes must be two Axes (one per panel), got {len(ax_list)}")
    return ax_list[0].figure, ax_list


def _ratio_axis(ax: Axes, values: np.ndarray) -> None:
    finite = values[np.isfinite(values) & (values > 0)]
    ax.set_yscale("log")
    if finite.size:
        lo, hi = float(finite.min()), float(finite.max())
        ax.set_ylim(max(lo / 1.5, 1e-3), hi * 1.8)
        _plain_log_ticks(ax.yaxis)


def plot_compare(reports: dict[str, ScanReport], axes: Sequence[Axes] | None = None, title: str | None = None
                 ) -> tuple[Figure, list[Axes]]:
    """Two panels side by side, one line per model (label = dict key), x = block index: the per-layer outlier
    fraction (% of patch tokens) and the per-layer max/median norm ratio (log-y). Phantom reports are labelled."""
    with _style():
        fig, (ax_f, ax_r) = _two_axes(axes, DOUBLE_WIDTH_IN, 2.5)
        all_ratio, max_blocks = [], 1
        for i, (key, rep) in enumerate(reports.items()):
            xs, frac, ratio = _per_block(rep)
            st = _style_for(i)
            label = _model_label(key, rep)
            ms = 3.5 if len(xs) <= 24 else 2.5
            ax_f.plot(xs, frac, label=label, markersize=ms, **st)
            ax_r.plot(xs, ratio, label=label, markersize=ms, **st)
            all_ratio.append(ratio)
            max_blocks = max(max_blocks, len(xs))
        ax_f.set_xlabel("block index")
        ax_r.set_xlabel("block index")
        ax_f.set_ylabel("outliers (% of patch tokens)")
        ax_r.set_ylabel("max / median token norm (×)")
        ax_f.set_ylim(bottom=0)
        ymax = ax_f.get_ylim()[1]
        ax_f.set_ylim(0, max(ymax * 1.08, 0.5))
        _ratio_axis(ax_r, np.concatenate(all_ratio) if all_ratio else np.array([]))
        ax_r.axhline(1.0, color="0.7", linewidth=0.6)
        for ax in (ax_f, ax_r):
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True, nbins=min(max_blocks, 12)))
            ax.grid(True, which="major", linewidth=0.3, alpha=0.5)
        ax_f.set_title("outlier fraction per layer")
        ax_r.set_title("max / median norm per layer")
        if reports and axes is None:
            fig.legend(*ax_f.get_legend_handles_labels(), loc="outside lower center", ncols=min(len(reports), 4),
                       handlelength=2.6)
        elif reports:
            ax_f.legend(loc="best", handlelength=2.6)
        else:
            for ax in (ax_f, ax_r):
                _no_data(ax, "no reports")
        phantom = any(is_phantom(r) for r in reports.values())
        sup = _tagged(title, phantom)
        if sup:
            fig.suptitle(_wrap(sup, 110))
    return fig, [ax_f, ax_r]


# ----------------------------------------------------------------------------------------------- 5. registers
def plot_register_ablation(reports: dict[int, ScanReport], axes: Sequence[Axes] | None = None,
                           title: str | None = None) -> tuple[Figure, list[Axes]]:
    """Darcet et al., Fig. 8 style: x = number of registers (evenly spaced categories: 0, 1, 2, 4, 8, 16 ...),
    y = the last block's outlier fraction (%) and its max/median norm ratio (log-y)."""
    with _style():
        fig, (ax_f, ax_r) = _two_axes(axes, DOUBLE_WIDTH_IN * 0.75, 2.3)
        keys = sorted(reports, key=int)
        pos = np.arange(len(keys), dtype=float)
        last = [reports[k].last_block for k in keys]
        frac = np.array([100 * _f(lay.outlier_fraction) for lay in last])
        ratio = np.array([_f(lay.max_over_median) for lay in last])
        ax_f.plot(pos, frac, color=_VERMILLION, marker="o", markersize=5)
        ax_r.plot(pos, ratio, color=_BLUE, marker="s", markersize=5)
        for x, y in zip(pos, frac):
            if math.isfinite(y):
                ax_f.annotate(_pct(y / 100), (x, y), textcoords="offset points", xytext=(4, 4), ha="left", va="bottom",
                              fontsize=6.5, color="0.25")
        for ax in (ax_f, ax_r):
            ax.set_xticks(pos)
            ax.set_xticklabels([str(k) for k in keys])
            ax.set_xlabel("number of register tokens")
            ax.set_xlim(-0.5, max(len(keys) - 0.5, 0.5))
            ax.grid(True, which="major", axis="y", linewidth=0.3, alpha=0.5)
        ax_f.set_ylabel("outliers (% of patch tokens)")
        ax_f.set_ylim(0, max(np.nanmax(frac) * 1.25 if np.isfinite(frac).any() else 0, 0.5))
        ax_r.set_ylabel("max / median token norm (×)")
        _ratio_axis(ax_r, ratio)
        ax_r.axhline(1.0, color="0.7", linewidth=0.6)
        block = f"block {last[0].index}" if last and all(lay.index == last[0].index for lay in last) else "last block"
        ax_f.set_title(f"outliers in {block}")
        ax_r.set_title(f"max / median norm in {block}")
        if not keys:
            for ax in (ax_f, ax_r):
                _no_data(ax, "no reports")
        phantom = any(is_phantom(r) for r in reports.values())
        sup = _tagged(title, phantom)
        if sup:
            fig.suptitle(_wrap(sup, 100))
    return fig, [ax_f, ax_r]


# ----------------------------------------------------------------------------------------------- 6. files
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _stem(name: str, index: int) -> str:
    """A file-name-safe stem for an image name (``photos/cat 1.jpg`` -> ``cat_1``, ``tensor[3]`` -> ``tensor_3``)."""
    base = str(name).replace("\\", "/").rstrip("/").split("/")[-1]
    if "." in base and not base.startswith("."):
        base = base.rsplit(".", 1)[0]
    stem = _UNSAFE.sub("_", base).strip("._-")[:80]
    return stem or f"image_{index}"


def _unique_stems(maps: Sequence[NormMap]) -> list[str]:
    seen: set[str] = set()
    out = []
    for m in maps:
        stem = _stem(m.image, m.image_index)
        candidate = stem
        if candidate.lower() in seen:  # case-insensitive: macOS / Windows file systems
            candidate = f"{stem}_{m.image_index}"
        n = 2
        while candidate.lower() in seen:
            candidate = f"{stem}_{m.image_index}_{n}"
            n += 1
        seen.add(candidate.lower())
        out.append(candidate)
    return out


def _close(fig: Figure) -> None:
    """Free a figure; also drops it from pyplot's list if it was registered there."""
    import sys

    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None:
        plt.close(fig)  # no-op for a figure pyplot does not manage
    fig.clear()


def _save(fig: Figure, path: Path, dpi: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with _style():
        fig.savefig(path, dpi=dpi)
    return path


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
    fig, _ = plot_norm_histogram(last, title=_tagged(f"{model}, {last.name}: patch-token norms", phantom),
                                 mode=report.threshold_mode)
    try:
        written.append(_save(fig, out / f"norm_histogram.{fmt}", dpi))
    finally:
        _close(fig)

    fig, _ = plot_layer_distributions(report)
    try:
        written.append(_save(fig, out / f"layer_norms.{fmt}", dpi))
    finally:
        _close(fig)

    input_size = tuple(report.model.input_size) if report.model.input_size else None
    by_index = {lay.index: lay for lay in report.layers}
    for m, stem in zip(report.maps, _unique_stems(report.maps)):
        layer = by_index.get(m.layer)
        thr = _f(layer.threshold) if layer is not None else math.nan
        fig, _ = plot_image_map(m, str(m.image), input_size,  # type: ignore[arg-type]
                                title=_tagged(model, phantom),
                                threshold=thr if math.isfinite(thr) else None)
        try:
            written.append(_save(fig, out / "maps" / f"{stem}.{fmt}", dpi))
        finally:
            _close(fig)
    return written


# ----------------------------------------------------------------------------------------------- 7. over training
def plot_emergence(result: EmergenceReport, axes: Sequence[Axes] | None = None, title: str | None = None
                   ) -> tuple[Figure, list[Axes]]:
    """Darcet et al., Fig. 4b style: the last block's outlier fraction (%) and max/median norm ratio (log-y) over
    training, one line per architecture of the run (label: number of registers). x = training step, or the
    checkpoint's position when a checkpoint has no step."""
    with _style():
        fig, (ax_f, ax_r) = _two_axes(axes, DOUBLE_WIDTH_IN, 2.4)
        all_ratio = []
        use_steps = all(pt.step is not None for g in result.groups for pt in g.points)
        for i, group in enumerate(result.groups):
            pts = [pt for pt in group.points if pt.outlier_fraction]
            xs = np.array([pt.step if use_steps else j for j, pt in enumerate(pts)], dtype=float)
            frac = np.array([100 * _f(pt.outlier_fraction[-1]) for pt in pts])
            ratio = np.array([_f(pt.max_over_median[-1]) if pt.max_over_median else math.nan for pt in pts])
            label = f"{group.registers} register{'s' if group.registers != 1 else ''}"
            if sum(g.registers == group.registers for g in result.groups) > 1:
                label += f" ({group.architecture})"
            st = _style_for(i)
            ax_f.plot(xs, frac, label=label, **st)
            ax_r.plot(xs, ratio, label=label, **st)
            all_ratio.append(ratio)
        xlabel = "training step" if use_steps else "checkpoint (training order)"
        for ax in (ax_f, ax_r):
            ax.set_xlabel(xlabel)
            ax.grid(True, which="major", linewidth=0.3, alpha=0.5)
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True, nbins=6, steps=[1, 2, 5, 10]))
        ax_f.set_ylabel("outliers (% of patch tokens)")
        ax_f.set_ylim(0, max(ax_f.get_ylim()[1] * 1.08, 0.5))
        ax_r.set_ylabel("max / median token norm (×)")
        _ratio_axis(ax_r, np.concatenate(all_ratio) if all_ratio else np.array([]))
        ax_r.axhline(1.0, color="0.7", linewidth=0.6)
        ax_f.set_title("outliers in the last block over training")
        ax_r.set_title("max / median norm in the last block")
        if result.groups:
            if axes is None:
                fig.legend(*ax_f.get_legend_handles_labels(), loc="outside lower center",
                           ncols=min(len(result.groups), 4), handlelength=2.6)
            else:
                ax_f.legend(loc="best", handlelength=2.6)
        else:
            for ax in (ax_f, ax_r):
                _no_data(ax, "no checkpoints")
        if title:
            fig.suptitle(_wrap(title, 110))
    return fig, [ax_f, ax_r]


def _save_one(fig: Figure, path: Path, dpi: int) -> list[Path]:
    try:
        return [_save(fig, path, dpi)]
    finally:
        _close(fig)


def save_compare_figure(result: CompareReport, out_dir: str | Path, fmt: str = "png", dpi: int = 150
                        ) -> list[Path]:
    """Write ``compare.<fmt>`` (:func:`plot_compare` of the per-model scans) and return its path; nothing when the
    result carries no per-model scans (e.g. read back from ``compare.json``, which leaves them out)."""
    reports = dict(getattr(result, "reports", None) or {})
    if not reports:
        return []
    out = Path(out_dir)
    fig, _ = plot_compare(reports, title=f"{len(reports)} models on {result.images}")
    return _save_one(fig, out / f"compare.{fmt.lower().lstrip('.')}", dpi)


def save_register_ablation_figure(result: CompareReport, out_dir: str | Path, fmt: str = "png", dpi: int = 150
                                  ) -> list[Path]:
    """Write ``register_ablation.<fmt>`` (:func:`plot_register_ablation`, the paper's Fig 8) for a comparison whose
    models differ in their number of registers."""
    reports = {row.registers: result.reports[row.label] for row in result.rows if row.label in result.reports}
    if len(reports) < 2:
        return []
    fig, _ = plot_register_ablation(reports, title=f"register ablation on {result.images}")
    return _save_one(fig, Path(out_dir) / f"register_ablation.{fmt.lower().lstrip('.')}", dpi)


def save_emergence_figure(result: EmergenceReport, out_dir: str | Path, fmt: str = "png", dpi: int = 150
                          ) -> list[Path]:
    """Write ``emergence.<fmt>`` (:func:`plot_emergence`) and return its path."""
    out = Path(out_dir)
    fig, _ = plot_emergence(result, title=f"{Path(str(result.run_dir)).name}: artifacts over training")
    return _save_one(fig, out / f"emergence.{fmt.lower().lstrip('.')}", dpi)
