"""The figure of a discovery report: images with LOST's box (and seed) against the ground-truth boxes, one row per
run (model, or model + fix), so before / after reads down a column.

Same conventions as the other figures: a bare matplotlib ``Figure`` (no pyplot), the Okabe-Ito palette, the
phantom tag in the title of a calibration-phantom report. Returns ``(fig, axes)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from artifactscan.render.style import (BLACK, BLUE, GREEN, VERMILLION, YELLOW, close_figure, new_figure, plot_style,
                                       save_figure, is_phantom, tag_phantom)
from matplotlib import patheffects  # noqa: E402  (after style, which says how to install matplotlib when missing)
from matplotlib.patches import Rectangle  # noqa: E402

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from artifactscan.analysis.discover import DiscoverReport, ImageDiscovery

__all__ = ["plot_discover", "save_discover_figure"]

MAX_IMAGES = 6


def _pixels(report: DiscoverReport, d: ImageDiscovery) -> np.ndarray | None:
    """The image in the pixels its boxes are in (H x W x 3), or None when it cannot be read any more."""
    # local imports, as in render.style.load_display_image: the figure modules do not need the data path at import
    data = report.data
    if d.path is not None:
        from artifactscan.inputs.images import load_rgb

        try:
            img = load_rgb(d.path)
        except Exception:
            return None
        w, h = d.size
        if img.size != (w, h) and w and h:
            img = img.resize((w, h))
        return np.asarray(img)
    size = data.synthetic_img_size or d.size[0]
    if data.kind == "synthetic-objects":
        from artifactscan.inputs.synthetic_objects import SyntheticObjects

        arr = SyntheticObjects(data.num_images, seed=0, img_size=size, split="val").render(d.index)[0]
    elif data.kind == "synthetic":
        from artifactscan.inputs.synthetic import SyntheticShapes

        arr = SyntheticShapes(data.num_images, seed=0, img_size=size, split="val").render(d.index)[0]
    else:
        return None
    return arr.transpose(1, 2, 0)


def _rect(ax: Axes, box: list[float], colour: str, style: str = "-", width: float = 1.4) -> None:
    x0, y0, x1, y1 = box
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=width,
                           linestyle=style, path_effects=[patheffects.withStroke(linewidth=width + 1.2,
                                                                                 foreground="white")]))


def plot_discover(report: DiscoverReport, max_images: int = MAX_IMAGES) -> tuple[Figure, list[Axes]]:
    """Rows: runs; columns: the first images. Ground truth dashed green, LOST's box solid vermillion, the seed a
    star (yellow when it is an outlier token), the outlier tokens small blue crosses."""
    runs = report.runs
    n_img = max(1, min(max_images, min(len(r.images) for r in runs)))
    with plot_style():
        fig = new_figure(1.25 * n_img + 0.6, 1.35 * len(runs) + 0.5)[0]
        fig.clear()
        grid = fig.subplots(len(runs), n_img, squeeze=False)
        axes = [ax for row in grid for ax in row]
        for ri, run in enumerate(runs):
            ph, pw = run.model.patch_size
            H_in, W_in = run.model.input_size
            for ci in range(n_img):
                ax = grid[ri][ci]
                ax.set_xticks([])
                ax.set_yticks([])
                d = run.images[ci]
                w, h = d.size
                sx, sy = w / W_in, h / H_in
                img = _pixels(report, d)
                if img is not None:
                    ax.imshow(img, extent=(0, w, h, 0), interpolation="nearest")
                else:
                    ax.set_facecolor("0.85")
                ax.set_xlim(0, w)
                ax.set_ylim(h, 0)
                for g in d.gt_boxes or []:
                    _rect(ax, g, GREEN, "--", 1.1)
                _rect(ax, d.box, VERMILLION)
                for r, c in d.outliers or []:
                    ax.plot([(c + 0.5) * pw * sx], [(r + 0.5) * ph * sy], marker="x", markersize=3.5, color=BLUE,
                            linestyle="none")
                r, c = d.seed
                ax.plot([(c + 0.5) * pw * sx], [(r + 0.5) * ph * sy], marker="*", markersize=8,
                        color=YELLOW if d.seed_flagged else "white", markeredgecolor=BLACK, markeredgewidth=0.6,
                        linestyle="none")
                label = "" if d.iou is None else f"IoU {d.iou:.2f}" + (" \u2713" if d.correct else "")
                ax.set_title(label, fontsize=6.5, pad=2)
                if ci == 0:
                    corloc = "" if run.corloc is None else f"\nCorLoc {100 * run.corloc:.1f}%"
                    ax.set_ylabel(f"{run.label}{corloc}", fontsize=6.5)
        phantom = any(is_phantom(r) for r in runs)
        title = (f"LOST boxes ({runs[0].features}, block {runs[0].block}): solid = discovered, dashed = ground truth, "
                 "star = seed (yellow: an outlier token), x = outlier tokens")
        fig.suptitle(tag_phantom(title, phantom), fontsize=7)
    return fig, axes


def save_discover_figure(report: DiscoverReport, out_dir: Path, dpi: int = 200) -> list[Path]:
    """Write ``discover.png`` into ``out_dir``; returns the paths written."""
    if not report.runs or not any(r.images for r in report.runs):
        return []
    fig, _ = plot_discover(report)
    try:
        return [save_figure(fig, Path(out_dir) / "discover.png", dpi)]
    finally:
        close_figure(fig)
