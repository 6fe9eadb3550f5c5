"""``artifactscan phantom``: describe a shipped calibration phantom or build a new one (over
:mod:`artifactscan.models.phantom`).

Registered on the shared app when :mod:`artifactscan.cli` imports this module.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from artifactscan.cli.app import app, print_line, run_command, stdout
from artifactscan.cli.options import DebugOpt, refuse_options_given, renamed_flag
from artifactscan.core.files import check_output_file


@app.command()
def phantom(
    ctx: typer.Context,
    describe: bool = typer.Option(False, "--describe", help="Say what was built into a shipped phantom and why."),
    name: Optional[str] = typer.Option(None, "--model", "-m", help="Which shipped phantom --describe explains: "
                                       "phantom-deep (the default model: 24 blocks, onset block 9) or phantom "
                                       "(6 blocks, onset block 2)."),
    build: bool = typer.Option(False, "--build", help="Rebuild the phantom from a trained baseline."),
    base: str = typer.Option("demo", "--from", help="Baseline to build from (the demo architecture)."),
    onset: int = typer.Option(2, "--onset", help="Block (0-based) whose artifact units plant the outliers."),
    fraction: float = typer.Option(0.02, "--fraction", help="Fraction of patch tokens planted per image (the shipped "
                                   "phantoms: 0.02; calibration builds up to 0.08)."),
    units: int = typer.Option(4, "--units", help="Number of artifact hidden units."),
    gain: float = typer.Option(25.0, "--gain", help="Planting strength: planted tokens are written at gain x the "
                               "baseline's largest median patch norm from the onset on (> 1; the shipped phantom: 25)."),
    save_model: Optional[Path] = typer.Option(None, "--save-model", metavar="FILE",
                                              help="Where --build writes the phantom (.safetensors or .pt)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", hidden=True,
                                       help="Deprecated: --save-model (--out names a folder in every command)."),
    json_out: bool = typer.Option(False, "--json", help="Print the description (of the phantom built, with --build) "
                                  "as JSON on stdout and nothing else."),
    debug: bool = DebugOpt,
) -> None:
    """The calibration phantom: a ViT whose artifact tokens were built in, so the right answer is known.

    No pretrained ViT can be downloaded here, and small ViTs trained here grow no artifacts, so artifactscan ships
    genuinely trained baselines with the paper's mechanism added at one block: a few hidden units fire on the <= 2%
    most redundant patches of each image and overwrite them with a large vector carrying a global summary.
    Two are shipped: phantom-deep (the default model: 24 blocks like ViT-L, onset block 9, so the paper's
    `probe --blocks 15` lands inside the artifact range) and phantom (6 blocks, onset block 2; fast, for tests and
    calibration). Their findings are facts about this construction, never about real models.

    Examples:

      artifactscan phantom --describe

      artifactscan phantom --describe --model phantom

      artifactscan phantom --build --from demo-deep --onset 9 --save-model artifactscan/weights/phantom-deep.safetensors
    """
    from artifactscan.models.phantom import build_phantom, describe_shipped_phantom, phantom_description

    def work() -> None:
        # --describe explains a shipped phantom, --build makes a new one: an option of the other mode would be
        # silently ignored, so it is refused
        if build and describe:
            from artifactscan.core.errors import InputError

            raise InputError("--build and --describe are two modes: --build makes a new phantom, --describe explains "
                             "a shipped one (--model); pass one of them")
        if build:
            refuse_options_given(ctx, ("name",), "--describe", "pass --describe instead of --build")
        else:
            refuse_options_given(ctx, ("base", "onset", "fraction", "units", "gain", "save_model", "out"), "--build",
                                 "add --build")
        if build:
            target = renamed_flag(save_model, out, "--out", "--save-model")  # phantom's --out was always a file
            if target is not None:
                check_output_file(target, "--save-model", (".safetensors", ".pt"))
            model, spec, path = build_phantom(base, target, onset=onset, fraction=fraction, units=units,
                                              gain_over_median=gain)
            if json_out:
                built = phantom_description(model, spec, str(path) if path else "not saved (no --save-model)",
                                            path or "PHANTOM.safetensors")
                sys.stdout.write(built.to_json() + "\n")
                return
            print_line(stdout, "built", "", f"the phantom from {base}: onset block {spec.onset}, "
                       f"{spec.planted_per_image} of {spec.num_patches} patch tokens planted per image, gain "
                       f"{spec.gain:g} ({spec.gain_over_median:g}x the baseline's median norm)"
                       + (f"; wrote {path}" if path else " (not saved: pass --save-model)"))
            return
        description = describe_shipped_phantom(name)
        if json_out:
            sys.stdout.write(description.to_json() + "\n")
        else:
            stdout.print(description.text())

    run_command(debug, work)
