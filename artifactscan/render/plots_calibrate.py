"""The detection-limit figure of ``artifactscan calibrate``: where the threshold rule sees planted groups and where
it is blind."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from artifactscan.render.style import (
    BLUE,
    HEATMAP_CMAP,
    PHANTOM_TAG,
    VERMILLION,
    close_figure,
    format_pct,
    plain_log_ticks,
    plot_style,
    save_figure,
    two_axes,
    wrap_text,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from artifactscan.analysis.calibrate import CalibrationReport

__all__ = ["plot_calibration", "save_calibration_figure"]


def plot_calibration(report: CalibrationReport, axes: Sequence[Axes] | None = None, title: str | None = None
                     ) -> tuple[Figure, list[Axes]]:
    """Left: a heat-map of recall per cell (rows: planting gain, labelled with the measured ratio at the weakest
    block; columns: share of patches planted), annotated with precision / recall. Right: every planted block of every
    phantom, its measured ratio (planted median / bulk median) against the recall there, with the rule's 2.5x."""
    gains = sorted({c.gain for c in report.cells})
    fractions = sorted({c.planted_share for c in report.cells})
    with plot_style():
        fig, ax_h, ax_s = two_axes(axes, 2.9)
        recall = np.full((len(gains), len(fractions)), np.nan)
        for c in report.cells:
            recall[gains.index(c.gain), fractions.index(c.planted_share)] = c.recall
        ax_h.imshow(recall, cmap=HEATMAP_CMAP, vmin=0, vmax=1, aspect="auto", origin="lower")
        for c in report.cells:
            i, j = gains.index(c.gain), fractions.index(c.planted_share)
            precision = "-" if not np.isfinite(c.precision) else f"{c.precision:.2f}"
            ax_h.text(j, i, f"P {precision}\nR {c.recall:.2f}", ha="center", va="center", fontsize=6,
                      color="black" if c.recall > 0.5 else "white")
        ratio_of = {g: min(c.ratio for c in report.cells if c.gain == g) for g in gains}
        ax_h.set_yticks(range(len(gains)), [f"{ratio_of[g]:.2g}x (gain {g:g})" for g in gains])
        ax_h.set_xticks(range(len(fractions)), [format_pct(f) for f in fractions])
        ax_h.set_xlabel("share of patch tokens planted per image")
        ax_h.set_ylabel("measured ratio at the weakest block")
        ax_h.set_title("recall of the planted tokens (all blocks from the onset)")
        for spine in ax_h.spines.values():
            spine.set_visible(False)

        ratios = np.array([r for c in report.cells for r in c.block_ratios])
        recalls = np.array([r for c in report.cells for r in c.block_recalls])
        found = recalls >= 0.95
        ax_s.scatter(ratios[found], recalls[found], color=BLUE, marker="o", s=14, label="found (recall >= 0.95)")
        ax_s.scatter(ratios[~found], recalls[~found], color=VERMILLION, marker="x", s=18, label="missed")
        ax_s.axvline(2.5, color="0.4", linestyle="--", linewidth=0.8, label="rule's minimum ratio (2.5x)")
        if report.blind_below is not None:
            ax_s.axvspan(max(ratios.min() * 0.9, 1.0), report.blind_below, color="0.9", zorder=0,
                         label=f"some block missed (up to {report.blind_below:.2g}x)")
        ax_s.set_xscale("log")
        plain_log_ticks(ax_s.xaxis)
        ax_s.set_ylim(-0.05, 1.05)
        ax_s.set_xlabel("planted median / bulk median in that block (×)")
        ax_s.set_ylabel("recall in that block")
        ax_s.set_title("every planted block of every phantom")
        ax_s.legend(loc="center right")
        sup = title or (f"Detection limit on phantoms built from {report.base} (onset block {report.onset}, "
                        f"{report.images.source})")
        fig.suptitle(wrap_text(f"{sup}\n{PHANTOM_TAG}", 110))
    return fig, [ax_h, ax_s]


def save_calibration_figure(report: CalibrationReport, out_dir: str | Path, fmt: str = "png", dpi: int = 150
                            ) -> list[Path]:
    """Write ``calibration.<fmt>`` (:func:`plot_calibration`) and return its path."""
    fig, _ = plot_calibration(report)
    try:
        return [save_figure(fig, Path(out_dir) / f"calibration.{fmt.lower().lstrip('.')}", dpi)]
    finally:
        close_figure(fig)
