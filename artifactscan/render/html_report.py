"""One self-contained HTML page for a results folder (``artifactscan report RESULTS_DIR -o report.html``).

The page gathers every artifactscan result found under the folder (searched recursively): norm scans
(``report.json`` with schema ``artifactscan.scan/...``), model comparisons, emergence over training, probe reports,
attention and fix reports, and train-reg run folders. Files are recognised by their ``"schema"`` key (train-reg runs,
which write plain JSON, by their file names), so one folder may hold several results with the same file name. A
result of a kind this module does not know yet is still shown: its headline/verdict if it has one, else a compact
table of its top-level values.

Figures are embedded as base64 data URIs and the styling is inline CSS: the file opens anywhere, offline, needs no
JavaScript and prints like a paper. All text from the results is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

from artifactscan.core.errors import InputError

__all__ = ["HtmlReportSummary", "IncludedResult", "build_html_report", "write_html_report", "collect_results"]

SCHEMA_PREFIX = "artifactscan."
FIGURE_SUFFIXES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}
MAX_FIGURE_BYTES = 8 * 1024 * 1024  # a single figure larger than this is left out (with a warning)
MAX_MAPS_PER_SCAN = 12
MAX_TABLE_ROWS = 40
TRAIN_REG_FILES = ("train_reg.json", "comparison.json", "config.json", "result.json", "worker-config.json")

# The figures each known kind writes next to its JSON (save_scan_figures, save_probe_figures, ...).
KNOWN_FIGURES: dict[str, tuple[str, ...]] = {
    "scan": ("norm_histogram", "layer_norms"),
    "probe": ("probes", "neighbour_similarity"),
    "compare": ("compare",),
    "emergence": ("emergence",),
    "attention": ("attention",),
    "fix": ("fix",),
}
KIND_ORDER = ("compare", "scan", "probe", "attention", "fix", "emergence", "train-reg", "training", "other")
KIND_TITLES = {
    "compare": "Model comparison", "scan": "Norm scan", "probe": "Probe", "attention": "Attention",
    "fix": "Fix", "emergence": "Emergence over training", "train-reg": "Train-reg comparison",
    "training": "Training run", "other": "Result",
}
PHANTOM_BANNER = (
    "Calibration phantom. {which} from the calibration phantom: a small ViT whose high-norm artifact tokens were "
    "built in by construction, so the right answer is known. Its findings check that artifactscan works; they are "
    "not findings about real models."
)


# ----------------------------------------------------------------------------------------------- summary types
@dataclass
class IncludedResult:
    """One section of the page: what kind of result, where it came from, and what went into it."""

    kind: str  # scan / compare / emergence / probe / attention / fix / train-reg / training / other
    path: str  # the JSON file (or run folder), relative to the results folder
    title: str
    headline: str
    schema: str | None = None
    figures: list[str] = field(default_factory=list)  # relative paths of the embedded figures
    phantom: bool = False
    num_outliers: int | None = None


@dataclass
class HtmlReportSummary:
    """What :func:`write_html_report` put on the page (and what it had to leave out)."""

    results_dir: Path
    out_path: Path | None
    headline: str
    results: list[IncludedResult]
    figures: int
    phantom: bool
    warnings: list[str]
    skipped: list[str]  # files that could not be read (relative paths)
    bytes: int = 0

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.results:
            out[r.kind] = out.get(r.kind, 0) + 1
        return out

    def describe(self) -> str:
        parts = [f"{n} {kind}{'s' if n != 1 else ''}" for kind, n in self.counts().items()]
        return f"{len(self.results)} result(s): {', '.join(parts)}; {self.figures} figure(s)"


# ----------------------------------------------------------------------------------------------- small helpers
def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or x is None:
        return None
    if isinstance(x, (int, float)):
        return float(x) if math.isfinite(float(x)) else None
    return None


def _g(x: Any, digits: int = 4) -> str:
    v = _num(x)
    if v is None:
        return "–" if x is None or isinstance(x, (int, float)) else _e(x)
    if isinstance(x, int):
        return f"{x:,}"
    return f"{v:.{digits}g}"


def _pct(x: Any) -> str:
    v = _num(x)
    return "–" if v is None else f"{100 * v:.2f}%"


def _ratio(x: Any) -> str:
    v = _num(x)
    return "–" if v is None else f"{v:.1f}×"


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix() or "."
    except ValueError:
        return path.as_posix()


def _slug(i: int) -> str:
    return f"r{i + 1}"


def _is_phantom_data(data: Any) -> bool:
    """``model.kind == "phantom"`` anywhere a result keeps a model summary (also in nested per-model reports)."""
    if isinstance(data, dict):
        model = data.get("model")
        if isinstance(model, dict) and model.get("kind") == "phantom":
            return True
        for key in ("reports", "models"):
            sub = data.get(key)
            if isinstance(sub, dict) and any(_is_phantom_data(v) for v in sub.values()):
                return True
            if isinstance(sub, list) and any(_is_phantom_data(v) for v in sub):
                return True
    return False


def _text_headline(data: dict[str, Any]) -> str:
    """A one-line statement for any result: ``headline``, ``verdict`` (text, or its summary/label), ``summary``."""
    for key in ("headline", "verdict", "summary", "conclusion", "message"):
        v = data.get(key)
        if isinstance(v, str) and v.strip():
            return v.strip()
        if isinstance(v, dict):
            label = v.get("label") if isinstance(v.get("label"), str) else None
            summary = v.get("summary") if isinstance(v.get("summary"), str) else None
            if summary or label:
                return f"{label}: {summary}" if label and summary else (summary or label)  # type: ignore[return-value]
    return ""


# ----------------------------------------------------------------------------------------------- discovery
@dataclass
class _Found:
    kind: str
    path: Path  # JSON file, or the run folder for train-reg / training
    data: Any
    schema: str | None = None


def _kind_of_schema(schema: str) -> str:
    name = schema[len(SCHEMA_PREFIX):].split("/", 1)[0].split(".", 1)[0].lower()
    return name if name in KNOWN_FIGURES else "other"


def _walk(root: Path) -> Iterable[tuple[Path, list[str]]]:
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        yield Path(dirpath), sorted(f for f in filenames if not f.startswith("."))


def collect_results(results_dir: str | Path, warn: Callable[[str], None] | None = None
                    ) -> tuple[list[_Found], list[str], dict[Path, list[Path]]]:
    """Find every artifactscan result under ``results_dir``.

    Returns ``(results, skipped, figures_by_dir)``; ``skipped`` lists JSON files that could not be read (each also
    reported through ``warn``).
    """
    root = Path(results_dir)
    warn = warn or (lambda msg: None)
    found: list[_Found] = []
    skipped: list[str] = []
    figures: dict[Path, list[Path]] = {}
    run_dirs: set[Path] = set()
    json_files: list[Path] = []
    metrics_dirs: list[Path] = []
    for d, files in _walk(root):
        for name in files:
            p = d / name
            suffix = p.suffix.lower()
            if suffix == ".json":
                json_files.append(p)
            elif suffix in FIGURE_SUFFIXES:
                figures.setdefault(d, []).append(p)
            elif name == "metrics.jsonl":
                metrics_dirs.append(d)
        if "train_reg.json" in files:
            run_dirs.add(d)

    def inside_run(p: Path) -> bool:
        return any(p == r or r in p.parents for r in run_dirs)

    for p in json_files:
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
            warn(f"skipped {_rel(p, root)}: not readable as JSON ({reason})")
            skipped.append(_rel(p, root))
            continue
        schema = data.get("schema") if isinstance(data, dict) else None
        if isinstance(schema, str) and schema.startswith(SCHEMA_PREFIX):
            found.append(_Found(_kind_of_schema(schema), p, data, schema))
        elif p.name == "train_reg.json":
            found.append(_Found("train-reg", p.parent, data))
    # a single training run (train-model) outside any train-reg folder: config.json + metrics.jsonl
    for d in metrics_dirs:
        if not inside_run(d) and (d / "config.json").is_file():
            found.append(_Found("training", d, None))
    return found, skipped, figures


# ----------------------------------------------------------------------------------------------- figures
def _figure_uri(path: Path, warn: Callable[[str], None], root: Path) -> str | None:
    """A data URI for an image file, or None (with a warning) when it is unreadable or not a valid image."""
    try:
        size = path.stat().st_size
        if size > MAX_FIGURE_BYTES:
            warn(f"left out {_rel(path, root)}: {size / 1e6:.1f} MB is too large to embed")
            return None
        raw = path.read_bytes()
    except OSError as exc:
        warn(f"left out {_rel(path, root)}: {exc.strerror or exc}")
        return None
    mime = FIGURE_SUFFIXES[path.suffix.lower()]
    if mime == "image/svg+xml":
        if b"<svg" not in raw[:4096]:
            warn(f"left out {_rel(path, root)}: not an SVG image")
            return None
    else:
        try:
            from PIL import Image

            with Image.open(io.BytesIO(raw)) as im:
                im.verify()
                if Image.MIME.get(im.format or "", "") != mime:
                    mime = Image.MIME.get(im.format or "", mime)
        except Exception as exc:  # a truncated or mislabelled file would show as a broken image
            warn(f"left out {_rel(path, root)}: not a valid image ({type(exc).__name__})")
            return None
    return f"data:{mime};base64,{base64.b64encode(raw).decode('ascii')}"


class _Figures:
    """Hands out each figure file once, to the result it belongs to, and renders ``<figure>`` elements."""

    def __init__(self, root: Path, by_dir: dict[Path, list[Path]], warn: Callable[[str], None]):
        self.root = root
        self.by_dir = {d: list(v) for d, v in by_dir.items()}
        self.warn = warn
        self.used: set[Path] = set()
        self.count = 0

    def claim(self, d: Path, stems: Iterable[str]) -> list[Path]:
        wanted = list(stems)
        out = []
        for stem in wanted:
            for p in self.by_dir.get(d, []):
                if p not in self.used and p.stem == stem:
                    self.used.add(p)
                    out.append(p)
        return out

    def claim_prefixed(self, d: Path, prefix: str) -> list[Path]:
        out = [p for p in self.by_dir.get(d, []) if p not in self.used and p.stem.startswith(prefix)]
        self.used.update(out)
        return out

    def claim_all(self, d: Path) -> list[Path]:
        out = [p for p in self.by_dir.get(d, []) if p not in self.used]
        self.used.update(out)
        return out

    def leftovers(self) -> dict[Path, list[Path]]:
        out = {}
        for d, paths in sorted(self.by_dir.items()):
            rest = [p for p in paths if p not in self.used]
            if rest:
                out[d] = rest
        return out

    def render(self, paths: list[Path], captions: dict[Path, str] | None = None, cls: str = "fig",
               included: list[str] | None = None) -> str:
        parts = []
        for p in paths:
            uri = _figure_uri(p, self.warn, self.root)
            if uri is None:
                continue
            rel = _rel(p, self.root)
            cap = (captions or {}).get(p)
            text = f'{_e(cap)} <span class="path">{_e(rel)}</span>' if cap else f'<span class="path">{_e(rel)}</span>'
            parts.append(f'<figure class="{cls}"><img src="{uri}" alt="{_e(cap or p.name)}">'
                         f"<figcaption>{text}</figcaption></figure>")
            self.count += 1
            if included is not None:
                included.append(rel)
        return "\n".join(parts)


# ----------------------------------------------------------------------------------------------- tables
def _table(headers: list[str], rows: list[list[str]], row_classes: list[str] | None = None, num_from: int = 1,
           caption: str | None = None) -> str:
    """``rows`` hold already-escaped cell HTML. Columns from ``num_from`` on are right-aligned (numbers)."""
    num = ' class="num"'
    head = "".join(f"<th{num if i >= num_from else ''}>{_e(h)}</th>" for i, h in enumerate(headers))
    body = []
    for j, row in enumerate(rows):
        cls = (row_classes or [""] * len(rows))[j]
        cells = "".join(f"<td{num if i >= num_from else ''}>{c}</td>" for i, c in enumerate(row))
        tr = f'<tr class="{cls}">' if cls else "<tr>"
        body.append(f"{tr}{cells}</tr>")
    cap = f"<caption>{_e(caption)}</caption>" if caption else ""
    return (f'<div class="tablewrap"><table>{cap}<thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)) or v is None:
        return _g(v)
    if isinstance(v, str):
        return _e(v if len(v) <= 300 else v[:300] + "…")
    if isinstance(v, list):
        if all(not isinstance(x, (dict, list)) for x in v) and len(v) <= 12:
            return ", ".join(_scalar(x) for x in v) or "–"
        return f'<span class="dim">[{len(v)} items]</span>'
    if isinstance(v, dict):
        return f'<span class="dim">{{{len(v)} keys}}</span>'
    return _e(v)


def _key_table(data: dict[str, Any], skip: Iterable[str] = ()) -> str:
    skip = set(skip)
    rows = [[_e(k), _scalar(v)] for k, v in data.items()
            if k not in skip and not (isinstance(v, list) and v and all(isinstance(x, dict) for x in v))]
    if not rows:
        return ""
    return f'<table class="keys"><tbody>{"".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)}</tbody></table>'


def _records_table(records: list[dict[str, Any]], caption: str | None = None, max_cols: int = 12) -> str:
    cols: list[str] = []
    for r in records[:MAX_TABLE_ROWS]:
        for k, v in r.items():
            if k not in cols and not isinstance(v, (dict, list)):
                cols.append(k)
    cols = cols[:max_cols]
    if not cols:
        return ""
    rows = [[_scalar(r.get(c)) for c in cols] for r in records[:MAX_TABLE_ROWS]]
    more = len(records) - MAX_TABLE_ROWS
    out = _table(cols, rows, caption=caption)
    if more > 0:
        out += f'<p class="dim">… and {more} more rows (see the JSON file).</p>'
    return out


def _notes(notes: Any) -> str:
    if not isinstance(notes, list) or not notes:
        return ""
    return '<ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>"


def _verdict_box(text: str, label: str = "verdict", tone: str = "") -> str:
    if not text:
        return ""
    return f'<div class="verdict {tone}"><span class="label">{_e(label)}</span> {_e(text)}</div>'


# ----------------------------------------------------------------------------------------------- sections
def _model_line(model: dict[str, Any], images: dict[str, Any] | None) -> str:
    bits = [f"<b>{_e(model.get('name'))}</b>"]
    if model.get("arch"):
        bits.append(f"({_e(model.get('arch'))})")
    facts = []
    if model.get("num_blocks") is not None:
        facts.append(f"{_e(model.get('num_blocks'))} blocks")
    if "num_prefix_tokens" in model:
        facts.append(_e(f"{model.get('num_cls_tokens', 0)} CLS + {model.get('num_register_tokens', 0)} register tokens"
                        if model.get("num_prefix_tokens") else "no prefix tokens"))
    grid = model.get("grid_size") or []
    if isinstance(grid, list) and len(grid) == 2:
        facts.append(f"{_e(grid[0])}×{_e(grid[1])} patches")
    if facts:
        bits.append("– " + ", ".join(facts))
    if images and images.get("num_scanned") is not None:
        bits.append(f"– {_g(images.get('num_scanned'))} images from <code>{_e(images.get('source'))}</code>")
    return f'<p class="meta">{" ".join(bits)}</p>'


def _scan_section(item: _Found, root: Path, figs: _Figures, inc: IncludedResult) -> str:
    from artifactscan.render.style import unique_stems
    from artifactscan.analysis.scan import ScanReport

    data = item.data
    report = ScanReport.from_dict(data)  # raises on a malformed report -> generic fallback
    n_images = report.images.num_scanned
    out = [_model_line(data.get("model") or {}, data.get("images"))]
    out.append(_verdict_box(report.headline, "headline", "flagged" if report.onset_layer is not None else "clean"))
    rows, classes = [], []
    for lay in report.layers:
        rows.append([
            _e(lay.name), _g(lay.median), _g(lay.p99), _g(lay.max), _ratio(lay.max_over_median),
            "–" if lay.threshold is None or not math.isfinite(lay.threshold) else _g(lay.threshold),
            _pct(lay.outlier_fraction), _g(lay.num_outliers), f"{lay.images_with_outliers}/{n_images}",
            _pct(lay.fraction_above_150)])
        classes.append("flagged" if lay.num_outliers > 0 else ("final" if lay.is_final_norm else ""))
    out.append(_table(["layer", "median", "p99", "max", "max/median", "threshold", "% flagged", "outliers",
                       "images with outliers", "> 150"], rows, classes,
                      caption="Patch-token L2 norms per layer (flagged layers in red; the last row is the final "
                              "LayerNorm output when captured)."))
    n_out = len(report.outliers)
    inc.num_outliers = n_out
    complete = "" if report.outlier_records_complete else " (records incomplete)"
    onset = "none" if report.onset_layer is None else f"block {report.onset_layer}"
    out.append(f'<p class="facts"><b>Outlier tokens recorded:</b> {n_out:,}{_e(complete)} · '
               f'<b>onset:</b> {_e(onset)} · <b>threshold:</b> {_e(report.threshold_mode)}</p>')
    if report.outliers:
        top = sorted(report.outliers, key=lambda o: -o.norm)[:10]
        out.append("<details open><summary>Largest outlier tokens</summary>" + _table(
            ["image", "layer", "row", "col", "norm"],
            [[_e(o.image), _g(o.layer), _g(o.row), _g(o.col), _g(o.norm)] for o in top], num_from=1) + "</details>")
    if report.images.skipped:
        out.append(f'<p class="warn">{len(report.images.skipped)} unreadable image(s) skipped: '
                   + ", ".join(_e(getattr(s, "path", s)) for s in report.images.skipped[:10]) + "</p>")
    out.append(_notes(report.notes))
    if report.threshold_rule:
        out.append(f'<p class="dim small">Threshold rule – {_e(report.threshold_rule)}</p>')
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
            out.append(f'<p class="dim">{more} more map(s) in <code>{_e(_rel(d / "maps", root))}/</code>.</p>')
    inc.headline = report.headline
    inc.title = f"{report.model.name}" + (f" ({report.model.arch})" if report.model.arch else "")
    return "\n".join(out)


def _compare_section(item: _Found, root: Path, figs: _Figures, inc: IncludedResult) -> str:
    data = item.data
    rows_data = data.get("rows") or []
    rows = []
    for r in rows_data:
        att = r.get("prefix_attention") or {}
        att_s = " ".join(f"{_e(k)}={100 * v:.1f}%" for k, v in att.items() if _num(v) is not None) or "–"
        bg = r.get("flagged_on_background")
        rows.append([
            _e(r.get("label")), _g(r.get("registers")),
            "–" if r.get("onset_layer") is None else _g(r.get("onset_layer")),
            _pct(r.get("outlier_fraction")), _pct(r.get("image_fraction_with_outliers")),
            _ratio(r.get("max_over_median")), _pct(r.get("peak_outlier_fraction")), att_s,
            _g(r.get("register_norm_mean")), "–" if _num(bg) is None else f"{100 * bg:.0f}%"])
    classes = ["flagged" if r.get("onset_layer") is not None else "" for r in rows_data]
    verdict = data.get("verdict") if isinstance(data.get("verdict"), str) else _text_headline(data)
    out = [f'<p class="meta">{len(rows_data)} model(s) on <code>{_e(data.get("images"))}</code></p>',
           _verdict_box(verdict, "verdict"),
           _table(["model", "registers", "onset", "% flagged (last)", "images", "max/median", "peak % flagged",
                   "attention on prefix", "register norm", "flagged on background"], rows, classes,
                  caption="One row per model, last block unless said otherwise."),
           _notes(data.get("notes"))]
    out.append(f'<div class="figrow">{figs.render(figs.claim(item.path.parent, KNOWN_FIGURES["compare"]), included=inc.figures)}</div>')
    inc.headline = verdict
    inc.title = f"{len(rows_data)} models"
    return "\n".join(out)


def _emergence_section(item: _Found, root: Path, figs: _Figures, inc: IncludedResult) -> str:
    data = item.data
    out = [f'<p class="meta">Run <code>{_e(data.get("run_dir"))}</code> on <code>{_e(data.get("images"))}</code></p>']
    lines = []
    for g in data.get("groups") or []:
        points = g.get("points") or []
        n = max((len(p.get("outlier_fraction") or []) for p in points), default=0)
        rows = []
        for p in points:
            fr, ra = p.get("outlier_fraction") or [], p.get("max_over_median") or []
            rows.append(["–" if p.get("step") is None else _g(p.get("step")), _e(Path(str(p.get("checkpoint", ""))).name),
                         "–" if p.get("onset_layer") is None else _g(p.get("onset_layer"))]
                        + [f"{_pct(fr[b]) if b < len(fr) else '–'} / {_ratio(ra[b]) if b < len(ra) else '–'}"
                           for b in range(n)])
        regs = g.get("registers")
        out.append(_table(["step", "checkpoint", "onset"] + [f"block {b}: % / ratio" for b in range(n)], rows,
                          caption=f"{g.get('architecture')} ({regs} registers): % patch tokens flagged / "
                                  "max-over-median norm, per block, over training"))
        if points:
            last = points[-1]
            onset = last.get("onset_layer")
            lines.append(f"{regs} register(s): " + ("no outliers at the last checkpoint" if onset is None
                                                    else f"outliers from block {onset} at the last checkpoint"))
    out.append(_notes(data.get("notes")))
    out.append(f'<div class="figrow">{figs.render(figs.claim(item.path.parent, KNOWN_FIGURES["emergence"]), included=inc.figures)}</div>')
    inc.headline = _text_headline(data) or "; ".join(lines)
    inc.title = Path(str(data.get("run_dir") or item.path.parent)).name
    return "\n".join(out)


def _probe_section(item: _Found, root: Path, figs: _Figures, inc: IncludedResult) -> str:
    data = item.data
    verdict = data.get("verdict") if isinstance(data.get("verdict"), dict) else {}
    label = str(verdict.get("label") or "")
    summary = str(verdict.get("summary") or _text_headline(data))
    tone = {"artifact-like": "flagged", "content-like": "clean", "clean": "clean"}.get(label, "")
    out = []
    if isinstance(data.get("model"), dict):
        out.append(_model_line(data["model"], data.get("images") if isinstance(data.get("images"), dict) else None))
    out.append(_verdict_box(summary, f"verdict: {label}" if label else "verdict", tone))
    if verdict.get("reasons"):
        out.append(_notes(verdict["reasons"]))
    facts = {k: data.get(k) for k in ("layer", "layer_description", "threshold_mode", "threshold", "num_patch_tokens",
                                      "num_outliers", "outlier_fraction", "images_with_outliers") if k in data}
    if facts:
        out.append(_key_table(facts))
    if isinstance(data.get("num_outliers"), int):
        inc.num_outliers = data["num_outliers"]
    rows = data.get("rows")
    if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
        out.append(_records_table(rows, caption="Probe metrics per token type", max_cols=16))
    out.append(_notes(data.get("notes")))
    out.append(f'<div class="figrow">{figs.render(figs.claim(item.path.parent, KNOWN_FIGURES["probe"]), included=inc.figures)}</div>')
    inc.headline = f"{label}: {summary}" if label else summary
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    inc.title = str(model.get("name") or item.path.parent.name)
    return "\n".join(f for f in out if f)


def _generic_section(item: _Found, root: Path, figs: _Figures, inc: IncludedResult) -> str:
    """Any valid artifactscan JSON: its headline/verdict if present, the model line, a compact key table, the first
    few lists of records, and the figures that sit next to it."""
    data = item.data
    out = []
    if isinstance(data, dict):
        head = _text_headline(data)
        if isinstance(data.get("model"), dict) and data["model"].get("name"):
            out.append(_model_line(data["model"], data.get("images") if isinstance(data.get("images"), dict) else None))
        out.append(_verdict_box(head, "verdict" if "verdict" in data else "headline"))
        skip = {"headline", "verdict", "summary", "model", "images", "notes", "schema"}
        if isinstance(data.get("verdict"), dict):
            v = data["verdict"]
            out.append(_notes(v.get("reasons")))
        out.append(_key_table(data, skip))
        n = 0
        for k, v in data.items():
            if k in skip or not (isinstance(v, list) and v and all(isinstance(x, dict) for x in v)):
                continue
            out.append(_records_table(v, caption=k))
            n += 1
            if n >= 3:
                break
        out.append(_notes(data.get("notes")))
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


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
    except (OSError, UnicodeDecodeError):
        pass
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _curve_figure(series: dict[str, list[dict[str, Any]]]) -> str | None:
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
            pts = [(s, _num(r.get(key))) for s, r in zip(steps, recs) if _num(s) is not None]
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


def _training_section(item: _Found, root: Path, figs: _Figures, inc: IncludedResult) -> str:
    """A train-reg folder (train_reg.json, comparison.json, reg*/metrics.jsonl) or a single training run."""
    d = item.path
    out = []
    series: dict[str, list[dict[str, Any]]] = {}
    if item.kind == "train-reg":
        comparison = _read_json(d / "comparison.json")
        variants = comparison.get("variants") if isinstance(comparison, dict) else None
        spec = item.data if isinstance(item.data, dict) else {}
        regs = spec.get("registers")
        out.append(f'<p class="meta">Registers trained: {_scalar(regs)}'
                   + (f"; baseline from <code>{_e(spec.get('baseline_checkpoint'))}</code>"
                      if spec.get("baseline_checkpoint") else "") + "</p>")
        if isinstance(variants, list) and variants:
            ratios = comparison.get("step_time_ratio_vs_reg0") or {}
            rows = []
            for v in variants:
                r = str(v.get("registers"))
                rows.append([_g(v.get("registers")), _pct(v.get("val_acc")), _g(v.get("steps")),
                             _g(v.get("img_per_s"), 3), _g(v.get("wall_s"), 3),
                             _g(ratios.get(r), 3) if isinstance(ratios, dict) else "–",
                             "yes" if v.get("trained") else "no (given)",
                             _e(_rel(Path(str(v.get("checkpoint"))), d) if v.get("checkpoint") else "–")])
            out.append(_table(["registers", "val. accuracy", "steps", "img/s", "wall s", "step-time ratio vs 0",
                               "trained", "checkpoint"], rows, caption="One model per register count, same seed "
                                                                       "and batch order.", num_from=0))
            accs = [(v.get("registers"), _num(v.get("val_acc"))) for v in variants]
            inc.headline = "Trained " + ", ".join(f"{r} registers ({'–' if a is None else f'{100 * a:.1f}%'} val. acc.)"
                                                  for r, a in accs) + "."
        else:
            out.append('<p class="warn">No comparison.json yet: the run has not finished (or was interrupted).</p>')
            inc.headline = f"Train-reg run with registers {regs} (not finished)."
        for sub in sorted(p for p in d.iterdir() if p.is_dir() and (p / "metrics.jsonl").is_file()):
            series[sub.name] = _read_jsonl(sub / "metrics.jsonl")
        if (d / "metrics.jsonl").is_file():
            series[d.name] = _read_jsonl(d / "metrics.jsonl")
    else:
        series[d.name] = _read_jsonl(d / "metrics.jsonl")
        result = _read_json(d / "result.json")
        if isinstance(result, dict):
            out.append(_key_table(result, skip={"checkpoints", "run_dir"}))
            inc.headline = (f"{_g(result.get('steps'))} steps, validation accuracy {_pct(result.get('val_acc'))}"
                            if "val_acc" in result else "Training run (not finished).")
        else:
            inc.headline = "Training run (no result.json yet)."
    last_rows = []
    for label, recs in series.items():
        if recs:
            r = recs[-1]
            last_rows.append([_e(label), _g(r.get("step")), _g(r.get("loss")), _g(r.get("val_loss")),
                              _pct(r.get("val_acc")), _g(r.get("img_per_s"), 3)])
    if last_rows:
        out.append(_table(["run", "last step", "train loss", "val. loss", "val. accuracy", "img/s"], last_rows,
                          caption="Last evaluation of each run (metrics.jsonl)."))
    uri = _curve_figure(series)
    if uri:
        out.append(f'<div class="figrow"><figure class="fig"><img src="{uri}" alt="training curves">'
                   f"<figcaption>training curves (from metrics.jsonl)</figcaption></figure></div>")
        figs.count += 1
        inc.figures.append(f"{_rel(d, root)}/metrics.jsonl (curves)")
    config = _read_json(d / "config.json")
    if isinstance(config, dict):
        out.append("<details><summary>Training configuration (config.json)</summary>" + _key_table(config) + "</details>")
    out.append(f'<div class="figrow">{figs.render(figs.claim_all(d), included=inc.figures)}</div>')
    inc.title = d.name
    return "\n".join(f for f in out if f)


_RENDERERS: dict[str, Callable[[_Found, Path, _Figures, IncludedResult], str]] = {
    "scan": _scan_section, "compare": _compare_section, "emergence": _emergence_section, "probe": _probe_section,
    "train-reg": _training_section, "training": _training_section,
}


# ----------------------------------------------------------------------------------------------- page
_CSS = """
:root { --ink: #1b1b1b; --dim: #666; --rule: #222; --thin: #bbb; --red: #a4161a; --redbg: #fbeaea;
        --green: #1d5e2f; --greenbg: #edf6ef; --warnbg: #fff4d6; --warn: #7a5200; }
* { box-sizing: border-box; }
html { background: #f4f3ef; }
body { font-family: "Charter", "Bitstream Charter", "Georgia", "Cambria", "Times New Roman", serif; color: var(--ink);
       line-height: 1.45; font-size: 16px; max-width: 62rem; margin: 1.5rem auto; padding: 2.2rem 2.6rem;
       background: #fff; box-shadow: 0 1px 4px rgba(0,0,0,.12); }
h1 { font-size: 1.7rem; margin: 0 0 .2rem; font-weight: 600; }
h2 { font-size: 1.3rem; margin: 2.2rem 0 .4rem; padding-top: .6rem; border-top: 2px solid var(--rule); }
h2 .kind { font-variant: small-caps; letter-spacing: .04em; color: var(--dim); font-weight: normal; margin-right: .4rem; }
h3 { font-size: 1.05rem; margin: 1.2rem 0 .3rem; }
h4 { font-size: .98rem; margin: 1rem 0 .3rem; font-style: italic; font-weight: normal; }
p { margin: .4rem 0; }
code, .path { font-family: "DejaVu Sans Mono", "Menlo", "Consolas", monospace; font-size: .82em; overflow-wrap: anywhere; }
.subtitle { color: var(--dim); margin: 0 0 1rem; font-size: .92rem; overflow-wrap: anywhere; }
.meta { color: #333; overflow-wrap: anywhere; }
.dim { color: var(--dim); }
.small { font-size: .85rem; }
.banner { border: 3px solid var(--red); background: var(--redbg); color: #5c0b0e; padding: .8rem 1rem;
          margin: 1rem 0; font-size: 1.02rem; }
.banner b { color: var(--red); font-size: 1.05rem; letter-spacing: .02em; }
.badge { display: inline-block; font-family: sans-serif; font-size: .68rem; font-weight: bold; letter-spacing: .05em;
         text-transform: uppercase; color: #fff; background: var(--red); border-radius: 3px; padding: .1rem .35rem;
         vertical-align: middle; margin-left: .4rem; }
.lead { border-left: 5px solid var(--rule); background: #f7f7f5; padding: .7rem 1rem; margin: 1rem 0; font-size: 1.08rem; }
.lead .label, .verdict .label { display: block; font-family: sans-serif; font-size: .7rem; font-weight: bold;
         letter-spacing: .08em; text-transform: uppercase; color: var(--dim); margin-bottom: .15rem; }
.lead .from { text-transform: none; letter-spacing: 0; font-weight: normal; }
.verdict { border-left: 4px solid #888; background: #f7f7f5; padding: .5rem .8rem; margin: .6rem 0; }
.verdict.flagged { border-color: var(--red); background: var(--redbg); }
.verdict.clean { border-color: var(--green); background: var(--greenbg); }
.warn { background: var(--warnbg); color: var(--warn); padding: .3rem .6rem; }
.tablewrap { overflow-x: auto; margin: .6rem 0 .8rem; }
table { border-collapse: collapse; font-size: .86rem; font-variant-numeric: tabular-nums; }
table caption { caption-side: bottom; text-align: left; font-size: .8rem; color: var(--dim); padding-top: .3rem; }
thead tr { border-top: 2px solid var(--rule); border-bottom: 1px solid var(--rule); }
tbody tr:last-child { border-bottom: 2px solid var(--rule); }
th { font-weight: 600; text-align: left; padding: .25rem .55rem; white-space: nowrap; }
td { padding: .18rem .55rem; vertical-align: top; overflow-wrap: anywhere; }
td.num { text-align: right; white-space: nowrap; }
th.num { text-align: right; white-space: normal; vertical-align: bottom; min-width: 3.5em; }
thead th { vertical-align: bottom; }
tr.flagged td { color: var(--red); font-weight: 600; }
tr.final td { color: var(--dim); font-style: italic; }
table.keys { margin: .5rem 0; }
table.keys th { color: #333; font-weight: 600; vertical-align: top; border: none; }
table.keys tr { border: none; }
table.keys tbody tr:last-child { border-bottom: 1px solid var(--thin); }
table.keys tbody tr:first-child { border-top: 1px solid var(--thin); }
.facts { font-size: .92rem; }
ul.notes { font-size: .9rem; color: #333; margin: .4rem 0; padding-left: 1.3rem; }
details { margin: .5rem 0; }
summary { cursor: pointer; font-style: italic; }
.figrow { display: flex; flex-wrap: wrap; gap: 1rem; align-items: flex-start; margin: .6rem 0; }
.figrow:empty { display: none; }
figure { margin: 0; }
figure.fig { flex: 1 1 26rem; max-width: 100%; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid #e4e4e4; background: #fff; }
figcaption { font-size: .78rem; color: var(--dim); margin-top: .2rem; overflow-wrap: anywhere; }
figcaption .path { display: block; font-size: .72rem; color: #999; }
.maps { display: grid; grid-template-columns: repeat(auto-fill, minmax(14rem, 1fr)); gap: .8rem; }
.maps figure.fig { flex: none; }
nav.toc table { width: 100%; }
nav.toc td:nth-child(3) { font-size: .82rem; color: #333; }
nav.toc a { color: inherit; }
footer { margin-top: 2.5rem; border-top: 1px solid var(--thin); padding-top: .5rem; font-size: .8rem; color: var(--dim); }
@media print {
  html { background: #fff; }
  body { box-shadow: none; margin: 0; padding: 0; max-width: none; font-size: 11pt; }
  figure, table, .banner, .verdict { break-inside: avoid; page-break-inside: avoid; }
  h2 { break-after: avoid; page-break-after: avoid; }
  details > summary { display: none; }
  details { display: block; }
  a { color: inherit; text-decoration: none; }
  .banner, .verdict, tr.flagged td { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
}
"""


def _build(results_dir: str | Path, warn: Callable[[str], None] | None = None) -> tuple[str, HtmlReportSummary]:
    root = Path(results_dir).expanduser()
    warnings: list[str] = []

    def _warn(msg: str) -> None:
        warnings.append(msg)
        if warn is not None:
            warn(msg)

    if not root.exists():
        raise InputError(f"results folder {root} does not exist; pass the folder given to "
                         "`artifactscan norms ... --out DIR` (or compare/probe --out)")
    if not root.is_dir():
        raise InputError(f"{root} is a file, not a results folder; pass the folder that holds it "
                         f"(e.g. `artifactscan report {root.parent}`)")
    try:
        found, skipped, by_dir = collect_results(root, _warn)
    except OSError as exc:
        raise InputError(f"cannot read results folder {root}: {exc.strerror or exc}") from None
    if not found:
        extra = f" ({len(skipped)} unreadable JSON file(s) skipped)" if skipped else ""
        raise InputError(f"nothing to report: {root} holds no artifactscan results{extra}; run "
                         f"`artifactscan norms MODEL IMAGES --out {root}` first (or compare/probe/train-reg --out)")
    found.sort(key=lambda f: (KIND_ORDER.index(f.kind) if f.kind in KIND_ORDER else len(KIND_ORDER),
                              _rel(f.path, root)))
    figs = _Figures(root, by_dir, _warn)
    sections: list[str] = []
    included: list[IncludedResult] = []
    for i, item in enumerate(found):
        rel = _rel(item.path, root)
        inc = IncludedResult(kind=item.kind, path=rel, title=rel, headline="", schema=item.schema,
                             phantom=_is_phantom_data(item.data))
        renderer = _RENDERERS.get(item.kind, _generic_section)
        try:
            body = renderer(item, root, figs, inc)
        except Exception as exc:  # a malformed or newer-version file: still show what it holds
            if renderer is _generic_section:
                raise
            _warn(f"{rel}: could not read it as a {item.kind} result ({type(exc).__name__}: {exc}); shown as raw values")
            inc.figures.clear()
            body = _generic_section(item, root, figs, inc)
        badge = '<span class="badge">calibration phantom</span>' if inc.phantom else ""
        schema = f" · schema <code>{_e(item.schema)}</code>" if item.schema else ""
        sections.append(
            f'<section id="{_slug(i)}"><h2><span class="kind">{_e(KIND_TITLES.get(item.kind, item.kind))}</span>'
            f"{_e(inc.title)}{badge}</h2>"
            f'<p class="subtitle"><code>{_e(rel)}</code>{schema}</p>\n{body}</section>')
        included.append(inc)

    # figures nobody claimed (e.g. a new kind's extra plots): shown at the end, by folder
    leftovers = figs.leftovers()
    if leftovers:
        parts = ['<section id="other-figures"><h2><span class="kind">Other figures</span>found in the results '
                 "folder</h2>"]
        for d, paths in leftovers.items():
            parts.append(f"<h4><code>{_e(_rel(d, root))}/</code></h4>"
                         f'<div class="maps">{figs.render(paths, cls="fig map")}</div>')
        sections.append("\n".join(parts) + "</section>")

    # the page's headline: a comparison's verdict, else the first scan's headline, else any result's; results on a
    # real model before those on the calibration phantom
    ranked = sorted((r for r in included if r.headline), key=lambda r: r.phantom)
    lead_item = (next((r for r in ranked if r.kind == "compare"), None)
                 or next((r for r in ranked if r.kind == "scan"), None)
                 or next(iter(ranked), None))
    lead = lead_item.headline if lead_item else ""
    lead_from = ""
    if lead_item is not None and len(included) > 1:
        lead_from = f' <span class="from">from <code>{_e(lead_item.path)}</code></span>'
    if lead_item is not None and lead_item.phantom:
        lead_from += ' <span class="badge">calibration phantom</span>'
    phantoms = [r for r in included if r.phantom]
    banner = ""
    if phantoms:
        which = ("This result is" if len(included) == 1 else
                 "Every result here is" if len(phantoms) == len(included) else
                 f"{len(phantoms)} of the {len(included)} results here are")
        banner = f'<div class="banner" role="alert"><b>⚠ {_e(PHANTOM_BANNER.format(which=which))}</b>'
        notes = {(r.get("model") or {}).get("calibration_note") for r in (f.data for f in found)
                 if isinstance(r, dict) and isinstance(r.get("model"), dict)}
        notes.discard(None)
        if notes:
            banner += "".join(f'<br><span class="small">{_e(n)}</span>' for n in sorted(notes))
        banner += "</div>"
    phantom_badge = ' <span class="badge">phantom</span>'
    toc_rows = [[f'<a href="#{_slug(i)}">{_e(KIND_TITLES.get(r.kind, r.kind))}</a>',
                 f"{_e(r.title)}{phantom_badge if r.phantom else ''}"
                 f'<br><span class="path">{_e(r.path)}</span>',
                 _e(r.headline if len(r.headline) <= 260 else r.headline[:260] + "…") or '<span class="dim">–</span>']
                for i, r in enumerate(included)]
    toc = ('<nav class="toc"><h3>Contents</h3>'
           + _table(["kind", "result", "headline"], toc_rows, num_from=99) + "</nav>")
    skipped_html = ""
    if warnings:
        skipped_html = ('<details class="warn"><summary>' + f"{len(warnings)} warning(s) while building this page"
                        + "</summary><ul>" + "".join(f"<li>{_e(w)}</li>" for w in warnings) + "</ul></details>")
    from artifactscan import __version__

    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = f"artifactscan report – {root.resolve().name}"
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="artifactscan {_e(__version__)}">
<title>{_e(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<header>
<h1>High-norm artifact tokens: results</h1>
<p class="subtitle">Results folder <code>{_e(root.resolve())}</code> · {len(included)} result(s), {figs.count} figure(s)
· built {_e(now)} by artifactscan {_e(__version__)}</p>
</header>
{banner}
<div class="lead"><span class="label">headline{lead_from}</span>{_e(lead) or '<span class="dim">no headline in these results</span>'}</div>
{skipped_html}
{toc}
{''.join(sections)}
<footer>Method: Darcet, Oquab, Mairal &amp; Bojanowski, “Vision Transformers Need Registers”, ICLR 2024. A high norm alone
does not prove an artifact: content tokens can be large too; the probe results test the paper's other signatures.
This page is self-contained: figures are embedded and it needs no network or scripts.</footer>
</body>
</html>
"""
    summary = HtmlReportSummary(results_dir=root, out_path=None, headline=lead, results=included, figures=figs.count,
                                phantom=bool(phantoms), warnings=warnings, skipped=skipped)
    return page, summary


def build_html_report(results_dir: str | Path, warn: Callable[[str], None] | None = None) -> str:
    """The HTML page for every artifactscan result under ``results_dir`` (searched recursively).

    Raises :class:`InputError` when the folder is missing or holds no artifactscan results. Unreadable JSON files and
    figures are skipped; each is reported through ``warn`` (and listed on the page).
    """
    return _build(results_dir, warn)[0]


def write_html_report(results_dir: str | Path, out_path: str | Path | None = None,
                      warn: Callable[[str], None] | None = None) -> HtmlReportSummary:
    """Build the page and write it to ``out_path`` (default ``RESULTS_DIR/report.html``; an existing folder gets
    ``report.html`` inside it; missing parent folders are created). Returns what went into it."""
    root = Path(results_dir).expanduser()
    out = root / "report.html" if out_path is None else Path(out_path).expanduser()
    if out.is_dir():
        out = out / "report.html"
    page, summary = _build(root, warn)
    from artifactscan.core.results import atomic_write_text

    blocker = next((a for a in out.parents if a.exists() and not a.is_dir()), None)
    if blocker is not None:
        raise InputError(f"cannot write the report to {out}: {blocker} is a file, not a folder; choose another -o path")

    try:
        atomic_write_text(out, page)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise InputError(f"cannot write the report to {out}: {reason}; choose another -o path") from None
    try:
        os.chmod(out, 0o644)  # mkstemp made it private; a report is meant to be shared
    except OSError:
        pass
    summary.out_path = out
    summary.bytes = len(page.encode("utf-8"))
    return summary
