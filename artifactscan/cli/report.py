"""``artifactscan report RESULTS_DIR --out FOLDER``: one self-contained HTML page (FOLDER/report.html).

The command named ``report`` writes the HTML report (not a scan's ``report.json``, nor a ``ScanReport``). A thin
Typer layer over :func:`artifactscan.render.html_report.write_html_report`; registered on the shared app when
:mod:`artifactscan.cli` imports this module.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from artifactscan.cli.app import DebugOpt, app, print_line, run_command, stdout, warn
from artifactscan.cli.options import deprecation_note
from artifactscan.core.files import display_name
from artifactscan.models.phantom_notice import PHANTOM_REPORT_NOTE

PAGE_NAME = "report.html"
#: What ``--out`` took when it named the page itself: such a value keeps that meaning for this version.
PAGE_SUFFIXES = (".html", ".htm")


def page_path(results_dir: Path, out: Optional[Path]) -> Path:
    """Where the page goes: ``OUT/report.html`` (``--out`` is a folder, as in every command); ``--out NAME.html``
    (not an existing folder) is the old spelling, still the page itself, with a note."""
    if out is None:
        return results_dir / PAGE_NAME
    if out.suffix.lower() in PAGE_SUFFIXES and not out.is_dir():
        deprecation_note(f"--out {display_name(out)} names the page; --out is a folder (the page is FOLDER/"
                         f"{PAGE_NAME}): this file name keeps working for this version")
        return out
    return out / PAGE_NAME


@app.command("report")
def report(
    results_dir: Path = typer.Argument(..., metavar="RESULTS_DIR", show_default=False,
                                       help="A folder written by `norms --out`, `compare --out`, `probe --out`, "
                                            "train-reg ... (searched recursively)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", show_default=False,
                                       help="The folder report.html is written to (default: RESULTS_DIR). Missing "
                                            "folders are created. A name ending in .html still names the page "
                                            "itself, for this version."),
    json_out: bool = typer.Option(False, "--json", help="Print what went into the page as JSON on stdout and "
                                                        "nothing else."),
    debug: bool = DebugOpt,
) -> None:
    """One self-contained HTML page of every result in a folder: scans, probes, attention, fixes, comparisons.

    Figures are embedded, styling is inline, and no network or JavaScript is needed: mail it, print it, archive it.
    The page opens with the headline verdict (and a banner when a result comes from the calibration phantom), then
    one section per result with its tables and figures. Files are recognised by their "schema" key, so results of
    newer kinds show up too. Unreadable JSON files are skipped with a warning.

    Examples:

      artifactscan norms demo sample_images/ --out results/demo

      artifactscan report results/ --out pages/
    """
    from artifactscan.render.html_report import write_html_report

    def work() -> None:
        from artifactscan.core.files import check_output_file

        from artifactscan.core.files import MANIFEST_NAME, output_folder

        target = page_path(results_dir, out)
        if out is not None or results_dir.is_dir():  # else RESULTS_DIR itself is the problem, and is named so
            # before the folder is read, not after; messages name --out only where it was given
            check_output_file(target, "--out" if out is not None else "the page")
        # Into a folder a run owns (it has a manifest): take its lock and join its manifest, so the next run there
        # removes this page with the rest of the outputs it was made from.
        managed = (target.parent / MANIFEST_NAME).is_file()
        flag = "--out" if out is not None else "results folder"
        with output_folder(target.parent if managed else None, "report", flag, add_to_previous=True):
            summary = write_html_report(results_dir, target, warn=warn)
        if json_out:
            sys.stdout.write(summary.to_json() + "\n")
            return
        if summary.phantom:
            print_line(stdout, "note:", "yellow", PHANTOM_REPORT_NOTE)
        print_line(stdout, "wrote", "", f"{display_name(summary.out_path)} ({summary.describe()}, "
                   f"{summary.bytes / 1024:.0f} KiB)")

    run_command(debug, work)
