"""``--gpu-decode``: JPEGs decoded in batches on the CUDA device, everything else (and every failure) through Pillow.

DataLoader workers only read the files (and their EXIF orientation); the main process hands each batch of JPEG bytes
to nvJPEG in one call, through TorchCodec's ``decode_jpeg`` (torchvision's CUDA ``decode_jpeg`` is deprecated since
0.29 in TorchCodec's favour), then resizes, crops and normalises on the device exactly as the model's eval transform
does on the CPU (resize the short side with the model's interpolation, antialiased; centre crop; mean/std).

Files that are not plain RGB or grayscale JPEGs (PNG, CMYK JPEG, too large, unreadable) take the Pillow path in the
worker, as without the option. When a whole GPU batch fails (one corrupt file is enough for nvJPEG), each of its files
is decoded again with Pillow, so a bad file is skipped with the same reason as on the CPU path and the good ones are
kept. docs/data-path.md says when this pays.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from artifactscan.core.errors import InputError, option
from artifactscan.inputs.images import BadSample, ImageFolderDataset, collate_skip_bad

__all__ = ["EncodedJpeg", "EncodedJpegs", "GpuJpegDecoder", "apply_exif_orientation", "collate_encoded",
           "encoded_view", "torchcodec_decode"]

_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class EncodedJpeg:
    """One JPEG file's bytes (1-D uint8, CPU) for the device decoder, with its EXIF orientation (1: as stored)."""

    index: int
    data: torch.Tensor
    orientation: int = 1


class EncodedJpegs(Dataset):
    """Item ``k``: an :class:`EncodedJpeg` for an RGB or grayscale JPEG, else what ``folder`` gives (Pillow)."""

    def __init__(self, folder: ImageFolderDataset, indices: Sequence[int] | None = None):
        self.folder = folder
        self.indices = None if indices is None else [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.folder) if self.indices is None else len(self.indices)

    def __getitem__(self, k: int):
        i = k if self.indices is None else self.indices[k]
        path = self.folder.paths[i]
        if not Path(path).is_file():  # a named pipe would block Image.open; the Pillow path names what it is
            return self.folder[i]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as im:  # the header only: format, mode, size, EXIF
                    plain = im.format == "JPEG" and im.mode in ("RGB", "L")
                    orientation = int(im.getexif().get(_EXIF_ORIENTATION, 1)) if plain else 1
            data = Path(path).read_bytes() if plain else b""
        except Exception:  # anything odd: the Pillow path decides (and names the reason if it is skipped)
            plain = False
        if not plain or not data:
            return self.folder[i]
        return EncodedJpeg(i, torch.frombuffer(bytearray(data), dtype=torch.uint8),
                           orientation if 1 <= orientation <= 8 else 1)


def encoded_view(dataset: Dataset, folder: ImageFolderDataset) -> EncodedJpegs:
    """The encoded counterpart of ``dataset`` (the folder itself, or a ``Subset`` of it, as a torchrun rank has)."""
    if isinstance(dataset, Subset):
        return EncodedJpegs(folder, list(dataset.indices))
    return EncodedJpegs(folder)


def collate_encoded(batch: Sequence[Any]):
    """``(cpu_images | None, cpu_indices, encoded, skipped)``: Pillow-decoded items collated as usual, the JPEGs
    as a list of :class:`EncodedJpeg`."""
    encoded = [b for b in batch if isinstance(b, EncodedJpeg)]
    rest = [b for b in batch if not isinstance(b, EncodedJpeg)]
    if rest:
        images, indices, skipped = collate_skip_bad(rest)
    else:
        images, indices, skipped = None, torch.empty(0, dtype=torch.long), []
    return images, indices, encoded, skipped


def torchcodec_decode(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Decode a batch of JPEG byte tensors on ``device`` in one nvJPEG call: uint8 ``[3, H, W]`` each, upright
    (TorchCodec applies the EXIF orientation itself)."""
    from torchcodec.decoders import decode_jpeg

    return decode_jpeg(list(data), mode="RGB", device=device)


def apply_exif_orientation(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """Turn a ``[C, H, W]`` image stored with EXIF ``orientation`` upright (Pillow's ``ImageOps.exif_transpose``)."""
    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(-1, -2)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:
        return img.transpose(-1, -2)
    if orientation == 6:
        return torch.rot90(img, -1, dims=(-2, -1))
    if orientation == 7:
        return torch.rot90(img, 1, dims=(-2, -1)).flip(-1)
    if orientation == 8:
        return torch.rot90(img, 1, dims=(-2, -1))
    return img


class GpuJpegDecoder:
    """Turns one collated batch of :func:`collate_encoded` into ``(images on device, indices, skipped)``.

    ``decode`` (default :func:`torchcodec_decode`) decodes a list of JPEG byte tensors; a decoder that does not turn
    images upright itself is marked ``applies_exif=False`` and the EXIF orientation read by the worker is applied
    here. ``fallbacks`` counts the files decoded with Pillow after their GPU batch failed.
    """

    def __init__(self, data_config: dict[str, Any], device: torch.device, folder: ImageFolderDataset,
                 decode: Callable[[list[torch.Tensor], torch.device], list[torch.Tensor]] | None = None,
                 applies_exif: bool | None = None):
        if decode is None:
            try:
                import torchcodec.decoders  # noqa: F401
            except Exception as exc:  # ImportError, or a TorchCodec build that does not match this torch
                raise InputError(f"{option('gpu_decode')} needs TorchCodec ({type(exc).__name__}: {exc}); "
                                 f"pip install torchcodec, or drop {option('gpu_decode')}") from None
        self.decode = decode or torchcodec_decode
        self.applies_exif = (decode is None) if applies_exif is None else applies_exif
        self.device, self.folder = torch.device(device), folder
        h, w = data_config["input_size"][-2:]
        crop_pct = data_config.get("crop_pct") or 1.0
        self.crop = (int(h), int(w))
        self.scale = (math.floor(h / crop_pct), math.floor(w / crop_pct))
        self.mode = data_config.get("crop_mode") or "center"
        if self.mode not in ("center", "squash") or (self.mode == "center" and self.scale[0] != self.scale[1]):
            raise InputError(f"{option('gpu_decode')} supports square inputs with crop_mode center or squash, not "
                             f"this model's {self.mode} {h}x{w}; drop {option('gpu_decode')}")
        interp = data_config.get("interpolation") or "bilinear"
        self.interpolation = interp if interp in ("bilinear", "bicubic", "nearest") else "bilinear"
        self.mean = torch.tensor(data_config["mean"], device=self.device).view(3, 1, 1)
        self.std = torch.tensor(data_config["std"], device=self.device).view(3, 1, 1)
        self.fallbacks = 0

    def transform(self, img: torch.Tensor) -> torch.Tensor:
        """uint8 ``[1 or 3, H, W]`` on the device -> the model's normalised ``[3, h, w]`` (timm's eval transform)."""
        x = img.expand(3, -1, -1) if img.shape[0] == 1 else img[:3]
        h, w = x.shape[-2:]
        if self.mode == "squash":
            size = self.scale
        else:  # torchvision's Resize(int): the short side to S, the long side int(S * long / short)
            s = self.scale[0]
            size = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
        aa = self.interpolation != "nearest"
        y = torch.nn.functional.interpolate(x[None].float(), size=size, mode=self.interpolation, antialias=aa,
                                            **({"align_corners": False} if aa else {}))[0]
        th, tw = self.crop
        top, left = int(round((y.shape[-2] - th) / 2.0)), int(round((y.shape[-1] - tw) / 2.0))
        y = y[:, top:top + th, left:left + tw].clamp_(0, 255).round_().div_(255.0)
        return (y - self.mean) / self.std

    def _gpu(self, encoded: list[EncodedJpeg]) -> torch.Tensor:
        decoded = self.decode([e.data for e in encoded], self.device)
        if len(decoded) != len(encoded):
            raise RuntimeError(f"decoder returned {len(decoded)} images for {len(encoded)} files")
        out = []
        for img, e in zip(decoded, encoded):
            img = img.to(self.device, non_blocking=True)
            out.append(self.transform(img if self.applies_exif else apply_exif_orientation(img, e.orientation)))
        return torch.stack(out)

    def __call__(self, cpu_images: torch.Tensor | None, cpu_indices: torch.Tensor, encoded: list[EncodedJpeg],
                 skipped: list[tuple[int, str]]):
        skipped = list(skipped)
        parts: list[torch.Tensor] = []
        indices: list[torch.Tensor] = []
        if cpu_images is not None:
            parts.append(cpu_images.to(self.device, non_blocking=True))
            indices.append(cpu_indices)
        if encoded:
            try:
                parts.append(self._gpu(encoded))
                indices.append(torch.tensor([e.index for e in encoded], dtype=torch.long))
            except Exception:  # a corrupt file, a JPEG flavour nvJPEG refuses, out of memory: Pillow, file by file
                for e in encoded:
                    self.fallbacks += 1
                    item = self.folder[e.index]
                    if isinstance(item, BadSample):
                        skipped.append((item.index, item.reason))
                        continue
                    parts.append(item[0][None].to(self.device, non_blocking=True))
                    indices.append(torch.tensor([item[1]], dtype=torch.long))
        skipped.sort()
        if not parts:
            return None, torch.empty(0, dtype=torch.long), skipped
        images, order_indices = torch.cat(parts), torch.cat(indices)
        order = torch.argsort(order_indices)  # file order, as on the Pillow path
        return images[order.to(images.device)], order_indices[order], skipped
