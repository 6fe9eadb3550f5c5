"""Figures of ``artifactscan probe``: the probes per token type (Fig 5b / Table 1) and the neighbour-similarity
densities of normal vs outlier tokens (Fig 5a).

Like :mod:`artifactscan.plots`, figures are bare :class:`matplotlib.figure.Figure` objects (rendered with Agg, never
shown, no pyplot state); each function draws into the ``ax`` it is given or builds its own figure and returns
``(fig, ax)`` (``(fig, axes)`` for several panels). Figures of the calibration phantom carry its tag in the title.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import matplotlib
from matplotlib.figure import Figure
from artifactscan.render.style import COMPACT_STYLE, is_phantom, save_figure, tag_phantom

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from artifactscan.analysis.probes import NeighbourHistogram, ProbeReport


__all__ = ["plot_probe_bars", "plot_neighbour_similarity", "save_probe_figures"]

# Okabe-Ito: normal = blue, outlier = vermillion, CLS = green, registers = purple
_COLOURS = {"normal": "#0072B2", "normal (n-matched)": "#56B4E9", "outlier": "#D55E00", "cls": "#009E73",
            "registers": "#CC79A7"}


def _ax(ax: "Axes | None", width: float, height: float, ncols: int = 1) -> tuple[Figure, list["Axes"]]:
    if ax is not None:
        return ax.figure, [ax]  # type: ignore[return-value]
    with matplotlib.rc_context(COMPACT_STYLE):
        fig = Figure(figsize=(width, height), layout="constrained")
        axes = list(fig.subplots(1, ncols, squeeze=False)[0])
    return fig, axes


def _v(x: Any) -> float:
    return float(x) if x is not None else math.nan


def plot_probe_bars(report: "ProbeReport", axes: Sequence["Axes"] | None = None, title: str | None = None
                    ) -> tuple[Figure, list["Axes"]]:
    """Three panels: position top-1, reconstruction FVU (local probes) and global top-1 per token type.

    Bars of rows with too few tokens are left out and labelled with the row's status ("too few (n=12)").
    """
    with matplotlib.rc_context(COMPACT_STYLE):
        if axes is None:
            fig, axes = _ax(None, 7.0, 2.8, ncols=3)
        else:
            fig = axes[0].figure  # type: ignore[assignment]
        # What each panel measures goes in its title, the unit in a short y-label: a long y-label is taller than
        # the 2.8-inch panels and runs into the figure's title.
        panels = (
            ("patch position (held-out)", "top-1", "position_top1", "local_status", "position_chance", True),
            ("pixel reconstruction", "FVU (lower = more kept)", "reconstruction_fvu", "local_status", None, False),
            ("image label (held-out images)", "top-1", "global_top1", "global_status", "global_chance", True),
        )
        for ax, (panel, label, attr, status_attr, chance_attr, pct) in zip(axes, panels):
            rows = [r for r in report.rows if getattr(r, status_attr) not in ("n/a",)]
            names = [r.name for r in rows]
            vals = [_v(getattr(r, attr)) for r in rows]
            err = [(_v(r.global_top1_std) if attr == "global_top1" else 0.0) for r in rows]
            xs = range(len(rows))
            scale = 100.0 if pct else 1.0
            ax.bar(xs, [v * scale if math.isfinite(v) else 0 for v in vals],
                   yerr=[e * scale if math.isfinite(e) else 0 for e in err],
                   color=[_COLOURS.get(n, "#999999") for n in names], capsize=2)
            for x, r, v in zip(xs, rows, vals):
                if not math.isfinite(v):
                    ax.text(x, 0, getattr(r, status_attr), rotation=90, ha="center", va="bottom", fontsize=6)
                elif chance_attr and getattr(r, chance_attr) is not None:
                    c = _v(getattr(r, chance_attr)) * scale
                    ax.plot([x - 0.4, x + 0.4], [c, c], color="black", lw=0.8, ls=":")
            ax.set_xticks(list(xs))
            # Upright, broken before a parenthesis: slanted labels of neighbouring bars cross each other's boxes.
            ax.set_xticklabels([n.replace(" (", "\n(") for n in names])
            ax.set_title(panel)
            ax.set_ylabel(label if not pct else label + " [%]")
            if pct:
                ax.set_ylim(0, 100)
        fig.suptitle(tag_phantom(title or f"{report.model.name}, block {report.layer}: probes per token type "
                                 "(dotted: chance)", is_phantom(report)))
    return fig, list(axes)


def plot_neighbour_similarity(report: "ProbeReport", ax: "Axes | None" = None, title: str | None = None
                              ) -> tuple[Figure, "Axes"]:
    """Fig 5a: density of the cosine similarity between each input patch embedding and its 4 neighbours, normal vs
    outlier tokens (exact histograms over every token), medians dashed."""
    nb: NeighbourHistogram = report.neighbours
    with matplotlib.rc_context(COMPACT_STYLE):
        fig, (a,) = _ax(ax, 3.5, 2.4)
        if not nb.available:
            a.text(0.5, 0.5, "no separable patch embedding", ha="center", va="center", transform=a.transAxes)
        edges = nb.edges
        width = edges[1] - edges[0]
        centres = [(lo + hi) / 2 for lo, hi in zip(edges[:-1], edges[1:])]
        for name, counts, median in (("normal", nb.normal, nb.normal_median),
                                     ("outlier", nb.outlier, nb.outlier_median)):
            total = sum(counts)
            if not total:
                continue
            dens = [c / (total * width) for c in counts]
            a.fill_between(centres, dens, step="mid", alpha=0.35, color=_COLOURS[name], label=f"{name} (n={total})")
            a.step(centres, dens, where="mid", color=_COLOURS[name], lw=0.8)
            if median is not None:
                a.axvline(median, color=_COLOURS[name], ls="--", lw=0.8)
        a.set_xlabel("cosine similarity of each input patch embedding\nwith its 4 neighbours")  # 1 line: too wide
        a.set_ylabel("density")
        a.legend(frameon=False)
        a.set_title(tag_phantom(title or f"{report.model.name}, block {report.layer}: redundancy of input "
                                "patches", is_phantom(report)))
    return fig, a


def save_probe_figures(report: "ProbeReport", out_dir: str | Path, fmt: str = "png", dpi: int = 150) -> list[Path]:
    """Write ``probes.<fmt>`` and ``neighbour_similarity.<fmt>`` into ``out_dir``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (fig, _) in (("probes", plot_probe_bars(report)), ("neighbour_similarity",
                                                                 plot_neighbour_similarity(report))):
        path = out / f"{name}.{fmt.lstrip('.')}"
        save_figure(fig, path, dpi, style=COMPACT_STYLE)
        fig.clear()
        written.append(path)
    return written
