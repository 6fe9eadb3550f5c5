"""The HTML report's section for ``artifactscan discover`` results (``discover.json``): one row per run, the
headline, the figure."""

from __future__ import annotations

from pathlib import Path

from artifactscan.render.html_parts import (FigureEmbedder, FoundResult, IncludedResult, KNOWN_FIGURES, as_number,
                                            esc, fmt_g, fmt_pct, html_table, notes_html, verdict_box)


def discover_section(item: FoundResult, root: Path, figs: FigureEmbedder, inc: IncludedResult) -> str:
    data = item.data
    runs = data.get("runs") or []
    rows, classes = [], []
    for r in runs:
        enrich = as_number(r.get("seed_outlier_enrichment"))
        flagged = r.get("threshold") is not None
        rows.append([
            esc(r.get("label")), esc(r.get("features")), fmt_g(r.get("block")), fmt_g(r.get("k")),
            fmt_pct(r.get("corloc")), fmt_pct(r.get("corloc_centre")), fmt_pct(r.get("corloc_random")),
            fmt_g(r.get("mean_iou"), 3),
            f"{fmt_g(r.get('seeds_on_outliers'))}/{fmt_g(r.get('num_images'))}" if flagged else "none flagged",
            fmt_pct(r.get("outlier_share")) if flagged else "–",
            "–" if enrich is None else f"{enrich:.1f}×",
            fmt_pct(r.get("corloc_seed_on_outlier")), fmt_pct(r.get("corloc_seed_elsewhere"))])
        classes.append("flagged" if (enrich or 0) >= 5 else "")
    d = data.get("data") or {}
    out = [f'<p class="meta">{len(runs)} run(s) on <code>{esc(d.get("description"))}</code></p>',
           verdict_box(data.get("headline") or "", "object discovery"),
           html_table(["run", "features", "block", "k", "CorLoc", "centred box", "random box", "mean IoU",
                       "seeds on outliers", "outlier share", "× share", "CorLoc | seed on outlier",
                       "CorLoc | elsewhere"], rows, classes, caption="LOST (Siméoni et al. 2021) per run. "
                       + str(data.get("corloc_rule") or "")),
           f'<p class="small">Baselines: {esc(data.get("baselines"))}. Outliers: {esc(data.get("threshold_rule"))}'
           "</p>",
           notes_html(data.get("notes"))]
    figures = figs.render(figs.claim(item.path.parent, KNOWN_FIGURES["discover"]), included=inc.figures)
    out.append(f'<div class="figrow">{figures}</div>')
    inc.headline = str(data.get("headline") or "")
    inc.title = ", ".join(str(r.get("label")) for r in runs) or "discovery"
    return "\n".join(out)
