"""Loading a model together with its images, decoding while the model is built.

Why: building a model costs a fixed second or more (importing timm alone is ~1.6 s on the CI machine: torchvision
and ``torch._dynamo`` come with it; a ViT-L checkpoint takes longer to read), and decoding photos is the other large
cost of a scan. When the model's preprocessing is known before the model is (a built-in, or a ``.safetensors``
checkpoint that records its data config), the decoding workers start first and fill their prefetch queues while the
main process builds the model. The preprocessing read ahead is only a hint: once the model is loaded its own config
is compared, and on any difference the early workers are stopped and the images prepared again for the real config.
docs/data-path.md has the measurements.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset

from artifactscan.core.errors import ArtifactScanError
from artifactscan.inputs.sources import (ImageSource, decode_min_side, forward_flops, make_image_source,
                                         parse_synthetic)
from artifactscan.inputs.transforms import eval_transform
from artifactscan.models.loading import LoadedModel, load_model, peek_data_config

ImagesSpec = str | Path | Sequence[str | Path] | Dataset | torch.Tensor | None


def same_preparation(early: dict[str, Any], final: dict[str, Any]) -> bool:
    """Whether images prepared for data config ``early`` are exactly what ``final`` prepares: the same transform
    (size, crop, interpolation, mean and std) and the same reduced-decode size."""
    ours = eval_transform(early)
    return ours is not None and ours == eval_transform(final) and decode_min_side(early) == decode_min_side(final)


def _early_source(model: Any, images: ImagesSpec, load: dict[str, Any], *, batch_size: int,
                  num_workers: int | str, device: torch.device, exact_decode: bool) -> ImageSource | None:
    """Image files, decoding already, when the model's preprocessing can be read ahead; else ``None``."""
    if any(load.get(k) for k in ("arch", "arch_kwargs", "img_size")):  # these change what the model will be
        return None
    if not isinstance(images, (str, Path, list, tuple)) or (
            isinstance(images, (str, Path)) and parse_synthetic(str(images)) is not None):
        return None
    cfg = peek_data_config(model)
    if cfg is None or eval_transform(cfg) is None:  # timm's own transform would mean importing timm first
        return None
    try:
        source = make_image_source(images, cfg, exact_decode=exact_decode)
    except ArtifactScanError:  # a bad IMAGES: said after the model loads, in the usual order
        return None
    if not source.start(batch_size, num_workers, device):
        source.close()
        return None
    return source


def load_with_images(model: Any, images: ImagesSpec, *, load: dict[str, Any], device: torch.device,
                     batch_size: int, num_workers: int | str, exact_decode: bool = False, gpu_decode: bool = False,
                     early: bool = True, after_load: Callable[[LoadedModel], None] | None = None
                     ) -> tuple[LoadedModel, ImageSource]:
    """``(load_model(model, **load), make_image_source(images, it, ...))``, with the first pass's decoding begun
    before the model is built where that is possible (``early``, CPU decoding by worker processes, preprocessing
    known ahead); the result is the same either way. ``after_load(loaded)`` checks the model (e.g. a block index)
    before anything is said about the images, so errors come in the same order either way."""
    source = None
    if early and not gpu_decode:
        source = _early_source(model, images, load, batch_size=batch_size, num_workers=num_workers, device=device,
                               exact_decode=exact_decode)
    try:
        loaded = load_model(model, **load)
        if after_load is not None:
            after_load(loaded)
    except BaseException:
        if source is not None:
            source.close()
        raise
    if source is not None:
        if source.data_config is not None and same_preparation(source.data_config, loaded.data_config):
            source.data_config = dict(loaded.data_config)
            source.forward_flops = forward_flops(loaded)
            return loaded, source
        source.close()
    return loaded, make_image_source(images, loaded, exact_decode=exact_decode, gpu_decode=gpu_decode)
