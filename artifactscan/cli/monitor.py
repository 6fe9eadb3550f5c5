"""``artifactscan monitor DIR``: render the ``monitor.jsonl`` an ArtifactMonitor writes, also while the run writes it.

A thin Typer layer over :func:`artifactscan.analysis.monitor_records.read_monitor` and
:mod:`artifactscan.render.monitor`; registered on the shared app when :mod:`artifactscan.cli` imports this module.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Optional

import typer

from artifactscan.cli.app import app, interrupt_handled, print_line, run_command, stdout, warn
from artifactscan.cli.options import DebugOpt


@app.command("monitor")
def monitor(
    folder: Path = typer.Argument(..., metavar="DIR", show_default=False,
                                  help="The `out` folder of an ArtifactMonitor (holding monitor.jsonl), or the file."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", show_default=False,
                                       help="Write the emergence figure here (monitor.png: a heat map of block x "
                                            "step, and the last block's outlier fraction against step)."),
    json_out: bool = typer.Option(False, "--json", help="Print every update as JSON on stdout and nothing else."),
    follow: bool = typer.Option(False, "--follow", "-f", help="After the table, keep printing each new update as "
                                                              "the run writes it (Ctrl-C ends)."),
    interval: float = typer.Option(2.0, "--interval", min=0.05, help="With --follow: seconds between two looks."),
    timeout: Optional[float] = typer.Option(None, "--timeout", min=0.0, show_default=False,
                                            help="With --follow: stop after this many seconds without a new update "
                                                 "(default: never)."),
    debug: bool = DebugOpt,
) -> None:
    """Artifacts emerging during training: the outlier fraction per block against step, and the onset.

    Reads the monitor.jsonl that `artifactscan.monitor.ArtifactMonitor` appends to inside a training loop. It takes
    no lock, so it can be run while the training writes; a torn last line (a run killed while writing) is skipped
    with a warning.

    Examples:

      artifactscan monitor runs/my-vit/artifacts

      artifactscan monitor runs/my-vit/artifacts --out figures/

      artifactscan monitor runs/my-vit/artifacts --follow
    """
    from artifactscan.analysis.monitor_records import read_monitor
    from artifactscan.render.monitor import render_monitor, save_monitor_figure

    said: set[str] = set()

    def warn_once(msg: str) -> None:  # a torn last line stays torn at every look until the writer finishes it
        if msg not in said:
            said.add(msg)
            warn(msg)

    def work() -> None:
        history = read_monitor(folder, warn=warn_once)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            written = save_monitor_figure(history, out)
            if not json_out:
                print_line(stdout, "wrote", "", str(written))
        if json_out:
            sys.stdout.write(history.to_json() + "\n")
        else:
            render_monitor(history, stdout)
        if follow:
            _follow(folder, len(history.updates), interval, timeout, warn_once)

    run_command(debug, work)


def _follow(folder: Path, seen: int, interval: float, timeout: float | None, warn_once: Callable[[str], None]
            ) -> None:
    """Print each update appended after the first ``seen``, one line each, until Ctrl-C or ``timeout`` idle."""
    from artifactscan.analysis.monitor_records import read_monitor

    last_new = time.monotonic()
    try:
        while timeout is None or time.monotonic() - last_new < timeout:
            time.sleep(interval)
            history = read_monitor(folder, warn=warn_once)
            for update in history.updates[seen:]:
                blocks = " ".join(f"{100 * lay.outlier_fraction:.2f}" for lay in update.layers)
                print_line(stdout, f"step {update.step}:", "bold", f"{update.headline} | % per block: {blocks}")
                last_new = time.monotonic()
            seen = max(seen, len(history.updates))
    except KeyboardInterrupt:  # the way to stop following: not an interrupted command
        interrupt_handled()
        return
