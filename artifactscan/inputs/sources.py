"""Where a measurement's images come from, and how they are batched.

``make_image_source`` turns what the user passed (a folder, a file list, ``synthetic[:N]``, a Dataset of ``[0, 1]``
tensors or an ``[N, 3, H, W]`` tensor) into an :class:`ImageSource` preprocessed for one model; ``batches`` yields
``(images, indices, skipped)`` from it, without a DataLoader for in-memory tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from artifactscan.core.errors import InputError
from artifactscan.inputs.images import ImageFolderDataset, collate_skip_bad, discover_images
from artifactscan.inputs.synthetic import SyntheticShapes

DEFAULT_SYNTHETIC_IMAGES = 256


class NormalizedTensors(Dataset):
    """Images already given as tensors in [0, 1] (the synthetic set, or a notebook batch)."""

    def __init__(self, source: Dataset | torch.Tensor, mean: Sequence[float], std: Sequence[float], size: tuple[int, int]):
        self.source = source
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.size = size

    def __len__(self) -> int:
        return len(self.source)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] -> resized to the model's input and normalised."""
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
    other_files: dict[str, int] = field(default_factory=dict)  # files in the folder that are not images, by suffix


def default_images() -> Path:
    """The photos shipped in ``sample_images/`` (next to the package in a source checkout)."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package.parent / "sample_images", package / "sample_images"):
        if candidate.is_dir():
            return candidate
    raise InputError("sample_images/ is not next to this install; pass an IMAGES folder")


def make_image_source(images: str | Path | Sequence[str | Path] | Dataset | torch.Tensor | None,
                      loaded: Any) -> ImageSource:
    """Build the dataset for ``images``: a folder / file / list of files, ``synthetic[:N]``, a Dataset or a tensor.

    ``loaded`` is the model the images are prepared for (a ``LoadedModel``: its ``data_config`` and ``input_size``).
    """
    cfg = loaded.data_config
    size = loaded.input_size
    if images is None:
        images = default_images()
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise InputError(f"image tensor must be shaped [N, 3, H, W] in [0, 1], got {tuple(images.shape)}")
        ds = NormalizedTensors(images, cfg["mean"], cfg["std"], size)
        return ImageSource(ds, [f"tensor[{i}]" for i in range(len(images))], "tensor", None, len(images))
    if isinstance(images, Dataset):
        ds = NormalizedTensors(images, cfg["mean"], cfg["std"], size)
        n = len(images)  # type: ignore[arg-type]
        return ImageSource(ds, [f"{type(images).__name__}[{i}]" for i in range(n)], type(images).__name__, None, n)
    if isinstance(images, (str, Path)) and (n_syn := parse_synthetic(str(images))) is not None:
        syn = SyntheticShapes(n_syn, seed=0, img_size=size[0], split="val")
        ds = NormalizedTensors(syn, cfg["mean"], cfg["std"], size)
        return ImageSource(ds, [f"synthetic[{i}]" for i in range(n_syn)], f"synthetic:{n_syn} (built-in data set)",
                           None, n_syn)
    other: dict[str, int] = {}
    if isinstance(images, (str, Path)):
        paths = discover_images(images, other_files=other)
        description = str(images)
    else:
        paths = [Path(p) for p in images]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise InputError(f"image file {missing[0]} does not exist")
        if not paths:
            raise InputError("the list of images is empty")
        description = f"{len(paths)} files"
    import timm.data

    transform = timm.data.create_transform(
        input_size=cfg["input_size"], interpolation=cfg.get("interpolation", "bicubic"), mean=cfg["mean"],
        std=cfg["std"], crop_pct=cfg.get("crop_pct", 1.0), crop_mode=cfg.get("crop_mode", "center"),
        is_training=False)
    folder = ImageFolderDataset(paths, transform)
    return ImageSource(folder, [str(p) for p in paths], description, collate_skip_bad, len(paths), folder, other)


def image_batches(source: ImageSource, batch_size: int, num_workers: int):
    ds = source.dataset
    if isinstance(ds, NormalizedTensors) and isinstance(ds.source, torch.Tensor):
        yield from ds.tensor_batches(batch_size)
        return
    loader = DataLoader(source.dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=source.collate)
    for batch in loader:
        if source.collate is collate_skip_bad:
            images, indices, skipped = batch
        else:
            (images, indices), skipped = batch, []
        yield images, indices, skipped
