"""Image-folder input shared by every command: find images, decode them robustly, batch them, skip bad ones.

* :func:`discover_images` turns a file or folder argument into a sorted, deterministic list of image paths.
* :func:`load_rgb` decodes one file to an 8-bit RGB :class:`PIL.Image.Image`, whatever its mode, and raises
  :class:`ImageSkipped` (an :class:`~artifactscan.core.errors.InputError`) with a short reason for files that
  cannot be used (corrupt, truncated, decompression bomb, unreadable).
* :class:`ImageFolderDataset` + :func:`collate_skip_bad` feed a ``DataLoader``; bad files are dropped from
  their batch and reported back as ``(index, reason)`` pairs so a scan can warn, count them in its report
  and carry on.
* :func:`image_folder_labels` reads class labels from an ImageFolder layout (``root/<class>/.../img.jpg``).
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset, default_collate

from artifactscan.core.errors import InputError
from artifactscan.core.files import display_name, name_hex
from artifactscan.core.summaries import SkippedImage  # noqa: F401  (the reports' vocabulary, named here too)
from artifactscan.inputs.own_outputs import OwnOutputs
from artifactscan.core.paths import path_kind, what_it_is

__all__ = [
    "IMAGE_EXTENSIONS",
    "UNDECODED_IMAGE_SUFFIXES",
    "ImageSkipped",
    "SkippedImage",
    "BadSample",
    "discover_images",
    "load_rgb",
    "reduced_decode_size",
    "upright_size",
    "ImageFolderDataset",
    "collate_skip_bad",
    "image_folder_labels",
]

def _pillow_decodes(feature: str) -> bool:
    try:
        from PIL import features

        return bool(features.check(feature))
    except Exception:  # an old Pillow without the feature name
        return False


#: Lower-case file suffixes treated as images (matched case-insensitively); ``.avif`` where this Pillow decodes it.
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
) + ((".avif",) if _pillow_decodes("avif") else ())
_ACCEPTED = ", ".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)

#: Suffixes of image formats left out (not decoded here): a folder holding them gets a warning with the count.
UNDECODED_IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".svg", ".svgz", ".heic", ".heif", ".avif", ".jxl", ".jp2", ".j2k", ".exr", ".hdr", ".psd", ".raw", ".dng",
     ".cr2", ".cr3", ".nef", ".arw", ".orf", ".ico", ".tga", ".eps", ".pdf"} - set(IMAGE_EXTENSIONS))

#: Background used where an image has transparency (alpha channel, tRNS chunk, transparent palette entry).
_BACKGROUND = (255, 255, 255)


class ImageSkipped(InputError):
    """One image file cannot be used; ``reason`` is a short human-readable cause (no path).

    Raised by :func:`load_rgb`. Scanning code catches it, warns, records a :class:`SkippedImage` and goes on.
    """

    def __init__(self, reason: str, path: str | os.PathLike[str] | None = None):
        self.reason = reason
        self.path = None if path is None else str(path)
        where = f"{display_name(self.path)}: " if self.path else ""
        super().__init__(f"skipped {where}{reason}; re-export the file or remove it from the folder")


@dataclass(frozen=True)
class BadSample:
    """Sentinel returned by :class:`ImageFolderDataset` for a file that could not be loaded.

    :func:`collate_skip_bad` removes it from the batch and reports ``(index, reason)``.
    """

    index: int
    reason: str


# --------------------------------------------------------------------------------------------- discovery


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _is_hidden(name: str) -> bool:
    # Dot-files include macOS "._photo.jpg" resource forks, which carry an image suffix but are not images.
    return name.startswith(".")


def discover_images(path: str | os.PathLike[str], recursive: bool = True,
                    other_files: dict[str, int] | None = None,
                    warn: Callable[[str], None] | None = None) -> list[Path]:
    """Return the image files named by ``path``: one image file, or every image in a folder.

    Folders are walked recursively (unless ``recursive=False``) without following symlinked folders; hidden
    files and folders (names starting with ``.``) are ignored. Suffixes are matched case-insensitively
    against :data:`IMAGE_EXTENSIONS`. The result is sorted by the path relative to the folder, compared
    component by component, so the order is the same on every machine and every run.

    ``other_files``, when given, is filled with the count of files left out because they are not images, by
    suffix (``{".svg": 2, ".txt": 1}``), so callers can say what was ignored.

    artifactscan's own outputs are left out: the files any ``.artifactscan-manifest.json`` met lists, and those of
    the output folders being written (:mod:`artifactscan.inputs.own_outputs`); ``warn`` (default: stderr) says so
    in one line, once per process.

    Raises :class:`InputError` when the path does not exist, is a file with another suffix, or is a folder
    with no image files in it (empty, or holding only other kinds of files).
    """
    p = Path(path).expanduser()
    if p.is_file():
        if not _is_image_name(p.name):
            raise InputError(
                f"{display_name(p)} is not an image file by its extension; pass a file ending in one of: {_ACCEPTED}"
            )
        return [p]
    if not p.is_dir():  # missing, or what it is instead: a named pipe, a socket, a symlink loop ...
        why = what_it_is(p, "an image file or a folder")
        raise InputError(f"{display_name(p)} {why}; pass an image file or a folder of images")

    found: list[tuple[tuple[str, ...], Path]] = []
    n_other = 0
    other_suffixes: set[str] = set()
    subdirs_with_images = False
    own = OwnOutputs(p)
    try:
        walker = os.walk(p, onerror=None)
        for dirpath, dirnames, filenames in walker:
            own.meet(dirpath, filenames)
            dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
            rel_dir = Path(dirpath).relative_to(p).parts
            is_top = not rel_dir
            if not is_top and not recursive:
                if any(_is_image_name(f) and not _is_hidden(f) for f in filenames):
                    subdirs_with_images = True
                    break
                continue
            for name in filenames:
                if _is_hidden(name) or own.owns(os.path.join(dirpath, name)):
                    continue
                if _is_image_name(name):
                    found.append((rel_dir + (name,), Path(dirpath) / name))
                else:
                    n_other += 1
                    suffix = Path(name).suffix.lower() or "(none)"
                    other_suffixes.add(suffix)
                    if other_files is not None:
                        other_files[suffix] = other_files.get(suffix, 0) + 1
            if not recursive and is_top and found:
                break
    except PermissionError as e:  # pragma: no cover - os.walk reports most of these via onerror
        raise InputError(f"cannot read folder {p}: {e.strerror}; check its permissions") from e

    own.say(warn)
    if not found:
        if own.left_out:
            raise InputError(f"{display_name(p)} holds only files artifactscan wrote ({len(own.left_out)}, listed in "
                             "its output manifests), and its own outputs are never read as inputs; pass a folder of "
                             "your own images")
        if subdirs_with_images:
            raise InputError(
                f"no images directly in {p}, only in sub-folders; search them too (recursive=True)"
            )
        if n_other == 0:
            raise InputError(f"folder {p} is empty; put image files ({_ACCEPTED}) in it")
        shown = ", ".join(sorted(other_suffixes)[:8])
        raise InputError(
            f"folder {p} has {n_other} file(s) but no images (found {shown}); "
            f"accepted extensions: {_ACCEPTED}"
        )
    found.sort(key=lambda t: t[0])
    return [fp for _, fp in found]


# ------------------------------------------------------------------------------------------------ decoding


def _skip_reason(exc: BaseException) -> str:
    """A short, path-free reason for a decoding failure."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        m = re.search(r"\((\d+) pixels\) exceeds limit of (\d+) pixels", msg)
        size = f" ({m.group(1)} pixels, limit {m.group(2)})" if m else ""
        return f"too large, over Pillow's decompression bomb limit{size}"
    if isinstance(exc, UnidentifiedImageError):
        return "corrupt or not an image (Pillow cannot identify it)"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, MemoryError):
        return "out of memory while decoding"
    if isinstance(exc, OSError) and "truncated" in msg.lower():
        return "truncated file"
    if isinstance(exc, (OSError, SyntaxError, ValueError, EOFError)):
        return f"corrupt image ({type(exc).__name__}: {msg})" if msg else f"corrupt image ({type(exc).__name__})"
    return f"cannot decode ({type(exc).__name__}: {msg})" if msg else f"cannot decode ({type(exc).__name__})"


def _gray_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Rescale a single-channel 16-bit / 32-bit / float array to uint8 without clipping."""
    if mode.startswith("I;16"):
        # Unsigned 16-bit container: map its full range 0..65535 linearly onto 0..255.
        scaled = arr.astype(np.float64) * (255.0 / 65535.0)
        return np.rint(scaled).astype(np.uint8)

    a = arr.astype(np.float64)
    finite = np.isfinite(a)
    if not finite.any():
        return np.zeros(a.shape, dtype=np.uint8)
    lo, hi = float(a[finite].min()), float(a[finite].max())
    a = np.where(finite, a, lo)  # NaN / inf -> darkest finite value
    if mode == "F" and lo >= 0.0 and hi <= 1.0:
        scaled = a * 255.0  # float image in [0, 1]
    elif mode == "I" and lo >= 0 and hi <= 255:
        scaled = a  # 8-bit data stored in a 32-bit container
    elif mode == "I" and lo >= 0 and hi <= 65535:
        scaled = a * (255.0 / 65535.0)  # 16-bit data (older Pillow decodes 16-bit PNGs as "I")
    elif hi > lo:
        scaled = (a - lo) * (255.0 / (hi - lo))  # arbitrary range: stretch min..max onto 0..255
    else:
        scaled = np.zeros_like(a)  # constant image with no known range
    return np.rint(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)


def _has_transparency(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im.copy()
    if mode in ("I", "F") or mode.startswith("I;16"):
        return Image.fromarray(_gray_to_uint8(np.asarray(im), mode), mode="L").convert("RGB")
    if _has_transparency(im):
        if mode in ("RGBa", "La"):  # premultiplied alpha
            im = im.convert("RGBA" if mode == "RGBa" else "LA")
        rgba = im.convert("RGBA")  # handles P/L/RGB + tRNS and LA/PA
        background = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # 1, L, P, CMYK, YCbCr, RGBX, HSV, ...: Pillow's own conversion (CMYK uses the naive formula, no ICC).
    return im.convert("RGB")


def reduced_decode_size(size: tuple[int, int], min_side: int | None) -> tuple[int, int] | None:
    """The smallest ``(w, h)`` with the aspect of ``size`` whose short side is at least ``min_side``, or ``None``
    when the image is not at least twice that large (nothing to gain from decoding it smaller)."""
    w, h = size
    short = min(w, h)
    if not min_side or short < 2 * min_side:
        return None
    scale = min_side / short
    return max(1, math.ceil(w * scale)), max(1, math.ceil(h * scale))


def _reduce_factor(size: tuple[int, int], min_side: int | None) -> int:
    """Largest integer factor that keeps the short side >= ``min_side`` (1: no reduction)."""
    return max(1, min(size) // min_side) if min_side else 1


def _skip_unless_regular(p: Path) -> None:
    """A named pipe, a socket or a device among the images is skipped as what it is; opening a FIFO would block."""
    kind = path_kind(p)
    if kind not in ("a file", "missing"):  # a file that disappeared is reported by the open below
        raise ImageSkipped(f"not a regular file: {kind}", p)


def upright_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(width, height)`` of the image :func:`load_rgb` would return in full, read from the header alone (EXIF
    orientations 5-8 swap the two). Raises :class:`ImageSkipped` when the header cannot be read."""
    p = Path(path)
    _skip_unless_regular(p)
    try:
        with Image.open(p) as im:
            w, h = im.size
            try:
                orientation = int(im.getexif().get(0x0112, 1))
            except Exception:
                orientation = 1
    except FileNotFoundError as e:
        raise ImageSkipped("file disappeared or does not exist", p) from e
    except Exception as e:
        raise ImageSkipped(_skip_reason(e), p) from e
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def load_rgb(path: str | os.PathLike[str], min_side: int | None = None) -> Image.Image:
    """Decode an image file into an 8-bit RGB :class:`PIL.Image.Image` that no longer needs the file.

    ``min_side`` (default ``None``: full decode) asks only for the resolution a model needs: the result's short
    side is at least ``min_side`` (callers pass twice the short side their resize targets, so the model's own
    interpolation still does the final step) and may be smaller than the file's. JPEGs are decoded at that size
    directly (Pillow's ``draft``: libjpeg's DCT-domain scaling by 1/2, 1/4 or 1/8); other formats are decoded in
    full and then reduced by an integer factor (``Image.reduce``, a box filter) before they are returned.

    Mode handling:

    * ``L`` / ``1`` / ``P`` / ``CMYK`` / ``YCbCr`` / ``RGBX``: converted with Pillow (grayscale is replicated
      to three channels; CMYK uses Pillow's plain formula, ICC profiles are ignored).
    * Transparency (``RGBA``, ``LA``, ``PA``, palette or ``tRNS`` transparency): **composited on a white
      background**, so fully transparent pixels become white rather than whatever colour hides under alpha 0.
    * 16-bit ``I;16*``: rescaled linearly from 0..65535 to 0..255 (full-range scaling, never clipped).
    * 32-bit ``I``: values within 0..255 kept, within 0..65535 scaled as 16-bit, otherwise min..max stretched.
    * Float ``F``: values within 0..1 multiplied by 255, otherwise min..max stretched; NaN/inf become the
      darkest finite value.
    * EXIF orientation is applied, so phone photos come out upright. Multi-frame files (GIF, TIFF) give
      their first frame.

    Raises :class:`ImageSkipped` with a short reason for files that are corrupt, truncated, unreadable or
    over Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``; the
    ``DecompressionBombWarning`` issued between 1x and 2x that limit is turned into an error for this
    call only, via ``warnings.catch_warnings``, which restores the previous filters on exit).
    Truncated files raise because Pillow's default ``ImageFile.LOAD_TRUNCATED_IMAGES = False`` is
    respected; a program that sets it to ``True`` opts in to loading them padded with grey.
    """
    p = Path(path)
    _skip_unless_regular(p)
    try:
        if p.stat().st_size == 0:
            raise ImageSkipped("empty file (0 bytes)", p)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                if im.format in ("JPEG", "MPO") and (want := reduced_decode_size(im.size, min_side)):
                    im.draft(im.mode, want)  # EXIF rotation below swaps w and h: the short side is the same
                im.load()
                try:
                    im = ImageOps.exif_transpose(im)
                except Exception:  # broken EXIF must not cost us an otherwise good image
                    pass
                mode = im.mode
                try:
                    rgb = _to_rgb(im)
                except (ValueError, TypeError) as e:
                    raise ImageSkipped(f"unsupported colour mode {mode} ({e})", p) from e
                factor = _reduce_factor(rgb.size, min_side)
                return rgb.reduce(factor) if factor > 1 else rgb
    except ImageSkipped:
        raise
    except FileNotFoundError as e:
        raise ImageSkipped("file disappeared or does not exist", p) from e
    except Exception as e:  # Pillow plugins raise many types (OSError, SyntaxError, ValueError, struct.error...)
        raise ImageSkipped(_skip_reason(e), p) from e


# -------------------------------------------------------------------------------------------------- batches


def _pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """Default transform: ``(3, H, W)`` float tensor in [0, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


class ImageFolderDataset(Dataset):
    """Map-style dataset over image paths; item ``i`` is ``(transform(load_rgb(paths[i], min_side)), i)``.

    A file that :func:`load_rgb` rejects yields a :class:`BadSample` instead; use ``collate_fn=
    collate_skip_bad`` so the DataLoader drops it and reports it. ``transform`` receives an RGB PIL image
    and should return a fixed-size tensor (default: un-normalised ``(3, H, W)`` float tensor in [0, 1],
    which only batches when all images have the same size). Errors raised by ``transform`` itself are
    not caught. The dataset is picklable (paths are stored as strings) as long as ``transform`` is, so it
    works with ``num_workers > 0``. ``min_side``: decode at reduced size (see :func:`load_rgb`); ``None``: in full.
    """

    def __init__(self, paths: Sequence[str | os.PathLike[str]], transform: Callable[[Image.Image], Any] | None = None,
                 min_side: int | None = None):
        self.paths: list[str] = [str(p) for p in paths]
        self.transform = transform
        self.min_side = min_side

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            img = load_rgb(self.paths[index], self.min_side)
        except ImageSkipped as e:
            return BadSample(int(index), e.reason)
        x = self.transform(img) if self.transform is not None else _pil_to_tensor(img)
        return x, int(index)

    def skipped_images(self, skipped: Sequence[tuple[int, str]]) -> list[SkippedImage]:
        """Turn the ``(index, reason)`` pairs from :func:`collate_skip_bad` into :class:`SkippedImage` records."""
        return [SkippedImage.of(self.paths[i], reason) for i, reason in skipped]


def collate_skip_bad(batch: Sequence[Any]) -> tuple[Any, torch.Tensor, list[tuple[int, str]]]:
    """``collate_fn`` for :class:`ImageFolderDataset` that drops bad samples.

    Returns ``(images, indices, skipped)``: ``images`` is the default-collated batch of the good items
    (a ``(B, ...)`` tensor) or ``None`` when every item in the batch was bad; ``indices`` is a ``long``
    tensor of the good items' dataset indices (same order as ``images``); ``skipped`` lists
    ``(index, reason)`` for the bad ones.
    """
    good = [b for b in batch if not isinstance(b, BadSample)]
    skipped = [(b.index, b.reason) for b in batch if isinstance(b, BadSample)]
    if not good:
        return None, torch.empty(0, dtype=torch.long), skipped
    images = default_collate([x for x, _ in good])
    indices = torch.tensor([i for _, i in good], dtype=torch.long)
    return images, indices, skipped


# --------------------------------------------------------------------------------------------------- labels


def _relative_parts(path: Path, root: Path) -> tuple[str, ...] | None:
    try:
        return path.relative_to(root).parts
    except ValueError:
        pass
    try:
        return path.resolve().relative_to(root.resolve()).parts
    except (ValueError, OSError):
        return None


def image_folder_labels(
    root: str | os.PathLike[str], paths: Sequence[str | os.PathLike[str]]
) -> tuple[list[int] | None, list[str] | None]:
    """Class labels from an ImageFolder layout: the first-level sub-folder of each image under ``root``.

    Returns ``(labels, class_names)`` with ``class_names`` sorted by name (as torchvision's ``ImageFolder``
    does; only sub-folders that contain images count) and ``labels[i]`` the index of ``paths[i]``'s class.
    Returns ``(None, None)`` when ``root`` is a single file or every image sits directly in ``root``.

    Raises :class:`InputError` when some images sit directly in ``root`` and others in sub-folders (the
    labels would be ambiguous) or when a path is not inside ``root``.
    """
    root_p = Path(root).expanduser()
    if root_p.is_file() or not paths:
        return None, None
    first_level: list[str | None] = []
    for path in paths:
        parts = _relative_parts(Path(path).expanduser(), root_p)
        if parts is None or not parts:
            raise InputError(f"{path} is not inside {root_p}; pass the folder the images were found in")
        first_level.append(parts[0] if len(parts) > 1 else None)
    n_loose = sum(c is None for c in first_level)
    if n_loose == len(first_level):
        return None, None
    if n_loose:
        raise InputError(
            f"{root_p} mixes {n_loose} image(s) directly in the folder with images in class sub-folders; "
            "move every image into a sub-folder named after its class (ImageFolder layout)"
        )
    class_names = sorted(set(first_level))  # type: ignore[arg-type]
    lookup = {name: i for i, name in enumerate(class_names)}
    return [lookup[c] for c in first_level], class_names  # type: ignore[index]
