"""What an :class:`~artifactscan.analysis.monitor.ArtifactMonitor` prepares before its first update, and the guard
that keeps an update from changing the training it runs inside.

* the probe set: images decoded and preprocessed once, kept in memory (:func:`probe_images`);
* facts about a live model: its data config, fixed input size, prefix tokens, summary and architecture fingerprint;
* the setups a single-rank forward cannot measure (sharded parameters: :func:`sharding_of`);
* :func:`training_untouched`: eval mode, no autograd, every submodule's mode and the RNG states restored after.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from artifactscan.core.errors import InputError
from artifactscan.core.summaries import ImageSummary, ModelSummary
from artifactscan.inputs.sources import image_batches, make_image_source, parse_synthetic
from artifactscan.inputs.synthetic_objects import SyntheticObjects
from artifactscan.models.hooks import HookFamily

#: Probe images kept by default: enough tokens for the threshold rule on a small ViT, cheap to run often.
MAX_PROBE_IMAGES = 64
DEFAULT_OBJECT_IMAGES = 64


class MonitorSetupError(InputError):
    """An ArtifactMonitor that cannot run as configured (bad options, probe set, model or output folder)."""


# ----------------------------------------------------------------------------------------------- the probe set
def probe_images(images: Any, data_config: dict[str, Any], max_images: int
                 ) -> tuple[torch.Tensor, ImageSummary, int]:
    """``(images [N, 3, H, W] normalised on the CPU, their summary, how many the source held)``: the first
    ``max_images`` readable images of ``images`` (a folder or file list, ``synthetic[:N]``,
    ``synthetic-objects[:N]``, a Dataset or an ``[N, 3, H, W]`` tensor in [0, 1]), prepared with ``data_config``."""
    spec = images
    if isinstance(images, (str, Path)) and (n := parse_synthetic(str(images), "synthetic-objects",
                                                                  DEFAULT_OBJECT_IMAGES)) is not None:
        images = SyntheticObjects(min(n, max_images), seed=0, img_size=int(data_config["input_size"][-1]))
    elif isinstance(images, torch.Tensor) and images.dim() == 4:
        images = images[:max_images]
    source = make_image_source(images, data_config)
    taken: list[torch.Tensor] = []
    skipped: list[tuple[int, str]] = []
    try:
        # No worker processes inside someone's training script: the set is decoded once, on this process.
        for batch, _, bad in image_batches(source, min(max_images, 32), num_workers=0):
            skipped.extend(bad)
            if batch is not None:
                taken.append(batch)
            if sum(len(b) for b in taken) >= max_images:
                break
    finally:
        source.close()
    if not taken:
        raise MonitorSetupError(f"the probe set {_spec(spec)} holds no readable image "
                                f"({len(skipped)} skipped); pass a folder of images, synthetic:N or a tensor")
    x = torch.cat(taken)[:max_images].float()
    summary = source.summary(len(x), skipped)
    summary.source = _spec(spec)
    return x, summary, source.num_found


def _spec(images: Any) -> str:
    if isinstance(images, torch.Tensor):
        return f"tensor {tuple(images.shape)}"
    return str(images) if isinstance(images, (str, Path)) else type(images).__name__


def check_probe_spec(images: Any) -> None:
    """The checks that need no model: the probe set exists and is not empty (a clear error at construction)."""
    if images is None:
        raise MonitorSetupError("images= is required: a folder of validation images, synthetic:N, "
                                "synthetic-objects:N or a tensor [N, 3, H, W] in [0, 1]")
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise MonitorSetupError(f"an image tensor must be shaped [N, 3, H, W] in [0, 1], got "
                                    f"{tuple(images.shape)}")
        if len(images) == 0:
            raise MonitorSetupError("the probe set is empty: the image tensor holds 0 images")
        return
    if isinstance(images, (str, Path)) and parse_synthetic(str(images), "synthetic-objects") is not None:
        return
    placeholder = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear",
                   "crop_pct": 1.0}
    source = make_image_source(images, placeholder)  # lists files (decodes nothing); refuses a missing folder
    source.close()
    if source.num_found == 0:
        raise MonitorSetupError(f"the probe set {_spec(images)} is empty")


# ----------------------------------------------------------------------------------------------- the model
def resolve_data_config(model: Any, module: nn.Module, given: dict[str, Any] | None) -> dict[str, Any]:
    """The preprocessing of the probe set: ``data_config=`` if given, a ``LoadedModel``'s own, or timm's for a timm
    module (its built input size, as the loader does); a live Hugging Face model has none and must be given one."""
    if given is not None:
        cfg = dict(given)
    elif isinstance(getattr(model, "data_config", None), dict):
        cfg = dict(model.data_config)
    elif type(module).__module__.startswith(("timm.", "artifactscan.")):
        import timm.data

        cfg = dict(timm.data.resolve_model_data_config(module))
        built = fixed_input_size(module)
        if built is not None:  # timm reports the pretrained size; a model built with img_size= takes its own
            cfg["input_size"] = (3, *built)
    else:
        raise MonitorSetupError(f"{type(module).__name__} has no timm data config to prepare the probe images "
                                "with; pass data_config={'input_size': (3, H, W), 'mean': ..., 'std': ..., "
                                "'interpolation': 'bicubic', 'crop_pct': 1.0}")
    missing = [k for k in ("input_size", "mean", "std") if k not in cfg]
    if missing:
        raise MonitorSetupError(f"data_config lacks {', '.join(missing)}")
    cfg["input_size"] = tuple(int(v) for v in cfg["input_size"])
    cfg.setdefault("interpolation", "bicubic")
    cfg.setdefault("crop_pct", 1.0)
    return cfg


def fixed_input_size(module: nn.Module) -> tuple[int, int] | None:
    """The one ``(H, W)`` a model accepts, or None when it takes other sizes (dynamic size, interpolated
    position embeddings)."""
    patch_embed = getattr(module, "patch_embed", None)
    if patch_embed is not None:
        size = getattr(patch_embed, "img_size", None)
        if size is None or getattr(module, "dynamic_img_size", False) or not getattr(patch_embed, "strict_img_size",
                                                                                       True):
            return None
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    config = getattr(module, "config", None)
    config = getattr(config, "vision_config", config)
    model_type = str(getattr(config, "model_type", ""))
    size = getattr(config, "image_size", None)
    if size is None or "dinov2" in model_type:  # DINOv2 interpolates its position embeddings to any size
        return None
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def check_input_size(module: nn.Module, data_config: dict[str, Any]) -> None:
    built = fixed_input_size(module)
    size = tuple(data_config["input_size"][-2:])
    if built is not None and size != built:
        raise MonitorSetupError(f"the probe images would be {size[0]}x{size[1]} px and {type(module).__name__} "
                                f"takes only {built[0]}x{built[1]}; pass data_config= with input_size (3, "
                                f"{built[0]}, {built[1]})")


def patch_size(module: nn.Module) -> tuple[int, int] | None:
    size = getattr(getattr(module, "patch_embed", None), "patch_size", None)
    if size is None:
        config = getattr(module, "config", None)
        size = getattr(getattr(config, "vision_config", config), "patch_size", None)
    if size is None:
        return None
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def fingerprint(module: nn.Module) -> str:
    """The architecture, not the weights (they change every step): class and parameter names and shapes."""
    h = hashlib.sha1(type(module).__name__.encode())
    for name, p in module.named_parameters():
        h.update(f"{name}:{tuple(p.shape)};".encode())
    return h.hexdigest()[:16]


def model_summary(model: Any, module: nn.Module, family: HookFamily, data_config: dict[str, Any],
                  name: str | None) -> ModelSummary:
    """The header's ``model`` for a live module (a ``LoadedModel`` gives its own name, source and kind)."""
    cls, reg = family.prefix_tokens(module)
    h, w = data_config["input_size"][-2:]
    ps = patch_size(module)
    kind = getattr(model, "kind", "phantom" if type(module).__name__ == "PhantomViT" else "model")
    arch = getattr(model, "arch", None) or (getattr(module, "default_cfg", None) or {}).get("architecture")
    return ModelSummary(
        name=name or getattr(model, "name", None) or type(module).__name__,
        source=getattr(model, "source", "live"), arch=arch, kind=kind, num_blocks=family.num_blocks(module),
        num_prefix_tokens=cls + reg, num_cls_tokens=cls, num_register_tokens=reg,
        patch_size=list(ps) if ps else [], grid_size=[h // ps[0], w // ps[1]] if ps else [], input_size=[h, w])


def sharding_of(model: Any) -> str | None:
    """The name of the sharding that keeps each rank from holding the whole model (FSDP, FSDP2, DeepSpeed ZeRO-3),
    or None: a forward on one rank alone would wait forever for the others' shards."""
    if type(model).__name__ == "DeepSpeedEngine":
        model = getattr(model, "module", model)
    if not isinstance(model, nn.Module):
        return None
    for m in model.modules():
        names = {c.__name__ for c in type(m).__mro__}
        if "FullyShardedDataParallel" in names:
            return "FSDP (FullyShardedDataParallel)"
        if "FSDPModule" in names:
            return "FSDP2 (fully_shard)"
    for p in model.parameters():
        if "DTensor" in {type(p).__name__, type(getattr(p, "data", p)).__name__}:
            return "sharded DTensor parameters (FSDP2 / tensor parallel)"
        if hasattr(p, "ds_id") and hasattr(p, "ds_status"):
            return "DeepSpeed ZeRO-3"
    return None


def unwrap_engine(model: Any) -> Any:
    """A DeepSpeed engine's module (ZeRO-1/2 keep whole parameters on every rank); anything else as it is."""
    return getattr(model, "module", model) if type(model).__name__ == "DeepSpeedEngine" else model


def module_device(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where the model's parameters live and their floating dtype (the probe images are cast to it)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


# ----------------------------------------------------------------------------------------------- the guard
@contextlib.contextmanager
def rng_preserved() -> Iterator[None]:
    """The CPU and CUDA RNG states put back after the block, even after an error. Not only the forward draws: a
    DataLoader iterator draws its base seed from the global RNG even without workers (preparing the probe set)."""
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


@contextlib.contextmanager
def training_untouched(module: nn.Module) -> Iterator[None]:
    """Run a measurement inside a training loop: every submodule in eval mode and no autograd graph
    (``torch.no_grad``, not ``inference_mode``: no inference tensors can leak into the user's autograd), then every
    submodule's own train/eval flag and the CPU and CUDA RNG states put back as they were, even after an error.

    The flags are restored by assignment, not through ``train()``: a module overriding ``train()`` could do more.
    The process-wide flush-denormal setting is left alone (``measurement_mode`` would reset it)."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        with rng_preserved():
            for m, _ in modes:
                m.training = False
            with torch.no_grad():
                yield
    finally:
        for m, mode in modes:
            m.training = mode


def out_of_memory_errors() -> tuple[type[BaseException], ...]:
    """The exceptions of a device running out of memory (torch >= 2.5 names one for every device)."""
    kinds: list[type[BaseException]] = [torch.cuda.OutOfMemoryError]
    generic = getattr(torch, "OutOfMemoryError", None)
    if isinstance(generic, type) and generic not in kinds:
        kinds.append(generic)
    return tuple(kinds)


Warn = Callable[[str], None]
