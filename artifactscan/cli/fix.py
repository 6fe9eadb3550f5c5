"""``artifactscan fix``: the training-free test-time register (a thin Typer layer over :func:`artifactscan.fix`).

Registered on the shared app when :mod:`artifactscan.cli` imports this module.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.text import Text

from artifactscan.cli.app import (IMAGES_HELP, MODEL_HELP, THRESHOLD_HELP, app, one_line, print_line, run_command,
                                  stdout, warn)
from artifactscan.cli.options import BatchOpt, DebugOpt, DecodeOptions, DeviceOpt, with_option_groups
from artifactscan.core.files import check_output_file, display_name


@app.command()
@with_option_groups
def fix(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP, show_default=False),
    images: Optional[str] = typer.Argument(None, help=IMAGES_HELP, show_default=False),
    test_time_registers: bool = typer.Option(True, "--test-time-registers/--no-test-time-registers",
                                             help="The training-free repair (the only method so far)."),
    top_k: int = typer.Option(4, "--top-k", help="Number of register neurons to move onto the register."),
    max_layer: Optional[int] = typer.Option(None, "--max-layer",
                                            help="Highest block searched for neurons (default: the onset layer)."),
    threshold: str = typer.Option("auto", "--threshold", "-t", help=THRESHOLD_HELP),
    out: Optional[Path] = typer.Option(None, "--out", "-o",
                                       help="Save the fixed model (same weights + neuron list) as a self-describing "
                                            "checkpoint that every command loads with the repair applied: a file "
                                            "name ending in .safetensors (or .pt for the PyTorch layout)."),
    json_out: bool = typer.Option(False, "--json", help="Print the fix report as JSON on stdout and nothing else."),
    device: str = DeviceOpt,
    batch_size: int = BatchOpt,
    decode: DecodeOptions = DecodeOptions(),
    debug: bool = DebugOpt,
) -> None:
    """Training-free repair: a test-time register (Jiang et al. 2025, "Vision Transformers Don't Need Trained Registers").

    Finds the "register neurons" - MLP hidden units (post-activation) in blocks up to the onset layer whose mean
    absolute activation at outlier positions ranks highest - then, at inference, inserts one extra zero-initialised
    token after the prefix tokens and moves those neurons' activation onto it (zero on every other token; on the
    register, the maximum over the image's tokens; per neuron and per image). Prints the before/after scan and how
    much the model's own outputs change (pooled-feature cosine, top-1 agreement).

    Example:

      artifactscan fix phantom sample_images/ --out phantom-fixed.safetensors
    """
    from artifactscan.analysis.fix import fix as run_fix

    def work() -> None:
        if not test_time_registers:
            from artifactscan.core.errors import InputError

            raise InputError("the only repair implemented is --test-time-registers")
        if out is not None:
            check_output_file(out, "--out", (".safetensors", ".pt"))  # before minutes of work, not after
        result = run_fix(model, images, top_k=top_k, max_layer=max_layer, threshold=threshold, out=out,
                         device=device, batch_size=batch_size, **decode.kwargs())
        if out is not None and not result.saved_to:
            warn(f"no file written to {display_name(out)}: {result.verdict}")
        if json_out:
            sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
            return
        from artifactscan.render.text import render_fix

        render_fix(result, stdout)
        for note in result.notes:
            stdout.print(Text(one_line(note), style="dim"))
        if result.saved_to:
            print_line(stdout, "saved the fixed model to", "", display_name(result.saved_to))

    run_command(debug, work)
