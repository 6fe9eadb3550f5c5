"""``artifactscan signatures``: every known artifact signature, per block, each against its null (a thin Typer
layer over :func:`artifactscan.analysis.signatures.signatures`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from artifactscan.cli.app import MODEL_HELP, THRESHOLD_HELP, app, emit_result, run_command, stdout
from artifactscan.cli.options import (DebugOpt, ModelLoadOptions, PassOptions,
                                      threshold_option, with_option_groups)
from artifactscan.core.files import output_folder


@app.command("signatures")
@with_option_groups
def signatures_command(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP, show_default=False),
    data: Optional[str] = typer.Argument(None, show_default=False,
                                         help="Images: synthetic-objects[:N] (default synthetic-objects:256, with "
                                              "boxes), synthetic[:N], a Pascal VOC-style folder (JPEGImages/ + "
                                              "Annotations/*.xml), a COCO-style instances_*.json or a folder "
                                              "holding one, or an image folder or file (no boxes: no hit ratio). "
                                              "Boxes go through the model's own resize and centre crop."),
    null_seeds: int = typer.Option(3, "--null-seeds", help="Random-init models of the same architecture the hit "
                                   "ratio's null is drawn from (each one more pass over the images)."),
    null_images: int = typer.Option(32, "--null-images", help="Images (spread over the set) each random-init model "
                                    "runs on; 0: all. Fewer widen the null's 99% range by their binomial error, so "
                                    "the verdict only gets more cautious."),
    image_root: Optional[Path] = typer.Option(None, "--image-root", help="Folder of a COCO-style JSON's images "
                                              "(default: beside the JSON, or the split's folder of a COCO folder)."),
    views: int = typer.Option(6, "--views", help="Shifted and flipped views per image for the shift residual "
                              "(patch-aligned; at most what the grid allows)."),
    shift_images: int = typer.Option(64, "--shift-images", help="Images the shift views run on (the first ones; "
                                     "each costs views forwards: the unshifted image's block outputs are kept "
                                     "from the scan when they fit 512 MiB, else views + 1)."),
    threshold: str = threshold_option(THRESHOLD_HELP),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write signatures.json and signatures.png here."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout and nothing else."),
    load: ModelLoadOptions = ModelLoadOptions(),
    run: PassOptions = PassOptions(),
    debug: bool = DebugOpt,
) -> None:
    """Every known artifact signature per block, side by side, each read against its own null (docs/signatures.md).

    Decision rules (a signature is never called present without beating its null):

      high norm: the norms scan's threshold rule flags tokens at some block.

      position-only component (Denoising ViTs): the share of patch-token variance explained by grid position is
      at least 3x the same tokens' share with their positions shuffled within each image.

      weights-only defect direction (SINDER): |cos| between the leading singular direction of the linearised
      blocks and the flagged tokens' mean is above a random direction's 99% quantile.

      register neurons (Jiang et al. 2025): a unit's mean |activation| at flagged positions is at least 3x its mean
      elsewhere.

      lazy aggregation (LaSt-ViT): the share of images whose patch most similar to CLS lies in a box is below the
      99% range of random-init models of the same architecture on the same images (not merely below the share of
      patches in boxes: an untrained ViT's CLS is closest to the many alike background patches too).

      shift consistency (PH-Reg): per patch, 1 - cosine between its feature and its average over --views shifted
      (whole patches) and flipped views mapped back to its grid cell, on the first --shift-images images; present
      when the flagged patches' median is above the 99% quantile of the median of as many unflagged patches of the
      same block drawn at random. Each block also gives the share of patches above 0.5.

    Example:

      artifactscan signatures demo synthetic-objects:128 --out results/signatures
    """
    from artifactscan.analysis.signatures import signatures
    from artifactscan.render.signatures import FIGURE_NAME, plot_signatures, render_signatures

    def work() -> None:
        with output_folder(out, "signatures"):  # validated and locked before any model runs
            result = signatures(model, data, threshold=threshold, null_seeds=null_seeds, null_images=null_images,
                                image_root=image_root, views=views, shift_images=shift_images, **run.kwargs(),
                                **load.kwargs())
            emit_result(result, out, "signatures.json", json_out, lambda r: render_signatures(r, stdout),
                        lambda r, folder: plot_signatures(r, folder / FIGURE_NAME))

    run_command(debug, work)
