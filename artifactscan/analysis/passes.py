"""One pass runner for every measurement: open a model with its images, then run passes over them.

Every command needs the same setup before its first forward, and each used to write it again (with drift): check
the pass's options, load the model while its images start decoding (:func:`load_with_images`), check that a batch
fits in memory, place the model, take this rank's shard under torchrun, iterate the batches with a progress bar on
stderr, account the files that could not be read, say so once, and stop the decoding workers on every way out.
:func:`open_pass` does it once::

    with open_pass(model, images, settings=PassSettings(batch_size=32)) as opened:
        norms, = opened.run([NormsMeasurement(...)], "scanning")

A *measurement* names the hook points it needs (:meth:`Measurement.hook_names`) and how far the forward must go
(:meth:`Measurement.stop_after`), takes every batch (:meth:`Measurement.on_batch`) and returns its result from
:meth:`Measurement.finish`. :meth:`OpenedPass.run` runs ONE forward per batch for all the measurements it is given, so
a command that needs several measurements of the same images (a plan) pays for one pass, not one per measurement.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import torch

from artifactscan.analysis.memory import check_fits
from artifactscan.analysis.opening import ImagesSpec, load_with_images
from artifactscan.core.errors import InputError, NonFiniteError, NotAViTError, option
from artifactscan.core.numerics import measurement_mode
from artifactscan.core.paths import display_name
from artifactscan.core.devices import resolve_device
from artifactscan.core.distributed import distributed_world, gather
from artifactscan.core.progress import ProgressBar
from artifactscan.inputs.images import UNDECODED_IMAGE_SUFFIXES
from artifactscan.inputs.naflex import NAFLEX_KEY, is_packed, unpack
from artifactscan.inputs.sources import ImageSource, effective_batch_size, image_batches, parse_workers
from artifactscan.models.capture import token_norms  # noqa: F401  (the norms reduction, for measurements)
from artifactscan.models.hooks import block_point, capture, padded_refusal
from artifactscan.models.loading import LoadedModel

#: What a hook point's tensor becomes inside its hook (e.g. token norms), so a pass never keeps ``[B, T, D]`` tokens
#: of every block; ``None`` keeps the tensor itself.
Reduce = Callable[[torch.Tensor], torch.Tensor]

#: The model's final normalised tokens (what ``forward_features`` returns), ``[B, T, D]``.
OUTPUT = "final_norm"
#: The patch embedding's output (before the position embedding), ``[B, N, D]``.
PATCH_EMBED = "patch_embed.post"


def block_output(index: int) -> str:
    """The hook point of block ``index``'s output: the residual stream after that block (before the final norm)."""
    return block_point(index, "resid_post")


# ----------------------------------------------------------------------------------------------- measurements
@dataclass
class Batch:
    """One batch as every measurement of a pass sees it."""

    images: torch.Tensor  # [B, 3, H, W], normalised, on the pass's device (NaFlex: packed patches, inputs/naflex.py)
    indices: torch.Tensor  # into ``source.names``
    captured: Mapping[str, torch.Tensor]  # hook point -> its tensor, reduced as the measurement asked
    # NaFlex models only (None otherwise): which patch tokens are the image's own ([B, N] bool; padding False,
    # left out of every statistic) and each image's patch grid ([B, 2]: rows, cols)
    valid: torch.Tensor | None = None
    grids: torch.Tensor | None = None


class Measurement(Protocol):
    """What a pass runs: the hook points it needs, one call per batch, and its result at the end.

    A measurement that leaves NaFlex padding out of everything it computes (``Batch.valid``) says so with a class
    attribute ``measures_naflex = True``; the others are refused on NaFlex models before any forward."""

    def hook_names(self) -> Mapping[str, Reduce | None]:
        """Hook point -> reduction applied inside the hook (``None``: the tensor itself)."""

    def stop_after(self) -> int | None:
        """The last block whose output it needs (later blocks need not run), or ``None`` for the whole forward."""

    def on_batch(self, batch: Batch) -> None:
        ...

    def finish(self) -> Any:
        ...


def _capture_points(measurements: Sequence[Measurement]) -> dict[str, Reduce | None]:
    """What the shared forward captures: each point reduced inside its hook when every measurement reduces it the
    same way; the tensor itself when they differ (each measurement's reduction then runs on it after the forward)."""
    wanted: dict[str, list[Reduce | None]] = {}
    for m in measurements:
        for name, reduce in m.hook_names().items():
            ways = wanted.setdefault(name, [])
            if reduce not in ways:  # equality, not identity: a bound method is a new object at every access
                ways.append(reduce)
    return {name: ways[0] if len(ways) == 1 else None for name, ways in wanted.items()}


def _view(measurement: Measurement, points: Mapping[str, Reduce | None],
          captured: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One measurement's points, each as it asked for it."""
    view = {}
    for name, reduce in measurement.hook_names().items():
        value = captured[name]
        view[name] = value if reduce is None or points[name] == reduce else reduce(value)
    return view


def _stops_early(measurements: Sequence[Measurement]) -> bool:
    """Whether the shared forward may stop once every point is captured: only when no measurement needs all of
    it (each one's deepest point is then the block it names in ``stop_after``)."""
    return all(m.stop_after() is not None for m in measurements)


# ----------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class PassSettings:
    """How a command's passes run: the same options, with the same meaning, for every command."""

    device: str | torch.device | None = "auto"
    batch_size: int = 32
    num_workers: int | str = "auto"
    exact_decode: bool = False
    gpu_decode: bool = False
    progress: bool = False
    warn: Callable[[str], None] | None = None  # one line per skipped image (default: stderr)
    allow_nonfinite: bool = False  # load weights holding NaN/Inf instead of refusing them

    def check(self) -> None:
        """Refuse bad options before anything is loaded."""
        if self.batch_size <= 0:
            raise InputError(f"{option('batch_size')} must be positive, got {self.batch_size}")
        parse_workers(self.num_workers)

    def say(self, message: str) -> None:
        if self.warn is not None:
            self.warn(message)
        else:
            print(f"warning: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------- the runner
@dataclass
class OpenedPass:
    """A model on its device with its images, ready for passes; close it (or use it as a context) to stop the
    decoding workers."""

    loaded: LoadedModel
    source: ImageSource  # every image (names, description)
    settings: PassSettings
    device: torch.device
    world: int = 1
    rank: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)  # this rank's unreadable files: (index, reason)

    def __post_init__(self) -> None:
        self.local = self.source  # the images this rank measures: under torchrun every world-th one
        if self.world > 1:
            from torch.utils.data import Subset

            shard = Subset(self.source.dataset, range(self.rank, self.source.num_found, self.world))
            self.local = replace(self.source, dataset=shard, num_found=len(shard))

    def __enter__(self) -> "OpenedPass":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.source.close()

    def batches(self, label: str, *, every_rank_all: bool = False
                ) -> Iterator[tuple[torch.Tensor | None, torch.Tensor, list[tuple[int, str]]]]:
        """This rank's batches ``(images on the device or None when all were unreadable, indices, skipped)``,
        with the progress bar. ``every_rank_all``: every image on every rank, for a pass that does not merge
        across ranks."""
        s = self.settings
        images_here = self.source if every_rank_all else self.local
        with ProgressBar(s.progress and self.rank == 0, images_here.num_found, label) as bar:
            for images, indices, bad in image_batches(images_here, s.batch_size, s.num_workers, self.device):
                bar.advance(len(indices) + len(bad))
                yield (None if images is None else images.to(self.device, non_blocking=True)), indices, bad

    def run(self, measurements: Sequence[Measurement], label: str, *, count_skipped: bool = True) -> list[Any]:
        """One pass: one forward per batch shared by every measurement; returns each one's ``finish()``.
        ``count_skipped``: add the unreadable files to :attr:`skipped` (a second pass over the same images
        leaves it off)."""
        self._check_naflex(measurements)
        points = _capture_points(measurements)
        with capture(self.loaded, points, stop_early=_stops_early(measurements), masks_padding=True) as cap:
            for images, indices, bad in self.batches(label):
                if count_skipped:
                    self.skipped.extend(bad)
                if images is None:
                    continue
                valid, grids = self._naflex_layout(images, indices)
                with measurement_mode():  # reductions after the forward run in the same mode as the hooks' own
                    cap.forward(images)
                    captured = {name: cap[name] for name in points}
                    views = [_view(m, points, captured) for m in measurements]
                for m, view in zip(measurements, views):
                    m.on_batch(Batch(images, indices, view, valid, grids))
        return [m.finish() for m in measurements]

    def _check_naflex(self, measurements: Sequence[Measurement]) -> None:
        """A NaFlex model's images each have their own grid, padded: only measurements that read the padding mask
        (``measures_naflex = True``: they leave padded tokens out) run on it; the others are refused in one line,
        before any forward."""
        if NAFLEX_KEY not in self.loaded.data_config:
            return
        for m in measurements:
            if not getattr(m, "measures_naflex", False):
                raise NotAViTError(padded_refusal(self.loaded.name, f"this measurement ({type(m).__name__})"))

    def _naflex_layout(self, images: torch.Tensor, indices: torch.Tensor
                       ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(validity mask, grids) on the CPU of a packed NaFlex batch, else (None, None); an image without a single
        patch of its own is refused by name before anything runs on its batch."""
        if not is_packed(images):
            return None, None
        batch = unpack(images)
        empty = (~batch.valid.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            name = display_name(self.source.names[int(indices[empty[0]])])
            raise InputError(f"{name} is all padding in its NaFlex batch (a patch grid of "
                             f"{tuple(batch.grids[empty[0]].tolist())}): it has no patch to measure")
        return batch.valid.cpu(), batch.grids.cpu()

    # ------------------------------------------------------------------------------ after the passes
    def all_skipped(self) -> list[tuple[int, str]]:
        """Every rank's unreadable files, in index order (a collective under torchrun: every rank calls it)."""
        if self.world > 1:
            return sorted(s for part in gather(self.skipped) for s in part)
        return list(self.skipped)

    def announce_skipped(self, skipped: Sequence[tuple[int, str]]) -> None:
        """One warning per unreadable file and one for files that look like images we leave out (rank 0 only)."""
        if self.rank != 0:
            return
        for idx, reason in skipped:
            self.settings.say(f"skipped {display_name(self.source.names[idx])}: {reason}")
        other = self.source.other_files
        if any(s in UNDECODED_IMAGE_SUFFIXES for s in other):
            # Said once when something looks like an image we leave out (.svg, .heic ...); a README beside the
            # photos is only counted (images.num_other_files).
            kinds = ", ".join(f"{k}: {v}" for k, v in sorted(other.items(), key=lambda kv: -kv[1])[:6])
            self.settings.say(f"ignored {sum(other.values())} file(s) that are not images ({kinds})")


def require_finite(values: torch.Tensor, what: str) -> None:
    """:class:`NonFiniteError` when ``values`` hold NaN/Inf: for measurements that mean nothing on such values
    (``allow_nonfinite`` lets such a model load; it cannot make its NaN tokens measurable)."""
    # The sum is one cheap reduction; only when it is not finite is the exact test needed (an overflowing sum).
    if not bool(torch.isfinite(values.sum())) and not bool(torch.isfinite(values).all()):
        raise NonFiniteError(what)


def open_pass(model: Any, images: ImagesSpec, *, settings: PassSettings, load: dict[str, Any] | None = None,
              explicit_attention: bool = False, after_load: Callable[[LoadedModel], None] | None = None
              ) -> OpenedPass:
    """Load ``model`` with ``images`` (decoding begun early where possible, never under torchrun: each rank takes
    a shard), refuse a batch that does not fit in memory, and place the model on the device.

    ``load``: :func:`artifactscan.load_model`'s keywords (``allow_nonfinite`` comes from ``settings``).
    ``explicit_attention``: the pass materialises attention probabilities (the memory check counts them).
    ``after_load``: checks of the loaded model that come before any error about the images."""
    settings.check()
    dev = resolve_device(settings.device)
    world, rank = distributed_world()
    loaded, source = load_with_images(
        model, images, load={**(load or {}), "allow_nonfinite": settings.allow_nonfinite}, device=dev,
        batch_size=settings.batch_size, num_workers=settings.num_workers, exact_decode=settings.exact_decode,
        gpu_decode=settings.gpu_decode, early=world == 1, after_load=after_load)
    try:
        check_fits(loaded, effective_batch_size(source, settings.batch_size), dev, explicit_attention)
        loaded.model.to(dev)
        return OpenedPass(loaded, source, settings, dev, world, rank)
    except BaseException:
        source.close()
        raise


def open_loaded(loaded: LoadedModel, source: ImageSource, settings: PassSettings, *,
                explicit_attention: bool = False) -> OpenedPass:
    """An :class:`OpenedPass` over a model already loaded and images already prepared (e.g. a data set with
    boxes): the memory check and the placement of :func:`open_pass`, every image on this process (no shard)."""
    settings.check()
    dev = resolve_device(settings.device)
    try:
        check_fits(loaded, effective_batch_size(source, settings.batch_size), dev, explicit_attention)
        loaded.model.to(dev)
        return OpenedPass(loaded, source, settings, dev)
    except BaseException:
        source.close()
        raise
