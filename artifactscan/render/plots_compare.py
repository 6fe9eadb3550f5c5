"""Figures that put several scans side by side: models compared, a register ablation, norms over training."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import matplotlib.ticker
import numpy as np
from artifactscan.render.style import (
    BLUE,
    DOUBLE_WIDTH_IN,
    PHANTOM_TAG,
    VERMILLION,
    as_float,
    close_figure,
    format_pct,
    is_phantom,
    line_style,
    new_figure,
    no_data,
    plain_log_ticks,
    plot_style,
    save_figure,
    tag_phantom,
    wrap_text,
)
from artifactscan.render.plots import block_layers

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from artifactscan.analysis.compare import CompareReport
    from artifactscan.analysis.emergence import EmergenceReport
    from artifactscan.analysis.scan import ScanReport

__all__ = ["plot_compare", "plot_register_ablation", "plot_emergence", "save_compare_figure",
           "save_register_ablation_figure", "save_emergence_figure"]


def _per_block(report: ScanReport) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    blocks = block_layers(report)
    xs = np.array([lay.index for lay in blocks], dtype=float)
    frac = np.array([100 * as_float(lay.outlier_fraction) for lay in blocks])
    ratio = np.array([as_float(lay.max_over_median) for lay in blocks])
    return xs, frac, ratio


def _model_label(key: Any, report: ScanReport) -> str:
    label = str(key)
    return f"{label} ({PHANTOM_TAG.split(' (')[0]})" if is_phantom(report) else label


def _two_axes(axes: Sequence[Axes] | None, width: float, height: float) -> tuple[Figure, list[Axes]]:
    if axes is None:
        return new_figure(width, height, 2)
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
        plain_log_ticks(ax.yaxis)


def plot_compare(reports: dict[str, ScanReport], axes: Sequence[Axes] | None = None, title: str | None = None
                 ) -> tuple[Figure, list[Axes]]:
    """Two panels side by side, one line per model (label = dict key), x = block index: the per-layer outlier
    fraction (% of patch tokens) and the per-layer max/median norm ratio (log-y). Phantom reports are labelled."""
    with plot_style():
        fig, (ax_f, ax_r) = _two_axes(axes, DOUBLE_WIDTH_IN, 2.5)
        all_ratio, max_blocks = [], 1
        for i, (key, rep) in enumerate(reports.items()):
            xs, frac, ratio = _per_block(rep)
            st = line_style(i)
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
        _finish_pair(fig, (ax_f, ax_r), reports, title, 110)
    return fig, [ax_f, ax_r]


def _finish_pair(fig: Figure, axes: Sequence[Axes], reports: dict, title: str | None, width: int) -> None:
    """The last touches of a two-panel comparison: "no reports" on empty axes, the (phantom-tagged) title."""
    if not reports:
        for ax in axes:
            no_data(ax, "no reports")
    sup = tag_phantom(title, any(is_phantom(r) for r in reports.values()))
    if sup:
        fig.suptitle(wrap_text(sup, width))


def plot_register_ablation(reports: dict[int, ScanReport], axes: Sequence[Axes] | None = None,
                           title: str | None = None) -> tuple[Figure, list[Axes]]:
    """Darcet et al., Fig. 8 style: x = number of registers (evenly spaced categories: 0, 1, 2, 4, 8, 16 ...),
    y = the last block's outlier fraction (%) and its max/median norm ratio (log-y)."""
    with plot_style():
        fig, (ax_f, ax_r) = _two_axes(axes, DOUBLE_WIDTH_IN * 0.75, 2.3)
        keys = sorted(reports, key=int)
        pos = np.arange(len(keys), dtype=float)
        last = [reports[k].last_block for k in keys]
        frac = np.array([100 * as_float(lay.outlier_fraction) for lay in last])
        ratio = np.array([as_float(lay.max_over_median) for lay in last])
        ax_f.plot(pos, frac, color=VERMILLION, marker="o", markersize=5)
        ax_r.plot(pos, ratio, color=BLUE, marker="s", markersize=5)
        for x, y in zip(pos, frac):
            if math.isfinite(y):
                ax_f.annotate(format_pct(y / 100), (x, y), textcoords="offset points", xytext=(4, 4), ha="left", va="bottom",
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
        _finish_pair(fig, (ax_f, ax_r), reports, title, 100)
    return fig, [ax_f, ax_r]


def plot_emergence(result: EmergenceReport, axes: Sequence[Axes] | None = None, title: str | None = None
                   ) -> tuple[Figure, list[Axes]]:
    """Darcet et al., Fig. 4b style: the last block's outlier fraction (%) and max/median norm ratio (log-y) over
    training, one line per architecture of the run (label: number of registers). x = training step, or the
    checkpoint's position when a checkpoint has no step."""
    with plot_style():
        fig, (ax_f, ax_r) = _two_axes(axes, DOUBLE_WIDTH_IN, 2.4)
        all_ratio = []
        use_steps = all(pt.step is not None for g in result.groups for pt in g.points)
        for i, group in enumerate(result.groups):
            pts = [pt for pt in group.points if pt.outlier_fraction]
            xs = np.array([pt.step if use_steps else j for j, pt in enumerate(pts)], dtype=float)
            frac = np.array([100 * as_float(pt.outlier_fraction[-1]) for pt in pts])
            ratio = np.array([as_float(pt.max_over_median[-1]) if pt.max_over_median else math.nan for pt in pts])
            label = f"{group.registers} register{'s' if group.registers != 1 else ''}"
            if sum(g.registers == group.registers for g in result.groups) > 1:
                label += f" ({group.architecture})"
            st = line_style(i)
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
                no_data(ax, "no checkpoints")
        if title:
            fig.suptitle(wrap_text(title, 110))
    return fig, [ax_f, ax_r]


def _save_one(fig: Figure, path: Path, dpi: int) -> list[Path]:
    try:
        return [save_figure(fig, path, dpi)]
    finally:
        close_figure(fig)


def save_compare_figure(result: CompareReport, out_dir: str | Path, fmt: str = "png", dpi: int = 150
                        ) -> list[Path]:
    """Write ``compare.<fmt>`` (:func:`plot_compare` of the per-model scans) and return its path; nothing when the
    result carries no per-model scans (e.g. read back from ``compare.json``, which leaves them out)."""
    reports = dict(getattr(result, "reports", None) or {})
    if not reports:
        return []
    out = Path(out_dir)
    from artifactscan.analysis.compare import count_models

    fig, _ = plot_compare(reports, title=f"{count_models(len(reports))} on {result.images.source}")
    return _save_one(fig, out / f"compare.{fmt.lower().lstrip('.')}", dpi)


def save_register_ablation_figure(result: CompareReport, out_dir: str | Path, fmt: str = "png", dpi: int = 150
                                  ) -> list[Path]:
    """Write ``register_ablation.<fmt>`` (:func:`plot_register_ablation`, the paper's Fig 8) for a comparison whose
    models differ in their number of registers."""
    reports = {row.registers: result.reports[row.label] for row in result.rows if row.label in result.reports}
    if len(reports) < 2:
        return []
    fig, _ = plot_register_ablation(reports, title=f"register ablation on {result.images.source}")
    return _save_one(fig, Path(out_dir) / f"register_ablation.{fmt.lower().lstrip('.')}", dpi)


def save_emergence_figure(result: EmergenceReport, out_dir: str | Path, fmt: str = "png", dpi: int = 150
                          ) -> list[Path]:
    """Write ``emergence.<fmt>`` (:func:`plot_emergence`) and return its path."""
    out = Path(out_dir)
    fig, _ = plot_emergence(result, title=f"{Path(str(result.run_dir)).name}: artifacts over training")
    return _save_one(fig, out / f"emergence.{fmt.lower().lstrip('.')}", dpi)
