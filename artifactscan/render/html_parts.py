"""The HTML report's building blocks: what it found (discovery of result files), summary types, escaping and
number formatting, embedded figures and tables."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from artifactscan.core.errors import InputError, NotAFileError
from artifactscan.core.paths import path_kind, read_regular_bytes, read_regular_text
from artifactscan.core.results import JsonResult
from artifactscan.analysis.run_files import OLD_NAMES, VARIANTS_FILE, shadowed_by_new_name
from artifactscan.analysis.monitor_records import MONITOR_FILE, read_monitor

SCHEMA_PREFIX = "artifactscan."
FIGURE_SUFFIXES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}
MAX_FIGURE_BYTES = 8 * 1024 * 1024  # a single figure larger than this is left out (with a warning)
MAX_MAPS_PER_SCAN = 12
MAX_TABLE_ROWS = 40
TRAIN_REG_FILES = ("train_reg.json", VARIANTS_FILE, OLD_NAMES[VARIANTS_FILE], "config.json", "result.json",
                   "worker-config.json")

# The figures each known kind writes next to its JSON (save_scan_figures, save_probe_figures, ...).
KNOWN_FIGURES: dict[str, tuple[str, ...]] = {
    "scan": ("norm_histogram", "layer_norms"),
    "probe": ("probes", "neighbour_similarity"),
    "compare": ("compare",),
    "emergence": ("emergence",),
    "attention": ("attention",),
    "fix": ("fix",),
    "discover": ("discover",),
    "calibration": ("calibration",),
    "monitor": ("monitor",),
    "signatures": ("signatures",),
}
KIND_ORDER = ("compare", "scan", "probe", "attention", "fix", "discover", "signatures", "calibration", "emergence",
              "monitor", "train-reg", "training", "other")
KIND_TITLES = {
    "compare": "Model comparison", "scan": "Norm scan", "probe": "Probe", "attention": "Attention",
    "fix": "Fix", "discover": "Object discovery", "emergence": "Emergence over training",
    "monitor": "Artifact monitor (during training)", "signatures": "Artifact signatures",
    "train-reg": "Train-reg comparison", "training": "Training run", "calibration": "Detection limit",
    "other": "Result",
}


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
class HtmlReportSummary(JsonResult):
    """What :func:`write_html_report` put on the page (and what it had to leave out); ``report --json`` prints it."""

    results_dir: Path
    out_path: Path | None
    headline: str
    results: list[IncludedResult]
    figures: int
    phantom: bool
    warnings: list[str]
    skipped: list[str]  # files that could not be read (relative paths)
    bytes: int = 0
    schema: str = "artifactscan.html_report/1"

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.results:
            out[r.kind] = out.get(r.kind, 0) + 1
        return out

    def describe(self) -> str:
        parts = [f"{n} {kind}{'s' if n != 1 else ''}" for kind, n in self.counts().items()]
        return f"{len(self.results)} result(s): {', '.join(parts)}; {self.figures} figure(s)"


def esc(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def as_number(x: Any) -> float | None:
    if isinstance(x, bool) or x is None:
        return None
    if isinstance(x, (int, float)):
        return float(x) if math.isfinite(float(x)) else None
    return None


def fmt_g(x: Any, digits: int = 4) -> str:
    v = as_number(x)
    if v is None:
        return "–" if x is None or isinstance(x, (int, float)) else esc(x)
    if isinstance(x, int):
        return f"{x:,}"
    return f"{v:.{digits}g}"


def fmt_pct(x: Any) -> str:
    v = as_number(x)
    return "–" if v is None else f"{100 * v:.2f}%"


def fmt_ratio(x: Any) -> str:
    v = as_number(x)
    return "–" if v is None else f"{v:.1f}×"


def rel_path(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix() or "."
    except ValueError:
        return path.as_posix()


def slug(i: int) -> str:
    return f"r{i + 1}"


def is_phantom_data(data: Any) -> bool:
    """``model.kind == "phantom"`` anywhere a result keeps a model summary (also in nested per-model reports)."""
    if isinstance(data, dict):
        model = data.get("model")
        if isinstance(model, dict) and model.get("kind") == "phantom":
            return True
        for key in ("reports", "models", "runs"):
            sub = data.get(key)
            if isinstance(sub, dict) and any(is_phantom_data(v) for v in sub.values()):
                return True
            if isinstance(sub, list) and any(is_phantom_data(v) for v in sub):
                return True
    return False


def text_headline(data: dict[str, Any]) -> str:
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


@dataclass
class FoundResult:
    kind: str
    path: Path  # JSON file, or the run folder for train-reg / training
    data: Any
    schema: str | None = None


def kind_of_schema(schema: str) -> str:
    name = schema[len(SCHEMA_PREFIX):].split("/", 1)[0].split(".", 1)[0].lower()
    return name if name in KNOWN_FIGURES else "other"


def walk_results(root: Path) -> Iterable[tuple[Path, list[str]]]:
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        yield Path(dirpath), sorted(f for f in filenames if not f.startswith("."))


def collect_results(results_dir: str | Path, warn: Callable[[str], None] | None = None
                    ) -> tuple[list[FoundResult], list[str], dict[Path, list[Path]]]:
    """Find every artifactscan result under ``results_dir``.

    Returns ``(results, skipped, figures_by_dir)``; ``skipped`` lists JSON files that could not be read (each also
    reported through ``warn``).
    """
    root = Path(results_dir)
    warn = warn or (lambda msg: None)
    found: list[FoundResult] = []
    skipped: list[str] = []
    figures: dict[Path, list[Path]] = {}
    run_dirs: set[Path] = set()
    json_files: list[Path] = []
    metrics_dirs: list[Path] = []
    monitor_files: list[Path] = []
    for d, files in walk_results(root):
        for name in files:
            p = d / name
            suffix = p.suffix.lower()
            if (suffix in (".json", *FIGURE_SUFFIXES) or name in ("metrics.jsonl", MONITOR_FILE)) \
                    and path_kind(p) != "a file":
                warn(f"skipped {rel_path(p, root)}: {path_kind(p)}, not a regular file")  # reading a FIFO would block
                skipped.append(rel_path(p, root))
                continue
            if suffix == ".json":
                json_files.append(p)
            elif suffix in FIGURE_SUFFIXES:
                figures.setdefault(d, []).append(p)
            elif name == "metrics.jsonl":
                metrics_dirs.append(d)
            elif name == MONITOR_FILE:
                monitor_files.append(p)
        if "train_reg.json" in files:
            run_dirs.add(d)

    def inside_run(p: Path) -> bool:
        return any(p == r or r in p.parents for r in run_dirs)

    for p in json_files:
        if shadowed_by_new_name(p):  # a renamed file's old copy (written for one version): one section, not two
            continue
        try:
            data = json.loads(read_regular_text(p))
        except (OSError, UnicodeDecodeError, ValueError, NotAFileError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
            warn(f"skipped {rel_path(p, root)}: not readable as JSON ({reason})")
            skipped.append(rel_path(p, root))
            continue
        schema = data.get("schema") if isinstance(data, dict) else None
        if isinstance(schema, str) and schema.startswith(SCHEMA_PREFIX):
            found.append(FoundResult(kind_of_schema(schema), p, data, schema))
        elif p.name == "train_reg.json":
            found.append(FoundResult("train-reg", p.parent, data))
    for p in monitor_files:  # an ArtifactMonitor's folder, possibly still being written (read without a lock)
        try:
            history = read_monitor(p, warn=lambda msg: warn(msg))
        except InputError as exc:
            warn(f"skipped {rel_path(p, root)}: {exc}")
            skipped.append(rel_path(p, root))
            continue
        found.append(FoundResult("monitor", p, history.to_dict(), history.schema))
    # a single training run (train-model) outside any train-reg folder: config.json + metrics.jsonl
    for d in metrics_dirs:
        if not inside_run(d) and (d / "config.json").is_file():
            found.append(FoundResult("training", d, None))
    return found, skipped, figures


def figure_uri(path: Path, warn: Callable[[str], None], root: Path) -> str | None:
    """A data URI for an image file, or None (with a warning) when it is unreadable or not a valid image."""
    try:
        size = path.stat().st_size
        if size > MAX_FIGURE_BYTES:
            warn(f"left out {rel_path(path, root)}: {size / 1e6:.1f} MB is too large to embed")
            return None
        raw = read_regular_bytes(path)
    except (OSError, NotAFileError) as exc:
        warn(f"left out {rel_path(path, root)}: {getattr(exc, 'strerror', None) or exc}")
        return None
    mime = FIGURE_SUFFIXES[path.suffix.lower()]
    if mime == "image/svg+xml":
        if b"<svg" not in raw[:4096]:
            warn(f"left out {rel_path(path, root)}: not an SVG image")
            return None
    else:
        try:
            from PIL import Image

            with Image.open(io.BytesIO(raw)) as im:
                im.verify()
                if Image.MIME.get(im.format or "", "") != mime:
                    mime = Image.MIME.get(im.format or "", mime)
        except Exception as exc:  # a truncated or mislabelled file would show as a broken image
            warn(f"left out {rel_path(path, root)}: not a valid image ({type(exc).__name__})")
            return None
    return f"data:{mime};base64,{base64.b64encode(raw).decode('ascii')}"


class FigureEmbedder:
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
            uri = figure_uri(p, self.warn, self.root)
            if uri is None:
                continue
            rel = rel_path(p, self.root)
            cap = (captions or {}).get(p)
            text = f'{esc(cap)} <span class="path">{esc(rel)}</span>' if cap else f'<span class="path">{esc(rel)}</span>'
            parts.append(f'<figure class="{cls}"><img src="{uri}" alt="{esc(cap or p.name)}">'
                         f"<figcaption>{text}</figcaption></figure>")
            self.count += 1
            if included is not None:
                included.append(rel)
        return "\n".join(parts)


def html_table(headers: list[str], rows: list[list[str]], row_classes: list[str] | None = None, num_from: int = 1,
           caption: str | None = None) -> str:
    """``rows`` hold already-escaped cell HTML. Columns from ``num_from`` on are right-aligned (numbers)."""
    num = ' class="num"'
    head = "".join(f"<th{num if i >= num_from else ''}>{esc(h)}</th>" for i, h in enumerate(headers))
    body = []
    for j, row in enumerate(rows):
        cls = (row_classes or [""] * len(rows))[j]
        cells = "".join(f"<td{num if i >= num_from else ''}>{c}</td>" for i, c in enumerate(row))
        tr = f'<tr class="{cls}">' if cls else "<tr>"
        body.append(f"{tr}{cells}</tr>")
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return (f'<div class="tablewrap"><table>{cap}<thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def scalar_html(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)) or v is None:
        return fmt_g(v)
    if isinstance(v, str):
        return esc(v if len(v) <= 300 else v[:300] + "…")
    if isinstance(v, list):
        if all(not isinstance(x, (dict, list)) for x in v) and len(v) <= 12:
            return ", ".join(scalar_html(x) for x in v) or "–"
        return f'<span class="dim">[{len(v)} items]</span>'
    if isinstance(v, dict):
        return f'<span class="dim">{{{len(v)} keys}}</span>'
    return esc(v)


def key_table(data: dict[str, Any], skip: Iterable[str] = ()) -> str:
    skip = set(skip)
    rows = [[esc(k), scalar_html(v)] for k, v in data.items()
            if k not in skip and not (isinstance(v, list) and v and all(isinstance(x, dict) for x in v))]
    if not rows:
        return ""
    return f'<table class="keys"><tbody>{"".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)}</tbody></table>'


def records_table(records: list[dict[str, Any]], caption: str | None = None, max_cols: int = 12) -> str:
    cols: list[str] = []
    for r in records[:MAX_TABLE_ROWS]:
        for k, v in r.items():
            if k not in cols and not isinstance(v, (dict, list)):
                cols.append(k)
    cols = cols[:max_cols]
    if not cols:
        return ""
    rows = [[scalar_html(r.get(c)) for c in cols] for r in records[:MAX_TABLE_ROWS]]
    more = len(records) - MAX_TABLE_ROWS
    out = html_table(cols, rows, caption=caption)
    if more > 0:
        out += f'<p class="dim">… and {more} more rows (see the JSON file).</p>'
    return out


def notes_html(notes: Any) -> str:
    if not isinstance(notes, list) or not notes:
        return ""
    return '<ul class="notes">' + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>"


def verdict_box(text: str, label: str = "verdict", tone: str = "") -> str:
    if not text:
        return ""
    return f'<div class="verdict {tone}"><span class="label">{esc(label)}</span> {esc(text)}</div>'
