"""``artifactscan attention``: attention maps and the attention mass on outlier tokens (a thin Typer layer over
:func:`artifactscan.analysis.attention_maps.attention_report`).

Registered on the shared app by ``from . import cli_attention`` at the bottom of :mod:`artifactscan.cli`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from artifactscan.cli.app import (IMAGES_HELP, MODEL_HELP, THRESHOLD_HELP, app, run_command, show_written_result,
                              warn)
from artifactscan.cli.options import (
    BLOCKS_SYNTAX,
    DebugOpt,
    ModelLoadOptions,
    PassOptions,
    maps_option,
    old_spelling,
    renamed_flag,
    threshold_option,
    with_option_groups,
)
from artifactscan.core.blocks import ALL_BLOCKS
from artifactscan.core.files import output_folder


@app.command("attention")
@with_option_groups
def attention(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP, show_default=False),
    images: Optional[str] = typer.Argument(None, help=IMAGES_HELP, show_default=False),
    blocks: str = typer.Option(ALL_BLOCKS, "--blocks", "-l",
                               help="Blocks to capture: 'all', or " + BLOCKS_SYNTAX + ". Only these blocks lose the "
                                    "fused attention kernel, only for the pass."),
    layers: Optional[str] = old_spelling("--layers", "--blocks"),
    heads: str = typer.Option("mean", "--heads",
                              help="'mean': maps averaged over heads. 'all': one map per head (the paper's Fig 9; "
                                   "writes per-head figures)."),
    query: str = typer.Option("auto", "--query", "-q",
                              help="Whose attention: 'auto' (CLS; the first register when the model has no CLS; the "
                                   "mean of all patch queries when it has no prefix tokens), 'cls', 'regK' or 'mean'."),
    query_patch: Optional[str] = typer.Option(None, "--query-patch", metavar="ROW,COL",
                                              help="Also map the attention of this patch (0-based grid position)."),
    threshold: str = threshold_option(THRESHOLD_HELP),
    maps: int = maps_option("Keep attention maps (and figures) for the first N images; the mass statistics always "
                            "use every image."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write attention.json and figures here."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout and nothing else."),
    figures: bool = typer.Option(True, "--figures/--no-figures", help="Write figures into --out."),
    load: ModelLoadOptions = ModelLoadOptions(),
    run: PassOptions = PassOptions(),
    debug: bool = DebugOpt,
) -> None:
    """Where the CLS token looks, and how much attention the high-norm outlier tokens attract (the paper's Fig 2
    and Fig 9).

    Two passes. First the norms scan (same --threshold) flags the outlier patch tokens of every image. Then the
    chosen blocks run with timm's explicit attention (their fused kernel is off for the pass and restored after;
    other blocks keep it) and their attention probabilities are reduced on the fly, so memory does not grow with
    the number of images.

    Per block it reports the mass the query (CLS, or the fallback it names) puts on each prefix token, on all
    patches and on the outlier tokens, next to the outliers' share of the patches: a spike is mass >> share
    (spike = outliers' share of the patch-directed attention / their share of the patches; 1 = no preference).
    The outliers for block b are those flagged at its input (the norms scan's row b-1, the keys it reads); block 0
    reads the patch embedding and has none.

    With --out: attention.json, attention_mass.png, and per kept image attention_maps/IMAGE.png (image, query
    map, outlier overlay at the last captured block), plus attention_heads/IMAGE.png with --heads all.

    Examples:

      artifactscan attention                                          # the calibration phantom on sample_images/

      artifactscan attention demo-reg4 sample_images/ --blocks -1 --heads all --out attn/

      artifactscan attention ckpt.pt imgs/ --arch vit_small_patch16_224 --query-patch 7,7 --json > attention.json
    """
    from artifactscan.analysis.attention_maps import attention_report
    from artifactscan.render.outputs import write_attention_outputs
    from artifactscan.render.text import render_attention

    def work() -> None:
        if maps < 0:
            from artifactscan.core.errors import InputError

            raise InputError(f"--maps must be 0 or more (the number of images that keep attention maps), got {maps}")
        with output_folder(out, "attention"):  # validated and locked before any model runs
            report = attention_report(
                model, images, blocks=renamed_flag(blocks, layers, "--layers", "--blocks", ALL_BLOCKS),
                threshold=threshold, query=query, query_patch=query_patch, heads=heads, maps=maps, **run.kwargs(),
                **load.kwargs(), progress=not json_out and sys.stderr.isatty(), warn=warn)
            written = write_attention_outputs(report, out, figures=figures) if out is not None else []
            show_written_result(report, out, json_out, written, render_attention,
                                "attention.json" + (", figures" if figures else ""))

    run_command(debug, work)
