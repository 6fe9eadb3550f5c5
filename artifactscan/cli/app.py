"""The ``artifactscan`` command line: a thin Typer layer over the library.

Each command parses flags, calls one library function, and renders its dataclass result. Library errors
(:class:`ArtifactScanError`) become one red line on stderr and exit code 1; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console

from artifactscan.core.errors import ArtifactScanError

app = typer.Typer(
    name="artifactscan",
    help=(
        "Find, explain and fix the high-norm 'artifact' tokens of Vision Transformers "
        "(Darcet et al., 'Vision Transformers Need Registers', ICLR 2024).\n\n"
        "Run any command with no MODEL/IMAGES to use the embedded default: the calibration phantom (a small ViT whose "
        "artifacts were built in, so the right answer is known) on the photos in sample_images/."
    ),
    no_args_is_help=False,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

stdout = Console()
stderr = Console(stderr=True)


def run_command(debug: bool, fn: Callable[[], Any]) -> Any:
    """Run ``fn``; turn expected failures into one clear line and exit 1 (traceback only with --debug)."""
    try:
        return fn()
    except ArtifactScanError as exc:
        if debug:
            traceback.print_exc()
        stderr.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        stderr.print("[red]interrupted[/red]")
        raise typer.Exit(130) from None
    except Exception as exc:  # an unexpected failure: still one line, with the way to get details
        if debug or os.environ.get("ARTIFACTSCAN_DEBUG"):
            traceback.print_exc()
        else:
            stderr.print(f"[bold red]internal error:[/bold red] {type(exc).__name__}: {exc} "
                         "(run again with --debug for the traceback)", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _version(value: bool) -> None:
    if value:
        from artifactscan.core.version import __version__

        stdout.print(f"artifactscan {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Find, explain and fix the high-norm artifact tokens of Vision Transformers."""


def emit_result(result: Any, out: Optional[Path], filename: str, json_out: bool,
                render: Callable[[Any], None], figures: Callable[[Any, Path], Any] | None = None) -> None:
    """Write ``result`` as ``out/filename`` (+ figures), then print it: JSON alone on stdout, or rendered."""
    from artifactscan.core.results import atomic_write_text

    text = json.dumps(result.to_dict(), indent=2)
    if out is not None:
        atomic_write_text(out / filename, text)
        if figures is not None:
            figures(result, out)
    if json_out:
        sys.stdout.write(text + "\n")
    else:
        render(result)


# ----------------------------------------------------------------------------------------------- shared options
MODEL_HELP = (
    "The ViT to scan: a built-in name (phantom, demo, demo-reg4), a checkpoint file in timm, DINOv2, DeiT-III, MAE, "
    "OpenCLIP/OpenAI or timm-training layout (a bare state dict's architecture is inferred when its shapes are "
    "unambiguous, else pass --arch), a Hugging Face save_pretrained folder, a timm name with pretrained tag "
    "(vit_large_patch14_dinov2.lvd142m), an hf-hub:ORG/NAME id (timm) or ORG/NAME (transformers). An existing path "
    "always wins. Default: the calibration phantom (docs/loading.md)."
)
IMAGES_HELP = (
    "An image folder (searched recursively), a single image, or synthetic[:N] for the built-in labelled data set. "
    "Default: the photos in sample_images/."
)
THRESHOLD_HELP = (
    "'auto' (default): per layer, flag a separated group above the bulk: >= 5 tokens and <= 50% of the layer, median "
    ">= 2.5x the bulk's, above an empty gap >= 1.5x (bulk's largest -> group's smallest norm) that a unimodal density "
    "would not leave and the bulk's fitted tail would not reach; otherwise no outliers (the strongest rejected "
    "candidate is shown as a near miss). A number (e.g. 150, the paper's value for DINOv2 ViT-g) flags every patch "
    "token above it. Detection limit: artifactscan calibrate."
)

ArchOpt = typer.Option(None, "--arch", help="timm architecture for a bare state dict, e.g. vit_small_patch16_224.")
ArchKwargsOpt = typer.Option(None, "--arch-kwargs", help='JSON of timm.create_model overrides, e.g. \'{"reg_tokens": 4}\'.')
TrustOpt = typer.Option(False, "--trust-checkpoint",
                        help="Allow loading a whole pickled nn.Module or a TorchScript archive (OpenAI's CLIP .pt). "
                             "Both run code from the file: only for files you trust.")
WeightsOpt = typer.Option(None, "--weights", help="ema or raw: which weights of a checkpoint holding both "
                                                  "(default: ema, as timm does; the report names the ones loaded).")
DeviceOpt = typer.Option("auto", "--device", help="auto (CUDA when available), cpu, cuda, cuda:N.")
BatchOpt = typer.Option(32, "--batch-size", "-b", help="Images per forward pass.")
WorkersOpt = typer.Option("auto", "--workers", help="DataLoader processes decoding images: 'auto' (one per core, at "
                          "most 8, none under 64 images) or a number (0: decode on the main process).")
ExactDecodeOpt = typer.Option(False, "--exact-decode", help="Decode image files in full. Default: only as large as the "
                              "model needs (JPEG draft / integer reduce to >= 2x its resize), docs/data-path.md.")
GpuDecodeOpt = typer.Option(False, "--gpu-decode", help="With a CUDA device: decode JPEGs on it in batches "
                            "(TorchCodec / nvJPEG; a failed batch falls back to Pillow file by file).")
ImgSizeOpt = typer.Option(None, "--img-size", help="Resize inputs to this square size instead of the model's own "
                                                   "(position embeddings are resampled).")
DebugOpt = typer.Option(False, "--debug", help="Show the full traceback on errors.")


@app.command()
def norms(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP, show_default=False),
    images: Optional[str] = typer.Argument(None, help=IMAGES_HELP, show_default=False),
    threshold: str = typer.Option("auto", "--threshold", "-t", help=THRESHOLD_HELP),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write report.json, outliers.csv and figures here."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout and nothing else."),
    maps: int = typer.Option(6, "--maps", help="Per-image norm maps to keep (first N images)."),
    figures: bool = typer.Option(True, "--figures/--no-figures", help="Write figures into --out."),
    arch: Optional[str] = ArchOpt,
    arch_kwargs: Optional[str] = ArchKwargsOpt,
    trust_checkpoint: bool = TrustOpt,
    weights: Optional[str] = WeightsOpt,
    img_size: Optional[int] = ImgSizeOpt,
    device: str = DeviceOpt,
    batch_size: int = BatchOpt,
    workers: str = WorkersOpt,
    exact_decode: bool = ExactDecodeOpt,
    gpu_decode: bool = GpuDecodeOpt,
    debug: bool = DebugOpt,
) -> None:
    """Per-layer patch-token norms of a ViT; flag the high-norm outliers (the paper's Fig 3 and 4a).

    Hooks every transformer block, measures the L2 norm of every token of the residual stream (before the final
    LayerNorm; the final normalised output is its own row), keeps streaming histograms (memory does not grow with
    the number of images) and prints, per layer: median, p99, max, max/median, threshold, % patch tokens flagged,
    images with >= 1 outlier, fraction above the paper's 150, and the prefix (CLS/register) norms apart.

    Examples:

      artifactscan norms                                   # the calibration phantom on sample_images/

      artifactscan norms demo sample_images/ --out report/

      artifactscan norms dinov2_vits14_reg4_pretrain.pth imgs/ --json > report.json   # architecture inferred

      artifactscan norms ckpt.pth imgs/ --arch deit3_small_patch16_224 --weights raw
    """
    from artifactscan.models.hf import is_model_folder
    from artifactscan.models.loading import parse_arch_kwargs
    from artifactscan.render.text import render_scan
    from artifactscan.render.outputs import write_scan_outputs
    from artifactscan.core.progress import distributed_world
    from artifactscan.analysis.scan import scan

    def work() -> None:
        if model is not None and Path(model).is_dir() and not is_model_folder(model):
            return _emergence(model)
        report = scan(model, images, threshold=threshold, arch=arch, arch_kwargs=parse_arch_kwargs(arch_kwargs),
                      trust_checkpoint=trust_checkpoint, weights=weights, img_size=img_size, device=device,
                      batch_size=batch_size,
                      num_workers=workers, num_maps=maps, progress=not json_out and sys.stderr.isatty(),
                      exact_decode=exact_decode, gpu_decode=gpu_decode,
                      warn=lambda msg: stderr.print(f"[yellow]warning:[/yellow] {msg}", highlight=False))
        if distributed_world()[1] != 0:
            return  # under torchrun every rank holds the merged report; rank 0 alone writes and prints it
        if out is not None:
            written = write_scan_outputs(report, out, figures=figures)
        if json_out:
            sys.stdout.write(report.to_json() + "\n")
            return
        render_scan(report, stdout)
        if out is not None:
            stdout.print(f"wrote {len(written)} files to {out}/ (report.json, outliers.csv"
                         f"{', figures' if figures else ''})")

    def _emergence(run_dir: str) -> None:
        from artifactscan.analysis.compare import scan_run
        from artifactscan.render.plots_compare import save_emergence_figure
        from artifactscan.render.text import render_emergence

        result = scan_run(run_dir, images, threshold=threshold, device=device, batch_size=batch_size,
                          progress=not json_out and sys.stderr.isatty(), img_size=img_size)
        emit_result(result, out, "emergence.json", json_out, lambda r: render_emergence(r, stdout),
                    save_emergence_figure if figures else None)

    run_command(debug, work)


@app.command()
def compare(
    models_and_images: list[str] = typer.Argument(..., metavar="MODEL... IMAGES",
                                                  help="Two or more models (as for `norms`), then the image folder "
                                                       "(or synthetic[:N]) they are all scanned on."),
    threshold: str = typer.Option("auto", "--threshold", "-t", help=THRESHOLD_HELP),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write compare.json and compare.png here."),
    json_out: bool = typer.Option(False, "--json", help="Print the comparison as JSON on stdout and nothing else."),
    device: str = DeviceOpt,
    batch_size: int = BatchOpt,
    workers: str = WorkersOpt,
    exact_decode: bool = ExactDecodeOpt,
    gpu_decode: bool = GpuDecodeOpt,
    debug: bool = DebugOpt,
) -> None:
    """Scan several models on the same images: one table, one figure (the paper's Fig 4c and 7).

    Models of different sizes, or with and without registers. Besides outlier statistics it reports what registers
    change even where no artifact exists: attention mass on prefix tokens and register norms. On synthetic[:N] it
    also says whether flagged tokens sit on background or on objects (content).

    Example:

      artifactscan compare demo demo-reg4 phantom synthetic:256
    """
    from artifactscan.analysis.compare import compare as compare_models
    from artifactscan.render.plots_compare import save_compare_figure
    from artifactscan.render.text import render_compare

    def work() -> None:
        if len(models_and_images) < 3:
            from artifactscan.core.errors import InputError

            raise InputError("compare needs at least two models and then the images: "
                             "artifactscan compare MODEL_A MODEL_B IMAGES")
        *models, images = models_and_images
        result = compare_models(models, images, threshold=threshold, device=device, batch_size=batch_size,
                                progress=not json_out and sys.stderr.isatty(), num_workers=workers,
                                exact_decode=exact_decode, gpu_decode=gpu_decode)
        emit_result(result, out, "compare.json", json_out, lambda r: render_compare(r, stdout), save_compare_figure)

    run_command(debug, work)


@app.command()
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
                                            ".safetensors that every command loads with the repair applied."),
    json_out: bool = typer.Option(False, "--json", help="Print the fix report as JSON on stdout and nothing else."),
    device: str = DeviceOpt,
    batch_size: int = BatchOpt,
    workers: str = WorkersOpt,
    exact_decode: bool = ExactDecodeOpt,
    gpu_decode: bool = GpuDecodeOpt,
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
        result = run_fix(model, images, top_k=top_k, max_layer=max_layer, threshold=threshold, out=out,
                         device=device, batch_size=batch_size, num_workers=workers, exact_decode=exact_decode,
                         gpu_decode=gpu_decode)
        if json_out:
            sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
            return
        from rich.panel import Panel
        from rich.table import Table

        if result.neurons:
            table = Table(title="register neurons", title_justify="left", header_style="bold")
            for col in ("site", "unit", "mean |act| at outliers", "at normal patches"):
                table.add_column(col, justify="left" if col == "site" else "right")
            for n in result.neurons:
                table.add_row(n.site, str(n.index), f"{n.outlier_activation:.3g}", f"{n.normal_activation:.3g}")
            stdout.print(table)
            stdout.print(f"last block: {result.before_outlier_fraction:.2%} -> {result.after_outlier_fraction:.2%} "
                         f"outliers; max/median {result.before_max_over_median:.1f}x -> "
                         f"{result.after_max_over_median:.1f}x")
        stdout.print(Panel(result.verdict, title="verdict", style="bold"))
        for note in result.notes:
            stdout.print(f"[dim]{note}[/dim]")
        if result.saved_to:
            stdout.print(f"saved the fixed model to {result.saved_to}")

    run_command(debug, work)


@app.command("train-reg")
def train_reg(
    data: Optional[str] = typer.Option(None, "--data", help="ImageFolder root (class sub-folders; a val/ folder is "
                                                            "used when present). Default: the built-in synthetic set."),
    arch: Optional[str] = typer.Option(None, "--arch", help="timm VisionTransformer name (default: the demo ViT)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="demo (CPU-sized, synthetic) or imagenet (the "
                                                                "architecture's own size, DeiT-like recipe)."),
    registers: str = typer.Option("4", "--registers", "-r", help="Registers of the twin (4), or a list for the "
                                                                "ablation: 0,1,2,4,8."),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="A trained 0-register checkpoint of the same "
                                                                     "architecture: train only the register model."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default: runs/<date>-<arch>)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue an interrupted run folder."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Epochs over --data (instead of --steps)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimiser steps per model."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Batch per process."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (warm-up then cosine)."),
    depth: Optional[int] = typer.Option(None, "--depth", help="Override: number of blocks."),
    dim: Optional[int] = typer.Option(None, "--dim", help="Override: embedding width."),
    heads: Optional[int] = typer.Option(None, "--heads", help="Override: attention heads."),
    img_size: Optional[int] = typer.Option(None, "--img-size", help="Override: input size."),
    patch: Optional[int] = typer.Option(None, "--patch", help="Override: patch size."),
    no_cls: bool = typer.Option(False, "--no-cls", help="No CLS token: average pooling over patch tokens."),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the model (GPU)."),
    scan_images: Optional[str] = typer.Option(None, "--scan-images", help="Held-out images the verdict scans "
                                              "(default: synthetic:512 of the built-in validation split, or the "
                                              "data set's val/ folder)."),
    device: str = DeviceOpt,
    json_out: bool = typer.Option(False, "--json", help="Print the verdict as JSON on stdout and nothing else."),
    debug: bool = DebugOpt,
) -> None:
    """Retrain with registers and confirm - or honestly fail to confirm - that they remove the artifacts.

    Trains the same ViT twice from the same seed, initial weights and data order: without registers and with N
    (timm's reg_tokens: after CLS, no position embedding, discarded at the output). Then scans both with the norms
    core on held-out images and prints the verdict side by side: outlier fraction, max/median ratio and onset layer
    per model, attention mass on prefix tokens, register norms, and (on the built-in data, whose object masks are
    known) whether flagged tokens sit on background or on objects. If the baseline grew no outliers the verdict says
    the experiment cannot confirm the fix. GPU: bf16 autocast, fused AdamW, SDPA; multi-GPU through torchrun (DDP).

    Examples:

      artifactscan train-reg                                    # CPU demo on the built-in data set

      artifactscan train-reg --data imagenet100/ --arch vit_small_patch16_224 --registers 4 --epochs 100

      torchrun --nproc-per-node 8 -m artifactscan train-reg --data imagenet/ --arch vit_base_patch16_224

      artifactscan train-reg --resume runs/2026-11-23-vit-small/
    """
    from artifactscan.analysis import training
    from artifactscan.analysis.compare import verdict_for_run
    from artifactscan.render.plots_compare import save_compare_figure, save_register_ablation_figure
    from artifactscan.render.text import render_compare

    def work() -> None:
        if resume is not None:
            # Options passed again must match the saved run; only where it runs may change.
            again = {k: v for k, v in dict(data=data, arch=arch, epochs=epochs, steps=steps, batch_size=batch_size,
                                            lr=lr, depth=depth, embed_dim=dim, num_heads=heads, img_size=img_size,
                                            patch_size=patch).items() if v is not None}
            runtime = {"device": device} if device != "auto" else {}
            result = training.resume(resume, again or None, progress=not json_out, **runtime)
            run_dir = resume
            if not isinstance(result, training.TrainRegResult):
                stdout.print(f"resumed and finished the single-model run in {resume}")
                return
        else:
            config = training.get_preset(
                preset, data=data, arch=arch, epochs=epochs, steps=steps, batch_size=batch_size, lr=lr, depth=depth,
                embed_dim=dim, num_heads=heads, img_size=img_size, patch_size=patch,
                class_token=False if no_cls else None, compile=compile_model or None,
                device=device if device != "auto" else None)
            run_dir = out or Path("runs") / f"{__import__('datetime').date.today()}-{config.arch.split('_patch')[0]}"
            result = training.train_reg(config, run_dir, registers, baseline_checkpoint=baseline,
                                        progress=not json_out)
        if int(os.environ.get("RANK", "0")) != 0:
            return  # rank 0 scans and reports
        verdict = verdict_for_run(result, scan_images, device=device, progress=not json_out and sys.stderr.isatty())

        def figures(v: Any, folder: Path) -> None:
            save_compare_figure(v.comparison, folder)
            if len(result.variants) > 2:
                save_register_ablation_figure(v.comparison, folder)

        def render(v: Any) -> None:
            render_compare(v.comparison, stdout)
            stdout.print("held-out accuracy: " + ", ".join(f"{k} {a:.1%}" for k, a in
                                                           v.validation_accuracy.items()))
            stdout.print(f"run folder: {run_dir} (verdict.json, compare.png, checkpoints per model)")

        emit_result(verdict, Path(run_dir), "verdict.json", json_out, render, figures)

    run_command(debug, work)


@app.command()
def phantom(
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
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where --build writes the .safetensors file."),
    debug: bool = DebugOpt,
) -> None:
    """The calibration phantom: a ViT whose artifact tokens were built in, so the right answer is known.

    No pretrained ViT can be downloaded here, and small ViTs trained here grow no artifacts, so artifactscan ships
    genuinely trained baselines with the paper's mechanism added at one block: a few hidden units fire on the <= 2%
    most redundant patches of each image and overwrite them with a large vector carrying a global summary.
    Two are shipped: phantom-deep (the default model: 24 blocks like ViT-L, onset block 9, so the paper's
    `probe --layer 15` lands inside the artifact range) and phantom (6 blocks, onset block 2; fast, for tests and
    calibration). Their findings are facts about this construction, never about real models.

    Examples:

      artifactscan phantom --describe

      artifactscan phantom --describe --model phantom

      artifactscan phantom --build --from demo-deep --onset 9 --out artifactscan/weights/phantom-deep.safetensors
    """
    from artifactscan.models.phantom import build_phantom, describe_phantom

    def work() -> None:
        if build:
            _, spec, path = build_phantom(base, out, onset=onset, fraction=fraction, units=units,
                                          gain_over_median=gain)
            stdout.print(f"built the phantom from {base}: onset block {spec.onset}, {spec.planted_per_image} of "
                         f"{spec.num_patches} patch tokens planted per image, gain {spec.gain:g} "
                         f"({spec.gain_over_median:g}x the baseline's median norm)"
                         + (f"; wrote {path}" if path else " (not saved: pass --out)"))
            return
        stdout.print(describe_phantom(name))

    run_command(debug, work)


def main() -> None:
    app()
