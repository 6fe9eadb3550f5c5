"""One HTML section per kind of result (scan, compare, emergence, probe, training, anything else with a schema)."""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path
from typing import Any

from artifactscan.core.errors import NotAFileError
from artifactscan.core.paths import read_regular_text
from artifactscan.render.html_parts import (
    FigureEmbedder,
    FoundResult,
    IncludedResult,
    KNOWN_FIGURES,
    MAX_MAPS_PER_SCAN,
    as_number,
    esc,
    fmt_g,
    fmt_pct,
    fmt_ratio,
    html_table,
    key_table,
    notes_html,
    records_table,
    rel_path,
    scalar_html,
    text_headline,
    verdict_box,
)
from artifactscan.render.style import unique_stems
from artifactscan.analysis.run_files import VARIANTS_FILE, existing_run_file
from artifactscan.analysis.scan import ScanReport


def model_line(model: dict[str, Any], images: dict[str, Any] | None) -> str:
    bits = [f"<b>{esc(model.get('name'))}</b>"]
    if model.get("arch"):
        bits.append(f"({esc(model.get('arch'))})")
    facts = []
    if model.get("num_blocks") is not None:
        facts.append(f"{esc(model.get('num_blocks'))} blocks")
    if "num_prefix_tokens" in model:
        facts.append(esc(f"{model.get('num_cls_tokens', 0)} CLS + {model.get('num_register_tokens', 0)} register tokens"
                        if model.get("num_prefix_tokens") else "no prefix tokens"))
    grid = model.get("grid_size") or []
    if isinstance(grid, list) and len(grid) == 2:
        facts.append(f"{esc(grid[0])}×{esc(grid[1])} patches")
    if facts:
        bits.append("– " + ", ".join(facts))
    if images and images.get("num_scanned") is not None:
        bits.append(f"– {fmt_g(images.get('num_scanned'))} images from <code>{esc(images.get('source'))}</code>")
    return f'<p class="meta">{" ".join(bits)}</p>'


def scan_section(item: FoundResult, root: Path, figs: FigureEmbedder, inc: IncludedResult) -> str:
    data = item.data
    report = ScanReport.from_dict(data)  # raises on a malformed report -> generic fallback
    n_images = report.images.num_scanned
    out = [model_line(data.get("model") or {}, data.get("images"))]
    undecided = report.inconclusive_layers or report.nonfinite_problem()  # never shown in the "clean" colours
    tone = "flagged" if report.onset_layer is not None else ("inconclusive" if undecided else "clean")
    out.append(verdict_box(report.headline, "headline", tone))
    rows, classes = [], []
    for lay in report.layers:
        rows.append([
            esc(lay.name), fmt_g(lay.median), fmt_g(lay.p99), fmt_g(lay.max), fmt_ratio(lay.max_over_median),
            "–" if lay.threshold is None or not math.isfinite(lay.threshold) else fmt_g(lay.threshold),
            fmt_pct(lay.outlier_fraction), fmt_g(lay.num_outliers), f"{lay.images_with_outliers}/{n_images}",
            fmt_pct(lay.fraction_above_150)])
        classes.append("flagged" if lay.num_outliers > 0 else ("final" if lay.is_final_norm else ""))
    out.append(html_table(["layer", "median", "p99", "max", "max/median", "threshold", "% flagged", "outliers",
                       "images with outliers", "> 150"], rows, classes,
                      caption="Patch-token L2 norms per layer (flagged layers in red; the last row is the final "
                              "LayerNorm output when captured)."))
    n_out = len(report.outliers)
    inc.num_outliers = n_out
    complete = "" if report.outlier_records_complete else " (records incomplete)"
    onset = "none" if report.onset_layer is None else f"block {report.onset_layer}"
    out.append(f'<p class="facts"><b>Outlier tokens recorded:</b> {n_out:,}{esc(complete)} · '
               f'<b>onset:</b> {esc(onset)} · <b>threshold:</b> {esc(report.threshold_mode)}</p>')
    if report.outliers:
        top = sorted(report.outliers, key=lambda o: -o.norm)[:10]
        out.append("<details open><summary>Largest outlier tokens</summary>" + html_table(
            ["image", "layer", "row", "col", "norm"],
            [[esc(o.image), fmt_g(o.layer), fmt_g(o.row), fmt_g(o.col), fmt_g(o.norm)] for o in top], num_from=1) + "</details>")
    if report.images.skipped:
        out.append(f'<p class="warn">{len(report.images.skipped)} unreadable image(s) skipped: '
                   + ", ".join(esc(getattr(s, "path", s)) for s in report.images.skipped[:10]) + "</p>")
    out.append(notes_html(report.notes))
    if report.threshold_rule:
        out.append(f'<p class="dim small">Threshold rule – {esc(report.threshold_rule)}</p>')
    d = item.path.parent
    main = figs.claim(d, KNOWN_FIGURES["scan"])
    out.append(f'<div class="figrow">{figs.render(main, included=inc.figures)}</div>')
    # per-image maps: maps/<stem>.png, captioned with the image name and layer they show
    captions: dict[Path, str] = {}
    map_paths: list[Path] = []
    stems = unique_stems(report.maps) if report.maps else []
    for m, stem in zip(report.maps, stems):
        for p in figs.claim(d / "maps", [stem]):
            captions[p] = f"{m.image} – block {m.layer}"
            map_paths.append(p)
    map_paths += figs.claim_all(d / "maps")
    if map_paths:
        shown = map_paths[:MAX_MAPS_PER_SCAN]
        more = len(map_paths) - len(shown)
        out.append("<h4>Per-image norm maps</h4>"
                   f'<div class="maps">{figs.render(shown, captions, "fig map", included=inc.figures)}</div>')
        if more > 0:
            out.append(f'<p class="dim">{more} more map(s) in <code>{esc(rel_path(d / "maps", root))}/</code>.</p>')
    inc.headline = report.headline
    inc.title = f"{report.model.name}" + (f" ({report.model.arch})" if report.model.arch else "")
    return "\n".join(out)


def images_source(data: dict[str, Any]) -> str:
    """Where the images came from: ``images.source`` (a summary, from the common header on), or the older files'
    description."""
    images = data.get("images")
    return str(images.get("source", "")) if isinstance(images, dict) else str(images or "")


def compare_section(item: FoundResult, root: Path, figs: FigureEmbedder, inc: IncludedResult) -> str:
    data = item.data
    rows_data = data.get("rows") or []
    rows = []
    for r in rows_data:
        att = r.get("prefix_attention") or {}
        att_s = " ".join(f"{esc(k)}={100 * v:.1f}%" for k, v in att.items() if as_number(v) is not None) or "–"
        bg = r.get("flagged_on_background")
        rows.append([
            esc(r.get("label")), fmt_g(r.get("registers")),
            "–" if r.get("onset_layer") is None else fmt_g(r.get("onset_layer")),
            fmt_pct(r.get("outlier_fraction")), fmt_pct(r.get("image_fraction_with_outliers")),
            fmt_ratio(r.get("max_over_median")), fmt_pct(r.get("peak_outlier_fraction")), att_s,
            fmt_g(r.get("register_norm_mean")), "–" if as_number(bg) is None else f"{100 * bg:.0f}%"])
    classes = ["flagged" if r.get("onset_layer") is not None else "" for r in rows_data]
    verdict = data.get("verdict") if isinstance(data.get("verdict"), str) else text_headline(data)
    out = [f'<p class="meta">{len(rows_data)} model(s) on <code>{esc(images_source(data))}</code></p>',
           verdict_box(verdict, "verdict"),
           html_table(["model", "registers", "onset", "% flagged (last)", "images", "max/median", "peak % flagged",
                   "attention on prefix", "register norm", "flagged on background"], rows, classes,
                  caption="One row per model, last block unless said otherwise."),
           notes_html(data.get("notes"))]
    out.append(f'<div class="figrow">{figs.render(figs.claim(item.path.parent, KNOWN_FIGURES["compare"]), included=inc.figures)}</div>')
    inc.headline = verdict
    inc.title = f"{len(rows_data)} models"
    return "\n".join(out)


def emergence_section(item: FoundResult, root: Path, figs: FigureEmbedder, inc: IncludedResult) -> str:
    data = item.data
    out = [f'<p class="meta">Run <code>{esc(data.get("run_dir"))}</code> on <code>{esc(images_source(data))}</code></p>']
    lines = []
    for g in data.get("groups") or []:
        points = g.get("points") or []
        n = max((len(p.get("outlier_fraction") or []) for p in points), default=0)
        rows = []
        for p in points:
            fr, ra = p.get("outlier_fraction") or [], p.get("max_over_median") or []
            rows.append(["–" if p.get("step") is None else fmt_g(p.get("step")), esc(Path(str(p.get("checkpoint", ""))).name),
                         "–" if p.get("onset_layer") is None else fmt_g(p.get("onset_layer"))]
                        + [f"{fmt_pct(fr[b]) if b < len(fr) else '–'} / {fmt_ratio(ra[b]) if b < len(ra) else '–'}"
                           for b in range(n)])
        regs = g.get("registers")
        out.append(html_table(["step", "checkpoint", "onset"] + [f"block {b}: % / ratio" for b in range(n)], rows,
                          caption=f"{g.get('architecture')} ({regs} registers): % patch tokens flagged / "
                                  "max-over-median norm, per block, over training"))
        if points:
            last = points[-1]
            onset = last.get("onset_layer")
            lines.append(f"{regs} register(s): " + ("no outliers at the last checkpoint" if onset is None
                                                    else f"outliers from block {onset} at the last checkpoint"))
    out.append(notes_html(data.get("notes")))
    out.append(f'<div class="figrow">{figs.render(figs.claim(item.path.parent, KNOWN_FIGURES["emergence"]), included=inc.figures)}</div>')
    inc.headline = text_headline(data) or "; ".join(lines)
    inc.title = Path(str(data.get("run_dir") or item.path.parent)).name
    return "\n".join(out)


def probe_section(item: FoundResult, root: Path, figs: FigureEmbedder, inc: IncludedResult) -> str:
    data = item.data
    verdict = data.get("verdict") if isinstance(data.get("verdict"), dict) else {}
    label = str(verdict.get("label") or "")
    summary = str(verdict.get("summary") or text_headline(data))
    tone = {"artifact-like": "flagged", "content-like": "clean", "clean": "clean",
            "inconclusive": "inconclusive"}.get(label, "")
    out = []
    if isinstance(data.get("model"), dict):
        out.append(model_line(data["model"], data.get("images") if isinstance(data.get("images"), dict) else None))
    out.append(verdict_box(summary, f"verdict: {label}" if label else "verdict", tone))
    if verdict.get("reasons"):
        out.append(notes_html(verdict["reasons"]))
    facts = {k: data.get(k) for k in ("layer", "layer_description", "threshold_mode", "threshold", "num_patch_tokens",
                                      "num_outliers", "outlier_fraction", "images_with_outliers") if k in data}
    if facts:
        out.append(key_table(facts))
    if isinstance(data.get("num_outliers"), int):
        inc.num_outliers = data["num_outliers"]
    rows = data.get("rows")
    if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
        out.append(records_table(rows, caption="Probe metrics per token type", max_cols=16))
    out.append(notes_html(data.get("notes")))
    out.append(f'<div class="figrow">{figs.render(figs.claim(item.path.parent, KNOWN_FIGURES["probe"]), included=inc.figures)}</div>')
    inc.headline = f"{label}: {summary}" if label else summary
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    inc.title = str(model.get("name") or item.path.parent.name)
    return "\n".join(f for f in out if f)


def generic_section(item: FoundResult, root: Path, figs: FigureEmbedder, inc: IncludedResult) -> str:
    """Any valid artifactscan JSON: its headline/verdict if present, the model line, a compact key table, the first
    few lists of records, and the figures that sit next to it."""
    data = item.data
    out = []
    if isinstance(data, dict):
        head = text_headline(data)
        if isinstance(data.get("model"), dict) and data["model"].get("name"):
            out.append(model_line(data["model"], data.get("images") if isinstance(data.get("images"), dict) else None))
        out.append(verdict_box(head, "verdict" if "verdict" in data else "headline"))
        skip = {"headline", "verdict", "summary", "model", "images", "notes", "schema"}
        if isinstance(data.get("verdict"), dict):
            v = data["verdict"]
            out.append(notes_html(v.get("reasons")))
        out.append(key_table(data, skip))
        n = 0
        for k, v in data.items():
            if k in skip or not (isinstance(v, list) and v and all(isinstance(x, dict) for x in v)):
                continue
            out.append(records_table(v, caption=k))
            n += 1
            if n >= 3:
                break
        out.append(notes_html(data.get("notes")))
        inc.headline = head
        model = data.get("model")
        if isinstance(model, dict) and model.get("name"):
            inc.title = f"{model['name']} ({item.path.stem})"
        if isinstance(data.get("num_outliers"), int):
            inc.num_outliers = data["num_outliers"]
    d = item.path.parent
    paths = figs.claim(d, KNOWN_FIGURES.get(item.kind, ())) + figs.claim_prefixed(d, item.path.stem)
    out.append(f'<div class="figrow">{figs.render(paths, included=inc.figures)}</div>')
    return "\n".join(f for f in out if f)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    try:
        for line in read_regular_text(path).splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
    except (OSError, UnicodeDecodeError, NotAFileError):
        pass
    return out


def read_json(path: Path) -> Any:
    try:
        return json.loads(read_regular_text(path))
    except (OSError, UnicodeDecodeError, ValueError, NotAFileError):
        return None


def curve_figure(series: dict[str, list[dict[str, Any]]]) -> str | None:
    """Validation accuracy and training loss over steps, one line per variant, as a PNG data URI."""
    if not any(len(v) >= 2 for v in series.values()):
        return None
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure
    except Exception:
        return None
    fig = Figure(figsize=(7.0, 2.4), layout="constrained")
    ax_l, ax_a = fig.subplots(1, 2)
    for label, recs in series.items():
        steps = [r.get("step") for r in recs]
        for ax, key in ((ax_l, "loss"), (ax_a, "val_acc")):
            pts = [(s, as_number(r.get(key))) for s, r in zip(steps, recs) if as_number(s) is not None]
            pts = [(s, v) for s, v in pts if v is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, linewidth=1.2)
    ax_l.set_title("training loss", fontsize=9)
    ax_a.set_title("validation accuracy", fontsize=9)
    for ax in (ax_l, ax_a):
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, linewidth=0.3, alpha=0.5)
    if len(series) > 1:
        ax_a.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130)
    fig.clear()
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def training_section(item: FoundResult, root: Path, figs: FigureEmbedder, inc: IncludedResult) -> str:
    """A train-reg folder (train_reg.json, variants.json, reg*/metrics.jsonl) or a single training run."""
    d = item.path
    out = []
    series: dict[str, list[dict[str, Any]]] = {}
    if item.kind == "train-reg":
        trained = read_json(existing_run_file(d, VARIANTS_FILE))  # a run written before 0.3: comparison.json
        variants = trained.get("variants") if isinstance(trained, dict) else None
        spec = item.data if isinstance(item.data, dict) else {}
        regs = spec.get("registers")
        out.append(f'<p class="meta">Registers trained: {scalar_html(regs)}'
                   + (f"; baseline from <code>{esc(spec.get('baseline_checkpoint'))}</code>"
                      if spec.get("baseline_checkpoint") else "") + "</p>")
        if isinstance(variants, list) and variants:
            ratios = trained.get("step_time_ratio_vs_reg0") or {}
            rows = []
            for v in variants:
                r = str(v.get("registers"))
                rows.append([fmt_g(v.get("registers")), fmt_pct(v.get("val_acc")), fmt_g(v.get("steps")),
                             fmt_g(v.get("img_per_s"), 3), fmt_g(v.get("wall_s"), 3),
                             fmt_g(ratios.get(r), 3) if isinstance(ratios, dict) else "–",
                             "yes" if v.get("trained") else "no (given)",
                             esc(rel_path(Path(str(v.get("checkpoint"))), d) if v.get("checkpoint") else "–")])
            out.append(html_table(["registers", "val. accuracy", "steps", "img/s", "wall s", "step-time ratio vs 0",
                               "trained", "checkpoint"], rows, caption="One model per register count, same seed "
                                                                       "and batch order.", num_from=0))
            accs = [(v.get("registers"), as_number(v.get("val_acc"))) for v in variants]
            inc.headline = "Trained " + ", ".join(f"{r} registers ({'–' if a is None else f'{100 * a:.1f}%'} val. acc.)"
                                                  for r, a in accs) + "."
        else:
            out.append(f'<p class="warn">No {VARIANTS_FILE} yet: the run has not finished (or was interrupted).</p>')
            inc.headline = f"Train-reg run with registers {regs} (not finished)."
        for sub in sorted(p for p in d.iterdir() if p.is_dir() and (p / "metrics.jsonl").is_file()):
            series[sub.name] = read_jsonl(sub / "metrics.jsonl")
        if (d / "metrics.jsonl").is_file():
            series[d.name] = read_jsonl(d / "metrics.jsonl")
    else:
        series[d.name] = read_jsonl(d / "metrics.jsonl")
        result = read_json(d / "result.json")
        if isinstance(result, dict):
            out.append(key_table(result, skip={"checkpoints", "run_dir"}))
            inc.headline = (f"{fmt_g(result.get('steps'))} steps, validation accuracy {fmt_pct(result.get('val_acc'))}"
                            if "val_acc" in result else "Training run (not finished).")
        else:
            inc.headline = "Training run (no result.json yet)."
    last_rows = []
    for label, recs in series.items():
        if recs:
            r = recs[-1]
            last_rows.append([esc(label), fmt_g(r.get("step")), fmt_g(r.get("loss")), fmt_g(r.get("val_loss")),
                              fmt_pct(r.get("val_acc")), fmt_g(r.get("img_per_s"), 3)])
    if last_rows:
        out.append(html_table(["run", "last step", "train loss", "val. loss", "val. accuracy", "img/s"], last_rows,
                          caption="Last evaluation of each run (metrics.jsonl)."))
    uri = curve_figure(series)
    if uri:
        out.append(f'<div class="figrow"><figure class="fig"><img src="{uri}" alt="training curves">'
                   f"<figcaption>training curves (from metrics.jsonl)</figcaption></figure></div>")
        figs.count += 1
        inc.figures.append(f"{rel_path(d, root)}/metrics.jsonl (curves)")
    config = read_json(d / "config.json")
    if isinstance(config, dict):
        out.append("<details><summary>Training configuration (config.json)</summary>" + key_table(config) + "</details>")
    out.append(f'<div class="figrow">{figs.render(figs.claim_all(d), included=inc.figures)}</div>')
    inc.title = d.name
    return "\n".join(f for f in out if f)
