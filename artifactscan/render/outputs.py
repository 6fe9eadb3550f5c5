"""Writing a measurement's files: ``report.json``, ``outliers.csv`` and the figures of a scan; the probe's files."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Callable

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


def _write_result(report: Any, out_dir: str | Path, filename: str,
                  save_figures: Callable[[Any, Path], list[Path]] | None,
                  also: Callable[[Path], list[Path]] | None = None) -> list[Path]:
    """``report`` as ``out_dir/filename`` (the folder created if needed), then what ``also`` writes there, then its
    figures; the paths written, in that order."""
    out = _output_folder(out_dir)
    written = [out / filename]
    atomic_write_text(written[0], report.to_json())
    if also is not None:
        written += also(out)
    if save_figures is not None:
        written += save_figures(report, out)
    return written


def write_scan_outputs(report: ScanReport, out_dir: str | Path, figures: bool = True) -> list[Path]:
    """Write ``report.json``, ``outliers.csv`` and the figures into ``out_dir``; return the paths written."""
    from artifactscan.render.plots import save_scan_figures

    def outliers_csv(out: Path) -> list[Path]:
        write_outliers_csv(report, out / "outliers.csv")
        return [out / "outliers.csv"]

    return _write_result(report, out_dir, "report.json", save_scan_figures if figures else None, outliers_csv)


def write_probe_outputs(report: ProbeReport, out_dir: str | Path, figures: bool = True) -> list[Path]:
    """Write ``report.json`` and the probe figures into ``out_dir``; return the paths written."""
    from artifactscan.render.plots_probe import save_probe_figures

    return _write_result(report, out_dir, "report.json", save_probe_figures if figures else None)


def write_attention_outputs(report: Any, out_dir: str | Path, figures: bool = True) -> list[Path]:
    """Write ``attention.json`` and the attention figures into ``out_dir``; return the paths written."""
    from artifactscan.render.plots_attention import save_attention_figures

    return _write_result(report, out_dir, "attention.json", save_attention_figures if figures else None)
