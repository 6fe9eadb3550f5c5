"""``artifactscan discover``: LOST object discovery and CorLoc, and whether the seeds fall on artifact tokens (a thin
Typer layer over :func:`artifactscan.analysis.discover.discover`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from artifactscan.cli.app import THRESHOLD_HELP, app, emit_result, run_command, stdout, warn
from artifactscan.cli.options import (BLOCKS_SYNTAX, DebugOpt, ModelLoadOptions, PassOptions,
                                      maps_option, old_spelling, renamed_flag, threshold_option, with_option_groups)
from artifactscan.core.defaults import BLOCK, MAPS, TOP_K
from artifactscan.core.files import output_folder

ARGS_HELP = (
    "Zero or more models (as for `norms`; default: the embedded default model), then DATA: synthetic-objects[:N] "
    "(default; the built-in set of 1-2 large objects with known boxes, 128 images), synthetic[:N] (the shapes set: "
    "its squares are smaller than a patch), a Pascal VOC-style folder (JPEGImages/ + Annotations/*.xml), a "
    "COCO-style .json (images under --image-root), or an image folder without boxes (boxes drawn, no CorLoc). "
    "A single argument is DATA when it is a folder, a .json or synthetic*, else a MODEL."
)


def _looks_like_data(arg: str) -> bool:
    p = Path(arg).expanduser()
    return arg.startswith("synthetic") or p.is_dir() or arg.lower().endswith(".json")


def split_args(args: list[str]) -> tuple[list[str | None], str | None]:
    """``MODEL... DATA`` -> (models, data); one argument is DATA or MODEL by its look (see ARGS_HELP)."""
    if not args:
        return [None], None
    if len(args) == 1:
        return ([None], args[0]) if _looks_like_data(args[0]) else ([args[0]], None)
    return list(args[:-1]), args[-1]


@app.command("discover")
@with_option_groups
def discover(
    args: Optional[list[str]] = typer.Argument(None, metavar="[MODEL...] [DATA]", help=ARGS_HELP, show_default=False),
    features: str = typer.Option("keys", "--features", "-f",
                                 help="Patch features LOST compares: keys (LOST's choice), queries, values (from the "
                                      "block's fused attn.qkv, heads concatenated) or tokens (the block's output). "
                                      "The registers paper's choice differs by model family."),
    blocks: str = typer.Option(str(BLOCK), "--blocks", "-l", help="The one block whose features are read, "
                               + BLOCKS_SYNTAX + "; default the last."),
    block: Optional[str] = old_spelling("--block", "--blocks"),
    k: Optional[int] = typer.Option(None, "--k", help="Seed-expansion patches: the seed's positively correlated "
                                                      "patches among the k of lowest degree. Default: LOST's 100 "
                                                      "scaled to the grid, round(100 x patches / 713)."),
    compare: Optional[str] = typer.Option(None, "--compare",
                                          help="'fix': also run each model with a test-time register installed "
                                               "(register neurons found on the same images, as `artifactscan fix` "
                                               "does), one row per model and fix."),
    threshold: str = threshold_option("How outlier tokens are flagged (where the features are read): "
                                      + THRESHOLD_HELP),
    image_root: Optional[Path] = typer.Option(None, "--image-root", help="Folder of a COCO-style JSON's images "
                                                                         "(default: the JSON's folder)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random-box baseline."),
    top_k: int = typer.Option(TOP_K, "--top-k", help="With --compare fix: register neurons moved onto the "
                                                     "register."),
    maps: int = maps_option("Images shown in discover.png (their outlier tokens are kept)."),
    figure_images: Optional[int] = old_spelling("--figure-images", "--maps"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write discover.json and discover.png here."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout and nothing else."),
    figures: bool = typer.Option(True, "--figures/--no-figures", help="Write discover.png into --out."),
    load: ModelLoadOptions = ModelLoadOptions(),
    run: PassOptions = PassOptions(),
    debug: bool = DebugOpt,
) -> None:
    """Unsupervised object discovery with LOST, scored with CorLoc: do artifact tokens break it (the registers
    paper's Table 3)?

    LOST (Simeoni et al., BMVC 2021) on one block's patch features (CLS, registers and any test-time register left
    out): the patch-similarity graph (dot products), the seed = the patch with the fewest positive correlations,
    the seed's positively correlated patches among the k lowest-degree ones, and the box = the connected region
    around the seed where their summed similarity is positive. A high-norm artifact token correlates with few
    patches, so it can capture the seed and the box lands on it.

    CorLoc = share of images whose box has IoU >= 0.5 with any ground-truth box, beside two baselines: a centred
    box (the middle half of each side) and a random box. Per image it says whether the seed was an outlier token
    (the norms scan's --threshold rule on the tokens the features are computed from) and sets the rate of such
    seeds against the outliers' share of tokens. With several models or --compare fix: one table, one figure.

    Reference (the registers paper, Table 3, VOC 2007, DINOv2): CorLoc 35.3 without registers, 55.4 with them. The built-in
    models are tiny and trained on synthetic shapes: their numbers say what this tool measures, not what real
    models do.

    Examples:

      artifactscan discover                                     # the default model on synthetic-objects:128

      artifactscan discover phantom synthetic-objects:256 --compare fix --out disc/

      artifactscan discover demo demo-reg4 synthetic-objects      # registers vs none, one table

      artifactscan discover vit_small_patch14_reg4_dinov2.lvd142m VOC2007/ --features keys --json > voc.json
    """
    from artifactscan.analysis.discover import discover as run_discover
    from artifactscan.render.text import render_discover, render_discover_written

    def work() -> None:
        if run.gpu_decode:
            from artifactscan.core.errors import InputError

            raise InputError("--gpu-decode does not apply to discover: it decodes every image file in full with "
                             "Pillow (its boxes are in the files' pixels); drop --gpu-decode")
        models, data = split_args(list(args or []))
        with output_folder(out, "discover"):  # validated and locked before any model runs
            # discover always decodes in full, so --exact-decode holds already (and is accepted)
            report = run_discover(
                models, data, compare=[compare] if compare else [],
                blocks=renamed_flag(blocks, block, "--block", "--blocks", str(BLOCK)), features=features, k=k,
                threshold=threshold, image_root=image_root, device=run.device, batch_size=run.batch_size,
                num_workers=run.workers, maps=renamed_flag(maps, figure_images, "--figure-images", "--maps", MAPS),
                random_seed=seed, fix_top_k=top_k, **load.kwargs(), progress=not json_out and sys.stderr.isatty(),
                warn=warn)
            from artifactscan.render.plots_discover import save_discover_figure

            emit_result(report, out, "discover.json", json_out, lambda r: render_discover(r, stdout),
                        save_discover_figure if figures else None)
            if out is not None and not json_out:
                render_discover_written(stdout, out, figures)

    run_command(debug, work)
