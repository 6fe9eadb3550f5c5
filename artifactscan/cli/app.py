"""The ``artifactscan`` command line: a thin Typer layer over the library.

Each command parses flags, calls one library function, and renders its dataclass result. Exit codes (the same for
every command; docs/reliability.md): 0 done; 1 a user error - library errors (:class:`ArtifactScanError`) and bad
command lines - as one red line on stderr; also an OSError of a kind that describes the machine (a full disk, a
read-only file system, no permission, a closed or full stdout: ``core/errors.py``), named with its path; 2 an internal
error (a bug: the line asks for ``--debug``, which shows the traceback); 3 a gate failed (``norms --fail-above``);
130 interrupted (SIGINT or SIGTERM); 141 stdout's reader went away (``| head -1``), silently (cli/streams.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

try:  # Typer >= 0.25 vendors click; its exceptions are that copy's, not the click package's
    from typer import _click as click  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - older Typer on top of click
    import click  # type: ignore[no-redef]

from artifactscan.core.errors import ArtifactScanError, cli_spelling, is_environment_problem, os_problem
from artifactscan.core.files import display_name, output_folder
from artifactscan.core.startup import begin_startup, end_startup, freeze_heap
from artifactscan.cli.streams import (EXIT_READER_GONE, ReaderGone, final_exit_code, forget_caught_interrupts,
                                      guarded_streams, reserve_closed_descriptors)
from artifactscan.cli.options import (  # noqa: F401  (re-exported: the commands' shared options)
    AllowNonFiniteOpt,
    ArchKwargsOpt,
    ArchOpt,
    DebugOpt,
    DeviceOpt,
    ExactDecodeOpt,
    GpuDecodeOpt,
    ImgSizeOpt,
    ModelLoadOptions,
    PassOptions,
    TrustOpt,
    WeightsOpt,
    WorkersOpt,
    maps_option,
    refuse_options_given,
    threshold_option,
    with_option_groups,
)

EXIT_OK, EXIT_USER, EXIT_INTERNAL, EXIT_GATE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def one_line(text: Any) -> str:
    """Any message as one printable line: its own newlines folded (a name's were escaped as ``\\n`` where the
    message was built, by ``display_name``), control characters and non-UTF-8 bytes escaped."""
    return display_name(" ".join(str(text).split("\n")).strip())


def print_line(console: Console, label: str, style: str, message: Any) -> None:
    """``label: message`` on one line; the message is never read as rich markup (paths may hold ``[bold]``)."""
    console.print(Text.assemble((label, style), " ", one_line(message)), soft_wrap=True, highlight=False)


class _Group(TyperGroup):
    """The app's click group: a bad command line is a user error too (one line, exit 1), not click's exit 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # type: ignore[override]
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False,
                              **extra)
        except click.exceptions.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "artifactscan"
            print_line(stderr, "error:", "bold red", f"{exc.format_message()} (see: {where} --help)")
            if not standalone_mode:
                raise
            sys.exit(EXIT_USER)
        except click.exceptions.ClickException as exc:
            print_line(stderr, "error:", "bold red", exc.format_message())
            if not standalone_mode:
                raise
            sys.exit(EXIT_USER)
        except typer.Abort:  # typer re-exports the Abort of the click it runs on (vendored or not)
            print_line(stderr, "interrupted", "red", "")
            if not standalone_mode:
                raise
            sys.exit(EXIT_INTERRUPTED)
        code = rv if isinstance(rv, int) and not isinstance(rv, bool) else EXIT_OK
        if standalone_mode:
            sys.exit(code)
        return rv


app = typer.Typer(
    cls=_Group,
    name="artifactscan",
    help=(
        "Find, explain and fix the high-norm 'artifact' tokens of Vision Transformers "
        "(Darcet et al., 'Vision Transformers Need Registers', ICLR 2024).\n\n"
        "Run any command with no MODEL/IMAGES to use the embedded default: the calibration phantom phantom-deep (a "
        "24-block ViT whose artifacts were built in from block 9, so the right answer is known) on the photos in "
        "sample_images/."
    ),
    no_args_is_help=False,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

stdout = Console()
stderr = Console(stderr=True)


def warn(message: Any) -> None:
    """One warning line on stderr (file names in it printed literally, escaped)."""
    print_line(stderr, "warning:", "yellow", message)


class _Terminated(KeyboardInterrupt):
    """SIGTERM's KeyboardInterrupt. A subclass on purpose: when the bare class escapes an ``exec`` of source text (as
    ``dataclasses`` runs while a class is defined), CPython marks it unhandled and ends the process by SIGINT after
    the command exits 130 (3 runs in 20 measured), whatever catches it later."""


_received_signals: list[int] = []  # SIGINT/SIGTERM received while the current command runs


def interrupt_handled() -> None:
    """A command that stops on Ctrl-C by design (``monitor --follow``) says so: it ends as it chooses, not as
    interrupted."""
    _received_signals.clear()


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM stops a command the way Ctrl-C does (cleanup runs, exit 130); train-reg installs its own handler.

    Both signals are also remembered: an interrupt raised while Python runs a weakref callback or a ``__del__``
    (matplotlib's transforms have such callbacks) is printed as "Exception ignored" and swallowed, and the command
    would then finish with exit 0 although it was told to stop. A command that returns after a signal it never saw
    raised ends as interrupted (exit 130) all the same."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = _received_signals
    received.clear()

    def handler(signum: int, frame: Any) -> None:
        received.append(signum)
        raise _Terminated if signum == signal.SIGTERM else KeyboardInterrupt

    try:
        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    except (ValueError, OSError):
        yield
        return
    try:
        yield
        if received:  # the body returned: the interrupt was swallowed on the way (see above)
            raise _Terminated if received[0] == signal.SIGTERM else KeyboardInterrupt
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_command(debug: bool, fn: Callable[[], Any]) -> Any:
    """Run ``fn``; turn failures into one clear line and the documented exit code (traceback only with --debug)."""
    debug = debug or bool(os.environ.get("ARTIFACTSCAN_DEBUG"))
    # a failing stdout never interrupts the work; it is judged once it is done. The library's messages (and the
    # handlers' own) name options by their flags.
    with guarded_streams() as out, cli_spelling():
        return _run_guarded(debug, fn, out)


def _run_guarded(debug: bool, fn: Callable[[], Any], out: Any) -> Any:
    try:
        with _sigterm_interrupts():
            result = _in_startup_phase(fn)
        out.check()
        return result
    except ReaderGone:
        raise typer.Exit(EXIT_READER_GONE) from None
    except ArtifactScanError as exc:
        if debug:
            traceback.print_exc()
        code = getattr(exc, "exit_code", EXIT_USER)
        label = {EXIT_GATE: "gate failed:", EXIT_INTERRUPTED: "interrupted:"}.get(code, "error:")
        print_line(stderr, label, "bold red", exc)
        raise typer.Exit(code) from None
    except KeyboardInterrupt:
        print_line(stderr, "interrupted", "red", "(outputs written so far are complete; nothing is half-written)")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except OSError as exc:
        if not is_environment_problem(exc):  # EBADF, EINVAL ... on a descriptor of artifactscan's own: a bug
            return _internal_error(debug, exc)
        if debug:
            traceback.print_exc()
        where = f"{display_name(exc.filename)}: " if exc.filename is not None else ""
        print_line(stderr, "error:", "bold red", where + os_problem(exc))
        raise typer.Exit(EXIT_USER) from None
    except Exception as exc:
        return _internal_error(debug, exc)
    finally:
        end_startup()


def _in_startup_phase(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` with the collector resting until its model is loaded (core/startup.py): the library calls back
    when a model is loaded and when a decoding worker starts (a forked worker inherits the start-up phase)."""
    from artifactscan.inputs.sources import in_decoding_workers
    from artifactscan.models.loading import after_load

    begin_startup()
    removers = [after_load.add(lambda loaded: end_startup()), in_decoding_workers.add(end_startup)]
    try:
        return fn()
    finally:
        for remove in removers:
            remove()


def _internal_error(debug: bool, exc: Exception) -> None:
    """An unexpected failure: a bug. Still one line, with the way to get details."""
    if debug:
        traceback.print_exception(exc)
    else:
        print_line(stderr, "internal error:", "bold red", f"{type(exc).__name__}: {exc} (a bug in artifactscan; "
                   "run again with --debug for the traceback and report it)")
    raise typer.Exit(EXIT_INTERNAL) from None


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
                render: Callable[[Any], None], figures: Callable[[Any, Path], Any] | None = None,
                old_filename: str | None = None) -> None:
    """Write ``result`` as ``out/filename`` (+ figures), then print it: JSON alone on stdout, or rendered.

    ``old_filename``: the name the file had before it was renamed, written too (same content) for one version."""
    from artifactscan.core.results import atomic_write_text

    text = json.dumps(result.to_dict(), indent=2)
    if out is not None:  # inside an output_folder(...) block: the folder was validated and locked before the work
        atomic_write_text(out / filename, text)
        if old_filename:
            atomic_write_text(out / old_filename, text)
        if figures is not None:
            figures(result, out)
    if json_out:
        sys.stdout.write(text + "\n")
    else:
        render(result)


def show_written_result(report: Any, out: Optional[Path], json_out: bool, written: list[Path],
                        render: Callable[[Any, Any], None], listing: str) -> None:
    """Print a result whose files are already written: its JSON alone on stdout, or its rendering followed by the
    ``wrote N files to OUT/ (listing)`` line."""
    from artifactscan.render.text import render_written

    if json_out:
        sys.stdout.write(report.to_json() + "\n")
        return
    render(report, stdout)
    if out is not None:
        render_written(stdout, written, out, listing)


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
    "candidate is shown as a near miss), or inconclusive when a group fails only the 5-token minimum. A number (e.g. 150, the paper's value for DINOv2 ViT-g) flags every patch "
    "token above it. Detection limit: artifactscan calibrate."
)

def check_fraction(value: float | None, flag: str) -> None:
    if value is not None and not (0.0 <= value <= 1.0):
        from artifactscan.core.errors import InputError

        raise InputError(f"{flag} takes a fraction between 0 and 1 (e.g. 0.01 for 1%), got {value:g}")


def swapped_arguments_hint(model: str, images: Optional[str]) -> None:
    """``norms imgs/ demo``: a folder of images where the model goes. Say so, with the command to type."""
    from artifactscan.core.errors import InputError
    from artifactscan.inputs.images import IMAGE_EXTENSIONS
    from artifactscan.models.loading import CHECKPOINT_SUFFIXES

    folder = Path(model)
    holds_checkpoints = any(p.suffix in CHECKPOINT_SUFFIXES for p in folder.rglob("*") if p.is_file())
    if holds_checkpoints:
        return
    holds_images = any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.rglob("*") if p.is_file())
    if holds_images:
        swapped = f"artifactscan norms {images} {model}" if images else f"artifactscan norms MODEL {model}"
        raise InputError(f"{model} is a folder of images, not a model or a training run (MODEL comes first, then "
                         f"IMAGES): did you mean `{swapped}`?")


@app.command()
@with_option_groups
def norms(
    ctx: typer.Context,
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP, show_default=False),
    images: Optional[str] = typer.Argument(None, help=IMAGES_HELP, show_default=False),
    threshold: str = threshold_option(THRESHOLD_HELP),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write report.json, outliers.csv and figures here."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout and nothing else."),
    maps: int = maps_option("Per-image norm maps to keep (first N images)."),
    figures: bool = typer.Option(True, "--figures/--no-figures", help="Write figures into --out."),
    fail_above: Optional[float] = typer.Option(
        None, "--fail-above", metavar="FRACTION",
        help="A gate for CI: exit with code 3 when the last block's outlier fraction exceeds FRACTION (e.g. 0.01), "
             "or when the scan is inconclusive (a separated group with too few tokens to decide: scan more images). "
             "The report and --out files are still written. For a run folder: the latest checkpoint of each model."),
    allow_nonfinite: bool = AllowNonFiniteOpt,
    load: ModelLoadOptions = ModelLoadOptions(),
    run: PassOptions = PassOptions(),
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

      artifactscan norms my_vit.safetensors val/ --fail-above 0.01        # CI: exit 3 if > 1% outliers

    Exit codes: 0 done; 1 a user or environment error (or NaN/Inf weights or norms, unless --allow-nonfinite); 2 a
    bug; 3 the --fail-above gate failed (too many outliers, or an inconclusive scan); 130 interrupted; 141 stdout's
    reader went away (| head).
    """
    from artifactscan.models.hf import is_training_run
    from artifactscan.render.text import render_scan
    from artifactscan.render.outputs import write_scan_outputs
    from artifactscan.core.distributed import distributed_world
    from artifactscan.analysis.scan import scan

    def work() -> None:
        check_fraction(fail_above, "--fail-above")
        if maps < 0:
            from artifactscan.core.errors import InputError

            raise InputError(f"--maps must be 0 or more (the number of images that keep a norm map), got {maps}")
        # a training run (its own files say so) or a folder of checkpoints; one with a config.json is a model
        folder = Path(model) if model is not None else None
        is_run = folder is not None and folder.is_dir() and (is_training_run(folder)
                                                             or not (folder / "config.json").is_file())
        if is_run:
            swapped_arguments_hint(model, images)  # type: ignore[arg-type]
            # a run's checkpoints describe themselves, and its report keeps no per-image maps
            refuse_options_given(ctx, RUN_FOLDER_REFUSES, "a single model, not a run folder",
                                 "scan one checkpoint of the run: artifactscan norms RUN/MODEL/CHECKPOINT")
        rank = distributed_world()[1]
        mine = out if rank == 0 else None  # under torchrun rank 0 alone owns --out
        with output_folder(mine, "norms"):  # validated and locked before any model runs
            if is_run:
                return norms_of_run(model, images, threshold=threshold, out=out, json_out=json_out,  # type: ignore
                                    figures=figures, fail_above=fail_above, **run.kwargs(),
                                    img_size=load.img_size, precision=load.precision, allow_nonfinite=allow_nonfinite)
            report = scan(model, images, threshold=threshold, **load.kwargs(), **run.kwargs(), num_maps=maps,
                          progress=not json_out and sys.stderr.isatty(), warn=warn, allow_nonfinite=allow_nonfinite)
            if rank != 0:
                return  # under torchrun every rank holds the merged report; rank 0 alone writes and prints it
            written = write_scan_outputs(report, out, figures=figures) if out is not None else []
            show_written_result(report, out, json_out, written, render_scan,
                                "report.json, outliers.csv" + (", figures" if figures else ""))
        check_scan_gates(report, fail_above, allow_nonfinite)

    run_command(debug, work)


#: ``norms`` options that do not apply to a run folder (refused when typed, never silently dropped).
RUN_FOLDER_REFUSES = ("arch", "arch_kwargs", "trust_checkpoint", "weights", "maps")


def check_scan_gates(report: Any, fail_above: Optional[float], allow_nonfinite: bool) -> None:
    """After a scan's outputs are written: non-finite values (exit 1) and the --fail-above gate (exit 3)."""
    from artifactscan.core.errors import GateFailedError, NonFiniteError

    problem = report.nonfinite_problem()
    if problem and not allow_nonfinite:
        raise NonFiniteError(f"{problem}: the statistics above are not valid; find where the values start (e.g. "
                             "fp16 overflow: try --precision bf16, which has float32's range), or pass "
                             "--allow-nonfinite to accept the report")
    last = report.last_block
    if fail_above is not None and last.outlier_fraction > fail_above:
        raise GateFailedError(f"{last.name}: {last.outlier_fraction:.2%} of patch tokens are outliers, above "
                              f"--fail-above {fail_above:g} ({fail_above:.2%})")
    undecided = report.inconclusive_problem()
    if fail_above is not None and undecided:  # "could not decide" never passes a gate
        raise GateFailedError(f"{undecided}; an inconclusive scan does not pass --fail-above")


def norms_of_run(run_dir: str, images: Optional[str], *, threshold: str, out: Optional[Path], json_out: bool,
                 figures: bool, fail_above: Optional[float], allow_nonfinite: bool, **scan_kwargs: Any) -> None:
    """``norms RUN_DIR``: every checkpoint of a training run scanned, outliers against training step."""
    from artifactscan.analysis.emergence import NONFINITE_REASON, scan_run
    from artifactscan.core.errors import NonFiniteError
    from artifactscan.render.plots_compare import save_emergence_figure
    from artifactscan.render.text import render_emergence

    result = scan_run(run_dir, images, threshold=threshold, progress=not json_out and sys.stderr.isatty(), warn=warn,
                      allow_nonfinite=allow_nonfinite, **scan_kwargs)
    emit_result(result, out, "emergence.json", json_out, lambda r: render_emergence(r, stdout),
                save_emergence_figure if figures else None)
    bad = [s for s in result.skipped if s.reason.startswith(NONFINITE_REASON)]
    if bad:
        raise NonFiniteError(f"{len(bad)} checkpoint(s) of the run hold non-finite weights or norms (first: "
                             f"{bad[0].path}: {bad[0].reason[len(NONFINITE_REASON):]}); they are listed under "
                             "'skipped' (--allow-nonfinite scans them anyway)")
    if fail_above is not None:
        check_run_gate(result, fail_above)


def check_run_gate(result: Any, fail_above: float) -> None:
    """--fail-above for a run folder: the latest checkpoint of each model, over the bar or inconclusive, fails."""
    from artifactscan.core.errors import GateFailedError

    over = [(g, g.points[-1]) for g in result.groups if g.points and g.points[-1].outlier_fraction
            and g.points[-1].outlier_fraction[-1] > fail_above]
    if over:
        g, p = over[0]
        raise GateFailedError(f"{Path(p.checkpoint).name} (step {p.step}): {p.outlier_fraction[-1]:.2%} of "
                              f"last-block patch tokens are outliers, above --fail-above {fail_above:g}"
                              + (f" (+{len(over) - 1} more models)" if len(over) > 1 else ""))
    undecided = [(g, g.points[-1]) for g in result.groups if g.points and g.points[-1].inconclusive_layers]
    if undecided:
        g, p = undecided[0]
        raise GateFailedError(f"{Path(p.checkpoint).name} (step {p.step}): inconclusive at block(s) "
                              f"{', '.join(map(str, p.inconclusive_layers))} (a separated group with fewer "
                              "tokens than the threshold rule needs; scan more images); an inconclusive "
                              "scan does not pass --fail-above"
                              + (f" (+{len(undecided) - 1} more models)" if len(undecided) > 1 else ""))


@app.command()
@with_option_groups
def compare(
    models_and_images: list[str] = typer.Argument(..., metavar="MODEL... IMAGES",
                                                  help="Two or more models (as for `norms`), then the image folder "
                                                       "(or synthetic[:N]) they are all scanned on."),
    threshold: str = threshold_option(THRESHOLD_HELP),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write compare.json and compare.png here."),
    json_out: bool = typer.Option(False, "--json", help="Print the comparison as JSON on stdout and nothing else."),
    load: ModelLoadOptions = ModelLoadOptions(),
    run: PassOptions = PassOptions(),
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
        with output_folder(out, "compare"):
            result = compare_models(models, images, threshold=threshold, **run.kwargs(),
                                    progress=not json_out and sys.stderr.isatty(),
                                    **load.kwargs())
            emit_result(result, out, "compare.json", json_out, lambda r: render_compare(r, stdout),
                        save_compare_figure)

    run_command(debug, work)


@app.command("train-reg")
def train_reg(
    data: Optional[str] = typer.Option(None, "--data", help="ImageFolder root (class sub-folders; a val/ folder is "
                                                            "used when present). Default: the built-in synthetic set."),
    arch: Optional[str] = typer.Option(None, "--arch", help="timm VisionTransformer name (default: the demo ViT)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="demo (CPU-sized, synthetic) or imagenet (the "
                                                                "architecture's own size, DeiT-like recipe)."),
    registers: Optional[str] = typer.Option(None, "--registers", "-r", show_default=False,
                                            help="Registers of the twin (default 4), or a list for the ablation: "
                                                 "0,1,2,4,8."),
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

    def work() -> None:
        main_rank = int(os.environ.get("RANK", "0")) == 0
        progress = not json_out
        if resume is not None:
            # Every option that defines the run, passed again, must match the saved run (training.resume compares
            # them all, naming both values); where it runs (--device, --compile) may change, and --scan-images
            # only concerns the verdict.
            again = {k: v for k, v in dict(data=data, arch=arch, epochs=epochs, steps=steps, batch_size=batch_size,
                                            lr=lr, depth=depth, embed_dim=dim, num_heads=heads, img_size=img_size,
                                            patch_size=patch, class_token=False if no_cls else None).items()
                     if v is not None}
            runtime: dict[str, Any] = {"device": device} if device != "auto" else {}
            if compile_model:
                runtime["compile"] = True
            check_resume_folders(resume, out)
            with output_folder(resume if main_rank else None, "train-reg", "--resume", manifest=False):
                result = training.resume(resume, again or None, registers=registers, baseline_checkpoint=baseline,
                                         preset=preset, progress=progress, **runtime)
                if not isinstance(result, training.TrainRegResult):
                    print_line(stdout, "resumed", "", f"and finished the single-model run in {display_name(resume)}")
                    return
                if main_rank:  # rank 0 scans and reports
                    train_reg_verdict(result, resume, scan_images, device, json_out)
            return
        config = training.get_preset(
            preset, data=data, arch=arch, epochs=epochs, steps=steps, batch_size=batch_size, lr=lr, depth=depth,
            embed_dim=dim, num_heads=heads, img_size=img_size, patch_size=patch,
            class_token=False if no_cls else None, compile=compile_model or None,
            device=device if device != "auto" else None)
        if steps is None and epochs is None and training.steps_from_environment() is not None:
            warn(f"{training.STEPS_ENV} is set: {config.steps} steps per model (a development setting)")
        run_dir = out or Path("runs") / f"{__import__('datetime').date.today()}-{config.arch.split('_patch')[0]}"
        # The run folder is validated and locked first: a second train-reg into it fails at once, not mid-run.
        with output_folder(run_dir if main_rank else None, "train-reg", manifest=False):
            result = training.train_reg(config, run_dir, registers or "4", baseline_checkpoint=baseline,
                                        progress=progress)
            if main_rank:
                train_reg_verdict(result, run_dir, scan_images, device, json_out)

    run_command(debug, work)


def check_resume_folders(resume: Path, out: Optional[Path]) -> None:
    """``--resume`` names an existing run folder, and ``--out`` (if given) the same one."""
    from artifactscan.core.errors import TrainingError

    if not resume.is_dir():
        raise TrainingError(f"cannot resume: {display_name(resume)} is not a folder; pass the run "
                            "folder train-reg wrote")
    if out is not None and out.resolve() != resume.resolve():
        raise TrainingError(f"--out {display_name(out)} and --resume {display_name(resume)} name different "
                            "folders: a run is continued in its own folder; drop --out")


def train_reg_verdict(result: Any, run_dir: Path, scan_images: Optional[str], device: str, json_out: bool) -> None:
    """Scan the trained models on held-out images and write/print the verdict (rank 0)."""
    try:  # a Ctrl-C from here on, the imports included, lands after the training is complete
        from artifactscan.analysis.training.verdict import verdict_for_run
        from artifactscan.analysis.run_files import HELD_OUT_COMPARISON_FILE, OLD_NAMES
        from artifactscan.render.plots_compare import save_compare_figure, save_register_ablation_figure
        from artifactscan.render.text import render_train_reg_verdict

        verdict = verdict_for_run(result, scan_images, device=device, progress=not json_out and sys.stderr.isatty())
    except KeyboardInterrupt:
        from artifactscan.core.errors import RunInterrupted

        raise RunInterrupted(f"stopped while scanning for the verdict; the training in {display_name(run_dir)} "
                             "is complete; get the verdict with: artifactscan train-reg --resume "
                             f"{display_name(run_dir)}") from None

    def figures(v: Any, folder: Path) -> None:
        save_compare_figure(v.comparison, folder)
        if len(result.variants) > 2:
            save_register_ablation_figure(v.comparison, folder)

    emit_result(verdict, Path(run_dir), HELD_OUT_COMPARISON_FILE, json_out,
                lambda v: render_train_reg_verdict(v, run_dir, stdout), figures,
                old_filename=OLD_NAMES[HELD_OUT_COMPARISON_FILE])


def main() -> None:
    """The ``artifactscan`` entry point. Once the command has finished (its outputs written and closed), the heap is
    frozen so that interpreter shutdown does not walk torch's and timm's objects again (0.6 s; core/startup.py).

    stdout is guarded here too, for what is printed outside a command's work (``--help``, ``--version``, a bad
    command line): a reader that went away is exit 141 there as well, a full stdout one error line (cli/streams.py).
    """
    reserve_closed_descriptors()
    try:
        with guarded_streams() as out:
            try:
                app()
            except SystemExit as exc:
                sys.exit(final_exit_code(out, exc.code, lambda e: print_line(stderr, "error:", "bold red", e)))
    finally:
        forget_caught_interrupts()  # the exit code stays 130 after a Ctrl-C caught during an import (cli/streams.py)
        freeze_heap()
