"""The evaluation transform of a timm model, without importing timm or torchvision.

``timm.data.create_transform(is_training=False, ...)`` is what a timm user's own eval loop applies; the scan must
see the same pixels. It is rebuilt here from Pillow and torch because importing timm (torchvision, and through its
``ops`` ``torch._dynamo``) costs ~1.6 s, and the scan starts decoding images while the model is still being built
(docs/data-path.md). The output is bit-identical to timm's transform for the configurations this module handles
(tests/test_transforms.py compares them on a battery of image sizes, crops and interpolations); for the others
(``crop_mode="border"``, a non-square centre-crop resize) :func:`eval_transform` returns ``None`` and the caller
uses timm's own.

The steps, as timm composes them from torchvision (center crop mode):

1. resize the short side to ``floor(size / crop_pct)`` keeping the aspect ratio (``squash``: both sides, exactly),
   with Pillow's filter for the interpolation (torchvision on a PIL image calls ``Image.resize``);
2. centre crop to ``size``, padding with black first where the image is smaller (torchvision's ``center_crop``);
3. ``uint8 -> float / 255``, channels first (``to_tensor``); subtract the mean, divide by the std (``normalize``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from artifactscan.inputs.naflex import transform_of as naflex_transform

PIL_FILTERS = {
    "nearest": Image.NEAREST,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "box": Image.BOX,
    "hamming": Image.HAMMING,
    "lanczos": Image.LANCZOS,
}
DEFAULT_CROP_PCT = 0.875  # timm's default when a config has no crop_pct


def _short_side_size(width: int, height: int, short: int) -> tuple[int, int]:
    """torchvision's ``Resize(int)`` output size: the short side becomes ``short``, the long side
    ``int(short * long / short_side)`` (truncated, as torchvision does)."""
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


@dataclass(frozen=True)
class EvalTransform:
    """PIL RGB image -> normalised ``[3, H, W]`` float tensor, as timm's eval transform makes it (picklable, so
    DataLoader workers can run it)."""

    size: tuple[int, int]  # (H, W) of the model input
    scale: tuple[int, int]  # (H, W) the resize targets before the crop
    squash: bool  # resize both sides to ``scale`` (timm's crop_mode="squash"); else the short side to ``scale[0]``
    resample: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def resize(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        if self.squash:
            new_w, new_h = self.scale[1], self.scale[0]
        else:
            new_w, new_h = _short_side_size(w, h, self.scale[0])
        if (new_w, new_h) == (w, h):
            return img
        return img.resize((new_w, new_h), self.resample)

    def center_crop(self, img: Image.Image) -> Image.Image:
        th, tw = self.size
        w, h = img.size
        if tw > w or th > h:  # torchvision pads with zeros (black) to the crop size first, centred
            left, top = (tw - w) // 2 if tw > w else 0, (th - h) // 2 if th > h else 0
            right, bottom = (tw - w + 1) // 2 if tw > w else 0, (th - h + 1) // 2 if th > h else 0
            padded = Image.new(img.mode, (w + left + right, h + top + bottom), 0)
            padded.paste(img, (left, top))
            img, (w, h) = padded, padded.size
            if (w, h) == (tw, th):
                return img
        top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
        return img.crop((left, top, left + tw, top + th))

    def map_box(self, box: Sequence[float], width: int, height: int) -> list[float] | None:
        """``box`` (``[x0, y0, x1, y1]`` pixels of a ``width`` x ``height`` image) in the pixels of the model input
        this transform makes of that image: scaled as :meth:`resize` scales, shifted as :meth:`center_crop` crops
        (or pads), and clipped to the input; ``None`` when nothing of it is left inside (the crop cut it off)."""
        new_w, new_h = (self.scale[1], self.scale[0]) if self.squash else _short_side_size(width, height,
                                                                                          self.scale[0])
        th, tw = self.size
        # the same offsets as center_crop: a positive one crops, a negative one is the black padding's width
        left = -((tw - new_w) // 2) if tw > new_w else int(round((new_w - tw) / 2.0))
        top = -((th - new_h) // 2) if th > new_h else int(round((new_h - th) / 2.0))
        x0, y0, x1, y1 = (float(v) for v in box)
        sx, sy = new_w / width, new_h / height
        x0, x1 = max(x0 * sx - left, 0.0), min(x1 * sx - left, float(tw))
        y0, y1 = max(y0 * sy - top, 0.0), min(y1 * sy - top, float(th))
        return [x0, y0, x1, y1] if x1 > x0 and y1 > y0 else None

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = self.center_crop(self.resize(img))
        x = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).view(img.size[1], img.size[0], 3)
        x = x.permute(2, 0, 1).contiguous().to(torch.get_default_dtype()).div(255)
        mean = torch.tensor(self.mean, dtype=x.dtype).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(-1, 1, 1)
        return x.sub_(mean).div_(std)


def eval_transform(cfg: dict[str, Any]) -> EvalTransform | None:
    """The eval transform of a timm data config (``input_size``, ``interpolation``, ``mean``, ``std``,
    ``crop_pct``, ``crop_mode``), or ``None`` when only timm's own can reproduce it."""
    h, w = (int(v) for v in cfg["input_size"][-2:])
    crop_pct = cfg.get("crop_pct", 1.0) or DEFAULT_CROP_PCT
    crop_mode = cfg.get("crop_mode") or "center"
    interpolation = cfg.get("interpolation", "bicubic")
    if interpolation not in PIL_FILTERS or crop_mode not in ("center", "squash"):
        return None
    scale = (math.floor(h / crop_pct), math.floor(w / crop_pct))
    if crop_mode == "center" and scale[0] != scale[1]:
        return None  # timm's ResizeKeepRatio for non-square targets: left to timm
    mean: Sequence[float] = cfg["mean"]
    std: Sequence[float] = cfg["std"]
    return EvalTransform((h, w), scale, crop_mode == "squash", PIL_FILTERS[interpolation],
                         tuple(float(v) for v in mean), tuple(float(v) for v in std))


def model_transform(cfg: dict[str, Any]) -> Any:
    """The transform a scan applies to every image for a model with data config ``cfg``: :func:`eval_transform`
    where it reproduces timm's exactly, timm's ``create_transform`` otherwise; a NaFlex model's own
    (:mod:`artifactscan.inputs.naflex`)."""
    naflex = naflex_transform(cfg)
    if naflex is not None:
        return naflex
    ours = eval_transform(cfg)
    if ours is not None:
        return ours
    import timm.data

    return timm.data.create_transform(
        input_size=cfg["input_size"], interpolation=cfg.get("interpolation", "bicubic"), mean=cfg["mean"],
        std=cfg["std"], crop_pct=cfg.get("crop_pct", 1.0), crop_mode=cfg.get("crop_mode", "center"),
        is_training=False)
