"""A monitor folder rendered: the table of outlier fraction per block against step, and the emergence figure
(a heat map block x step, and the last block's fraction against step: the paper's Fig 4b, live)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from artifactscan.analysis.monitor_records import MonitorHistory, MonitorUpdate
from artifactscan.render.table import Column, FitTable, pct, ratio

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from rich.console import Console

FIGURE_STEM = "monitor"


def update_cells(update: MonitorUpdate) -> list[str]:
    """One table row: step, onset, last block, max/median, then every block's outlier fraction."""
    last = update.last_block
    onset = "-" if update.onset_layer is None else str(update.onset_layer)
    flags = "NaN/Inf" if update.num_nonfinite else ("" if update.conclusive else "inconclusive")
    return ([str(update.step), onset, pct(last.outlier_fraction), ratio(last.max_over_median), flags]
            + [pct(lay.outlier_fraction) for lay in update.layers])


def monitor_table(history: MonitorHistory, updates: Sequence[MonitorUpdate] | None = None) -> FitTable:
    """The table of ``updates`` (default: all): blocks are the rightmost columns, dropped first (from the first
    block) when the console is narrow."""
    n = history.num_blocks
    columns = [Column("step"), Column("onset", long="onset block"), Column("last", long="last block % flagged"),
               Column("max/med", long="last block max/median"), Column("", justify="left", drop=n + 1, long="note")]
    columns += [Column(f"b{i}", drop=n - i, long=f"block {i} % flagged") for i in range(n)]
    table = FitTable(columns, title=f"Outlier fraction per block against step ({history.path})")
    for u in history.updates if updates is None else updates:
        if len(u.layers) == n:
            table.add_row(*update_cells(u), style="red" if u.onset_layer is not None else "")
    return table


def render_monitor(history: MonitorHistory, console: "Console") -> None:
    from rich.panel import Panel

    monitor_table(history).print(console)
    console.print(Panel(history.headline, title="artifact monitor", style="bold"))


def plot_monitor(history: MonitorHistory, axes: Sequence["Axes"] | None = None) -> tuple["Figure", list["Axes"]]:
    """The emergence figure: outlier fraction (%) as a heat map of block against step, and the last block's
    fraction against step. Returns ``(figure, [heat map axes, curve axes])``."""
    from artifactscan.render.style import HEATMAP_CMAP, no_data, plot_style, tag_phantom, two_axes

    with plot_style():
        fig, ax_h, ax_c = two_axes(axes, 2.6)
        steps = np.array(history.steps, dtype=float)
        frac = np.array([row for row in history.outlier_fraction if len(row) == history.num_blocks],
                        dtype=float).reshape(-1, history.num_blocks) * 100
        if len(frac) == 0:
            for ax in (ax_h, ax_c):
                no_data(ax, "no update yet")
            return fig, [ax_h, ax_c]
        image = ax_h.imshow(frac.T, aspect="auto", origin="lower", cmap=HEATMAP_CMAP, interpolation="nearest",
                            extent=(-0.5, len(steps) - 0.5, -0.5, history.num_blocks - 0.5))
        ticks = np.unique(np.linspace(0, len(steps) - 1, min(6, len(steps))).round().astype(int))
        ax_h.set_xticks(ticks, [f"{int(steps[t])}" for t in ticks])
        ax_h.set_xlabel("training step")
        ax_h.set_ylabel("block")
        ax_h.set_title("outliers (% of patch tokens)")
        fig.colorbar(image, ax=ax_h, shrink=0.9)
        ax_c.plot(steps, frac[:, -1], marker="o", markersize=3, color="#D55E00")
        if history.onset_step is not None:
            ax_c.axvline(history.onset_step, color="0.5", linestyle="--", linewidth=0.8,
                         label=f"onset: step {history.onset_step}")
            ax_c.legend(loc="best")
        ax_c.set_xlabel("training step")
        ax_c.set_ylabel("outliers (% of patch tokens)")
        ax_c.set_ylim(0, max(ax_c.get_ylim()[1] * 1.08, 0.5))
        ax_c.set_title("last block over training")
        ax_c.grid(True, linewidth=0.3, alpha=0.5)
        title = tag_phantom(history.model.name, history.model.kind == "phantom")
        if title and axes is None:
            fig.suptitle(title)
    return fig, [ax_h, ax_c]


def save_monitor_figure(history: MonitorHistory, out_dir: str | Path, fmt: str = "png", dpi: int = 150) -> Path:
    """Write ``OUT/monitor.<fmt>`` (:func:`plot_monitor`) atomically; returns its path."""
    from artifactscan.render.style import close_figure, save_figure

    fig, _ = plot_monitor(history)
    try:
        return save_figure(fig, Path(out_dir) / f"{FIGURE_STEM}.{fmt}", dpi)
    finally:
        close_figure(fig)
