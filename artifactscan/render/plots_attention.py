"""Figures of an attention report (the paper's Fig 2 and Fig 9): per-image attention maps with the outlier tokens
outlined, per-head maps, and the per-block attention mass on outliers and prefix tokens.

Same conventions as :mod:`artifactscan.plots`: bare :class:`~matplotlib.figure.Figure` objects (no pyplot), 8-pt
fonts, the Okabe-Ito palette and *viridis* for maps, and ``PHANTOM_TAG`` in the titles of a calibration-phantom
report. Every function returns ``(fig, axes)``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from artifactscan.core.paths import display_name
from artifactscan.render.style import (BLACK, BLUE, DOUBLE_WIDTH_IN, HEATMAP_CMAP, MARKERS, OKABE_ITO, ORANGE,
                                       VERMILLION, close_figure, load_display_image, new_figure, outline_cells,
                                       is_phantom, plain_log_ticks, plot_style, save_figure, tag_phantom, two_axes,
                                       unique_stems, wrap_text)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from artifactscan.analysis.attention_maps import AttentionMap, AttentionReport

__all__ = ["plot_attention_image", "plot_attention_heads", "plot_attention_mass", "save_attention_figures"]

# Two lines: on one, the colour bar's label is taller than the 2.55-inch figure and runs into the titles.
_ATTN_LABEL = "attention (share of\nthe query's total)"
# Said beside the colour bar, not in the panel's title: constrained layout leaves room for one title line only
# above a panel that has a colour bar and a fixed aspect, and a second line runs into the figure's title.
_HEAD_MEAN_LABEL = "mean of heads: share\nof the query's total"


def _layer_pos(amap: AttentionMap, block: int | None) -> int:
    if block is None:
        return len(amap.blocks) - 1
    if block not in amap.blocks:
        raise ValueError(f"block {block} was not captured; captured: {amap.blocks}")
    return amap.blocks.index(block)


def _grid_axes(ax: Axes, gh: int, gw: int) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(True)
        s.set_linewidth(0.4)


def _query_title(query: str) -> str:
    return {"cls": "CLS", "mean": "mean query"}.get(query, query)


def _mark_query_patch(ax: Axes, query: str) -> None:
    if query.startswith("patch("):
        r, c = (int(v) for v in query[6:-1].split(","))
        ax.plot([c], [r], marker="*", markersize=9, color="white", markeredgecolor=BLACK, markeredgewidth=0.6,
                linestyle="none")


def plot_attention_image(amap: AttentionMap, image_path: str | None, data_size: tuple[int, int] | None = None, *,
                         block: int | None = None, title: str | None = None) -> tuple[Figure, list[Axes]]:
    """One image: (1) the image as the model saw it, (2) the query's attention map over the patch grid at ``block``
    (default: the last captured block; averaged over heads), (3) the overlay: the map over the image with the
    flagged outlier tokens outlined. Without a readable image file (tensor / synthetic inputs) panel 1 says so and
    the overlay is drawn on the map alone."""
    li = _layer_pos(amap, block)
    att = np.asarray(amap.maps[li], dtype=float).mean(axis=0)  # [gh, gw], mean over heads
    flagged = np.asarray(amap.flagged[li], dtype=bool)
    gh, gw = att.shape
    aspect_hw = tuple(data_size) if data_size else (gh, gw)
    cell_aspect = (aspect_hw[0] / gh) / (aspect_hw[1] / gw)
    extent = (-0.5, gw - 0.5, gh - 0.5, -0.5)
    b = amap.blocks[li]
    q = _query_title(amap.query)
    with plot_style():
        img = load_display_image(image_path, aspect_hw)  # type: ignore[arg-type]
        fig, axes = new_figure(DOUBLE_WIDTH_IN, 2.55, 3)
        ax_img, ax_map, ax_ov = axes
        name = display_name(Path(str(amap.image)).name or str(amap.image))  # escaped, as messages print names
        if img is not None:
            ax_img.imshow(img, extent=extent, aspect=cell_aspect, interpolation="lanczos")
            _grid_axes(ax_img, gh, gw)
        else:
            ax_img.set_axis_off()
            ax_img.text(0.5, 0.5, "no image file\n(synthetic or tensor input)", ha="center", va="center",
                        color="0.4", transform=ax_img.transAxes)
        ax_img.set_title(wrap_text(name, 36))

        vmax = float(att.max()) if att.size and att.max() > 0 else 1.0
        im = ax_map.imshow(att, cmap=HEATMAP_CMAP, extent=extent, aspect=cell_aspect, vmin=0.0, vmax=vmax,
                           interpolation="nearest")
        _grid_axes(ax_map, gh, gw)
        _mark_query_patch(ax_map, amap.query)
        cb = fig.colorbar(im, ax=ax_map, shrink=0.9, pad=0.02, fraction=0.06)
        cb.set_label(_HEAD_MEAN_LABEL if len(amap.maps[li]) > 1 else _ATTN_LABEL)
        cb.outline.set_linewidth(0.4)
        ax_map.set_title(f"{q} attention, block {b}")

        if img is not None:
            ax_ov.imshow(img.mean(axis=-1) if img.ndim == 3 else img, cmap="gray", extent=extent,
                         aspect=cell_aspect, interpolation="lanczos")
            ax_ov.imshow(att, cmap=HEATMAP_CMAP, extent=extent, aspect=cell_aspect, vmin=0.0, vmax=vmax,
                         alpha=0.6, interpolation="nearest")
        else:
            ax_ov.imshow(att, cmap=HEATMAP_CMAP, extent=extent, aspect=cell_aspect, vmin=0.0, vmax=vmax,
                         interpolation="nearest")
        n_flag = outline_cells(ax_ov, flagged, VERMILLION)
        _mark_query_patch(ax_ov, amap.query)
        _grid_axes(ax_ov, gh, gw)
        on_flagged = float(att[flagged].sum()) if n_flag else 0.0
        ax_ov.set_title(f"{n_flag} outlier{'s' if n_flag != 1 else ''} outlined"
                        + (f"\n{on_flagged:.0%} of {q}'s attention" if n_flag else
                           ("" if b > 0 else "\n(block 0: no outlier mask)")))
        if title:
            fig.suptitle(wrap_text(title, 100))
    return fig, list(axes)


def plot_attention_heads(amap: AttentionMap, block: int | None = None, *, title: str | None = None,
                         max_cols: int = 6) -> tuple[Figure, list[Axes]]:
    """The query's attention map per head at ``block`` (the paper's Fig 9), flagged outliers outlined; every head
    on its own colour scale (heads differ by orders of magnitude)."""
    li = _layer_pos(amap, block)
    per_head = np.asarray(amap.maps[li], dtype=float)  # [H, gh, gw]
    flagged = np.asarray(amap.flagged[li], dtype=bool)
    H, gh, gw = per_head.shape
    ncols = min(H, max_cols)
    nrows = math.ceil(H / ncols)
    from matplotlib.figure import Figure as _Figure

    with plot_style():
        width = min(DOUBLE_WIDTH_IN, max(3.5, 1.2 * ncols + 0.4))
        fig = _Figure(figsize=(width, 1.25 * nrows + 0.6), layout="constrained")
        grid = fig.subplots(nrows, ncols, squeeze=False)
        axes = list(grid.ravel())
        for h, ax in enumerate(axes):
            if h >= H:
                ax.set_axis_off()
                continue
            m = per_head[h]
            ax.imshow(m, cmap=HEATMAP_CMAP, vmin=0.0, vmax=float(m.max()) if m.max() > 0 else 1.0,
                      interpolation="nearest")
            outline_cells(ax, flagged, VERMILLION)
            _mark_query_patch(ax, amap.query)
            _grid_axes(ax, gh, gw)
            ax.set_title(f"head {h}: max {m.max():.0%}", fontsize=6.5)
        head = (f"{_query_title(amap.query)} attention per head, block {amap.blocks[li]} - "
                f"{display_name(Path(amap.image).name)}")
        fig.suptitle(wrap_text(f"{title}\n{head}" if title else head, int(width * 13)))
    return fig, axes


def plot_attention_mass(report: AttentionReport, axes: Sequence[Axes] | None = None, title: str | None = None
                        ) -> tuple[Figure, list[Axes]]:
    """Per captured block: (left) attention mass on the flagged outlier tokens, from the selected query and from the
    patch queries, against what they would get with no preference (their share of the patches times the mass that
    goes to patches) — the spikes; (right) mass on each prefix token (CLS / registers)."""
    blocks = np.array([lay.block for lay in report.layers])
    q = _query_title(report.query.name)

    def col(values):
        return np.array([math.nan if v is None else float(v) for v in values])

    with plot_style():
        fig, ax_o, ax_p = two_axes(axes, 2.6)
        q_out = col(lay.query.outliers for lay in report.layers)
        p_out = col(lay.patch_queries.outliers for lay in report.layers)
        frac = col(lay.outlier_fraction for lay in report.layers)
        uniform = frac * col(lay.query.patches for lay in report.layers)
        positive = np.concatenate([v[np.isfinite(v) & (v > 0)] for v in (q_out, p_out, uniform)])
        if positive.size:
            ax_o.plot(blocks, q_out, marker=MARKERS[0], color=VERMILLION, label=f"{q} -> outliers")
            ax_o.plot(blocks, p_out, marker=MARKERS[1], color=BLUE, label="patch queries -> outliers")
            ax_o.plot(blocks, uniform, linestyle="--", color=BLACK, linewidth=0.9,
                      label="no preference (outlier share of patches)")
            ax_o.set_yscale("log")
            lo, hi = float(positive.min()), float(positive.max())
            ax_o.set_ylim(max(lo / 3, 1e-6), min(hi * 3, 1.5))  # at least a decade, so a flat line reads flat
            plain_log_ticks(ax_o.yaxis)
            ax_o.legend(loc="best")
        else:
            ax_o.text(0.5, 0.5, "no outlier tokens flagged\nat the input of the captured blocks", ha="center",
                      va="center", color="0.4", transform=ax_o.transAxes)
        ax_o.set_xlabel("block")
        ax_o.set_ylabel("attention mass on outliers")
        ax_o.set_title("attention on high-norm outlier tokens")

        names = list(report.layers[0].query.prefix) if report.layers else []
        if names:
            for i, name in enumerate(names[:8]):
                ax_p.plot(blocks, [lay.query.prefix[name] for lay in report.layers], marker=MARKERS[i % 8],
                          color=OKABE_ITO[i % len(OKABE_ITO)], label=f"{q} -> {name}")
            ax_p.plot(blocks, [sum(lay.patch_queries.prefix.values()) for lay in report.layers], linestyle="--",
                      color=ORANGE if len(names) > 1 else BLACK, label="patch queries -> all prefix")
            ax_p.set_ylim(0, ax_p.get_ylim()[1] * 1.35)  # room for the legend above the lines
            ax_p.legend(loc="upper right")
        else:
            ax_p.text(0.5, 0.5, "no CLS or register tokens", ha="center", va="center", color="0.4",
                      transform=ax_p.transAxes)
        ax_p.set_xlabel("block")
        ax_p.set_ylabel("attention mass")
        ax_p.set_title("attention on prefix tokens")
        for ax in (ax_o, ax_p):
            ax.set_xticks(blocks if len(blocks) <= 16 else blocks[:: math.ceil(len(blocks) / 16)])
        tagged = tag_phantom(title or f"{report.model.name}: attention by block (query: {q})",
                             is_phantom(report))
        if axes is None and tagged:
            fig.suptitle(wrap_text(tagged, 110))
    return fig, [ax_o, ax_p]


def save_attention_figures(report: AttentionReport, out_dir: str | Path, fmt: str = "png", dpi: int = 150
                           ) -> list[Path]:
    """Write the figures of an attention report and return their paths:

    * ``attention_mass.<fmt>`` — per block, attention on outliers and on prefix tokens;
    * ``attention_maps/<stem>.<fmt>`` — per kept image: image, the query's map, outlier overlay (last block);
    * ``attention_maps/<stem>_patch.<fmt>`` — the same for ``--query-patch``, when given;
    * ``attention_heads/<stem>.<fmt>`` — per-head maps (with ``heads == "all"``).
    """
    fmt = fmt.lower().lstrip(".")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    phantom = is_phantom(report)
    written: list[Path] = []

    def save(fig: Figure, path: Path) -> None:
        try:
            written.append(save_figure(fig, path, dpi))
        finally:
            close_figure(fig)

    save(plot_attention_mass(report)[0], out / f"attention_mass.{fmt}")
    size = tuple(report.model.input_size) if report.model.input_size else None
    main = report.maps_for()
    patch = {m.image_index: m for m in report.maps if m.query.startswith("patch(")}
    label = tag_phantom(f"{report.model.name} - query: {_query_title(report.query.name)} ({report.query.reason})",
                    phantom)
    for m, stem in zip(main, unique_stems(main)):
        save(plot_attention_image(m, str(m.image), size, title=label)[0], out / "attention_maps" / f"{stem}.{fmt}")
        if m.image_index in patch:
            pm = patch[m.image_index]
            save(plot_attention_image(pm, str(pm.image), size, title=tag_phantom(report.model.name, phantom))[0],
                 out / "attention_maps" / f"{stem}_patch.{fmt}")
        if report.heads == "all":
            save(plot_attention_heads(m, title=tag_phantom(report.model.name, phantom))[0],
                 out / "attention_heads" / f"{stem}.{fmt}")
    return written
