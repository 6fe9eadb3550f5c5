"""Writing a measurement's files: ``report.json``, ``outliers.csv`` and the figures of a scan; the probe's files."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from artifactscan.analysis.probes.types import ProbeReport
from artifactscan.analysis.scan import ScanReport
from artifactscan.core.errors import InputError
from artifactscan.core.files import atomic_write_text, display_name


def _output_folder(out_dir: str | Path) -> Path:
    """``out_dir``, created if needed; a folder that cannot be created is a user error, not a traceback."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create output folder {display_name(out)}: {exc.strerror}") from None
    return out


def write_outliers_csv(report: ScanReport, path: Path) -> None:
    """One row per flagged token, written atomically (UTF-8). Names are the report's escaped ones; when any name
    had to be escaped, an ``image_hex`` column holds its exact bytes (empty for the names that are exact)."""
    with_hex = any(o.image_hex for o in report.outliers)
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(["image", "image_index", "layer", "row", "col", "norm"] + (["image_hex"] if with_hex else []))
    for o in report.outliers:
        writer.writerow([o.image, o.image_index, o.layer, o.row, o.col, f"{o.norm:.6g}"]
                        + ([o.image_hex or ""] if with_hex else []))
    atomic_write_text(path, buf.getvalue())


def write_scan_outputs(report: ScanReport, out_dir: str | Path, figures: bool = True) -> list[Path]:
    """Write ``report.json``, ``outliers.csv`` and the figures into ``out_dir``; return the paths written."""
    out = _output_folder(out_dir)
    written = [out / "report.json", out / "outliers.csv"]
    atomic_write_text(written[0], report.to_json())
    write_outliers_csv(report, written[1])
    if figures:
        from artifactscan.render.plots import save_scan_figures

        written += save_scan_figures(report, out)
    return written


def write_probe_outputs(report: ProbeReport, out_dir: str | Path, figures: bool = True) -> list[Path]:
    """Write ``report.json`` and the probe figures into ``out_dir``; return the paths written."""
    out = _output_folder(out_dir)
    written = [out / "report.json"]
    atomic_write_text(written[0], report.to_json())
    if figures:
        from artifactscan.render.plots_probe import save_probe_figures

        written += save_probe_figures(report, out)
    return written


def write_attention_outputs(report: Any, out_dir: str | Path, figures: bool = True) -> list[Path]:
    """Write ``attention.json`` and the attention figures into ``out_dir``; return the paths written."""
    out = _output_folder(out_dir)
    written = [out / "attention.json"]
    atomic_write_text(written[0], report.to_json())
    if figures:
        from artifactscan.render.plots_attention import save_attention_figures

        written += save_attention_figures(report, out)
    return written
