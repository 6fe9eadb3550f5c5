"""The HTML report's sections for attention, fix and calibration results: headline, key table, records, figures.

Each reads the result's JSON as a dict (as the other sections do), so a file of an older schema or with a key
missing still renders what it has.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from artifactscan.render.html_parts import (KNOWN_FIGURES, FigureEmbedder, FoundResult, IncludedResult, esc, fmt_g,
                                            fmt_pct, fmt_ratio, html_table, key_table, notes_html, records_table,
                                            text_headline, verdict_box)
from artifactscan.render.html_sections import images_source


def _model_title(data: dict[str, Any], fallback: str) -> str:
    model = data.get("model")
    if isinstance(model, dict) and model.get("name"):
        return str(model["name"])
    return str(model) if isinstance(model, str) and model else fallback


def _meta_line(data: dict[str, Any]) -> str:
    images = data.get("images")
    n = f"{fmt_g(images.get('num_scanned'))} images from " if isinstance(images, dict) else ""
    return (f'<p class="meta">{esc(_model_title(data, "model"))} – {n}<code>{esc(images_source(data))}</code></p>'
            if images_source(data) else "")


def _finish(out: list[str], head: str, item: FoundResult, figs: FigureEmbedder, inc: IncludedResult,
            subfolders: tuple[str, ...] = ()) -> str:
    """A section's end, the same for every kind: its notes and figures; the headline and title it is listed under."""
    out += [notes_html(item.data.get("notes")), _figures(item, figs, inc, subfolders)]
    inc.headline = head
    inc.title = _model_title(item.data, item.path.parent.name)
    return "\n".join(part for part in out if part)


def _figures(item: FoundResult, figs: FigureEmbedder, inc: IncludedResult, subfolders: tuple[str, ...] = ()) -> str:
    d = item.path.parent
    paths = figs.claim(d, KNOWN_FIGURES.get(item.kind, ())) + figs.claim_prefixed(d, item.kind)
    for sub in subfolders:
        paths += figs.claim_all(d / sub)
    return f'<div class="figrow">{figs.render(paths, included=inc.figures)}</div>' if paths else ""


def attention_section(item: FoundResult, root: Path, figs: FigureEmbedder, inc: IncludedResult) -> str:
    """Where the query looks per captured block, and the attention mass on the flagged outliers."""
    data = item.data
    head = text_headline(data)
    query = data.get("query") if isinstance(data.get("query"), dict) else {}
    rows, classes = [], []
    for lay in data.get("layers") or []:
        q = lay.get("query") or {}
        pq = lay.get("patch_queries") or {}
        rows.append([fmt_g(lay.get("block")), fmt_pct(lay.get("outlier_fraction")),
                     f"{fmt_g(lay.get('images_with_outliers'))}/{fmt_g(lay.get('num_images'))}",
                     fmt_pct(q.get("patches")), fmt_pct(q.get("outliers")), fmt_ratio(q.get("spike")),
                     fmt_pct(pq.get("outliers")), fmt_ratio(pq.get("spike"))])
        classes.append("flagged" if (lay.get("images_with_outliers") or 0) > 0 else "")
    out = [_meta_line(data), verdict_box(head, "headline"),
           key_table({"query": query.get("name"), "why this query": query.get("reason"), "heads": data.get("heads"),
                      "threshold": data.get("threshold_rule"), "outliers": data.get("outlier_rule")})]
    if rows:
        out.append(html_table(["block", "% flagged", "images with outliers", f"{query.get('name', 'query')} → patches",
                               "→ outliers", "spike", "patch queries → outliers", "spike"], rows, classes,
                              caption="Attention mass per captured block (fractions of each query's attention; "
                                      "spike = outliers' share of patch attention over their share of patches)."))
    return _finish(out, head, item, figs, inc, ("attention_maps", "attention_heads"))


def fix_section(item: FoundResult, root: Path, figs: FigureEmbedder, inc: IncludedResult) -> str:
    """Before and after the test-time register, with the neurons it moved."""
    data = item.data
    head = text_headline(data)
    tone = "flagged" if head.startswith("DAMAGED") else "clean" if (data.get("outliers_removed") or 0) >= 0.95 else ""
    facts = {
        "last block % flagged": f"{fmt_pct(data.get('before_outlier_fraction'))} → "
                                f"{fmt_pct(data.get('after_outlier_fraction'))}",
        "last block max/median": f"{fmt_ratio(data.get('before_max_over_median'))} → "
                                 f"{fmt_ratio(data.get('after_max_over_median'))}",
        "outliers removed": fmt_pct(data.get("outliers_removed")),
        "pooled-feature cosine": f"{fmt_g(data.get('feature_cosine_mean'))} (min {fmt_g(data.get('feature_cosine_min'))})",
        "top-1 agreement": fmt_pct(data.get("prediction_agreement")),
        "neurons searched up to block": fmt_g(data.get("max_layer")),
        "saved to": data.get("saved_to") or "not saved",
    }
    out = [_meta_line(data), verdict_box(head, "headline", tone), key_table(facts)]
    if isinstance(data.get("verdict"), dict):  # a verdict with its reasons, as probes write it
        out.append(notes_html(data["verdict"].get("reasons")))
    neurons = data.get("neurons")
    if isinstance(neurons, list) and neurons and all(isinstance(n, dict) for n in neurons):
        out.append(records_table(neurons, caption="Register neurons moved by the test-time register"))
    return _finish(out, head, item, figs, inc)


def calibration_section(item: FoundResult, root: Path, figs: FigureEmbedder, inc: IncludedResult) -> str:
    """The detection limit: one row per phantom of the grid, and where the rule goes blind."""
    data = item.data
    head = text_headline(data)
    rows, classes = [], []
    for c in data.get("cells") or []:
        found = ((c.get("recall") or 0) >= 0.95 and (c.get("precision") or 0) >= 0.95 and c.get("onset_error") == 0)
        rows.append([fmt_g(c.get("gain")), fmt_pct(c.get("planted_share")), fmt_ratio(c.get("ratio")),
                     fmt_pct(c.get("precision")), fmt_pct(c.get("recall")),
                     "–" if c.get("detected_onset") is None else fmt_g(c.get("detected_onset")),
                     f"{fmt_g(c.get('blocks_detected'))}/{fmt_g(c.get('blocks_planted'))}", "yes" if found else "no"])
        classes.append("" if found else "flagged")
    facts = {"base": data.get("base"), "onset block": data.get("onset"), "blocks": data.get("num_blocks"),
             "images": images_source(data), "threshold": data.get("threshold_rule"),
             "blind below": fmt_ratio(data.get("blind_below")), "found from": fmt_ratio(data.get("found_from"))}
    out = [verdict_box(head, "headline"), key_table(facts)]
    if rows:
        out.append(html_table(["gain", "planted share", "ratio (weakest block)", "precision", "recall",
                               "detected onset", "blocks detected", "found"], rows, classes,
                              caption="One phantom per cell; ratio = planted median / bulk median."))
    out += [notes_html(data.get("notes")), _figures(item, figs, inc)]
    inc.headline = head
    inc.title = f"phantoms from {data.get('base', '?')}"
    return "\n".join(part for part in out if part)


def _shift_cell(shift: dict | None) -> str:
    """Median shift residuals, flagged / unflagged, with the flagged median's null (results older than the shift
    signature have none: a dash)."""
    if not shift:
        return "–"
    return (f"{fmt_g(shift.get('median_flagged'), 3)} / {fmt_g(shift.get('median_normal'), 3)} "
            f"({fmt_g(shift.get('flagged_null_99'), 3)})")


def signatures_section(item: FoundResult, root: Path, figs: FigureEmbedder, inc: IncludedResult) -> str:
    """Every artifact signature per block beside its null, and the verdict on each (``artifactscan signatures``)."""
    data = item.data
    head = text_headline(data)
    calls = [[esc(c.get("signature")), esc({True: "present", False: "absent"}.get(c.get("present"), "n/a")),
              esc(c.get("evidence"))] for c in data.get("verdict") or []]
    rows = []
    for b in data.get("blocks") or []:
        units = b.get("units") or []
        top = units[0] if units else {}
        rows.append([esc(b.get("block")), fmt_pct(b.get("outlier_fraction")), fmt_ratio(b.get("max_over_median")),
                     f"{fmt_g(b.get('position_share'), 3)} ({fmt_g(b.get('position_null'), 3)})",
                     fmt_g(b.get("defect_cos_flagged"), 3),
                     esc(f"{top.get('point')}[{top.get('unit')}] {fmt_ratio(top.get('ratio'))}") if top else "–",
                     f"{fmt_g(b.get('hit_ratio'), 3)} "
                     f"({', '.join(fmt_g(v, 3) for v in b.get('null_hit_ratios') or [])})",
                     _shift_cell(b.get("shift"))])
    out = [_meta_line(data), verdict_box(head, "headline")]
    if calls:
        out.append(html_table(["signature", "call", "evidence"], calls, num_from=3,
                              caption="Each signature is called present only when it beats its own null."))
    if rows:
        out.append(html_table(["block", "% flagged", "max/median", "position share (shuffled null)",
                               "defect |cos|", "top unit (ratio)", "hit ratio (random-init nulls)",
                               "shift residual flagged / unflagged (null 99%)"], rows,
                              caption="Per block, each measure beside its null (docs/signatures.md)."))
    return _finish(out, head, item, figs, inc)
