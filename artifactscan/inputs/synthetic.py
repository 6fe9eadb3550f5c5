"""The built-in synthetic data set ("shapes"): small images whose ground truth says where the objects are.

Why it exists: ``artifactscan train-reg`` must run on a laptop CPU with no download, and the later tools need to
know whether a flagged token sits on *background* or on an *object* — the paper's artifacts live in redundant
background patches, so a data set whose background/object masks are known exactly is the cheapest honest test bed.

Each image (default 32×32) is a flat grey-ish background with a per-image colour tint and light Gaussian noise
(sd 0.03), plus 1–4 saturated squares (3–4 px at 32 px; sizes scale with ``img_size``) in 4 colours, each placed
inside its own cell of a 4×4 grid so squares never overlap. About 89% of the 4×4-pixel patches are pure
background.

The label needs *global* information (no single patch can tell it)::

    label = (count - 1) * 2 + [at least two objects share a colour]        # 8 logits, classes 0..7

Class 1 (one object, shared colour) cannot occur; it is kept so the label is a plain formula. The count is uniform
in 1..4 and "shared" a fair coin when count ≥ 2, so class 0 holds 25% of the images and classes 2–7 12.5% each.

Images are generated on the fly and are a pure function of ``(seed, split, index)``: no files, no cache, the same
image on every machine and in every DataLoader worker. Train and validation sets never share an image because the
split name is mixed into the random stream (``SyntheticShapes(n, seed, split="val")``).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from artifactscan.core.errors import InputError, option

NUM_CLASSES = 8
GRID = 4  # objects are placed in the cells of a GRID×GRID layout, at most one per cell
COLOURS = np.array(
    [
        [0.95, 0.10, 0.10],  # red
        [0.10, 0.85, 0.15],  # green
        [0.10, 0.25, 0.95],  # blue
        [0.95, 0.90, 0.10],  # yellow
    ],
    dtype=np.float32,
)
COLOUR_NAMES = ("red", "green", "blue", "yellow")
NOISE_SD = 0.03
# Folder names used by write_image_folder; sorted order == label order, so an ImageFolder reader gets the same ids.
CLASS_NAMES = tuple(
    f"{label}_{label // 2 + 1}obj_{'shared' if label % 2 else 'distinct'}" for label in range(NUM_CLASSES)
)
_SPLIT_TAGS = {"train": 0, "val": 1, "test": 2}


def _split_tag(split: str) -> int:
    if split in _SPLIT_TAGS:
        return _SPLIT_TAGS[split]
    return 1000 + zlib.crc32(split.encode())  # any other name is its own stream


def label_of(count: int, shared: bool) -> int:
    """The class id of an image with ``count`` objects, ``shared`` = two of them have the same colour."""
    return (count - 1) * 2 + int(shared)


class SyntheticImages(Dataset):
    """What the built-in synthetic sets share: ``num_images`` square images of ``img_size`` px, each a pure function
    of ``(seed, the set's stream tags, index)``.

    Args:
        what: the set's name in the error for a bad count. size_hint: appended to the error for a bad size.
    """

    def __init__(self, num_images: int, seed: int, img_size: int, split: str, what: str, size_hint: str = ""):
        if num_images < 1:
            raise InputError(f"{what} needs at least 1 image, got {num_images}; pass a positive count")
        if img_size < 8:
            raise InputError(f"synthetic images must be at least 8 px wide, got {img_size}{size_hint}")
        self.num_images = int(num_images)
        self.seed = int(seed)
        self.img_size = int(img_size)
        self.split = split

    def __len__(self) -> int:
        return self.num_images

    def stream(self, index: int, *tags: int) -> np.random.Generator:
        """The random stream of image ``index`` (``IndexError`` outside ``0..num_images-1``)."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} synthetic images")
        return np.random.default_rng([self.seed, *tags, int(index)])


def background_colour(rng: np.random.Generator) -> np.ndarray:
    """A grey-ish background with a per-image tint: float32 RGB, the next draws of ``rng``."""
    base = rng.uniform(0.35, 0.65)
    tint = rng.uniform(-0.08, 0.08, size=3)
    return (base + tint).astype(np.float32)


def noisy_background(colour: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A ``3×size×size`` float32 image of ``colour`` plus Gaussian noise (sd :data:`NOISE_SD`) drawn from ``rng``."""
    img = np.empty((3, size, size), dtype=np.float32)
    img[:] = colour[:, None, None]
    img += rng.standard_normal((3, size, size), dtype=np.float32) * NOISE_SD
    return img


class SyntheticShapes(SyntheticImages):
    """On-the-fly synthetic images: ``ds[i]`` → ``(float tensor 3×H×W in [0, 1], label int)``.

    Args:
        num_images: length of the data set (the index range; any image can be rebuilt from its index alone).
        seed: base seed; the same ``(seed, split, index)`` always gives the same image.
        img_size: side in pixels (multiple of 4 is sensible; square sizes scale as ``img_size / 32``).
        split: ``"train"``, ``"val"``, ``"test"`` (or any name) — different splits never share an image.
    """

    num_classes = NUM_CLASSES
    classes = CLASS_NAMES

    def __init__(self, num_images: int, seed: int = 0, img_size: int = 32, split: str = "train"):
        super().__init__(num_images, seed, img_size, split, "synthetic data", f"; use {option('img_size', 32)}")
        self._tag = _split_tag(split)
        scale = img_size / 32.0
        self._sq_min = max(1, round(3 * scale))
        self._sq_max = max(self._sq_min, round(4 * scale))
        # cell boundaries (integers) so every square fits inside its own cell with a 1 px margin when possible
        self._edges = np.linspace(0, img_size, GRID + 1).round().astype(int)

    # --- generation -----------------------------------------------------------------------------------------
    def _rng(self, index: int) -> np.random.Generator:
        return self.stream(index, self._tag)

    def describe(self, index: int) -> dict:
        """The scene of image ``index``: object boxes ``(y0, x0, size)``, colour ids, count, shared flag, label."""
        rng = self._rng(index)
        count = int(rng.integers(1, 5))
        shared = bool(count >= 2 and rng.random() < 0.5)
        if shared:
            colours = rng.integers(0, len(COLOURS), size=count)
            if len(set(colours.tolist())) == count:  # force a repeat: copy one colour onto another object
                i, j = rng.choice(count, size=2, replace=False)
                colours[j] = colours[i]
        else:
            colours = rng.permutation(len(COLOURS))[:count]
        cells = rng.choice(GRID * GRID, size=count, replace=False)
        boxes = []
        for cell in cells:
            cy, cx = divmod(int(cell), GRID)
            y_lo, y_hi = self._edges[cy], self._edges[cy + 1]
            x_lo, x_hi = self._edges[cx], self._edges[cx + 1]
            size = int(rng.integers(self._sq_min, self._sq_max + 1))
            size = min(size, y_hi - y_lo, x_hi - x_lo)
            y0 = int(rng.integers(y_lo, y_hi - size + 1))
            x0 = int(rng.integers(x_lo, x_hi - size + 1))
            boxes.append((y0, x0, size))
        background = background_colour(rng)
        return {
            "count": count,
            "shared": shared,
            "label": label_of(count, shared),
            "colours": [int(c) for c in colours],
            "boxes": boxes,
            "background": background,
            "_rng": rng,  # continues the same stream for the noise
        }

    def render(self, index: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Return ``(image float32 3×H×W in [0, 1], object mask bool H×W, label)`` for ``index``."""
        scene = self.describe(index)
        rng = scene.pop("_rng")
        s = self.img_size
        img = noisy_background(scene["background"], s, rng)
        mask = np.zeros((s, s), dtype=bool)
        for (y0, x0, size), c in zip(scene["boxes"], scene["colours"]):
            img[:, y0 : y0 + size, x0 : x0 + size] = COLOURS[c][:, None, None]
            mask[y0 : y0 + size, x0 : x0 + size] = True
        np.clip(img, 0.0, 1.0, out=img)
        return img, mask, scene["label"]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img, _, label = self.render(index)
        return torch.from_numpy(img), label

    # --- ground truth for the scanners ----------------------------------------------------------------------
    def label(self, index: int) -> int:
        """The label alone (cheap: no pixels are drawn)."""
        return self.describe(index)["label"]

    def object_mask(self, index: int) -> torch.Tensor:
        """Bool ``H×W`` tensor, True on object (square) pixels, False on background."""
        return torch.from_numpy(self.render(index)[1])

    def patch_object_mask(self, index: int, patch_size: int, min_fraction: float = 0.0) -> torch.Tensor:
        """Bool ``(H/p)×(W/p)`` grid, True where a patch holds object pixels (more than ``min_fraction`` of it)."""
        return patch_mask_from_pixels(self.object_mask(index), patch_size, min_fraction)

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images ``N×3×H×W``, labels ``N`` and pixel masks ``N×H×W`` for a list of indices in one call."""
        parts = [self.render(int(i)) for i in indices]
        imgs = torch.from_numpy(np.stack([p[0] for p in parts]))
        masks = torch.from_numpy(np.stack([p[1] for p in parts]))
        labels = torch.tensor([p[2] for p in parts], dtype=torch.long)
        return imgs, labels, masks


def patch_mask_from_pixels(mask: torch.Tensor, patch_size: int, min_fraction: float = 0.0) -> torch.Tensor:
    """Reduce a pixel mask (``H×W`` or ``N×H×W``) to a per-patch mask: True where the object covers
    more than ``min_fraction`` of the patch (0 → any object pixel). ``H`` and ``W`` must be multiples of ``patch_size``."""
    h, w = mask.shape[-2:]
    if h % patch_size or w % patch_size:
        raise InputError(f"image size {h}×{w} is not a multiple of patch size {patch_size}; pick a divisor of {h}")
    m = mask.float().reshape(*mask.shape[:-2], h // patch_size, patch_size, w // patch_size, patch_size)
    return m.mean(dim=(-3, -1)) > min_fraction


def make_splits(
    num_train: int, num_val: int, seed: int = 0, img_size: int = 32
) -> tuple[SyntheticShapes, SyntheticShapes]:
    """Train and validation sets that never share an image (same seed, different split streams)."""
    return (
        SyntheticShapes(num_train, seed=seed, img_size=img_size, split="train"),
        SyntheticShapes(num_val, seed=seed, img_size=img_size, split="val"),
    )


def write_image_folder(
    out_dir: str | Path, num_images: int, seed: int = 0, img_size: int = 32, split: str = "train"
) -> Path:
    """Write ``num_images`` synthetic images as PNG files in ImageFolder layout (``out_dir/<class>/<index>.png``).

    Class folder names sort in label order (``0_1obj_distinct`` … ``7_4obj_shared``); class 1 never occurs, so its
    folder is created empty to keep folder order == label id. Returns ``out_dir``.
    """
    from PIL import Image

    out = Path(out_dir)
    ds = SyntheticShapes(num_images, seed=seed, img_size=img_size, split=split)
    for name in CLASS_NAMES:
        (out / name).mkdir(parents=True, exist_ok=True)
    for i in range(num_images):
        img, _, label = ds.render(i)
        arr = (img.transpose(1, 2, 0) * 255.0 + 0.5).astype(np.uint8)
        Image.fromarray(arr).save(out / CLASS_NAMES[label] / f"{split}_{i:06d}.png")
    return out


def write_photo_folder(out_dir: str | Path, num_images: int, photos: list[str | Path], size: tuple[int, int] = (1600, 1200),
                       fmt: str = "jpeg", seed: int = 0, quality: int = 90) -> Path:
    """Write ``num_images`` real-size, photo-like files (for data-path tests and benchmarks).

    Each is one of ``photos``, randomly cropped (60-100% per side), maybe flipped, upscaled to ``size`` (bicubic), with
    Gaussian sensor noise (sd 4 of 255) so the file carries the fine detail a reduced decode drops. ``fmt``: ``jpeg``
    (``quality``) or ``png``. A pure function of ``seed``. Returns ``out_dir``.
    """
    from PIL import Image

    if fmt not in ("jpeg", "png"):
        raise InputError(f"photo format {fmt!r}: use jpeg or png")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sources = [Image.open(p).convert("RGB") for p in photos]
    for i in range(num_images):
        src = sources[i % len(sources)]
        w, h = src.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        im = src.crop((left, top, left + cw, top + ch)).resize(size, Image.BICUBIC)
        if rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        noisy = np.asarray(im, dtype=np.float32) + rng.normal(0, 4, (size[1], size[0], 1))
        img = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
        if fmt == "jpeg":
            img.save(out / f"photo{i:04d}.jpg", quality=quality)
        else:
            img.save(out / f"photo{i:04d}.png", compress_level=1)
    return out
