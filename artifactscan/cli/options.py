"""Options shared by several commands, and the groups of them a command takes as one parameter.

A command declares ``load: ModelLoadOptions = ModelLoadOptions()`` (or ``run: PassOptions = PassOptions()``) and is
decorated with :func:`with_option_groups`: Typer then sees the group's own options in that place of the signature
(same flags, defaults and help as if each were written out), and the command receives them as one object whose
``kwargs()`` are the library's keyword arguments.
"""

from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional

import typer

from artifactscan.core.defaults import BATCH_SIZE, DEVICE, MAPS, THRESHOLD, WORKERS

ArchOpt = typer.Option(None, "--arch", help="timm architecture for a bare state dict, e.g. vit_small_patch16_224.")
ArchKwargsOpt = typer.Option(None, "--arch-kwargs", help='JSON of timm.create_model overrides, e.g. \'{"reg_tokens": 4}\'.')
TrustOpt = typer.Option(False, "--trust-checkpoint",
                        help="Allow loading a whole pickled nn.Module or a TorchScript archive (OpenAI's CLIP .pt). "
                             "Both run code from the file: only for files you trust.")
WeightsOpt = typer.Option(None, "--weights", help="ema or raw: which weights of a checkpoint holding both "
                                                  "(default: ema, as timm does; the report names the ones loaded).")
DeviceOpt = typer.Option(DEVICE, "--device", help="auto (CUDA when available), cpu, cuda, cuda:N.")
BatchOpt = typer.Option(BATCH_SIZE, "--batch-size", "-b", help="Images per forward pass.")
WorkersOpt = typer.Option(WORKERS, "--workers", help="DataLoader processes decoding images: 'auto' (half the cores on "
                          "the CPU, all but one with CUDA; at most 8, none under 64 images) or a number (0: decode on "
                          "the main process).")
ExactDecodeOpt = typer.Option(False, "--exact-decode", help="Decode image files in full. Default: only as large as the "
                              "model needs (JPEG draft / integer reduce to >= 2x its resize), docs/data-path.md.")
GpuDecodeOpt = typer.Option(False, "--gpu-decode", help="With a CUDA device: decode JPEGs on it in batches "
                            "(TorchCodec / nvJPEG; a failed batch falls back to Pillow file by file).")
ImgSizeOpt = typer.Option(None, "--img-size", help="Resize inputs to this square size instead of the model's own "
                                                   "(position embeddings are resampled).")
DebugOpt = typer.Option(False, "--debug", help="Show the full traceback on errors.")
PrecisionOpt = typer.Option("auto", "--precision", help="fp32, bf16 or fp16: hold the weights and run the forward in "
                            "it (statistics stay float32); auto: fp32 when the fp32 weights fit in memory, else the "
                            "checkpoint's half precision (said in one line).")
AllowNonFiniteOpt = typer.Option(False, "--allow-nonfinite",
                                 help="Scan a model whose weights or token norms hold NaN/Inf instead of stopping with "
                                      "exit code 1 (the report still says so first, loudly).")


def _opt(default: Any, option: Any) -> Any:
    return field(default=default, metadata={"option": option})


@dataclass(frozen=True)
class ModelLoadOptions:
    """--arch, --arch-kwargs, --trust-checkpoint, --weights, --img-size, --precision: how a command loads its model."""

    arch: Optional[str] = _opt(None, ArchOpt)
    arch_kwargs: Optional[str] = _opt(None, ArchKwargsOpt)
    trust_checkpoint: bool = _opt(False, TrustOpt)
    weights: Optional[str] = _opt(None, WeightsOpt)
    img_size: Optional[int] = _opt(None, ImgSizeOpt)
    precision: str = _opt("auto", PrecisionOpt)

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``load_model`` and of every library entry point that loads one (--arch-kwargs
        parsed here: a bad JSON is an InputError, so call this inside the command's work)."""
        from artifactscan.models.loading import parse_arch_kwargs

        return dict(arch=self.arch, arch_kwargs=parse_arch_kwargs(self.arch_kwargs),
                    trust_checkpoint=self.trust_checkpoint, weights=self.weights, img_size=self.img_size,
                    precision=self.precision)


@dataclass(frozen=True)
class PassOptions:
    """--device, --batch-size, --workers, --exact-decode, --gpu-decode: where a command's forward passes run, how
    many images each takes, and how its image files are decoded."""

    device: str = _opt(DEVICE, DeviceOpt)
    batch_size: int = _opt(BATCH_SIZE, BatchOpt)
    workers: str = _opt(WORKERS, WorkersOpt)
    exact_decode: bool = _opt(False, ExactDecodeOpt)
    gpu_decode: bool = _opt(False, GpuDecodeOpt)

    def kwargs(self) -> dict[str, Any]:
        """The library's keyword arguments: ``device``, ``batch_size``, ``num_workers``, ``exact_decode``,
        ``gpu_decode``."""
        return dict(device=self.device, batch_size=self.batch_size, num_workers=self.workers,
                    exact_decode=self.exact_decode, gpu_decode=self.gpu_decode)


OPTION_GROUPS = (ModelLoadOptions, PassOptions)


def with_option_groups(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a Typer command: each parameter annotated with an option group becomes that group's options in its
    place (for Typer's help and parsing), and the command is called with one group object there."""
    sig = inspect.signature(fn, eval_str=True)
    params: list[inspect.Parameter] = []
    groups: dict[str, type] = {}
    for p in sig.parameters.values():
        if p.annotation not in OPTION_GROUPS:
            params.append(p)
            continue
        groups[p.name] = p.annotation
        hints = typing.get_type_hints(p.annotation)
        for f in fields(p.annotation):
            params.append(inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                            default=f.metadata["option"], annotation=hints[f.name]))

    @functools.wraps(fn)
    def command(**kwargs: Any) -> Any:
        for name, group in groups.items():
            kwargs[name] = group(**{f.name: kwargs.pop(f.name) for f in fields(group)})
        return fn(**kwargs)

    command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params} | {"return": sig.return_annotation}
    return command


#: How every ``--blocks`` is written (core/blocks.py parses it).
BLOCKS_SYNTAX = ("0-based like timm; negative counts from the end (-1 = the last block); a comma list (0,5,-1) or an "
                 "inclusive range (2:8 = blocks 2 to 8; :8 and 9: leave an end open)")


def threshold_option(help_text: str) -> Any:
    """``--threshold/-t``, with the shared default."""
    return typer.Option(THRESHOLD, "--threshold", "-t", help=help_text)


def maps_option(help_text: str) -> Any:
    """``--maps N``: the images kept for the per-image figures (one name in every command)."""
    return typer.Option(MAPS, "--maps", help=help_text)


def old_spelling(old: str, new: str) -> Any:
    """A hidden option for a flag's old spelling, kept for one version (see :func:`renamed_flag`)."""
    return typer.Option(None, old, hidden=True, help=f"Deprecated: use {new}.")


def deprecation_note(text: str) -> None:
    """One line on stderr; the command goes on with the same result."""
    typer.echo(f"warning: deprecated: {text}", err=True)


def renamed_flag(new_value: Any, old_value: Any, old: str, new: str, default: Any = None,
                 convert: Callable[[Any], Any] = lambda v: v) -> Any:
    """The value of a flag spelled ``old`` until this version: a one-line deprecation note, then the same value as
    ``new`` (``convert``-ed where the new flag writes it differently); both typed is an error."""
    if old_value is None:
        return new_value
    from artifactscan.core.errors import InputError

    if new_value is not None and new_value != default:
        raise InputError(f"{old} and {new} name the same thing; pass only {new}")
    value = convert(old_value)
    deprecation_note(f"{old} {old_value} is now {new} {value} (same result); {old} goes in the next version")
    return value


def refuse_options_given(ctx: typer.Context, names: tuple[str, ...], mode: str, instead: str) -> None:
    """Refuse the options among ``names`` (parameter names) that were typed on the command line although they only
    apply to ``mode``: one line naming them, so that none is silently ignored."""
    from artifactscan.core.errors import InputError

    flags = {p.name: p.opts[0] for p in ctx.command.params}
    # compared by name: Typer may run on its own vendored copy of click, whose enum is not click's
    sources = {n: getattr(ctx.get_parameter_source(n), "name", "DEFAULT") for n in names}
    typed = [flags[n] for n in names if sources[n] != "DEFAULT"]
    if typed:
        one = len(typed) == 1
        raise InputError(f"{', '.join(typed)} only appl{'ies' if one else 'y'} to {mode}; drop "
                         f"{'it' if one else 'them'} or {instead}")
