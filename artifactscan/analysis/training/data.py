"""Training data: an image folder (ImageFolder layout) or the built-in synthetic set, and the step-based sampler
that makes a resumed run see exactly the batches an uninterrupted one would."""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import numpy as np
import torch

from artifactscan.core.errors import InputError, option
from artifactscan.analysis.training.config import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    IMAGE_EXTENSIONS,
    SYNTHETIC_MEAN,
    SYNTHETIC_STD,
    TrainConfig,
)
from artifactscan.inputs.images import ImageSkipped, load_rgb, upright_size
from artifactscan.inputs.synthetic import NUM_CLASSES, make_splits


class ImageFolderData(torch.utils.data.Dataset):
    """Images in ``root/<class>/*`` → ``(float 3×S×S in [0, 1], label)``.

    ``train=True`` applies a random-resized crop + horizontal flip whose randomness comes from ``(seed, epoch,
    index)`` rather than a global RNG, so a resumed run and every DataLoader worker see the same augmentations.
    ``train=False`` resizes the short side to ``S / crop_pct`` and centre-crops (timm's eval transform).

    Files are decoded by :func:`artifactscan.inputs.images.load_rgb` (the scans' decoder: every colour mode, EXIF
    orientation, decompression-bomb limit), only as large as needed: at least 2x the short side the crop is resized
    to. The random crop is drawn on the full-size (upright) dimensions from the header, then scaled to the decoded
    size, so the crops are those of a full decode and a resumed run decodes exactly the same pixels. A file that
    cannot be read stops training with an :class:`InputError` naming it.
    """

    def __init__(self, files: list[Path], labels: list[int], classes: list[str], img_size: int, train: bool,
                 seed: int = 0, crop_pct: float = 0.875):
        self.files, self.labels, self.classes = files, labels, classes
        self.img_size, self.train, self.seed, self.crop_pct = img_size, train, seed, crop_pct

    def __len__(self) -> int:
        return len(self.files)

    def _unreadable(self, index: int, exc: ImageSkipped) -> InputError:
        return InputError(f"cannot read image {self.files[index]} ({exc.reason}); delete or replace the file")

    def _decode(self, index: int, min_side: int | None) -> torch.Tensor:
        import torchvision.transforms.functional as TF

        try:
            return TF.pil_to_tensor(load_rgb(self.files[index], min_side))
        except ImageSkipped as exc:
            raise self._unreadable(index, exc) from None

    def load(self, index: int, epoch: int = 0) -> tuple[torch.Tensor, int]:
        import torchvision.transforms.functional as TF

        s = self.img_size
        if self.train:
            g = np.random.default_rng([self.seed, epoch, index])
            try:
                w, h = upright_size(self.files[index])
            except ImageSkipped as exc:
                raise self._unreadable(index, exc) from None
            for _ in range(10):
                area = h * w * g.uniform(0.35, 1.0)
                ratio = math.exp(g.uniform(math.log(3 / 4), math.log(4 / 3)))
                cw, ch = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
                if 0 < cw <= w and 0 < ch <= h:
                    top, left = int(g.integers(0, h - ch + 1)), int(g.integers(0, w - cw + 1))
                    break
            else:
                ch, cw = min(h, w), min(h, w)
                top, left = (h - ch) // 2, (w - cw) // 2
            # Keep >= 2 s pixels across the crop's short side: the image's short side may shrink by min(ch, cw) / 2s.
            img = self._decode(index, math.ceil(min(h, w) * 2 * s / min(ch, cw)))
            sy, sx = img.shape[-2] / h, img.shape[-1] / w
            top, left = int(top * sy), int(left * sx)
            ch, cw = max(1, min(round(ch * sy), img.shape[-2] - top)), max(1, min(round(cw * sx), img.shape[-1] - left))
            img = TF.resized_crop(img, top, left, ch, cw, [s, s], antialias=True)
            if g.random() < 0.5:
                img = TF.hflip(img)
        else:
            img = self._decode(index, 2 * int(math.floor(s / self.crop_pct)))
            img = TF.resize(img, int(math.floor(s / self.crop_pct)), antialias=True)
            img = TF.center_crop(img, [s, s])
        return img.float().div_(255.0), self.labels[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.load(index)


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def scan_image_folder(root: str | Path) -> tuple[list[str], list[Path], list[int]]:
    """Classes (sorted sub-folder names), image files and labels of an ImageFolder tree, with clear errors."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"data folder {root} does not exist; pass a folder with one sub-folder per class")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files: list[Path] = []
    labels: list[int] = []
    with_images = 0
    for i, c in enumerate(classes):
        imgs = list_images(root / c)
        with_images += bool(imgs)
        files += imgs
        labels += [i] * len(imgs)
    if not files:
        loose = [p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS]
        hint = " (images found directly in it: move them into one sub-folder per class)" if loose else ""
        raise InputError(f"no images in class sub-folders of {root}{hint}; expected {root}/<class>/<image>.jpg")
    if with_images < 2:
        raise InputError(
            f"{root} has images in only one class folder; classification needs at least 2 class sub-folders"
        )
    return classes, files, labels


def build_datasets(config: TrainConfig, world: int = 1):
    """Return ``(train_ds, val_ds, num_classes, data_config, description)`` for ``config.data``.

    ``None`` → the built-in synthetic shapes (train and val from different random streams); a folder → ImageFolder
    with ``val/`` (and ``train/``) sub-folders when present, else a deterministic ``val_fraction`` split.
    """
    if config.data is None:
        train, val = make_splits(config.train_size, config.val_size, seed=config.seed, img_size=config.img_size)
        data_config = dict(input_size=[3, config.img_size, config.img_size], mean=list(SYNTHETIC_MEAN),
                           std=list(SYNTHETIC_STD), interpolation="bilinear", crop_pct=1.0)
        return train, val, NUM_CLASSES, data_config, "synthetic-shapes"
    root = Path(config.data)
    crop_pct = 0.875 if config.img_size >= 64 else 1.0
    if (root / "val").is_dir() and (root / "train").is_dir():
        classes, files, labels = scan_image_folder(root / "train")
        v_classes, v_files, v_labels = scan_image_folder(root / "val")
        unknown = set(v_classes) - set(classes)
        if unknown:
            raise InputError(f"{root}/val has class folders missing from {root}/train: {sorted(unknown)[:5]}")
        remap = [classes.index(c) for c in v_classes]
        v_labels = [remap[l] for l in v_labels]
    elif (root / "val").is_dir():
        raise InputError(f"{root} has a val/ folder but no train/ folder; put the training classes in {root}/train")
    else:
        classes, all_files, all_labels = scan_image_folder(root)
        n = len(all_files)
        n_val = max(1, int(round(n * config.val_fraction)))
        if n - n_val < 1:
            raise InputError(f"{root} has only {n} images; add more or use a train/ and val/ sub-folder")
        order = np.random.default_rng([config.seed, zlib.crc32(b"val-split")]).permutation(n)
        val_idx, train_idx = set(order[:n_val].tolist()), order[n_val:]
        files = [all_files[i] for i in sorted(train_idx.tolist())]
        labels = [all_labels[i] for i in sorted(train_idx.tolist())]
        v_files = [all_files[i] for i in sorted(val_idx)]
        v_labels = [all_labels[i] for i in sorted(val_idx)]
    train = ImageFolderData(files, labels, classes, config.img_size, True, config.seed, crop_pct)
    val = ImageFolderData(v_files, v_labels, classes, config.img_size, False, config.seed, crop_pct)
    data_config = dict(input_size=[3, config.img_size, config.img_size], mean=list(IMAGENET_MEAN),
                       std=list(IMAGENET_STD), interpolation="bicubic", crop_pct=crop_pct)
    return train, val, len(classes), data_config, f"imagefolder:{root}"


class EpochIndexed(torch.utils.data.Dataset):
    """Lets the step sampler pass ``(index, epoch)`` so augmentation can be seeded per epoch."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, item):
        index, epoch = item
        if hasattr(self.ds, "load"):
            return self.ds.load(index, epoch)
        return self.ds[index]


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's share of global batch ``k`` for ``k`` in ``[start_step, total_steps)``.

    Batch ``k`` is a pure function of ``(seed, k)``: epoch ``e = k // steps_per_epoch`` uses a fresh permutation
    seeded by ``(seed, e)``; the global batch has ``world × batch_size`` items and rank ``r`` takes ``[r::world]``.
    Stateless, so resuming at any step reproduces the original order exactly (the DistributedSampler equivalent).
    """

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int, total_steps: int,
                 rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start, self.total, self.rank, self.world = start_step, total_steps, rank, world
        self.global_batch = batch_size * world
        self.steps_per_epoch = n // self.global_batch
        if self.steps_per_epoch < 1:
            raise InputError(
                f"the training set has {n} images, fewer than one global batch ({self.global_batch}); "
                f"add images or lower {option('batch_size')}"
            )
        self._perm_epoch, self._perm = -1, None

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def batch(self, step: int) -> list[tuple[int, int]]:
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        idx = self._perm[k * self.global_batch : (k + 1) * self.global_batch][self.rank :: self.world]
        return [(int(i), epoch) for i in idx]

    def __iter__(self):
        for step in range(self.start, self.total):
            yield self.batch(step)
