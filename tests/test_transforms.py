"""The eval transform rebuilt without timm (inputs/transforms.py) gives exactly timm's pixels.

The reference is timm's own ``create_transform(is_training=False)`` on the same PIL images, over a battery of image
sizes (portrait, landscape, smaller than the crop, odd sizes), crop fractions, crop modes, interpolations and
normalisations, including the data configs of real timm models (read from timm's registry, no weights needed)."""

from __future__ import annotations

import itertools
import pickle

import numpy as np
import pytest
import timm.data
import torch
from PIL import Image

from artifactscan.inputs.transforms import EvalTransform, eval_transform, model_transform

IMAGE_SIZES = [(640, 480), (480, 640), (224, 224), (225, 223), (37, 53), (1000, 17), (16, 16), (301, 299)]


def _image(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    # smooth structure plus noise, so every filter gives different pixels
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), ((xx + yy) % 256)], -1)
    noisy = base + rng.integers(-40, 40, size=base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def _timm_transform(cfg: dict):
    return timm.data.create_transform(
        input_size=cfg["input_size"], interpolation=cfg.get("interpolation", "bicubic"), mean=cfg["mean"],
        std=cfg["std"], crop_pct=cfg.get("crop_pct", 1.0), crop_mode=cfg.get("crop_mode", "center"),
        is_training=False)


NORMALISATIONS = [((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
CONFIGS = [
    dict(input_size=(3, s, s), interpolation=interp, crop_pct=pct, crop_mode=mode, mean=NORMALISATIONS[i % 2][0],
         std=NORMALISATIONS[i % 2][1])
    for i, (s, interp, pct, mode) in enumerate(itertools.product(
        (32, 224), ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming"), (1.0, 0.875, None, 1.15),
        ("center", "squash")))
] + [dict(input_size=(3, 160, 96), interpolation="bicubic", crop_pct=0.95, crop_mode="squash",
          mean=(0.5,) * 3, std=(0.5,) * 3),
     dict(input_size=(3, 224, 224), interpolation="bilinear", crop_pct=0.9, crop_mode=None, mean=(0.5,) * 3,
          std=(0.5,) * 3),
     dict(input_size=(3, 518, 518), interpolation="bicubic", crop_pct=1.0, mean=(0.485, 0.456, 0.406),
          std=(0.229, 0.224, 0.225))]  # no crop_mode key at all (older configs)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c['input_size'][1]}x{c['input_size'][2]}-"
                                                       f"{c['interpolation']}-{c['crop_pct']}-{c.get('crop_mode')}")
def test_bit_identical_to_timm(cfg):
    ours, theirs = eval_transform(cfg), _timm_transform(cfg)
    assert ours is not None
    for i, size in enumerate(IMAGE_SIZES):
        img = _image(size, i)
        a, b = ours(img), theirs(img)
        assert a.dtype == b.dtype and a.shape == b.shape, (size, a.shape, b.shape)
        assert torch.equal(a, b), (size, (a - b).abs().max().item())


@pytest.mark.parametrize("name", ["vit_small_patch16_224.augreg_in21k_ft_in1k", "vit_base_patch14_dinov2.lvd142m",
                                  "deit3_small_patch16_224.fb_in1k", "vit_base_patch16_clip_224.openai",
                                  "vit_base_patch16_siglip_224.webli", "eva02_base_patch14_224.mim_in22k",
                                  "vit_small_patch14_reg4_dinov2.lvd142m", "vit_large_patch16_384.augreg_in21k_ft_in1k"])
def test_real_model_configs(name):
    """The data configs of real timm models (from its registry; nothing is downloaded) transform identically."""
    cfg = timm.data.resolve_data_config(pretrained_cfg=timm.models.get_pretrained_cfg(name).to_dict())
    ours = eval_transform(cfg)
    assert ours is not None, cfg
    for i, size in enumerate(IMAGE_SIZES[:4]):
        img = _image(size, 10 + i)
        assert torch.equal(ours(img), _timm_transform(cfg)(img)), (name, size)


def test_configs_left_to_timm():
    """Border crops and non-square centre-crop resizes are timm's own (ResizeKeepRatio): None here, timm's in use."""
    border = dict(input_size=(3, 224, 224), interpolation="bicubic", crop_pct=0.9, crop_mode="border",
                  mean=(0.5,) * 3, std=(0.5,) * 3)
    wide = dict(border, crop_mode="center", input_size=(3, 160, 96))
    odd = dict(border, crop_mode="center", interpolation="random")
    for cfg in (border, wide, odd):
        assert eval_transform(cfg) is None
    img = _image((300, 200), 3)
    for cfg in (border, wide):
        assert not isinstance(model_transform(cfg), EvalTransform)
        assert torch.equal(model_transform(cfg)(img), _timm_transform(cfg)(img))


def test_picklable_for_workers():
    cfg = CONFIGS[0]
    t = eval_transform(cfg)
    img = _image((50, 40), 0)
    assert torch.equal(pickle.loads(pickle.dumps(t))(img), t(img))


def test_default_float_dtype_followed():
    cfg = CONFIGS[0]
    img = _image((50, 40), 0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        a, b = eval_transform(cfg)(img), _timm_transform(cfg)(img)
    finally:
        torch.set_default_dtype(old)
    assert a.dtype == b.dtype == torch.float64 and torch.equal(a, b)
