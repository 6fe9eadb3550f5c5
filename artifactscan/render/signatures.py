"""The table, verdict and figure of ``artifactscan signatures``: every signature per block, each beside its null."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.text import Text

from artifactscan.render.table import Column, FitTable, num, pct, ratio

if TYPE_CHECKING:
    from rich.console import Console

#: What the figure file is called in ``--out``.
FIGURE_NAME = "signatures.png"


def _pair(value: float | None, null: float | None, fmt: Any = num) -> str:
    """``value (null)``: every number beside the null it is read against."""
    return "-" if value is None else f"{fmt(value)} ({fmt(null)})"


def _shift_cell(shift: Any) -> str:
    """``flagged / unflagged (null)`` median shift residuals; only the unflagged one where nothing is flagged."""
    if shift is None or shift.median_normal is None:
        return "-"
    if shift.median_flagged is None:
        return f"- / {num(shift.median_normal)}"
    return f"{num(shift.median_flagged)} / {num(shift.median_normal)} ({num(shift.flagged_null_99)})"


def render_signatures(result: Any, console: "Console") -> None:
    """One row per block: high norm, position share (shuffled null), defect |cos| (random 99%), the top register
    unit (its flagged / elsewhere ratio), the hit ratio (random-init range), the shift residuals (the flagged
    median's null); then the verdict, one line each."""
    table = FitTable([Column("block"), Column("outliers"), Column("max/med", drop=3),
                      Column("position (null)", long="position share (shuffled-grid null)"),
                      Column("defect |cos| (sv/random)", drop=2, long="defect direction |cos| with flagged mean"),
                      Column("top unit", "left", drop=1, long="top register unit (flagged/elsewhere)"),
                      Column("hit (random-init)", long="top patch in a box (random-init 99% range)"),
                      Column("shift flagged/other (null)", drop=2,
                             long="median shift residual, flagged / unflagged (null 99% of the flagged median)")],
                     title="signatures per block: each value (its null)")
    for row in result.blocks:
        defect = "-" if row.defect_singular_value is None else (
            f"{num(row.defect_cos_flagged)} ({ratio(row.defect_singular_value / row.defect_random_singular_value)})")
        unit = "-" if not row.units else f"{row.units[0].point.split('.', 2)[2]}[{row.units[0].unit}] " \
                                         f"{'only there' if row.units[0].ratio is None else ratio(row.units[0].ratio)}"
        hit = "n/a" if row.hit_ratio is None else (
            f"{pct(row.hit_ratio)} ({pct(row.null_interval[0])}-{pct(row.null_interval[1])})")
        table.add_row(str(row.block), pct(row.outlier_fraction), ratio(row.max_over_median),
                      _pair(row.position_share, row.position_null), defect, unit, hit, _shift_cell(row.shift))
    table.print(console)
    console.print(f"embedding position share {num(result.embedding_position_share)} (shuffled-grid null "
                  f"{num(result.embedding_position_null)}); random direction |cos| 99%: {num(result.random_cos_99)}"
                  + ("" if result.chance_hit_ratio is None else
                     f"; patches in boxes {pct(result.chance_hit_ratio)}"), highlight=False)
    if result.shift_views:
        console.print(Text(f"shift residual: {len(result.shift_views)} views ({', '.join(result.shift_views)}) on "
                           f"{result.shift_images} images", style="dim"))
    for note in (result.boxes_note, result.defect_note):
        if note:
            console.print(Text(note, style="dim"))
    for call in result.verdict:
        word = {True: "present", False: "not shown", None: "not measurable"}[call.present]
        console.print(Text.assemble((f"{call.signature}: {word}", "bold"), f" - {call.evidence}"))
    console.print(Text(result.headline, style="bold"))


def plot_signatures(result: Any, path: Path, dpi: int = 120) -> Path:
    """Per block: the position share and its null, the defect |cos| and the random 99% line, the hit ratio with its
    random-init range and the share of patches in boxes, the median shift residuals with the flagged median's null;
    and the embedding's position map."""
    import numpy as np

    from artifactscan.render.style import close_figure, new_figure, save_figure

    fig, (ax_pos, ax_cos, ax_hit, ax_shift, ax_map) = new_figure(16, 3.2, ncols=5)
    blocks = [r.block for r in result.blocks]
    ax_pos.plot(blocks, [r.position_share for r in result.blocks], "o-", label="position share")
    ax_pos.plot(blocks, [r.position_null for r in result.blocks], "s--", label="shuffled-grid null")
    ax_pos.set(title="position-only component", xlabel="block")
    ax_pos.legend(fontsize=7)
    cos = [np.nan if r.defect_cos_flagged is None else r.defect_cos_flagged for r in result.blocks]
    ax_cos.plot(blocks, cos, "o-", label="|cos| defect vs flagged mean")
    ax_cos.axhline(result.random_cos_99, ls="--", color="grey", label="random direction 99%")
    ax_cos.set(title="weights-only defect direction" if result.defect_note is None else "defect: n/a",
               xlabel="block", ylim=(0, 1))
    ax_cos.legend(fontsize=7)
    if result.chance_hit_ratio is not None:
        ax_hit.plot(blocks, [r.hit_ratio for r in result.blocks], "o-", label="hit ratio")
        ax_hit.fill_between(blocks, [r.null_interval[0] for r in result.blocks],
                            [r.null_interval[1] for r in result.blocks], alpha=0.3, label="random-init 99%")
        ax_hit.axhline(result.chance_hit_ratio, ls=":", color="grey", label="patches in boxes")
        ax_hit.legend(fontsize=7)
    ax_hit.set(title="lazy aggregation (top patch to CLS)", xlabel="block", ylim=(0, 1))
    _shift_panel(ax_shift, result)
    im = ax_map.imshow(np.array(result.embedding_position_map), cmap="viridis")
    fig.colorbar(im, ax=ax_map, shrink=0.8)
    ax_map.set(title="|per-position mean - mean| (embedding)", xticks=[], yticks=[])
    try:
        return save_figure(fig, path, dpi)
    finally:
        close_figure(fig)


def _shift_panel(ax: Any, result: Any) -> None:
    """Median shift residual per block, flagged and unflagged patches, and the flagged median's null (99%)."""
    import numpy as np

    blocks = [r.block for r in result.blocks]

    def series(name: str) -> list[float]:
        return [np.nan if r.shift is None or getattr(r.shift, name) is None else getattr(r.shift, name)
                for r in result.blocks]

    ax.plot(blocks, series("median_normal"), "o-", label="unflagged median")
    ax.plot(blocks, series("median_flagged"), "^-", label="flagged median")
    ax.plot(blocks, series("flagged_null_99"), "--", color="grey", label="null 99% (flagged median)")
    ax.set(title=f"shift residual, {len(result.shift_views)} views", xlabel="block", ylabel="1 - cos")
    ax.legend(fontsize=7)
