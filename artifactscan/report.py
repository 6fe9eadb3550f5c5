"""Turning results into words, tables, JSON and files.

The library returns dataclasses; this module serialises them (``to_jsonable`` / ``from_jsonable`` round-trip), writes
the output folder and renders rich tables. The CLI only calls these.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import tempfile
import types
import typing
from pathlib import Path
from typing import Any

if typing.TYPE_CHECKING:
    from rich.console import Console

    from .scan import ScanReport

NOT_AN_ARTIFACT_HINT = (
    "A high norm alone does not prove an artifact: content tokens (e.g. saturated object patches) can be large too. "
    "Run `artifactscan probe` to test the paper's other signatures."
)


# ----------------------------------------------------------------------------------------------- JSON
def to_jsonable(obj: Any) -> Any:
    """Dataclasses -> dicts, recursively; non-finite floats -> None (JSON has no NaN)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def from_jsonable(cls: Any, data: Any) -> Any:
    """Inverse of :func:`to_jsonable` for the typed result dataclasses (uses their type hints)."""
    if data is None:
        return math.nan if cls is float else None  # to_jsonable wrote a non-finite float as null
    origin = typing.get_origin(cls)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(cls) if a is not type(None)]
        return from_jsonable(options[0], data) if len(options) == 1 else data
    if origin is list:
        (item,) = typing.get_args(cls) or (Any,)
        return [from_jsonable(item, v) for v in data]
    if origin is dict:
        _, val = typing.get_args(cls) or (Any, Any)
        return {k: from_jsonable(val, v) for k, v in data.items()}
    if dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: from_jsonable(hints[k], v) for k, v in data.items() if k in names})
    return data


class JsonResult:
    """Mixin for the typed result dataclasses: ``to_dict`` / ``to_json`` / ``from_dict`` round-trip."""

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        return from_jsonable(cls, data)


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def load_report(path: str | Path) -> "ScanReport":
    from .scan import ScanReport

    return ScanReport.from_dict(json.loads(Path(path).read_text()))


# ----------------------------------------------------------------------------------------------- words
def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def headline(report: "ScanReport") -> str:
    """The one-paragraph verdict shown first in the terminal and stored in the JSON."""
    last = report.last_block
    parts = []
    if report.model.kind == "phantom":
        parts.append("[CALIBRATION PHANTOM - artifacts built in by construction, not a finding about real models]")
    if report.onset_layer is None:
        parts.append(f"No high-norm outlier tokens in any of the {report.model.num_blocks} blocks "
                     f"({report.images.num_scanned} images, {report.threshold_mode} threshold).")
        if report.threshold_mode == "auto":
            parts.append("Every layer's patch-norm distribution is unimodal.")
    else:
        parts.append(
            f"Outliers appear from block {report.onset_layer} of {report.model.num_blocks} (0-based). "
            f"Last block: {_pct(last.outlier_fraction)} of patch tokens flagged, in "
            f"{_pct(last.image_fraction_with_outliers)} of images; max/median norm {last.max_over_median:.1f}x.")
    if report.threshold_mode == "auto":
        thr = "none (unimodal)" if last.threshold is None else f"{last.threshold:.4g}"
        parts.append(f"Threshold: adaptive bimodal rule per layer (last block: {thr}).")
    else:
        parts.append(f"Threshold: fixed, norm > {last.threshold:g}.")
    parts.append(f"Paper's fixed 150 would flag {_pct(last.fraction_above_150)} at the last block.")
    if report.images.skipped:
        parts.append(f"{len(report.images.skipped)} unreadable image(s) skipped.")
    return " ".join(parts)


# ----------------------------------------------------------------------------------------------- files
def write_outliers_csv(report: "ScanReport", path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "image_index", "layer", "row", "col", "norm"])
        for o in report.outliers:
            writer.writerow([o.image, o.image_index, o.layer, o.row, o.col, f"{o.norm:.6g}"])


def write_scan_outputs(report: "ScanReport", out_dir: str | Path, figures: bool = True) -> list[Path]:
    """Write ``report.json``, ``outliers.csv`` and the figures into ``out_dir``; return the paths written."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        from .errors import InputError

        raise InputError(f"cannot create output folder {out}: {exc.strerror}") from None
    written = [out / "report.json", out / "outliers.csv"]
    atomic_write_text(written[0], report.to_json())
    write_outliers_csv(report, written[1])
    if figures:
        from .plots import save_scan_figures

        written += save_scan_figures(report, out)
    return written


# ----------------------------------------------------------------------------------------------- terminal
def render_scan(report: "ScanReport", console: "Console") -> None:
    """The per-layer table and the headline, for humans."""
    from rich.panel import Panel
    from rich.table import Table

    m = report.model
    prefix = f"{m.num_cls_tokens} CLS + {m.num_register_tokens} register" if m.num_prefix_tokens else "no prefix"
    title = (f"{m.name} ({m.arch or m.source}) - {m.num_blocks} blocks, {prefix} tokens, "
             f"{m.grid_size[0]}x{m.grid_size[1]} patches - {report.images.num_scanned} images")
    table = Table(title=title, title_justify="left", header_style="bold")
    for col, justify in (("layer", "left"), ("median", "right"), ("p99", "right"), ("max", "right"),
                         ("max/med", "right"), ("threshold", "right"), ("% flagged", "right"),
                         ("images", "right"), ("> 150", "right"), ("prefix norms (mean)", "left")):
        table.add_column(col, justify=justify)
    for lay in report.layers:
        flagged = lay.num_outliers > 0
        style = "bold red" if flagged else ("dim" if lay.is_final_norm else "")
        prefix_text = " ".join(f"{p.name}={p.mean:.3g}" for p in lay.prefix[:5])
        if len(lay.prefix) > 5:
            prefix_text += f" (+{len(lay.prefix) - 5})"
        table.add_row(
            lay.name, f"{lay.median:.3g}", f"{lay.p99:.3g}", f"{lay.max:.3g}", f"{lay.max_over_median:.1f}x",
            "-" if lay.threshold is None else f"{lay.threshold:.3g}", _pct(lay.outlier_fraction),
            f"{lay.images_with_outliers}/{report.images.num_scanned}", _pct(lay.fraction_above_150),
            prefix_text or "-", style=style)
    console.print(table)
    if report.model.kind == "phantom":
        console.print(Panel(report.model.calibration_note or "", title="calibration phantom", style="yellow"))
    console.print(Panel(report.headline, title="verdict", style="bold"))
    if report.onset_layer is not None:
        console.print(f"[dim]{NOT_AN_ARTIFACT_HINT}[/dim]")
    console.print(f"[dim]Threshold rule - {report.threshold_rule}[/dim]")


def render_compare(report: Any, console: "Console") -> None:
    """One row per model: the comparison table and the verdict."""
    from rich.panel import Panel
    from rich.table import Table

    table = Table(title=f"{len(report.rows)} models on {report.images}", title_justify="left", header_style="bold")
    for col in ("model", "registers", "onset", "% flagged (last)", "images", "max/med", "peak % flagged",
                "attn on prefix", "register norm", "flagged on background"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in report.rows:
        att = " ".join(f"{k}={100 * v:.1f}%" for k, v in r.prefix_attention.items()) or "-"
        table.add_row(r.label, str(r.registers), "-" if r.onset_layer is None else str(r.onset_layer),
                      _pct(r.outlier_fraction), _pct(r.image_fraction_with_outliers), f"{r.max_over_median:.1f}x",
                      _pct(r.peak_outlier_fraction), att,
                      "-" if r.register_norm_mean is None else f"{r.register_norm_mean:.3g}",
                      "-" if r.flagged_on_background is None else f"{r.flagged_on_background:.0%}")
    console.print(table)
    console.print(Panel(report.verdict, title="verdict", style="bold"))
    for note in report.notes:
        console.print(f"[dim]{note}[/dim]")


def render_emergence(report: Any, console: "Console") -> None:
    from rich.table import Table

    for group in report.groups:
        table = Table(title=f"{group.architecture.split()[0]} with {group.registers} registers: outliers over training "
                            "(% flagged / max-over-median per block)",
                      title_justify="left", header_style="bold")
        table.add_column("step", justify="right")
        table.add_column("onset", justify="right")
        n = len(group.points[0].outlier_fraction) if group.points else 0
        for b in range(n):
            table.add_column(f"b{b} %/ratio", justify="right")
        for p in group.points:
            table.add_row("-" if p.step is None else str(p.step), "-" if p.onset_layer is None else str(p.onset_layer),
                          *[f"{100 * f:.1f}/{r:.1f}x" for f, r in zip(p.outlier_fraction, p.max_over_median)])
        console.print(table)
    for note in report.notes:
        console.print(f"[yellow]{note}[/yellow]")
