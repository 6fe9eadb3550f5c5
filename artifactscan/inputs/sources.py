"""Where a measurement's images come from, and how they are batched.

``make_image_source`` turns what the user passed (a folder, a file list, ``synthetic[:N]``, a Dataset of ``[0, 1]``
tensors or an ``[N, 3, H, W]`` tensor) into an :class:`ImageSource` preprocessed for one model; ``image_batches``
yields ``(images, indices, skipped)`` from it, without a DataLoader for in-memory tensors.

Image files are decoded only as large as the model needs (twice the short side its resize targets; ``exact_decode``
decodes in full), by ``workers`` DataLoader processes (``auto``: :func:`auto_workers`) that persist across the passes
over one source; on CUDA batches are pinned and copied with ``non_blocking``. ``gpu_decode`` decodes JPEGs on the
device (:mod:`artifactscan.inputs.gpu_decode`). docs/data-path.md has the measurements behind these choices.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from artifactscan.core.errors import InputError, option
from artifactscan.core.paths import display_name, what_it_is
from artifactscan.core.summaries import ImageSummary, SkippedImage
from artifactscan.inputs.gpu_decode import GpuJpegDecoder, collate_encoded, encoded_view
from artifactscan.inputs.images import ImageFolderDataset, collate_skip_bad, discover_images
from artifactscan.inputs.synthetic import SyntheticShapes
from artifactscan.inputs.naflex import NaFlexTransform, transform_of as naflex_transform
from artifactscan.inputs.transforms import model_transform
from artifactscan.core.callbacks import Callbacks

DEFAULT_SYNTHETIC_IMAGES = 256


class NormalizedTensors(Dataset):
    """Images already given as tensors in [0, 1] (the synthetic set, or a notebook batch)."""

    def __init__(self, source: Dataset | torch.Tensor, mean: Sequence[float], std: Sequence[float], size: tuple[int, int],
                 naflex: NaFlexTransform | None = None):
        self.source = source
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.size = size
        self.naflex = naflex  # a NaFlex model's images: each resized to its own patch budget, packed

    def __len__(self) -> int:
        return len(self.source)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] -> resized to the model's input and normalised."""
        if self.naflex is not None:
            return torch.stack([self.naflex(image) for image in x])
        if tuple(x.shape[-2:]) != self.size:
            x = torch.nn.functional.interpolate(x.float(), size=self.size, mode="bicubic",
                                                align_corners=False).clamp(0, 1)
        return (x - self.mean) / self.std

    def __getitem__(self, index: int):
        item = self.source[index]
        x = item[0] if isinstance(item, (tuple, list)) else item
        return self._prepare(x[None])[0], index

    def tensor_batches(self, batch_size: int):
        """In-memory tensors need no DataLoader: slice and normalise whole batches."""
        for start in range(0, len(self.source), batch_size):
            stop = min(start + batch_size, len(self.source))
            yield self._prepare(self.source[start:stop]), torch.arange(start, stop), []


def parse_synthetic(spec: str, prefix: str = "synthetic", default: int = DEFAULT_SYNTHETIC_IMAGES) -> int | None:
    """``prefix`` -> ``default``; ``prefix:N`` -> N (positive, else InputError); anything else -> None."""
    if spec == prefix:
        return default
    if spec.startswith(prefix + ":"):
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            n = 0
        if n <= 0:
            raise InputError(f"{spec!r}: write {prefix}:N with N a positive number of images")
        return n
    return None


@dataclass
class ImageSource:
    dataset: Dataset
    names: list[str]
    description: str
    collate: Callable | None
    num_found: int
    folder_dataset: ImageFolderDataset | None = None
    data_config: dict[str, Any] | None = None
    gpu_decode: bool = False
    other_files: dict[str, int] = field(default_factory=dict)  # files in the folder that are not images, by suffix
    # DataLoaders (and so their persistent workers) reused by every pass over this source, keyed by their settings.
    loaders: dict[tuple, DataLoader] = field(default_factory=dict, init=False, repr=False)
    # Multiply-adds x 2 of one image's forward (:func:`forward_flops`), when the model is known: decides whether the
    # forward or the decoding limits a CPU pass (image_batches' thread count).
    forward_flops: float | None = None
    # A first pass begun ahead of time (:meth:`start`): its loader key and running iterator, taken by the next pass.
    started: tuple[tuple, Any] | None = field(default=None, init=False, repr=False)

    def start(self, batch_size: int, num_workers: int | str | None = "auto",
              device: torch.device | str | None = None) -> bool:
        """Begin the first pass now: the decoding workers start and fill their prefetch queues while the caller does
        something else (builds the model). The next :func:`image_batches` call with the same settings continues this
        pass instead of starting one. Only for image files decoded on the CPU by worker processes (with no workers
        nothing could run meanwhile); returns whether it started."""
        if self.folder_dataset is None or self.gpu_decode or self.dataset is not self.folder_dataset:
            return False
        batch_size = effective_batch_size(self, batch_size)
        cuda = device is not None and torch.device(device).type == "cuda"
        workers = resolve_workers(self, batch_size, num_workers, cuda)
        if workers == 0:
            return False
        key, loader = _decoded_loader(self, batch_size, workers, cuda)
        self.started = (key, iter(loader))
        return True

    def summary(self, num_scanned: int, skipped: Sequence[tuple[int, str]]) -> ImageSummary:
        """What a result records about these images (the ``images`` of its header): ``num_scanned`` measured,
        ``skipped`` the ``(index, reason)`` pairs of the files left out."""
        records = (self.folder_dataset.skipped_images(skipped) if self.folder_dataset
                   else [SkippedImage.of(self.names[i], reason) for i, reason in skipped])
        return ImageSummary(display_name(self.description), self.num_found, num_scanned, records,
                            sum(self.other_files.values()))

    def close(self) -> None:
        """Stop this source's worker processes now (they also stop when the source is garbage-collected).

        A DataLoader's persistent workers end when its running iterator is deleted, and the source holds the only
        references to it (its loaders and a pass begun by :meth:`start`): dropping them ends the workers at once, by
        reference counting, even with the collector off (measured: 2 workers gone 0.03-0.10 s after ``close``, as
        with torch's private ``_shutdown_workers``). A pass that a caller is still iterating keeps them until it
        ends."""
        self.started = None
        self.loaders.clear()


def parse_workers(value: int | str | None) -> int | None:
    """``--workers``: ``auto`` (or ``None``) -> ``None``; a whole number >= 0 -> that number; else :class:`InputError`."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = -1
    if isinstance(value, float) or n < 0:
        raise InputError(f"{option('num_workers', value)}: use auto or a whole number of worker processes >= 0 "
                         "(0 decodes on the main process)")
    return n


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - macOS / Windows
        return os.cpu_count() or 1


#: Below this many image files ``--workers auto`` decodes on the main process: starting workers costs more.
MIN_IMAGES_FOR_WORKERS = 64
#: ``--workers auto`` never starts more than this many processes (decoding a batch is rarely the bottleneck past it).
MAX_AUTO_WORKERS = 8


def auto_workers(num_images: int, batch_size: int, cores: int | None = None, cuda: bool = False) -> int:
    """``--workers auto``: decoding processes beside the main one, which runs the model. On the CPU the forward needs
    cores too: half of them decode (at least one); with CUDA the main process only feeds the device: all cores but
    its own. At most :data:`MAX_AUTO_WORKERS`, and only as many as get two batches each; none for small folders
    (< :data:`MIN_IMAGES_FOR_WORKERS` images) or a single core."""
    cores = available_cores() if cores is None else cores
    if cores < 2 or num_images < MIN_IMAGES_FOR_WORKERS:
        return 0
    share = cores - 1 if cuda else max(1, cores // 2)
    return max(0, min(share, MAX_AUTO_WORKERS, math.ceil(num_images / batch_size) // 2))


def decode_min_side(cfg: dict[str, Any]) -> int:
    """The short side a reduced decode keeps: twice the largest edge the eval transform resizes to, so the model's
    own interpolation does the last step from at least 2x (timm: ``floor(input_size / crop_pct)``)."""
    crop_pct = cfg.get("crop_pct") or 1.0
    h, w = cfg["input_size"][-2:]
    return 2 * max(math.floor(h / crop_pct), math.floor(w / crop_pct))


def default_images() -> Path:
    """The sample photos: ``artifactscan/sample_images/`` inside an installed wheel (built from the top-level
    ``sample_images/``, pyproject.toml), else that top-level folder of a source checkout or editable install."""
    from importlib import resources

    shipped = resources.files("artifactscan") / "sample_images"
    checkout = Path(__file__).resolve().parents[2] / "sample_images"
    for candidate in (shipped, checkout):
        # a package imported from a zip file has no folder to scan: only a real one will do
        if isinstance(candidate, Path) and candidate.is_dir():
            return candidate
    raise InputError("the sample photos are not installed with this copy of artifactscan (no sample_images/ in the "
                     "package or beside it); pass an IMAGES folder")


def forward_flops(model: Any) -> float | None:
    """About the FLOPs of one image's forward through a ``LoadedModel``: 2 x parameters x tokens (the matmuls; the
    attention's quadratic term is left out, small at ViT sequence lengths). ``None`` for anything else."""
    module = getattr(model, "model", None)
    if not isinstance(module, torch.nn.Module):
        return None
    try:
        gh, gw = model.grid_size
        tokens = gh * gw + int(model.num_prefix_tokens)
    except (AttributeError, TypeError, ValueError):
        return None
    return 2.0 * sum(p.numel() for p in module.parameters()) * tokens


def _config_of(target: Any) -> tuple[dict[str, Any], tuple[int, int]]:
    """``(data_config, (H, W))`` of a ``LoadedModel`` or of a timm data config itself."""
    cfg = target if isinstance(target, dict) else target.data_config
    _, h, w = cfg["input_size"]
    return cfg, (int(h), int(w))


def make_image_source(images: str | Path | Sequence[str | Path] | Dataset | torch.Tensor | None,
                      loaded: Any, *, exact_decode: bool = False, gpu_decode: bool = False) -> ImageSource:
    """Build the dataset for ``images``: a folder / file / list of files, ``synthetic[:N]``, a Dataset or a tensor.

    ``loaded`` is the model the images are prepared for: a ``LoadedModel`` (its ``data_config``) or a timm data
    config (``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``) before the model exists.
    Files get timm's eval transform for that config (:func:`artifactscan.inputs.transforms.model_transform`).
    Image files are decoded at reduced size (:func:`decode_min_side`) unless ``exact_decode``; ``gpu_decode`` marks
    the source for JPEG decoding on the device (used by :func:`image_batches` when it is given a CUDA device).
    """
    source = _make_image_source(images, loaded, exact_decode=exact_decode, gpu_decode=gpu_decode)
    source.forward_flops = forward_flops(loaded)
    return source


def _make_image_source(images: str | Path | Sequence[str | Path] | Dataset | torch.Tensor | None,
                       loaded: Any, *, exact_decode: bool = False, gpu_decode: bool = False) -> ImageSource:
    """:func:`make_image_source` without the forward's cost estimate."""
    cfg, size = _config_of(loaded)
    if images is None:
        images = default_images()
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise InputError(f"image tensor must be shaped [N, 3, H, W] in [0, 1], got {tuple(images.shape)}")
        ds = NormalizedTensors(images, cfg["mean"], cfg["std"], size, naflex_transform(cfg))
        return ImageSource(ds, [f"tensor[{i}]" for i in range(len(images))], "tensor", None, len(images))
    if isinstance(images, Dataset):
        ds = NormalizedTensors(images, cfg["mean"], cfg["std"], size, naflex_transform(cfg))
        n = len(images)  # type: ignore[arg-type]
        return ImageSource(ds, [f"{type(images).__name__}[{i}]" for i in range(n)], type(images).__name__, None, n)
    if isinstance(images, (str, Path)) and (n_syn := parse_synthetic(str(images))) is not None:
        syn = SyntheticShapes(n_syn, seed=0, img_size=size[0], split="val")
        ds = NormalizedTensors(syn, cfg["mean"], cfg["std"], size, naflex_transform(cfg))
        return ImageSource(ds, [f"synthetic[{i}]" for i in range(n_syn)], f"synthetic:{n_syn} (built-in data set)",
                           None, n_syn)
    other: dict[str, int] = {}
    if isinstance(images, (str, Path)):
        paths = discover_images(images, other_files=other)
        description = str(images)
    else:
        paths = [Path(p) for p in images]
        missing = [p for p in paths if not p.is_file()]
        if missing:  # what it is instead: missing, a named pipe, a folder ...
            raise InputError(f"image file {display_name(missing[0])} {what_it_is(missing[0], 'an image file')}")
        if not paths:
            raise InputError("the list of images is empty")
        description = f"{len(paths)} files"
    folder = ImageFolderDataset(paths, model_transform(cfg), None if exact_decode else decode_min_side(cfg))
    return ImageSource(folder, [str(p) for p in paths], description, collate_skip_bad, len(paths), folder,
                       dict(cfg), gpu_decode, other)


def _loader(source: ImageSource, key: tuple, dataset: Callable[[], Dataset], collate: Callable | None) -> DataLoader:
    """The DataLoader for ``key = (kind, batch_size, workers, pin)``, made once per source and settings."""
    if key not in source.loaders:
        _, batch_size, workers, pin = key
        extra = {}
        if workers > 0:
            extra = dict(persistent_workers=True, prefetch_factor=prefetch_factor(source, batch_size, workers),
                         worker_init_fn=start_decoding_worker)
        source.loaders[key] = DataLoader(dataset(), batch_size=batch_size, shuffle=False, num_workers=workers,
                                         collate_fn=collate, pin_memory=pin, **extra)
    return source.loaders[key]


def _decoded_loader(source: ImageSource, batch_size: int, workers: int, cuda: bool) -> tuple[tuple, DataLoader]:
    """The DataLoader of decoded (CPU-transformed) batches and its key: one for :meth:`ImageSource.start` and the
    pass that continues it, so that the two always agree on which pass was begun."""
    key = ("decoded", batch_size, workers, cuda)
    return key, _loader(source, key, lambda: source.dataset, source.collate)


#: Above this many FLOPs per image the forward, not decoding, limits a CPU pass (a 1600x1200 JPEG's reduced decode
#: costs ~4 ms, the forward ~20 ms per GFLOP on one core): the forward then keeps all of torch's threads.
FORWARD_BOUND_FLOPS = 1e9

#: Decoded batches waiting for the model may take this much memory (shared memory, between the workers and the
#: main process) before the prefetch depth stops growing past its floor of :data:`MIN_PREFETCH` batches per worker.
PREFETCH_BYTES = 64 * 2**20
MIN_PREFETCH, MAX_PREFETCH = 4, 64


def prefetch_factor(source: ImageSource, batch_size: int, workers: int) -> int:
    """Batches each worker decodes ahead: as many as :data:`PREFETCH_BYTES` holds (small inputs: deep, so the
    workers keep decoding while the model is still being built, analysis/opening.py), at least :data:`MIN_PREFETCH`."""
    cfg = source.data_config or {}
    h, w = (cfg.get("input_size") or (3, 224, 224))[-2:]
    batch_bytes = batch_size * 3 * int(h) * int(w) * 4
    return max(MIN_PREFETCH, min(MAX_PREFETCH, PREFETCH_BYTES // max(1, workers * batch_bytes)))


#: How much lower the decoding workers' scheduling priority is than the main process's (``os.nice``). The main
#: process is a scan's critical path - importing timm, building the model, the forward - and the workers only have to
#: keep ahead of it: at equal priority they took CPU from it whenever the cores were full (400 JPEGs on 2 cores:
#: 1.17-1.22x the decode limit at equal priority, 1.07-1.15x niced; docs/data-path.md). Idle cores: no change.
WORKER_NICENESS = 5


#: Called with no arguments at the start of every decoding worker process. A worker forked during the command line's
#: start-up phase inherits it (the collector off); the command line registers here what ends it for the worker
#: (core/startup.py: freezing what it inherited, the parent's objects, never its garbage). Registered functions
#: reach forked workers only (a spawned worker imports the package afresh, with nothing registered and nothing to end).
in_decoding_workers = Callbacks("decoding worker started")


def start_decoding_worker(worker_id: int) -> None:
    """``worker_init_fn`` of the decoding workers: :data:`in_decoding_workers`, then a lower priority."""
    in_decoding_workers()
    try:
        os.nice(WORKER_NICENESS)
    except (AttributeError, OSError):  # pragma: no cover - no nice() (Windows) or not permitted
        pass


def effective_batch_size(source: ImageSource, batch_size: int) -> int:
    """The batch a pass over ``source`` really forms: at most its number of images (``--batch-size 1000000`` on 4
    images is one batch of 4). Memory checks and loaders use this, not the number asked for."""
    return max(1, min(int(batch_size), len(source.dataset)))


_workers_said: set[tuple[int, int]] = set()  # (asked, used): each cap is said once per process, not once per pass


def resolve_workers(source: ImageSource, batch_size: int, num_workers: int | str | None, cuda: bool = False) -> int:
    """``--workers`` for this source: ``auto`` (or ``None``): :func:`auto_workers` for image folders, 0 (the main
    process) for everything else; a number as given, but at most one per CPU core and one per batch (more only
    start processes that wait: 500 took 20 s to start and made torch warn), with one warning line when capped."""
    workers = parse_workers(num_workers)
    if workers is None:
        return auto_workers(len(source.dataset), batch_size, cuda=cuda) if source.folder_dataset is not None else 0
    cores = available_cores()
    batches = math.ceil(len(source.dataset) / effective_batch_size(source, batch_size))
    most = max(1, min(cores, batches))
    if workers > most:
        if (workers, most) not in _workers_said:
            _workers_said.add((workers, most))
            why = (f"{batches} batch{'es' if batches != 1 else ''} to decode" if batches <= cores
                   else f"{cores} CPU core{'s' if cores != 1 else ''} available")
            print(f"warning: {option('num_workers', workers)}: using {most} ({why}; more processes would only wait)",
                  file=sys.stderr)
        workers = most
    return workers


def image_batches(source: ImageSource, batch_size: int, num_workers: int | str | None = "auto",
                  device: torch.device | str | None = None):
    """Yield ``(images, indices, skipped)`` batches of ``source``: ``images`` normalised ``[B, 3, H, W]`` (``None``
    when every file of the batch was skipped), ``indices`` into ``source.names``, ``skipped`` ``(index, reason)``.

    ``num_workers``: ``auto`` (:func:`auto_workers`, image folders only; other sources decode on the main process)
    or a number of DataLoader processes, kept alive across passes over the same source. ``device``: with CUDA, host
    batches are pinned and ``images`` arrive on the device (``non_blocking`` copy); elsewhere they stay on the CPU.
    """
    ds = source.dataset
    batch_size = effective_batch_size(source, batch_size)
    if isinstance(ds, NormalizedTensors) and isinstance(ds.source, torch.Tensor):
        yield from ds.tensor_batches(batch_size)
        return
    dev = torch.device(device) if device is not None else None
    cuda = dev is not None and dev.type == "cuda"
    workers = resolve_workers(source, batch_size, num_workers, cuda)
    if source.gpu_decode and source.folder_dataset is not None and not cuda:
        raise InputError(f"{option('gpu_decode')} decodes on a CUDA device, and this pass runs on "
                         f"{dev or 'the CPU'}; pass {option('device', 'cuda')} or drop {option('gpu_decode')}")
    if cuda and source.gpu_decode and source.folder_dataset is not None:
        decoder = GpuJpegDecoder(source.data_config or {}, dev, source.folder_dataset)
        loader = _loader(source, ("encoded", batch_size, workers, True),
                         lambda: encoded_view(ds, source.folder_dataset), collate_encoded)
        for batch in loader:
            yield decoder(*batch)
        return
    key, loader = _decoded_loader(source, batch_size, workers, cuda)
    if source.started is not None and source.started[0] == key:  # continue the pass begun by ImageSource.start
        batches = source.started[1]  # (iter(loader) again would reset it and throw its prefetched batches away)
    else:
        batches = iter(loader)
    source.started = None
    threads = torch.get_num_threads()
    if workers > 0 and not cuda and not (source.forward_flops or 0) > FORWARD_BOUND_FLOPS:
        # Decoding limits this pass: the forward gets the cores the workers leave. More intra-op threads than free
        # cores make every OpenMP barrier wait for a descheduled thread (2 threads beside 1 worker on 2 cores: 4.1 s
        # vs 3.6 s for 400 JPEGs, docs/data-path.md). A heavy forward keeps all its threads (the niced workers fill
        # its gaps): ViT-S/16 at 224 px on 2 cores scans 13 images/s capped, 18-20 with both threads (bare: 24).
        torch.set_num_threads(max(1, min(threads, available_cores() - workers)))
    try:
        for batch in batches:
            if source.collate is collate_skip_bad:
                images, indices, skipped = batch
            else:
                (images, indices), skipped = batch, []
            if cuda and images is not None:
                images = images.to(dev, non_blocking=True)
            yield images, indices, skipped
    finally:
        torch.set_num_threads(threads)
