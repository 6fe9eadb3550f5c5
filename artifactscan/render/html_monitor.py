"""The HTML report's section for an ArtifactMonitor folder: the headline, the onset, the outlier fraction per block
against step, and the emergence figure (drawn from the records: a run's folder holds no figure of its own)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

from artifactscan.analysis.monitor_records import MonitorHistory
from artifactscan.render.html_parts import FigureEmbedder, FoundResult, IncludedResult, esc, fmt_g, fmt_pct, \
    fmt_ratio, html_table, key_table, verdict_box

#: The table shows the latest updates; the figure and --json have all of them.
MAX_ROWS = 60


def _figure_html(history: MonitorHistory) -> str:
    from artifactscan.render.monitor import plot_monitor
    from artifactscan.render.style import close_figure, make_texts_literal, plot_style

    fig, _ = plot_monitor(history)
    try:
        buffer = io.BytesIO()
        make_texts_literal(fig)
        with plot_style():
            fig.savefig(buffer, format="png", dpi=110)
    finally:
        close_figure(fig)
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return (f'<div class="figrow"><figure class="fig"><img src="{uri}" alt="artifact emergence">'
            "<figcaption>outlier fraction per block against step, and the last block's</figcaption></figure></div>")


def monitor_section(item: FoundResult, root: Path, figs: FigureEmbedder, inc: IncludedResult) -> str:
    """Artifacts during training, as the monitor recorded them (also while the run is still writing)."""
    history = MonitorHistory.from_dict(item.data)
    head = history.headline
    last = history.last
    facts = {"updates": len(history.updates), "last step": last.step if last else None,
             "onset step": history.onset_step, "onset block": history.onset_block,
             "probe images": f"{fmt_g(last.images.num_scanned)} from {last.images.source}" if last and last.images
             else None, "threshold": last.threshold_rule if last else None}
    tone = "flagged" if history.onset_step is not None else "clean" if history.updates else ""
    out = [verdict_box(head, "headline", tone), key_table(facts)]
    shown = history.updates[-MAX_ROWS:]
    rows, classes = [], []
    for u in shown:
        rows.append([fmt_g(u.step), "–" if u.onset_layer is None else fmt_g(u.onset_layer),
                     fmt_pct(u.last_block.outlier_fraction), fmt_ratio(u.last_block.max_over_median)]
                    + [fmt_pct(lay.outlier_fraction) for lay in u.layers])
        classes.append("flagged" if u.onset_layer is not None else "")
    if rows:
        caption = "Outlier fraction per block against step" + (
            f" (the latest {len(shown)} of {len(history.updates)} updates)" if len(shown) < len(history.updates)
            else "")
        out.append(html_table(["step", "onset", "last block", "max/median"]
                              + [f"b{i}" for i in range(history.num_blocks)], rows, classes, caption=caption))
        out.append(_figure_html(history))
    paths = figs.claim(item.path.parent, ("monitor",))
    if paths:
        out.append(f'<div class="figrow">{figs.render(paths, included=inc.figures)}</div>')
    inc.headline = head
    inc.title = history.model.name
    return "\n".join(part for part in out if part)
