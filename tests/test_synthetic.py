"""The synthetic shapes data set: determinism, ground truth (labels, masks) and speed."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from artifactscan.core.errors import InputError
from artifactscan.inputs.synthetic import (
    CLASS_NAMES,
    COLOURS,
    NUM_CLASSES,
    SyntheticShapes,
    label_of,
    make_splits,
    patch_mask_from_pixels,
    write_image_folder,
)


def test_item_shape_range_and_type():
    ds = SyntheticShapes(10, seed=0)
    x, y = ds[3]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert isinstance(y, int) and 0 <= y < NUM_CLASSES
    assert len(ds) == 10
    with pytest.raises(IndexError):
        ds[10]


def test_deterministic_per_seed_and_index():
    a, b = SyntheticShapes(50, seed=7), SyntheticShapes(50, seed=7)
    for i in (0, 13, 49):
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
    # order of access does not matter (generated from (seed, index) alone)
    assert torch.equal(SyntheticShapes(50, seed=7)[13][0], a[13][0])
    c = SyntheticShapes(50, seed=8)
    assert not torch.equal(a[0][0], c[0][0])


def test_train_and_val_splits_differ():
    train, val = make_splits(100, 100, seed=0)
    assert train.split == "train" and val.split == "val"
    same = sum(torch.equal(train[i][0], val[i][0]) for i in range(100))
    assert same == 0


def test_labels_match_object_counts_and_colours():
    ds = SyntheticShapes(300, seed=1)
    seen = set()
    for i in range(300):
        scene = ds.describe(i)
        img, mask, label = ds.render(i)
        count = len(scene["boxes"])
        # read the colours back from the pixels (centre of each square)
        colours = []
        for (y0, x0, size) in scene["boxes"]:
            px = img[:, y0 + size // 2, x0 + size // 2]
            colours.append(int(np.argmin(((COLOURS - px) ** 2).sum(1))))
        shared = len(set(colours)) < count
        assert 1 <= count <= 4
        assert label == label_of(count, shared) == (count - 1) * 2 + int(shared)
        assert ds[i][1] == label == ds.label(i)
        seen.add(label)
    assert 1 not in seen  # one object can't share a colour
    assert seen == {0, 2, 3, 4, 5, 6, 7}


def test_masks_cover_exactly_the_squares():
    ds = SyntheticShapes(100, seed=2)
    obj_patches = []
    for i in range(100):
        scene = ds.describe(i)
        mask = ds.object_mask(i)
        assert mask.dtype == torch.bool and mask.shape == (32, 32)
        expected = torch.zeros(32, 32, dtype=torch.bool)
        for (y0, x0, size) in scene["boxes"]:
            assert 3 <= size <= 4
            expected[y0 : y0 + size, x0 : x0 + size] = True
        assert torch.equal(mask, expected)
        assert int(mask.sum()) == sum(s * s for (_, _, s) in scene["boxes"])  # squares never overlap
        pm = ds.patch_object_mask(i, 4)
        assert pm.shape == (8, 8)
        manual = expected.reshape(8, 4, 8, 4).any(3).any(1)
        assert torch.equal(pm, manual)
        obj_patches.append(pm.float().mean().item())
    # most 4×4 patches are pure background (≈ 89–92%)
    assert 0.04 < float(np.mean(obj_patches)) < 0.16


def test_background_is_flat_with_light_noise():
    ds = SyntheticShapes(20, seed=3)
    for i in range(20):
        img, mask, _ = ds.render(i)
        bg = img[:, ~mask]
        assert bg.std(axis=1).max() < 0.05  # noise sd 0.03, tint constant per image


def test_patch_mask_helper_batch_and_errors():
    ds = SyntheticShapes(8, seed=0, img_size=64)
    imgs, labels, masks = ds.batch(range(8))
    assert imgs.shape == (8, 3, 64, 64) and labels.shape == (8,) and masks.shape == (8, 64, 64)
    pm = patch_mask_from_pixels(masks, 16)
    assert pm.shape == (8, 4, 4)
    strict = patch_mask_from_pixels(masks, 16, min_fraction=0.99)
    assert (strict <= pm).all()
    with pytest.raises(InputError, match="not a multiple of patch size"):
        patch_mask_from_pixels(masks, 5)


def test_square_size_scales_with_image_size():
    ds = SyntheticShapes(30, seed=0, img_size=64)
    sizes = {s for i in range(30) for (_, _, s) in ds.describe(i)["boxes"]}
    assert sizes <= {6, 7, 8}


def test_invalid_arguments():
    with pytest.raises(InputError, match="at least 1 image"):
        SyntheticShapes(0)
    with pytest.raises(InputError, match="at least 8 px"):
        SyntheticShapes(10, img_size=4)


def test_batch_generation_is_fast():
    ds = SyntheticShapes(10_000, seed=0)
    ds.batch(range(64))
    t = time.perf_counter()
    for _ in range(3):
        ds.batch(range(64))
    per_batch = (time.perf_counter() - t) / 3
    assert per_batch < 0.1  # a training step of the demo model takes ~0.6–0.8 s


def test_works_with_dataloader():
    loader = torch.utils.data.DataLoader(SyntheticShapes(40, seed=0), batch_size=16)
    x, y = next(iter(loader))
    assert x.shape == (16, 3, 32, 32) and y.dtype == torch.int64


def test_write_image_folder_roundtrip(tmp_path):
    from PIL import Image

    out = write_image_folder(tmp_path / "shapes", 12, seed=4)
    assert sorted(p.name for p in out.iterdir()) == list(CLASS_NAMES)
    files = sorted(out.rglob("*.png"))
    assert len(files) == 12
    ds = SyntheticShapes(12, seed=4)
    for f in files:
        idx = int(f.stem.split("_")[-1])
        img, _, label = ds.render(idx)
        assert f.parent.name == CLASS_NAMES[label]
        arr = np.asarray(Image.open(f)).astype(np.float32).transpose(2, 0, 1) / 255.0
        assert np.abs(arr - img).max() <= 1 / 255 + 1e-6
