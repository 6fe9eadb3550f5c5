"""NaFlex inputs (SigLIP2's ``siglip2`` models, timm's ``naflexvit_*`` incl. C-RADIO v3/v4): each image resized with
its aspect ratio kept to at most ``max_num_patches`` patches, cut into patches, padded to one sequence length.

As the families' own processors make them: transformers' ``Siglip2ImageProcessor`` and timm's
``naflex_transforms`` use the same size search (the largest scale whose patch-multiple, ceil-rounded size fits the
budget), a bilinear antialiased resize of the 8-bit image, then mean/std, then patches flattened ``P x P x C``
(channels last) in row-major order, zero-padded at the end (tests/test_naflex.py checks ours against the processor).

Why one *packed* tensor per image: the whole data path (DataLoader workers, pinned memory, the device transfer,
torchrun shards, the memory check) moves one tensor per image. So an image travels as ``[1 + max_num_patches,
P*P*C]``: row 0 is a header holding the grid ``(rows, cols)``, the other rows are its patches, padding last.
:func:`unpack` turns a batch of them back into what the models take: patches, the validity mask, the grids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

#: data-config key holding a NaFlex model's input settings (``patch_size``, ``max_num_patches``)
NAFLEX_KEY = "naflex"


def naflex_settings(cfg: dict[str, Any]) -> dict[str, int] | None:
    """``{"patch_size", "max_num_patches"}`` of a NaFlex model's data config, else None."""
    settings = cfg.get(NAFLEX_KEY)
    return None if not settings else {k: int(settings[k]) for k in ("patch_size", "max_num_patches")}


def nominal_input_size(patch_size: int, max_num_patches: int) -> tuple[int, int, int]:
    """The input a NaFlex model's budget corresponds to: the squarest grid of at least ``max_num_patches`` patches
    (reduced decoding and the memory check read it; a batch holds ``max_num_patches`` tokens per image)."""
    rows = max(1, math.isqrt(max_num_patches))
    return (3, patch_size * rows, patch_size * math.ceil(max_num_patches / rows))


def size_for_budget(height: int, width: int, patch_size: int, max_num_patches: int, eps: float = 1e-5
                    ) -> tuple[int, int]:
    """The resized ``(height, width)``: the binary search both processors run (HF's
    ``get_image_size_for_max_num_patches``, timm's ``get_image_size_for_seq``)."""
    def scaled(scale: float, size: int) -> int:
        return int(max(patch_size, math.ceil(size * scale / patch_size) * patch_size))

    low, high = eps / 10, 100.0
    while high - low >= eps:
        scale = (low + high) / 2
        if (scaled(scale, height) // patch_size) * (scaled(scale, width) // patch_size) <= max_num_patches:
            low = scale
        else:
            high = scale
    return scaled(low, height), scaled(low, width)


def patchify(image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[C, H, W]`` -> ``[rows * cols, P * P * C]``, patches in row-major order, each flattened channels last."""
    c, h, w = image.shape
    rows, cols = h // patch_size, w // patch_size
    patches = image.reshape(c, rows, patch_size, cols, patch_size).permute(1, 3, 2, 4, 0)
    return patches.reshape(rows * cols, -1)


def pack(patches: torch.Tensor, rows: int, cols: int, max_num_patches: int) -> torch.Tensor:
    """One image's packed tensor: the header row ``(rows, cols, 0, ...)`` then its patches, zero-padded."""
    packed = patches.new_zeros(1 + max_num_patches, patches.shape[1])
    packed[0, 0], packed[0, 1] = rows, cols
    packed[1:1 + len(patches)] = patches
    return packed


@dataclass
class NaFlexBatch:
    """A batch as NaFlex models take it."""

    patches: torch.Tensor  # [B, N, P*P*C]
    valid: torch.Tensor    # [B, N] bool: True for an image's own patches, False for padding
    grids: torch.Tensor    # [B, 2] long: (rows, cols) of each image's patch grid

    def coords(self) -> torch.Tensor:
        """``[B, N, 2]`` (row, col) of every patch (padding at (0, 0)), as timm's ``patch_coord``."""
        index = torch.arange(self.patches.shape[1], device=self.patches.device)
        cols = self.grids[:, 1:2].clamp_min(1)
        coords = torch.stack([index[None] // cols, index[None] % cols], dim=-1)
        return coords * self.valid[..., None]


def unpack(packed: torch.Tensor) -> NaFlexBatch:
    """A batch of packed images ``[B, 1 + N, P*P*C]`` as patches, validity mask and grids."""
    grids = packed[:, 0, :2].round().long()
    count = grids[:, 0] * grids[:, 1]
    valid = torch.arange(packed.shape[1] - 1, device=packed.device)[None] < count[:, None]
    return NaFlexBatch(packed[:, 1:], valid, grids)


def is_packed(images: torch.Tensor) -> bool:
    """Whether ``images`` is a batch of packed NaFlex images (3-D) rather than ``[B, 3, H, W]`` pixels."""
    return images.dim() == 3


#: how each family's processor resizes: transformers' on the 8-bit tensor (torchvision, antialiased), timm's on the
#: PIL image (its ``ResizeToSequence`` runs before ``ToTensor``)
RESIZERS = ("tensor", "pil")


class NaFlexTransform:
    """PIL image (or ``[3, H, W]`` tensor in [0, 1]) -> its packed NaFlex tensor; picklable for DataLoader
    workers."""

    def __init__(self, patch_size: int, max_num_patches: int, mean: Sequence[float], std: Sequence[float],
                 interpolation: str = "bilinear", resizer: str = "tensor"):
        self.patch_size, self.max_num_patches = int(patch_size), int(max_num_patches)
        self.mean = torch.tensor([float(v) for v in mean]).view(-1, 1, 1)
        self.std = torch.tensor([float(v) for v in std]).view(-1, 1, 1)
        self.interpolation, self.resizer = interpolation, resizer

    def _resized(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        """The image resized to its budget, as 8-bit ``[3, h, w]``."""
        from torchvision.transforms.v2 import functional as tvf  # the processors' own resize

        if isinstance(image, torch.Tensor):
            image = tvf.to_pil_image((image.clamp(0, 1) * 255).round().to(torch.uint8))
        image = image.convert("RGB")
        h, w = size_for_budget(image.height, image.width, self.patch_size, self.max_num_patches)
        mode = tvf.InterpolationMode(self.interpolation)
        if self.resizer == "pil":
            image = tvf.resize(image, [h, w], interpolation=mode)
            return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
        return tvf.resize(pixels, [h, w], interpolation=mode, antialias=True)

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        resized = self._resized(image)
        normalised = (resized.float() / 255.0 - self.mean) / self.std
        rows, cols = resized.shape[1] // self.patch_size, resized.shape[2] // self.patch_size
        return pack(patchify(normalised, self.patch_size), rows, cols, self.max_num_patches)


def transform_of(cfg: dict[str, Any]) -> NaFlexTransform | None:
    """The NaFlex transform of a data config, or None for a fixed-grid model."""
    settings = cfg.get(NAFLEX_KEY)
    if not settings:
        return None
    return NaFlexTransform(int(settings["patch_size"]), int(settings["max_num_patches"]), cfg["mean"], cfg["std"],
                           cfg.get("interpolation", "bilinear"), settings.get("resizer", "tensor"))
