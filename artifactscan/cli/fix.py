"""``artifactscan fix``: the training-free test-time register (a thin Typer layer over :func:`artifactscan.fix`).

Registered on the shared app when :mod:`artifactscan.cli` imports this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from artifactscan.cli.app import IMAGES_HELP, MODEL_HELP, THRESHOLD_HELP, app, emit_result, run_command, stdout, warn
from artifactscan.cli.options import (BLOCKS_SYNTAX, DebugOpt, ModelLoadOptions, PassOptions,
                                      deprecation_note, old_spelling, renamed_flag, threshold_option,
                                      with_option_groups)
from artifactscan.core.defaults import TOP_K
from artifactscan.core.files import check_output_file, display_name, output_folder

#: File names that ``--out`` took before it named a folder: such a value still saves the model, for this version.
CHECKPOINT_SUFFIXES = (".safetensors", ".pt")


@app.command()
@with_option_groups
def fix(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP, show_default=False),
    images: Optional[str] = typer.Argument(None, help=IMAGES_HELP, show_default=False),
    top_k: int = typer.Option(TOP_K, "--top-k", help="Number of register neurons to move onto the register."),
    blocks: Optional[str] = typer.Option(None, "--blocks", "-l", show_default=False,
                                         help="Blocks searched for register neurons, always from block 0: 0:N (or "
                                              ":N) searches blocks 0 to N (" + BLOCKS_SYNTAX + "). Default: up to "
                                              "the onset layer."),
    max_layer: Optional[int] = old_spelling("--max-layer", "--blocks 0:N"),
    threshold: str = threshold_option(THRESHOLD_HELP),
    save_model: Optional[Path] = typer.Option(None, "--save-model", metavar="FILE",
                                              help="Save the fixed model (same weights + neuron list) as a "
                                                   "self-describing checkpoint that every command loads with the "
                                                   "repair applied: a file name ending in .safetensors (or .pt for "
                                                   "the PyTorch layout)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write fix.json here (a folder). A file name "
                                       "ending in .safetensors or .pt still means --save-model, for this version."),
    json_out: bool = typer.Option(False, "--json", help="Print the fix report as JSON on stdout and nothing else."),
    test_time_registers: Optional[bool] = typer.Option(None, "--test-time-registers/--no-test-time-registers",
                                                       hidden=True, help="Deprecated: the only repair, always on."),
    load: ModelLoadOptions = ModelLoadOptions(),
    run: PassOptions = PassOptions(),
    debug: bool = DebugOpt,
) -> None:
    """Training-free repair: a test-time register (Jiang et al. 2025, "Vision Transformers Don't Need Trained Registers").

    Finds the "register neurons" - MLP hidden units (post-activation) in blocks up to the onset layer whose mean
    absolute activation at outlier positions ranks highest - then, at inference, inserts one extra zero-initialised
    token after the prefix tokens and moves those neurons' activation onto it (zero on every other token; on the
    register, the maximum over the image's tokens; per neuron and per image). Prints the before/after scan and how
    much the model's own outputs change (pooled-feature cosine, top-1 agreement).

    Example:

      artifactscan fix phantom sample_images/ --save-model phantom-fixed.safetensors --out fix/
    """
    from artifactscan.analysis.fix import fix as run_fix
    from artifactscan.render.text import render_fix

    def work() -> None:
        check_repair_flag(test_time_registers)
        folder, checkpoint = split_out(out, save_model)
        if checkpoint is not None:
            check_output_file(checkpoint, "--save-model", CHECKPOINT_SUFFIXES)  # before minutes of work, not after
        spec = renamed_flag(blocks, max_layer, "--max-layer", "--blocks", convert=lambda n: f"0:{n}")
        with output_folder(folder, "fix"):  # validated and locked before any model runs
            result = run_fix(model, images, top_k=top_k, blocks=spec, threshold=threshold, save_model=checkpoint,
                             **run.kwargs(), **load.kwargs())
            if checkpoint is not None and not result.saved_to:
                warn(f"no file written to {display_name(checkpoint)}: {result.verdict}")
            emit_result(result, folder, "fix.json", json_out, lambda r: render_fix(r, stdout))

    run_command(debug, work)


def check_repair_flag(test_time_registers: Optional[bool]) -> None:
    """``--test-time-registers`` named the only repair there is (a no-op, deprecated); its negative form never
    worked and is refused."""
    if test_time_registers is None:
        return
    if test_time_registers:
        deprecation_note("--test-time-registers is the only repair and always on; drop the flag (same result)")
        return
    from artifactscan.core.errors import InputError

    raise InputError("--no-test-time-registers: the test-time register is the only repair fix has; to measure a "
                     "model without it, run artifactscan norms")


def split_out(out: Optional[Path], save_model: Optional[Path]) -> tuple[Optional[Path], Optional[Path]]:
    """(the --out folder, the checkpoint file): ``--out NAME.safetensors`` (``.pt``) is the old spelling of
    ``--save-model``, kept for this version with a note."""
    if out is None or out.suffix.lower() not in CHECKPOINT_SUFFIXES or out.is_dir():
        return out, save_model
    if save_model is not None:
        from artifactscan.core.errors import InputError

        raise InputError(f"--out {display_name(out)} and --save-model both name the checkpoint file; --out is a "
                         "folder now: pass the file to --save-model only")
    deprecation_note(f"--out {display_name(out)} is now --save-model {display_name(out)} (same result); --out names "
                     "a folder (fix.json) from the next version")
    return None, out
