"""``artifactscan probe``: the paper's probes at one layer (a thin Typer layer over :func:`artifactscan.probes.probe`).

Registered on the shared app by ``from . import cli_probe`` at the bottom of :mod:`artifactscan.cli`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from artifactscan.cli.app import MODEL_HELP, THRESHOLD_HELP, app, run_command, show_written_result, warn
from artifactscan.cli.options import (BLOCKS_SYNTAX, DebugOpt, ModelLoadOptions, PassOptions,
                                      old_spelling, renamed_flag, threshold_option, with_option_groups)
from artifactscan.core.defaults import BLOCK
from artifactscan.core.files import output_folder
from artifactscan.analysis.probes import (
    DEFAULT_PROBE_IMAGES,
    GLOBAL_DRAWS,
    MIN_GLOBAL_IMAGES,
    MIN_LOCAL_TOKENS,
    PROTOCOL,
    TEST_FRACTION,
)

DATA_HELP = (
    "An image folder (searched recursively; class labels from its sub-folders, ImageFolder layout, when present), "
    f"or synthetic[:N] for the built-in labelled data set. Default: synthetic:{DEFAULT_PROBE_IMAGES}. Without class "
    "sub-folders (or with a single class) the global probe is skipped with a message and the local probes still run."
)


def _probe_help() -> str:
    # Typer/rich treat single newlines as spaces; blank lines keep the protocol's steps apart.
    protocol = PROTOCOL.replace("\n", " ").replace(" 1. ", "\n\n1. ").replace(" 2. ", "\n\n2. ").replace(
        " 3. ", "\n\n3. ").replace(" 4. ", "\n\n4. ").replace(" 5. ", "\n\n5. ").replace(" Rows with", "\n\nRows with")
    return (
        "Do the flagged high-norm tokens behave like the paper's artifacts (redundant patches, lost local "
        "information, global information: Fig 5 and Table 1) or like content tokens with a large norm?\n\n"
        "Examples:\n\n"
        "  artifactscan probe --blocks 15\n\n"
        "  artifactscan probe model.pt data/ --arch vit_small_patch16_224 --blocks 9 --out probe/\n\n"
        "  artifactscan probe vit_base_patch14_dinov2.lvd142m imagenette/ --blocks -1 --device cuda --json\n\n"
        "Exit codes: 0 on any finding (artifact-like, content-like, inconclusive, clean); 1 on bad input; 2 a bug; "
        "130 interrupted.\n\n"
        "PROTOCOL\n\n" + protocol
    )


@app.command("probe", help=_probe_help())
@with_option_groups
def probe_command(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP, show_default=False),
    data: Optional[str] = typer.Argument(None, help=DATA_HELP, show_default=False),
    blocks: str = typer.Option(str(BLOCK), "--blocks", "-l", help="The one block to probe, " + BLOCKS_SYNTAX
                               + ". Only blocks 0..N run."),
    layer: Optional[str] = old_spelling("--layer", "--blocks"),
    threshold: str = threshold_option(THRESHOLD_HELP),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write report.json and the figures here."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout and nothing else."),
    figures: bool = typer.Option(True, "--figures/--no-figures", help="Write figures into --out."),
    min_tokens: int = typer.Option(MIN_LOCAL_TOKENS, "--min-tokens",
                                   help="Held-out tokens a local-probe row needs; fewer -> 'too few (n=...)'."),
    min_images: int = typer.Option(MIN_GLOBAL_IMAGES, "--min-images",
                                   help="Images a global-probe row needs; fewer -> 'too few (n=...)'."),
    draws: int = typer.Option(GLOBAL_DRAWS, "--draws", help="Random draws of the global probe (mean +- std)."),
    test_fraction: float = typer.Option(TEST_FRACTION, "--test-fraction", help="Images held out for testing."),
    seed: int = typer.Option(0, "--seed", help="Seed of every random choice (split, samples, draws)."),
    load: ModelLoadOptions = ModelLoadOptions(),
    run: PassOptions = PassOptions(),
    debug: bool = DebugOpt,
) -> None:
    from artifactscan.core.distributed import distributed_world
    from artifactscan.analysis.probes import probe
    from artifactscan.render.text import render_probe
    from artifactscan.render.outputs import write_probe_outputs

    def work() -> None:
        rank = distributed_world()[1]
        with output_folder(out if rank == 0 else None, "probe"):  # validated and locked before any model runs
            report = probe(model, data, blocks=renamed_flag(blocks, layer, "--layer", "--blocks", str(BLOCK)),
                           threshold=threshold, **load.kwargs(), **run.kwargs(), min_tokens=min_tokens,
                           min_images=min_images, draws=draws, test_fraction=test_fraction, seed=seed,
                           progress=not json_out and sys.stderr.isatty(), warn=warn)
            if rank != 0:
                return  # under torchrun every rank holds the merged report; rank 0 alone writes and prints it
            written = write_probe_outputs(report, out, figures=figures) if out is not None else []
            show_written_result(report, out, json_out, written, render_probe, "report.json" + (", figures" if figures else ""))

    run_command(debug, work)
