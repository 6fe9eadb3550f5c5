"""Training library behind ``artifactscan train-reg``: train the same ViT with and without register tokens.

Why this exists: the paper's fix for high-norm artifact tokens is a handful of extra learnable "register" tokens
(timm's ``reg_tokens=``: inserted after CLS, no position embedding, discarded at the output). The only convincing way
to show what registers change is a *controlled* pair: the same architecture, the same seed, the same initial weights
for every shared parameter, the same data in the same order — the register tokens are the only difference. Then
``artifactscan norms`` scans both and the difference in their token-norm statistics is attributable to registers.

Design points (each one exists to keep that comparison honest or the run recoverable):

* **Identical init.** The register model copies every shared parameter from a freshly built 0-register model made
  from the same seed, so the two models start from the same point (only ``reg_token`` is new).
* **Data order from the step number.** Batch ``k`` is a pure function of ``(seed, k)``; the sampler keeps no state,
  which makes a resumed run see exactly the batches an uninterrupted run would, and lets DDP ranks shard a global
  batch without a ``DistributedSampler`` object (rank ``r`` takes every ``world``-th item of the global batch).
* **Resume = bit-identical on CPU.** ``last.pt`` stores model, optimiser, scheduler, RNG states (as tensors, so the
  file loads with ``weights_only=True``) and the step; resuming a killed run ends at the same weights.
* **Self-describing checkpoints.** Every checkpoint is written with :func:`artifactscan.checkpoint.save_checkpoint`
  (arch, arch_kwargs incl. ``reg_tokens``, data_config, step), so later commands need no ``--arch``.
* **Side by side on CPU.** On a CPU with ≥ 2 cores, the variants of ``train_reg`` run as parallel single-threaded
  processes: small ViTs scale badly across threads, so two 1-thread runs use two cores best.

Public API: :class:`TrainConfig`, :data:`PRESETS`, :func:`get_preset`, :func:`parse_registers`, :func:`build_model`,
:func:`train_model`, :func:`train_reg`, :func:`resume`, :func:`evaluate_checkpoint`; results are
:class:`TrainResult` and :class:`TrainRegResult`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import META_KEY, CheckpointMeta, read_meta, save_checkpoint
from .errors import InputError, TrainingError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SYNTHETIC_MEAN = (0.5, 0.5, 0.5)
SYNTHETIC_STD = (0.5, 0.5, 0.5)

# Fields that may differ between a run and its resumption (where/how it runs, not what it computes).
RUNTIME_FIELDS = frozenset({"device", "compile", "num_threads", "num_workers", "progress_every"})


# ----------------------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Everything that determines a training run (JSON-serialisable; saved as ``config.json`` in the run folder).

    The defaults are the ``demo`` preset: a 1.2M-parameter ViT on 32 px synthetic images, the recipe measured in
    ``shared/research/emergence.md`` (≈110 img/s on one CPU thread). ``batch_size`` is *per process*: under torchrun
    with ``W`` processes the global batch is ``W × batch_size``.
    """

    # model
    arch: str = "vit_small_patch16_224"
    # None = the architecture's own value (resolved by resolve_config before training and then stored)
    img_size: int | None = 32
    patch_size: int | None = 4
    embed_dim: int | None = 128
    depth: int | None = 6
    num_heads: int | None = 4
    num_classes: int | None = 8  # None → number of class folders in --data
    class_token: bool = True
    global_pool: str = "token"  # "token" (CLS) or "avg" (--no-cls)
    registers: int = 0
    init_values: float | None = None  # LayerScale init (None = off)
    # data
    data: str | None = None  # None → built-in synthetic shapes; else an ImageFolder root
    train_size: int = 102_400  # synthetic only: images per epoch (generated on the fly)
    val_size: int = 2048  # synthetic only: held-out images
    val_fraction: float = 0.1  # ImageFolder without val/: share held out (deterministic split)
    # schedule
    steps: int | None = 1600
    epochs: float | None = None  # used when steps is None
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 200
    min_lr_ratio: float = 0.0  # cosine decays to lr × min_lr_ratio
    clip_grad: float | None = 3.0
    seed: int = 0
    # bookkeeping
    eval_every: int = 200
    ckpt_every: int = 200  # resume file + intermediate snapshot every N steps
    keep_ckpts: int = 8  # intermediate snapshots kept (thinned evenly when exceeded)
    # runtime (may change on resume)
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1" ...
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    compile: bool = False
    num_threads: int | None = None
    num_workers: int = 0
    progress_every: int = 10

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def replace(self, **changes: Any) -> "TrainConfig":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TrainingError(f"unknown training option(s) {sorted(unknown)}; see TrainConfig for valid names")
        return dataclasses.replace(self, **changes)

    def model_kwargs(self, registers: int | None = None) -> dict[str, Any]:
        """Keyword overrides for ``timm.create_model`` (also stored as ``arch_kwargs`` in every checkpoint).

        ``no_embed_class=True`` as in timm's ``*_reg4`` models: neither CLS nor registers get a position embedding,
        so the 0- and N-register models have identically shaped ``pos_embed`` and can share their initial weights.
        """
        reg = self.registers if registers is None else registers
        pool = self.global_pool if self.class_token else ("avg" if self.global_pool == "token" else self.global_pool)
        kw: dict[str, Any] = dict(
            num_classes=self.num_classes,
            img_size=self.img_size,
            patch_size=self.patch_size,
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            reg_tokens=int(reg),
            class_token=self.class_token,
            global_pool=pool,
            no_embed_class=True,
        )
        kw = {k: v for k, v in kw.items() if v is not None}
        if self.init_values is not None:
            kw["init_values"] = self.init_values
        return kw

    def identity(self) -> dict[str, Any]:
        """The fields that define *what* is computed (used to refuse resuming with a different config)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}


PRESETS: dict[str, TrainConfig] = {
    # Real data (--data / --arch): the architecture's own size (e.g. ViT-S/16 at 224 px), DeiT-like recipe;
    # batch is per process, so 8 GPUs × 128 = 1024 as in DeiT.
    "imagenet": TrainConfig(
        img_size=None, patch_size=None, embed_dim=None, depth=None, num_heads=None, num_classes=None,
        steps=None, epochs=100, batch_size=128, lr=1e-3, weight_decay=0.05, warmup_steps=2000, clip_grad=3.0,
        eval_every=2000, ckpt_every=5000, keep_ckpts=10, num_workers=8, progress_every=20,
    ),
    # The recipe of emergence.md run A (+ cosine decay): 1600 steps × 64 = 102,400 images, each seen once;
    # ≈ 20–25 min per model on one CPU thread (≈ 80 img/s measured on this 2-core VM), both models side by side.
    "demo": TrainConfig(),
}


def get_preset(name: str | None = None, **overrides: Any) -> TrainConfig:
    """A copy of preset ``name`` with ``overrides`` applied (``None`` values are ignored, so CLI options can be
    passed straight through).

    ``name=None`` picks ``"demo"`` (the CPU demo on synthetic data) unless ``data`` or ``arch`` is given, then
    ``"imagenet"`` (the architecture's own size). ``epochs`` without ``steps`` clears the preset's step count.
    """
    changes = {k: v for k, v in overrides.items() if v is not None}
    if name is None:
        name = "imagenet" if ("data" in changes or "arch" in changes) else "demo"
    if name not in PRESETS:
        raise TrainingError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    if "epochs" in changes and "steps" not in changes:
        changes["steps"] = None
    if changes.get("class_token") is False and "global_pool" not in changes:
        changes["global_pool"] = "avg"
    return PRESETS[name].replace(**changes)


def parse_registers(spec: str | int | Sequence[int]) -> list[int]:
    """``"4"`` → ``[4]``, ``"0,1,2,4,8"`` → ``[0, 1, 2, 4, 8]``; refuses negative or non-integer counts."""
    if isinstance(spec, int):
        items: list[Any] = [spec]
    elif isinstance(spec, str):
        items = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        items = list(spec)
    out: list[int] = []
    for item in items:
        try:
            n = int(item)
        except (TypeError, ValueError):
            raise TrainingError(f"--registers expects integers like 4 or 0,1,2,4,8, got {item!r}") from None
        if n < 0:
            raise TrainingError(f"--registers must be 0 or more, got {n}; use e.g. --registers 4 or 0,1,2,4,8")
        if n not in out:
            out.append(n)
    if not out:
        raise TrainingError("--registers is empty; use e.g. --registers 4 or 0,1,2,4,8")
    return out


def resolve_config(config: TrainConfig) -> TrainConfig:
    """Fill the ``None`` model sizes from the architecture itself (built on the meta device: no memory, no time),
    and refuse architectures that are not ViTs before any data is read."""
    import timm

    if not timm.is_model(config.arch):
        raise TrainingError(
            f"unknown timm architecture {config.arch!r}; use a ViT name such as vit_small_patch16_224"
        )
    if None not in (config.img_size, config.patch_size, config.embed_dim, config.depth, config.num_heads):
        return config
    try:
        with torch.device("meta"):
            m = timm.create_model(config.arch, pretrained=False, num_classes=0)
    except TypeError as exc:
        raise TrainingError(f"{config.arch} cannot be built ({exc}); use a ViT such as vit_small_patch16_224")
    if not hasattr(m, "blocks") or not hasattr(m, "num_prefix_tokens") or not hasattr(m, "patch_embed"):
        raise TrainingError(
            f"{config.arch} is not a timm VisionTransformer (no blocks / prefix tokens); "
            f"use a ViT such as vit_small_patch16_224"
        )
    pe = m.patch_embed
    found = dict(
        img_size=int(pe.img_size[0]) if getattr(pe, "img_size", None) else 224,
        patch_size=int(pe.patch_size[0]),
        embed_dim=int(m.embed_dim),
        depth=len(m.blocks),
        num_heads=int(m.blocks[0].attn.num_heads),
    )
    return config.replace(**{k: v for k, v in found.items() if getattr(config, k) is None})


def _validate(config: TrainConfig) -> None:
    if config.registers < 0:
        raise TrainingError(f"registers must be 0 or more, got {config.registers}; use e.g. --registers 4")
    if config.batch_size < 1:
        raise TrainingError(f"batch size must be positive, got {config.batch_size}")
    if config.steps is None and config.epochs is None:
        raise TrainingError("give either --steps or --epochs")
    if config.steps is not None and config.steps < 1:
        raise TrainingError(f"--steps must be positive, got {config.steps}")
    if config.img_size % config.patch_size:
        raise TrainingError(
            f"--img-size {config.img_size} is not a multiple of --patch {config.patch_size}; pick a divisor"
        )
    if config.embed_dim % config.num_heads:
        raise TrainingError(f"--dim {config.embed_dim} is not divisible by --heads {config.num_heads}")


# ----------------------------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------------------------
def build_model(config: TrainConfig, registers: int | None = None, *, seed: int | None = None) -> nn.Module:
    """Create the (untrained) timm ViT described by ``config`` with ``registers`` register tokens.

    With ``registers > 0`` every parameter except ``reg_token`` is copied from the 0-register model built from the
    same seed, so a register model and its baseline start from the same weights.
    """
    import timm

    reg = config.registers if registers is None else int(registers)
    if reg < 0:
        raise TrainingError(f"registers must be 0 or more, got {reg}; use e.g. --registers 4")
    seed = config.seed if seed is None else seed
    if not timm.is_model(config.arch):
        raise TrainingError(
            f"unknown timm architecture {config.arch!r}; use a ViT name such as vit_small_patch16_224"
        )

    def create(n_reg: int) -> nn.Module:
        torch.manual_seed(seed)
        try:
            model = timm.create_model(config.arch, pretrained=False, **config.model_kwargs(n_reg))
        except TypeError as exc:
            raise TrainingError(
                f"{config.arch} is not a timm VisionTransformer (it does not accept img_size/patch_size/reg_tokens: "
                f"{exc}); use a ViT such as vit_small_patch16_224"
            ) from None
        if not hasattr(model, "blocks") or not hasattr(model, "num_prefix_tokens"):
            raise TrainingError(
                f"{config.arch} has no transformer blocks / prefix tokens; use a ViT such as vit_small_patch16_224"
            )
        if getattr(model, "num_reg_tokens", n_reg) != n_reg:
            raise TrainingError(f"{config.arch} ignored reg_tokens={n_reg}; use a timm VisionTransformer")
        return model

    model = create(reg)
    if reg > 0:
        base = create(0).state_dict()
        missing, unexpected = model.load_state_dict(base, strict=False)
        if unexpected or any(k != "reg_token" for k in missing):
            raise TrainingError(f"{config.arch}: register and baseline models differ beyond reg_token ({missing})")
    return model


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod  # torch.compile
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norms, tokens and position embeddings (timm/DeiT convention)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------------
class ImageFolderData(torch.utils.data.Dataset):
    """Images in ``root/<class>/*`` → ``(float 3×S×S in [0, 1], label)``.

    ``train=True`` applies a random-resized crop + horizontal flip whose randomness comes from ``(seed, epoch,
    index)`` rather than a global RNG, so a resumed run and every DataLoader worker see the same augmentations.
    ``train=False`` resizes the short side to ``S / crop_pct`` and centre-crops (timm's eval transform).
    """

    def __init__(self, files: list[Path], labels: list[int], classes: list[str], img_size: int, train: bool,
                 seed: int = 0, crop_pct: float = 0.875):
        self.files, self.labels, self.classes = files, labels, classes
        self.img_size, self.train, self.seed, self.crop_pct = img_size, train, seed, crop_pct

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int, epoch: int = 0) -> tuple[torch.Tensor, int]:
        from PIL import Image
        import torchvision.transforms.functional as TF

        try:
            with Image.open(self.files[index]) as im:
                img = TF.pil_to_tensor(im.convert("RGB"))
        except OSError as exc:
            raise InputError(f"cannot read image {self.files[index]} ({exc}); delete or replace the file") from None
        s = self.img_size
        if self.train:
            g = np.random.default_rng([self.seed, epoch, index])
            h, w = img.shape[-2:]
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
            img = TF.resized_crop(img, top, left, ch, cw, [s, s], antialias=True)
            if g.random() < 0.5:
                img = TF.hflip(img)
        else:
            img = TF.resize(img, int(math.floor(s / self.crop_pct)), antialias=True)
            img = TF.center_crop(img, [s, s])
        return img.float().div_(255.0), self.labels[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.load(index)


def _list_images(folder: Path) -> list[Path]:
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
        imgs = _list_images(root / c)
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
        from .synthetic import NUM_CLASSES, make_splits

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


class _EpochIndexed(torch.utils.data.Dataset):
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
                f"add images or lower --batch-size"
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


# ----------------------------------------------------------------------------------------------------------------
# runtime helpers
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise TrainingError(f"unknown device {spec!r}; use cpu, cuda or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return dev


def _init_distributed(device: torch.device) -> tuple[_Dist, torch.device]:
    """Join the torchrun process group (env:// init; nccl on GPU, gloo on CPU) when ``WORLD_SIZE`` > 1."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist(), device
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise TrainingError(
                f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs; lower torchrun --nproc-per-node"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return _Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local), device


def _all_reduce_sum(values: list[float], device: torch.device, d: _Dist) -> list[float]:
    if d.world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _barrier(d: _Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


def _atomic_torch_save(obj: Any, path: Path) -> None:
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


@torch.no_grad()
def evaluate(model: nn.Module, dataset, config: TrainConfig, device: torch.device, mean: torch.Tensor,
             std: torch.Tensor, d: _Dist | None = None, batch_size: int = 256) -> tuple[float, float]:
    """Mean cross-entropy and accuracy on ``dataset`` (sharded across DDP ranks, summed with all-reduce)."""
    d = d or _Dist()
    was_training = model.training
    model.eval()
    loss_sum = correct = count = 0.0
    idx = list(range(d.rank, len(dataset), d.world))
    amp = device.type == "cuda" and config.amp
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, idx), batch_size=batch_size, shuffle=False,
        num_workers=config.num_workers, pin_memory=device.type == "cuda",
    )
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        x = (x - mean) / std
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
        count += len(y)
    loss_sum, correct, count = _all_reduce_sum([loss_sum, correct, count], device, d)
    model.train(was_training)
    return loss_sum / max(count, 1), correct / max(count, 1)


class _Reporter:
    """Rich progress bar on stderr (rank 0 only) + optional event callback (used by side-by-side workers)."""

    def __init__(self, enabled: bool, label: str, total: int, start: int,
                 on_event: Callable[[dict], None] | None):
        self.on_event, self.progress, self.task = on_event, None, None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  acc {task.fields[acc]}  {task.fields[ips]} img/s"),
                TimeRemainingColumn(), console=Console(stderr=True),
            )
            self.progress.start()
            self.task = self.progress.add_task(label, total=total, completed=start, loss="-", acc="-", ips="-")

    def step(self, step: int, loss: float, ips: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, loss=f"{loss:.3f}", ips=f"{ips:.0f}")
        if self.on_event:
            self.on_event({"type": "step", "step": step, "loss": loss, "img_per_s": ips})

    def eval(self, record: dict) -> None:
        if self.progress is not None:
            self.progress.update(self.task, acc=f"{record['val_acc']:.3f}")
            self.progress.console.print(
                f"step {record['step']}: loss {record['loss']:.3f}  val loss {record['val_loss']:.3f}  "
                f"val acc {record['val_acc']:.3f}  {record['img_per_s']:.0f} img/s"
            )
        if self.on_event:
            self.on_event({"type": "eval", **record})

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


# ----------------------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What one training run produced. ``final_checkpoint`` is a self-describing ``.safetensors`` file."""

    run_dir: Path
    registers: int
    final_checkpoint: Path
    checkpoints: list[Path]  # intermediate snapshots (oldest first), for following norms over training
    steps: int
    val_acc: float
    val_loss: float
    wall_s: float  # whole run incl. evaluation and checkpointing (this process's share when resumed)
    train_s: float  # time spent in training steps only (all sessions of the run)
    img_per_s: float  # training throughput (global, all ranks)
    model: nn.Module | None = field(default=None, repr=False)  # the trained model (unwrapped), for in-process use

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "model"}
        d["run_dir"] = str(self.run_dir)
        d["final_checkpoint"] = str(self.final_checkpoint)
        d["checkpoints"] = [str(p) for p in self.checkpoints]
        return d


def _meta(config: TrainConfig, registers: int, data_config: dict, step: int, kind: str = "trained",
          description: str = "", extra: dict | None = None) -> CheckpointMeta:
    return CheckpointMeta(
        arch=config.arch,
        arch_kwargs=config.model_kwargs(registers),
        data_config=data_config,
        kind=kind,
        step=step,
        description=description
        or f"{config.arch} ({config.depth}×{config.embed_dim}, {config.img_size}px/{config.patch_size}) with "
        f"{registers} register tokens, trained by artifactscan train-reg for {step} steps",
        extra={"config": config.to_dict(), **(extra or {})},
    )


def _check_same_config(saved: dict, expected: TrainConfig | dict | None, run_dir: Path) -> None:
    if expected is None:
        return
    given = expected.identity() if isinstance(expected, TrainConfig) else dict(expected)
    # None means "automatic" (e.g. num_classes from the folders), which matches whatever was resolved then
    diffs = [k for k, v in given.items()
             if k not in RUNTIME_FIELDS and k in saved and v is not None and saved[k] != v]
    if diffs:
        shown = ", ".join(f"{k}: saved {saved[k]!r} vs given {given[k]!r}" for k in diffs[:3])
        raise TrainingError(
            f"{run_dir} was trained with a different config ({shown}); drop those options or start a new run folder"
        )


def train_model(
    config: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    on_event: Callable[[dict], None] | None = None,
    stop_at_step: int | None = None,
    label: str | None = None,
    return_model: bool = False,
) -> TrainResult:
    """Train one model (``config.registers`` register tokens) into ``run_dir``.

    Writes ``config.json``, ``metrics.jsonl`` (one line per evaluation), ``checkpoints/step_*.safetensors``
    (intermediate snapshots, thinned to ``keep_ckpts``), ``last.pt`` (resume state), ``final.safetensors`` and
    ``result.json``. Under torchrun every rank trains and only rank 0 writes.

    Args:
        resume: continue from ``run_dir/last.pt`` (same config required; the result equals an uninterrupted run).
        progress: show the rich progress bar on stderr.
        on_event: called with ``{"type": "step"|"eval", ...}`` dicts (for parent processes drawing the bar).
        stop_at_step: save the resume state and return after this step (simulates a killed run; tests use it).
        return_model: put the trained (unwrapped) model in the result.
    """
    config = resolve_config(config)
    _validate(config)
    run_dir = Path(run_dir)
    t_start = time.perf_counter()
    device = _resolve_device(config.device)
    d, device = _init_distributed(device)
    if config.num_threads:
        torch.set_num_threads(int(config.num_threads))
    last_path = run_dir / "last.pt"

    saved_resume: dict | None = None
    if resume:
        if not last_path.is_file():
            what = "has no checkpoint yet (last.pt)" if (run_dir / "config.json").is_file() else "is not a run folder"
            raise TrainingError(f"cannot resume: {run_dir} {what}; start a fresh run instead of --resume")
        blob = torch.load(last_path, map_location="cpu", weights_only=True)
        saved_cfg = json.loads(blob["resume"]["config"])
        _check_same_config(saved_cfg, config, run_dir)
        saved_resume = blob
    elif last_path.exists() or (run_dir / "final.safetensors").exists():  # every rank checks: no rank left hanging
        raise TrainingError(f"{run_dir} already holds a training run; pass --resume {run_dir} or choose a new folder")

    train_ds, val_ds, n_data_classes, data_config, data_desc = build_datasets(config, d.world)
    if config.num_classes is None:
        config = config.replace(num_classes=n_data_classes)
    elif n_data_classes > config.num_classes:
        raise TrainingError(
            f"the data has {n_data_classes} classes but the model has {config.num_classes} outputs; "
            f"drop --num-classes or set it to {n_data_classes}"
        )
    total = config.steps
    if total is None:
        total = max(1, math.ceil(config.epochs * len(train_ds) / (config.batch_size * d.world)))

    model = build_model(config).to(device)
    raw = model
    opt = torch.optim.AdamW(_param_groups(raw, config.weight_decay), lr=config.lr, betas=(0.9, 0.999),
                            **({"fused": True} if device.type == "cuda" else {}))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total, config.warmup_steps, config.min_lr_ratio)
    )
    start_step, loss_sum, loss_count, train_time, eval_mark, snapshots = 0, 0.0, 0, 0.0, 0.0, []
    if saved_resume is not None:
        st = saved_resume["resume"]
        raw.load_state_dict(saved_resume["state_dict"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        torch.set_rng_state(st["rng_cpu"])
        if device.type == "cuda" and st.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(st["rng_cuda"], device)
        start_step = int(st["step"])
        loss_sum, loss_count, train_time = float(st["loss_sum"]), int(st["loss_count"]), float(st["train_time"])
        eval_mark = float(st["eval_mark"])
        snapshots = [run_dir / p for p in st["snapshots"]]
    else:
        torch.manual_seed(config.seed + 1)  # any randomness in the loop (drop-path if added) is seeded too

    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_json(run_dir / "config.json", {**config.to_dict(), "total_steps": total, "data": config.data,
                                              "data_description": data_desc, "world_size": d.world})
    if config.compile:
        model = torch.compile(model)
    if d.world > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    sampler = StepBatchSampler(len(train_ds), config.batch_size, config.seed, start_step, total, d.rank, d.world)
    loader = torch.utils.data.DataLoader(
        _EpochIndexed(train_ds), batch_sampler=sampler, num_workers=config.num_workers,
        pin_memory=device.type == "cuda", persistent_workers=False,
    )
    mean = torch.tensor(data_config["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(data_config["std"], device=device).view(1, 3, 1, 1)
    amp = device.type == "cuda" and config.amp
    params = [p for p in raw.parameters() if p.requires_grad]
    reporter = _Reporter(progress and d.main, label or f"reg{config.registers}", total, start_step, on_event)
    metrics_path = run_dir / "metrics.jsonl"
    val_loss = val_acc = float("nan")
    step = start_step
    ckpt_stride = 1
    recent_ips = 0.0
    running_loss = torch.zeros((), dtype=torch.float64, device=device)

    def save_resume_state(at_step: int) -> None:
        if not d.main:
            return
        pending_loss = loss_sum + running_loss.item()
        state = {
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "step": at_step,
            "config": json.dumps(config.to_dict(), sort_keys=True),
            "loss_sum": pending_loss,
            "loss_count": loss_count,
            "train_time": train_time,
            "eval_mark": eval_mark,
            "snapshots": [p.name if p.parent == run_dir else str(p.relative_to(run_dir)) for p in snapshots],
        }
        meta = _meta(config, config.registers, data_config, at_step, extra={"resume_file": True})
        sd = {k: v.detach().cpu() for k, v in raw.state_dict().items()}
        _atomic_torch_save({"state_dict": sd, META_KEY: json.loads(meta.to_json()), "resume": state}, last_path)

    try:
        model.train()
        t_window, n_window = time.perf_counter(), 0
        for batch in loader:
            t0 = time.perf_counter()
            x, y = batch
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            x = (x - mean) / std
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(x)
                loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.clip_grad:
                torch.nn.utils.clip_grad_norm_(params, config.clip_grad)
            opt.step()
            sched.step()
            step += 1
            running_loss += loss.detach().double()  # no host sync per step (matters on GPU)
            loss_count += 1
            train_time += time.perf_counter() - t0
            n_window += 1
            if step % config.progress_every == 0 or step == total:
                now = time.perf_counter()
                recent_ips = n_window * config.batch_size * d.world / max(now - t_window, 1e-9)
                t_window, n_window = now, 0
                reporter.step(step, loss.item(), recent_ips)

            is_last = step == total
            if step % config.eval_every == 0 or is_last:
                val_loss, val_acc = evaluate(raw, val_ds, config, device, mean, std, d)
                loss_sum += running_loss.item()
                record = {
                    "step": step,
                    "loss": loss_sum / max(loss_count, 1),  # mean training loss since the previous evaluation
                    "val_loss": val_loss,
                    "val_acc": val_acc,
                    "img_per_s": loss_count * config.batch_size * d.world / max(train_time - eval_mark, 1e-9),
                    "lr": opt.param_groups[0]["lr"],
                    "train_s": train_time,
                    "registers": config.registers,
                }
                running_loss.zero_()
                loss_sum, loss_count, eval_mark = 0.0, 0, train_time
                if d.main:
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                reporter.eval(record)
            if (step % config.ckpt_every == 0 and not is_last) and d.main:
                snap = run_dir / "checkpoints" / f"step_{step:07d}.safetensors"
                save_checkpoint(snap, raw.state_dict(), _meta(config, config.registers, data_config, step))
                snapshots.append(snap)
                while len(snapshots) > max(1, config.keep_ckpts):  # thin evenly: double the stride
                    ckpt_stride *= 2
                    keep = [p for p in snapshots
                            if (int(p.stem.split("_")[1]) // config.ckpt_every) % ckpt_stride == 0]
                    for p in set(snapshots) - set(keep):
                        p.unlink(missing_ok=True)
                    snapshots = keep
            if step % config.ckpt_every == 0 or is_last or step == stop_at_step:
                save_resume_state(step)
            if stop_at_step is not None and step >= stop_at_step and not is_last:
                break
    except torch.cuda.OutOfMemoryError:
        smaller = max(1, config.batch_size // 2)
        raise TrainingError(
            f"CUDA ran out of memory at batch size {config.batch_size} per GPU ({config.arch}, "
            f"{config.img_size}px, {config.registers} registers); try --batch-size {smaller}"
        ) from None
    finally:
        reporter.close()

    final = run_dir / "final.safetensors"
    finished = step == total
    if finished and start_step == total:  # resumed a run that had already finished: just re-evaluate
        val_loss, val_acc = evaluate(raw, val_ds, config, device, mean, std, d)
    ips = step * config.batch_size * d.world / train_time if train_time else 0.0  # over all sessions of the run
    wall = time.perf_counter() - t_start
    if finished and d.main:
        save_checkpoint(final, raw.state_dict(), _meta(config, config.registers, data_config, total))
    result = TrainResult(
        run_dir=run_dir, registers=config.registers, final_checkpoint=final, checkpoints=list(snapshots),
        steps=step, val_acc=val_acc, val_loss=val_loss, wall_s=wall, train_s=train_time, img_per_s=ips,
        model=raw if return_model else None,
    )
    if finished and d.main:
        prev = run_dir / "result.json"
        if resume and prev.exists():  # a resumed run's wall time includes the earlier sessions
            try:
                result.wall_s += float(json.loads(prev.read_text()).get("wall_s_partial", 0.0))
            except (ValueError, OSError):
                pass
        _write_json(run_dir / "result.json", result.to_dict())
    elif d.main:
        _write_json(run_dir / "result.json", {"finished": False, "steps": step, "wall_s_partial": wall})
    _barrier(d)
    return result


# ----------------------------------------------------------------------------------------------------------------
# train-reg: the controlled pair (or ablation)
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class RegVariant:
    """One model of a ``train_reg`` comparison."""

    registers: int
    checkpoint: Path  # final weights (self-describing .safetensors, or the given baseline checkpoint)
    run_dir: Path | None  # None for a baseline given with --baseline
    val_acc: float
    trained: bool  # False when the baseline came from --baseline
    steps: int | None = None
    wall_s: float | None = None
    img_per_s: float | None = None
    checkpoints: list[Path] = field(default_factory=list)  # intermediate snapshots

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["checkpoint"] = str(self.checkpoint)
        d["run_dir"] = str(self.run_dir) if self.run_dir else None
        d["checkpoints"] = [str(p) for p in self.checkpoints]
        return d


@dataclass
class TrainRegResult:
    """The hook for the verdict step: scan ``variant.checkpoint`` of every variant with the norms core.

    ``variants`` is sorted by register count; ``baseline`` is the 0-register model.
    """

    run_dir: Path
    config: TrainConfig
    variants: list[RegVariant]
    comparison_path: Path

    @property
    def baseline(self) -> RegVariant:
        return self.variant(0)

    def variant(self, registers: int) -> RegVariant:
        for v in self.variants:
            if v.registers == registers:
                return v
        raise KeyError(f"no variant with {registers} registers")

    def checkpoints(self) -> dict[int, Path]:
        return {v.registers: v.checkpoint for v in self.variants}

    def to_dict(self) -> dict[str, Any]:
        base = next((v for v in self.variants if v.registers == 0), None)
        ratios = {}
        if base is not None and base.img_per_s:
            ratios = {str(v.registers): base.img_per_s / v.img_per_s for v in self.variants if v.img_per_s}
        return {
            "run_dir": str(self.run_dir),
            "config": self.config.to_dict(),
            "variants": [v.to_dict() for v in self.variants],
            "step_time_ratio_vs_reg0": ratios,
        }


def evaluate_checkpoint(path: str | Path, config: TrainConfig, device: str = "cpu") -> tuple[float, float]:
    """Held-out ``(loss, accuracy)`` of a self-describing checkpoint on ``config``'s validation data."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_meta(path)
    if meta is None:
        raise TrainingError(f"{path} is not a self-describing artifactscan checkpoint; train it with train-reg")
    dev = _resolve_device(device)
    cfg = config.replace(registers=int(meta.arch_kwargs.get("reg_tokens", 0)))
    _, val_ds, _, data_config, _ = build_datasets(cfg)
    model = build_model(cfg).to(dev)
    if path.suffix == ".safetensors":
        sd = load_file(str(path))
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    mean = torch.tensor(data_config["mean"], device=dev).view(1, 3, 1, 1)
    std = torch.tensor(data_config["std"], device=dev).view(1, 3, 1, 1)
    return evaluate(model, val_ds, cfg, dev, mean, std)


def _check_baseline(path: Path, config: TrainConfig) -> None:
    if not path.is_file():
        raise TrainingError(f"baseline checkpoint {path} does not exist; pass the final.safetensors of a 0-register run")
    meta = read_meta(path)
    if meta is None:
        raise TrainingError(f"{path} is not a self-describing artifactscan checkpoint; use one written by train-reg")
    want = config.model_kwargs(0)
    got = dict(meta.arch_kwargs)
    diffs = [k for k in want if got.get(k) != want[k]]
    if meta.arch != config.arch or diffs:
        shown = ", ".join(f"{k}={got.get(k)!r} (want {want[k]!r})" for k in diffs[:3]) or f"arch {meta.arch}"
        raise TrainingError(f"baseline {path} does not match the requested model: {shown}; use matching options")


def _worker_main(config_path: str, run_dir: str, resume: bool) -> int:
    """Entry point of a side-by-side child process: train one variant, stream JSON events on stdout."""
    config = TrainConfig.from_dict(json.loads(Path(config_path).read_text()))

    def emit(ev: dict) -> None:
        sys.stdout.write(json.dumps(ev) + "\n")
        sys.stdout.flush()

    try:
        res = train_model(config, run_dir, resume=resume, progress=False, on_event=emit)
    except (TrainingError, InputError) as exc:
        emit({"type": "error", "kind": type(exc).__name__, "message": str(exc)})
        return 2
    emit({"type": "done", "result": res.to_dict()})
    return 0


def _variant_from_result(reg: int, r: dict) -> RegVariant:
    return RegVariant(
        registers=reg, checkpoint=Path(r["final_checkpoint"]), run_dir=Path(r["run_dir"]), val_acc=r["val_acc"],
        trained=True, steps=r["steps"], wall_s=r["wall_s"], img_per_s=r["img_per_s"],
        checkpoints=[Path(p) for p in r["checkpoints"]],
    )


def train_reg(
    config: TrainConfig,
    out_dir: str | Path,
    registers: str | int | Sequence[int] = 4,
    *,
    baseline_checkpoint: str | Path | None = None,
    parallel: bool | None = None,
    resume: bool = False,
    progress: bool = True,
) -> TrainRegResult:
    """Train the controlled comparison: the same ViT with 0 and with N register tokens (or an ablation list).

    ``registers=4`` trains ``[0, 4]``; ``"0,1,2,4,8"`` trains all five. With ``baseline_checkpoint`` (a
    0-register ``final.safetensors`` of the same architecture) the 0-register model is not retrained. Every variant
    uses the same seed, initial shared weights and batch order. Layout::

        out_dir/config.json, out_dir/train_reg.json, out_dir/reg{N}/..., out_dir/comparison.json

    Args:
        parallel: run variants as side-by-side single-threaded processes. ``None`` = yes on CPU with ≥ 2 cores
            outside torchrun; ignored on CUDA (variants share the GPU sequentially).
        resume: continue the variants of an interrupted ``train_reg`` folder (finished ones are reused).
    Returns:
        :class:`TrainRegResult` listing each variant's final checkpoint — scan them for the verdict.
    """
    out = Path(out_dir)
    config = resolve_config(config)
    regs = parse_registers(registers)
    if baseline_checkpoint is None and 0 not in regs:
        regs = [0] + regs
    if baseline_checkpoint is not None:
        baseline_checkpoint = Path(baseline_checkpoint)
        _check_baseline(baseline_checkpoint, config)
        regs = [r for r in regs if r != 0]
        if not regs:
            raise TrainingError("with --baseline only register models are trained; pass e.g. --registers 4")
    _validate(config)
    device = _resolve_device(config.device)  # fail before creating any folder
    if config.data is not None:
        build_datasets(config)  # a bad data folder fails here, before any worker process starts
    world = int(os.environ.get("WORLD_SIZE", "1"))
    main = int(os.environ.get("RANK", "0")) == 0
    if not resume and main and (out / "train_reg.json").exists():
        raise TrainingError(f"{out} already holds a train-reg run; pass --resume {out} or choose a new folder")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "config.json", config.to_dict())
        _write_json(out / "train_reg.json", {
            "registers": regs, "baseline_checkpoint": str(baseline_checkpoint) if baseline_checkpoint else None,
        })

    jobs: list[tuple[int, Path, bool]] = []
    done: dict[int, RegVariant] = {}
    for reg in regs:
        vdir = out / f"reg{reg}"
        if resume and (vdir / "final.safetensors").is_file() and (vdir / "result.json").is_file():
            r = json.loads((vdir / "result.json").read_text())
            if "final_checkpoint" in r:
                done[reg] = _variant_from_result(reg, r)
                continue
        jobs.append((reg, vdir, resume and (vdir / "last.pt").is_file()))

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if parallel is None:
        parallel = device.type == "cpu" and world == 1 and cores >= 2 and len(jobs) > 1
    if parallel and (device.type != "cpu" or world > 1):
        parallel = False

    if jobs and parallel:
        done.update(_run_parallel(config, jobs, cores, progress))
    else:
        for reg, vdir, res in jobs:
            r = train_model(config.replace(registers=reg), vdir, resume=res, progress=progress, label=f"reg{reg}")
            done[reg] = _variant_from_result(reg, r.to_dict())

    if baseline_checkpoint is not None:
        _, acc = evaluate_checkpoint(baseline_checkpoint, config, device=str(device)) if main else (0.0, float("nan"))
        done[0] = RegVariant(registers=0, checkpoint=baseline_checkpoint, run_dir=None, val_acc=acc, trained=False)
    result = TrainRegResult(run_dir=out, config=config, variants=[done[r] for r in sorted(done)],
                            comparison_path=out / "comparison.json")
    if main:
        _write_json(result.comparison_path, result.to_dict())
    return result


def _run_parallel(config: TrainConfig, jobs, cores: int, progress: bool) -> dict[int, RegVariant]:
    """Run the variants as side-by-side child processes (``python -m artifactscan.training --_worker``).

    Children are plain subprocesses (not multiprocessing) so this works from any entry point (scripts, stdin,
    notebooks); each streams JSON events on stdout, which feed one progress bar per variant here.
    """
    import queue as queue_mod
    import subprocess
    import threading

    n_proc = min(len(jobs), cores)
    threads = config.num_threads or max(1, cores // n_proc)
    events: queue_mod.Queue = queue_mod.Queue()
    bars = None
    if progress:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bars = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  acc {task.fields[acc]}  {task.fields[ips]} img/s"),
            TimeRemainingColumn(), console=Console(stderr=True),
        )
        bars.start()
    tasks: dict[str, Any] = {}
    results: dict[int, RegVariant] = {}
    errors: list[str] = []
    waiting = list(jobs)
    running: dict[str, tuple[int, subprocess.Popen]] = {}

    def pump(label: str, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            try:
                events.put({"label": label, **json.loads(line)})
            except ValueError:
                pass
        events.put({"label": label, "type": "exit", "rc": proc.wait()})

    def launch(reg: int, vdir: Path, res: bool) -> None:
        label = f"reg{reg}"
        vdir.mkdir(parents=True, exist_ok=True)
        cfg_path = vdir / "worker-config.json"
        _write_json(cfg_path, config.replace(registers=reg, num_threads=threads).to_dict())
        cmd = [sys.executable, "-m", "artifactscan.training", "--_worker", str(cfg_path), "--out", str(vdir)]
        if res:
            cmd.append("--_resume")
        pkg_parent = str(Path(__file__).resolve().parent.parent)  # so the child imports this same artifactscan
        pypath = os.pathsep.join(p for p in (pkg_parent, os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WORLD_SIZE": "1", "RANK": "0", "PYTHONPATH": pypath}
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
        running[label] = (reg, proc)
        if bars is not None:
            tasks[label] = bars.add_task(label, total=config.steps or None, loss="-", acc="-", ips="-")
        threading.Thread(target=pump, args=(label, proc), daemon=True).start()

    try:
        while waiting and len(running) < n_proc:
            launch(*waiting.pop(0))
        while running:
            ev = events.get()
            label, kind = ev["label"], ev["type"]
            if kind == "step" and bars is not None:
                bars.update(tasks[label], completed=ev["step"], loss=f"{ev['loss']:.3f}",
                            ips=f"{ev['img_per_s']:.0f}")
            elif kind == "eval" and bars is not None:
                bars.update(tasks[label], acc=f"{ev['val_acc']:.3f}")
                bars.console.print(f"{label} step {ev['step']}: loss {ev['loss']:.3f}  val acc {ev['val_acc']:.3f}"
                                   f"  {ev['img_per_s']:.0f} img/s")
            elif kind == "done":
                reg = running[label][0]
                results[reg] = _variant_from_result(reg, ev["result"])
            elif kind == "error":
                errors.append(ev["message"])
            elif kind == "exit":
                reg, _ = running.pop(label)
                if reg not in results and not errors:
                    errors.append(f"training the {reg}-register model crashed (exit code {ev['rc']}); "
                                  f"see the messages above, then --resume the run folder")
                if errors:  # stop the others: the comparison is incomplete anyway
                    for _, p in running.values():
                        p.terminate()
                elif waiting:
                    launch(*waiting.pop(0))
    finally:
        for _, p in running.values():
            p.terminate()
        if bars is not None:
            bars.stop()
    if errors:
        raise TrainingError(errors[0])
    return results


def resume(
    run_dir: str | Path,
    expected: TrainConfig | dict | None = None,
    *,
    progress: bool = True,
    parallel: bool | None = None,
    **runtime: Any,
) -> TrainResult | TrainRegResult:
    """Continue a killed run to the same result an uninterrupted one would have reached.

    ``run_dir`` is either a ``train_reg`` folder (with ``train_reg.json``) or a single-model folder (with
    ``last.pt``). ``expected`` holds options the user passed again (a dict of changed fields, or a full config):
    if any of them differs from the saved config the resume is refused. ``runtime`` may change where it runs
    (``device``, ``num_threads``, ``num_workers``, ``compile``).
    """
    run_dir = Path(run_dir)
    bad = set(runtime) - RUNTIME_FIELDS
    if bad:
        raise TrainingError(f"only {sorted(RUNTIME_FIELDS)} can change on --resume, not {sorted(bad)}")
    if (run_dir / "train_reg.json").is_file():
        config = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
        _check_same_config(config.to_dict(), expected, run_dir)
        spec = json.loads((run_dir / "train_reg.json").read_text())
        started = [d for d in run_dir.glob("reg*") if (d / "last.pt").is_file() or (d / "final.safetensors").is_file()]
        if not started:
            raise TrainingError(f"cannot resume: {run_dir} has no checkpoint yet; start a fresh run instead")
        regs = spec["registers"]
        return train_reg(config.replace(**runtime), run_dir, regs, baseline_checkpoint=spec["baseline_checkpoint"],
                         parallel=parallel, resume=True, progress=progress)
    if (run_dir / "last.pt").is_file():
        blob = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
        config = TrainConfig.from_dict(json.loads(blob["resume"]["config"]))
        _check_same_config(config.to_dict(), expected, run_dir)
        return train_model(config.replace(**runtime), run_dir, resume=True, progress=progress)
    if (run_dir / "config.json").is_file():
        raise TrainingError(f"cannot resume: {run_dir} has no checkpoint yet (last.pt); start a fresh run instead")
    raise TrainingError(f"cannot resume: {run_dir} is not an artifactscan run folder (no config.json/last.pt)")


# ----------------------------------------------------------------------------------------------------------------
# fp16 export of the demo pair
# ----------------------------------------------------------------------------------------------------------------
def export_half(src: str | Path, dst: str | Path, *, kind: str = "demo", description: str = "",
                extra: dict | None = None) -> Path:
    """Copy a trained checkpoint to a float16 ``.safetensors`` (half the size; loaders upcast to float32)."""
    from safetensors.torch import load_file

    src = Path(src)
    meta = read_meta(src)
    if meta is None:
        raise TrainingError(f"{src} is not a self-describing artifactscan checkpoint")
    sd = load_file(str(src)) if src.suffix == ".safetensors" else torch.load(src, weights_only=True)["state_dict"]
    meta.kind = kind
    meta.description = description or meta.description
    meta.extra = {**meta.extra, "dtype": "float16", "source": src.name, **(extra or {})}
    return save_checkpoint(dst, {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, meta)


# ----------------------------------------------------------------------------------------------------------------
# python -m artifactscan.training (stand-in for the CLI; also what torchrun can launch)
# ----------------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """Internal entry point of the side-by-side worker processes (``python -m artifactscan.training --_worker``).

    Users train with ``artifactscan train-reg`` (or ``torchrun -m artifactscan train-reg``); one CLI, one set of flags.
    """
    import argparse

    p = argparse.ArgumentParser(prog="python -m artifactscan.training",
                                description="internal worker of `artifactscan train-reg`; run that command instead")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_resume", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a, _ = p.parse_known_args(argv)
    if not a._worker or not a.out:
        print("error: train with `artifactscan train-reg` (python -m artifactscan.training is its internal worker)",
              file=sys.stderr)
        return 2
    return _worker_main(a._worker, a.out, a._resume)


if __name__ == "__main__":
    raise SystemExit(main())
