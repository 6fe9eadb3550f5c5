"""``artifactscan calibrate``: the threshold rule's detection limit, measured on calibration phantoms."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from artifactscan.cli.app import DebugOpt, app, emit_result, run_command, stderr, stdout
from artifactscan.core.files import output_folder


@app.command("calibrate")
def calibrate_command(
    base: str = typer.Option("demo", "--from", help="Clean baseline the phantoms are built from (the demo "
                             "architecture, no registers)."),
    gains: str = typer.Option("1.5,2,2.5,3,4,6,10", "--gains", help="Planting strengths to try, comma-separated: "
                              "each x the baseline's largest median patch norm from the onset on (each > 1)."),
    fractions: str = typer.Option("0.015625,0.0625", "--fractions", help="Shares of patch tokens planted per "
                                  "image, comma-separated (each <= 0.08; default: 1 and 4 of 64 patches)."),
    onset: int = typer.Option(2, "--onset", help="Block (0-based) where the planted groups appear."),
    images: int = typer.Option(128, "--images", help="Built-in synthetic validation images each phantom is "
                               "scanned on."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write calibration.json and calibration.png here."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout and nothing else."),
    debug: bool = DebugOpt,
) -> None:
    """Measure where the auto threshold goes blind: phantoms over a grid of strengths and shares, each scanned.

    For every cell of the grid a calibration phantom is built in memory (the documented mechanism: hidden units
    that overwrite the most redundant patches from the onset block on), its patch norms are captured on built-in
    synthetic images and thresholded exactly as `artifactscan norms` does, and the flags are compared with what was
    planted. Each cell reports what a user would read - the measured ratio of the planted tokens' median norm to
    the bulk's median (at the weakest block) - with precision, recall and the onset error; per block, the headline
    says from which ratio every planted group was found and up to which one some were missed. These are facts
    about phantoms: they bound what the rule can see, not what real models contain. About a minute here.

    Examples:

      artifactscan calibrate

      artifactscan calibrate --gains 2,2.5,3,3.5 --fractions 0.02 --out results/calibration
    """
    from artifactscan.analysis.calibrate import calibrate, parse_grid
    from artifactscan.render.plots_calibrate import save_calibration_figure
    from artifactscan.render.text import render_calibration

    def work() -> None:
        grid_gains, grid_fractions = parse_grid(gains, "gains"), parse_grid(fractions, "fractions")
        with output_folder(out, "calibrate"):  # validated and locked before any phantom is built
            with stderr.status("building and scanning phantoms ...") if not json_out else _null():
                result = calibrate(base, gains=grid_gains, fractions=grid_fractions, onset=onset, num_images=images)
            emit_result(result, out, "calibration.json", json_out, lambda r: render_calibration(r, stdout),
                        save_calibration_figure)

    run_command(debug, work)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
