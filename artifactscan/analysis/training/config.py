"""What a training run computes: :class:`TrainConfig`, its presets and the checks that resolve it."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from artifactscan.core.errors import TrainingError, option

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


SYNTHETIC_MEAN = (0.5, 0.5, 0.5)


SYNTHETIC_STD = (0.5, 0.5, 0.5)


# Fields that may differ between a run and its resumption (where/how it runs, not what it computes).
RUNTIME_FIELDS = frozenset({"device", "compile", "num_threads", "num_workers", "progress_every"})

# The fields a train-reg option sets, so that a message names what the user typed (their flags' spellings:
# core.errors.option; ``embed_dim`` is ``--dim``).
OPTION_FIELDS = frozenset({"data", "arch", "epochs", "steps", "batch_size", "lr", "depth", "embed_dim", "num_heads",
                           "img_size", "patch_size", "class_token", "global_pool", "registers", "device", "compile"})


def option_name(field_name: str) -> str:
    """``embed_dim`` -> ``--dim`` under the CLI, ``embed_dim`` in Python: the option that sets a config field, or the
    field's own name where none does."""
    return option(field_name) if field_name in OPTION_FIELDS else field_name


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


#: A development setting (docs/development.md): the step count of a preset when neither steps nor epochs is given,
#: so that tests and the README's examples run train-reg in seconds instead of the demo's 20 minutes.
STEPS_ENV = "ARTIFACTSCAN_TRAIN_STEPS"


def steps_from_environment() -> int | None:
    """The step count :data:`STEPS_ENV` sets, or ``None`` when it is unset or empty."""
    raw = os.environ.get(STEPS_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise TrainingError(f"{STEPS_ENV} must be a whole number of steps (1 or more), got {raw!r}; unset it to "
                            "train the preset's own steps")
    return int(raw)


def get_preset(name: str | None = None, **overrides: Any) -> TrainConfig:
    """A copy of preset ``name`` with ``overrides`` applied (``None`` values are ignored, so CLI options can be
    passed straight through).

    ``name=None`` picks ``"demo"`` (the CPU demo on synthetic data) unless ``data`` or ``arch`` is given, then
    ``"imagenet"`` (the architecture's own size). ``epochs`` without ``steps`` clears the preset's step count.
    Neither given, :data:`STEPS_ENV` (when set) is the step count, with a snapshot halfway so that the run still
    has a checkpoint history.
    """
    changes = {k: v for k, v in overrides.items() if v is not None}
    if name is None:
        name = "imagenet" if ("data" in changes or "arch" in changes) else "demo"
    if name not in PRESETS:
        raise TrainingError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    if "epochs" in changes and "steps" not in changes:
        changes["steps"] = None
    elif "steps" not in changes and (steps := steps_from_environment()) is not None:
        every = changes.get("ckpt_every", PRESETS[name].ckpt_every)
        changes.update(steps=steps, ckpt_every=min(every, max(1, steps // 2)))
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
            raise TrainingError(f"{option('registers')} expects integers like 4 or 0,1,2,4,8, got {item!r}") from None
        if n < 0:
            raise TrainingError(f"{option('registers')} must be 0 or more, got {n}; use e.g. "
                                f"{option('registers', 4)} or 0,1,2,4,8")
        if n not in out:
            out.append(n)
    if not out:
        raise TrainingError(f"{option('registers')} is empty; use e.g. {option('registers', 4)} or 0,1,2,4,8")
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


def validate_config(config: TrainConfig) -> None:
    if config.registers < 0:
        raise TrainingError(f"registers must be 0 or more, got {config.registers}; use e.g. {option('registers', 4)}")
    if config.batch_size < 1:
        raise TrainingError(f"batch size must be positive, got {config.batch_size}")
    if config.steps is None and config.epochs is None:
        raise TrainingError(f"give either {option('steps')} or {option('epochs')}")
    if config.steps is not None and config.steps < 1:
        raise TrainingError(f"{option('steps')} must be positive, got {config.steps}")
    if config.steps is None and not (math.isfinite(config.epochs) and config.epochs > 0):
        # the step count is rounded up from epochs x images / batch: 0 epochs would still train one step
        raise TrainingError(f"{option('epochs')} must be a positive number (fractions allowed, e.g. 0.5), got "
                            f"{config.epochs:g}")
    if not (math.isfinite(config.lr) and config.lr > 0):
        raise TrainingError(f"{option('lr')} must be a positive number, got {config.lr:g}")
    for name in ("depth", "embed_dim", "num_heads", "img_size", "patch_size"):
        if getattr(config, name) < 1:
            raise TrainingError(f"{option_name(name)} must be positive, got {getattr(config, name)}")
    if config.img_size % config.patch_size:
        raise TrainingError(
            f"{option('img_size', config.img_size)} is not a multiple of {option('patch_size', config.patch_size)}; "
            "pick a divisor"
        )
    if config.embed_dim % config.num_heads:
        raise TrainingError(f"{option('embed_dim', config.embed_dim)} is not divisible by "
                            f"{option('num_heads', config.num_heads)}")


def training_bytes(config: TrainConfig, activation_bytes: int = 4) -> tuple[int, int]:
    """``(bytes, tokens per image)``: a lower bound on one process's training memory for ``config``.

    The float32 weights with their gradients and AdamW's two moments (4 copies of the position embedding and the
    blocks' matrices: qkv, projection and a 4x MLP), and what backward keeps of each block for a batch (the residual
    stream, q/k/v, the attention output and the MLP's hidden layer before and after its activation: 16 x width per
    token) at ``activation_bytes`` per number (2 under bf16 autocast).
    """
    tokens = (config.img_size // config.patch_size) ** 2 + 1 + config.registers
    dim = config.embed_dim
    params = tokens * dim + config.depth * 12 * dim * dim
    activations = config.batch_size * tokens * config.depth * 16 * dim
    return 4 * 4 * params + activation_bytes * activations, tokens


def check_training_fits(config: TrainConfig, device: torch.device) -> None:
    """Refuse (:class:`ResourceError`) a run whose least memory exceeds what ``device`` has free, before any model
    is built (``--img-size 100000`` would otherwise fail inside the allocator, or be killed by the kernel)."""
    from artifactscan.core.memory import GIB, available_bytes
    from artifactscan.core.errors import ResourceError

    need, tokens = training_bytes(config, 2 if device.type == "cuda" and config.amp else 4)
    free = available_bytes(device)
    if free is None or need <= free:
        return
    where = "GPU memory" if device.type == "cuda" else "memory"
    raise ResourceError(
        f"{option('img_size', config.img_size)} with {option('patch_size', config.patch_size)} makes {tokens:,} tokens "
        f"per image: training needs at least {need / GIB:,.1f} GiB (weights, optimiser state and a batch of "
        f"{config.batch_size}'s activations) but {free / GIB:.1f} GiB of {where} is available; lower {option('img_size')} or "
        f"{option('batch_size')}")
