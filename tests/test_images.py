"""Tests for artifactscan.images: discovery, decoding of every Pillow mode, skipping bad files, batching, labels."""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader

from artifactscan.core.errors import InputError
from artifactscan.inputs.images import (
    IMAGE_EXTENSIONS,
    BadSample,
    ImageFolderDataset,
    ImageSkipped,
    SkippedImage,
    collate_skip_bad,
    discover_images,
    image_folder_labels,
    load_rgb,
)

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "sample_images"


def _resize_to_tensor(img: Image.Image) -> torch.Tensor:
    """Module-level (picklable) transform for DataLoader workers."""
    arr = np.asarray(img.resize((16, 16)), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)


def _photo(size=(64, 48), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB")


def _save_jpeg(path: Path, size=(64, 48), seed=0) -> Path:
    _photo(size, seed).save(path, "JPEG", quality=90)
    return path


# ------------------------------------------------------------------------------------------------ conversions


def _roundtrip(tmp_path: Path, im: Image.Image, name: str, **save_kw) -> Image.Image:
    path = tmp_path / name
    im.save(path, **save_kw)
    out = load_rgb(path)
    assert out.mode == "RGB"
    assert out.size == im.size
    return out


def test_rgb_passthrough(tmp_path):
    im = _photo()
    out = _roundtrip(tmp_path, im, "rgb.png")
    assert np.array_equal(np.asarray(out), np.asarray(im))


def test_grayscale_L_replicated(tmp_path):
    a = np.tile(np.arange(0, 256, dtype=np.uint8), (4, 1))
    out = np.asarray(_roundtrip(tmp_path, Image.fromarray(a, "L"), "gray.png"))
    for c in range(3):
        assert np.array_equal(out[..., c], a)


def test_LA_composited_on_white(tmp_path):
    la = Image.new("LA", (8, 4), (0, 0))  # black, fully transparent
    la.putpixel((0, 0), (50, 255))  # one opaque dark pixel
    out = np.asarray(_roundtrip(tmp_path, la, "la.png"))
    assert tuple(out[0, 0]) == (50, 50, 50)
    assert tuple(out[1, 1]) == (255, 255, 255)


def test_RGBA_composited_on_white(tmp_path):
    arr = np.zeros((4, 8, 4), dtype=np.uint8)
    arr[..., 0] = 255  # red everywhere
    arr[:, :4, 3] = 255  # left half opaque
    arr[:, 4:, 3] = 0  # right half transparent
    arr[0, 7, 3] = 128  # one half-transparent pixel
    out = np.asarray(_roundtrip(tmp_path, Image.fromarray(arr, "RGBA"), "rgba.png"))
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[1, 5]) == (255, 255, 255)
    r, g, b = (int(v) for v in out[0, 7])
    assert r == 255 and 120 <= g <= 135 and g == b


def test_palette_P(tmp_path):
    im = _photo().quantize(colors=16)
    assert im.mode == "P"
    out = _roundtrip(tmp_path, im, "pal.png")
    assert np.array_equal(np.asarray(out), np.asarray(im.convert("RGB")))


def test_palette_with_transparency(tmp_path):
    im = Image.new("P", (6, 6), 0)
    im.putpalette([0, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))  # 0 black, 1 blue
    im.putpixel((0, 0), 1)
    im.info["transparency"] = 0  # index 0 transparent
    out = np.asarray(_roundtrip(tmp_path, im, "ptrans.png", transparency=0))
    assert tuple(out[0, 0]) == (0, 0, 255)
    assert tuple(out[3, 3]) == (255, 255, 255)  # transparent black -> white, not black


def test_palette_gif_with_transparency(tmp_path):
    im = Image.new("P", (6, 6), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    im.putpixel((2, 2), 1)
    path = tmp_path / "anim.gif"
    im.save(path, transparency=0)
    out = np.asarray(load_rgb(path))
    assert tuple(out[2, 2]) == (255, 0, 0)
    assert tuple(out[0, 0]) == (255, 255, 255)


@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_16bit_full_range_gradient_is_rescaled(tmp_path, fmt):
    a = np.linspace(0, 65535, 512).round().astype(np.uint16).reshape(2, 256)
    im = Image.fromarray(a)
    assert im.mode.startswith("I;16")
    path = tmp_path / f"g16.{fmt}"
    im.save(path)
    with Image.open(path) as check:
        assert check.mode in ("I;16", "I;16B", "I;16L", "I")  # depends on Pillow version / format
    out = np.asarray(load_rgb(path))[..., 0].astype(int)
    assert out.min() == 0 and out.max() == 255
    # Linear, not clipped: the middle of the gradient is mid-grey and there are many distinct levels.
    assert abs(int(out[0, 255]) - 127) <= 2
    assert len(np.unique(out)) >= 200
    assert np.all(np.diff(out.ravel()) >= 0)


def test_32bit_I_mode_16bit_values(tmp_path):
    a = np.linspace(0, 65535, 256).astype(np.int32).reshape(1, 256)
    im = Image.fromarray(a, "I")
    path = tmp_path / "i32.tiff"
    im.save(path)
    out = np.asarray(load_rgb(path))[..., 0].astype(int)
    assert out.min() == 0 and out.max() == 255


def test_float_F_unit_range_and_wide_range(tmp_path):
    a = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(1, 64)
    p1 = tmp_path / "f01.tiff"
    Image.fromarray(a, "F").save(p1)
    out = np.asarray(load_rgb(p1))[..., 0].astype(int)
    assert out[0, 0] == 0 and out[0, -1] == 255

    b = np.linspace(-1000.0, 3000.0, 64, dtype=np.float32).reshape(1, 64)
    b[0, 5] = np.nan
    p2 = tmp_path / "fwide.tiff"
    Image.fromarray(b, "F").save(p2)
    out2 = np.asarray(load_rgb(p2))[..., 0].astype(int)
    assert out2.min() == 0 and out2.max() == 255  # stretched, not clipped to 0/255 extremes
    assert len(np.unique(out2)) > 50


def test_cmyk(tmp_path):
    im = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    out = np.asarray(_roundtrip(tmp_path, im, "cmyk.jpg", quality=95))
    r, g, b = (int(v) for v in out[4, 4])
    assert r > 200 and g < 60 and b < 60


def test_cmyk_tiff(tmp_path):
    im = Image.new("CMYK", (8, 8), (0, 0, 0, 255))  # black
    out = np.asarray(_roundtrip(tmp_path, im, "cmyk.tiff"))
    assert out.max() == 0


def test_one_bit(tmp_path):
    im = Image.new("1", (8, 8), 0)
    im.putpixel((1, 1), 1)
    out = np.asarray(_roundtrip(tmp_path, im, "bw.png"))
    assert tuple(out[1, 1]) == (255, 255, 255)
    assert tuple(out[0, 0]) == (0, 0, 0)


def test_bmp_ppm_pgm_webp(tmp_path):
    for name in ("a.bmp", "a.ppm", "a.webp"):
        assert load_rgb(_roundtrip_path(tmp_path, _photo(), name)).mode == "RGB"
    assert load_rgb(_roundtrip_path(tmp_path, _photo().convert("L"), "a.pgm")).mode == "RGB"


def _roundtrip_path(tmp_path, im, name):
    path = tmp_path / name
    im.save(path)
    return path


def test_exif_orientation_applied(tmp_path):
    im = _photo((40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    path = tmp_path / "rot.jpg"
    im.save(path, exif=exif)
    assert load_rgb(path).size == (20, 40)


def test_result_does_not_keep_file_open(tmp_path):
    path = _save_jpeg(tmp_path / "x.jpg")
    img = load_rgb(path)
    os.remove(path)  # would fail on Windows if the handle were open; here check pixel access still works
    assert img.getpixel((0, 0)) is not None


# --------------------------------------------------------------------------------------------------- bad files


def test_corrupt_random_bytes(tmp_path):
    path = tmp_path / "corrupt.jpg"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ImageSkipped) as ei:
        load_rgb(path)
    assert isinstance(ei.value, InputError)
    assert "corrupt" in ei.value.reason
    assert str(path) in str(ei.value)
    assert "\n" not in str(ei.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageSkipped, match="empty file"):
        load_rgb(path)


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
def test_truncated_jpeg(tmp_path, keep):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # Pillow default, which load_rgb relies on
    full = _save_jpeg(tmp_path / "full.jpg", size=(256, 192))
    data = full.read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ImageSkipped) as ei:
        load_rgb(cut)
    assert "truncated" in ei.value.reason


def test_truncated_png(tmp_path):
    full = tmp_path / "full.png"
    _photo((128, 128)).save(full)
    data = full.read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageSkipped):
        load_rgb(cut)


def test_decompression_bomb_error_and_warning(tmp_path, monkeypatch):
    path = _save_jpeg(tmp_path / "big.jpg", size=(100, 100))  # 10_000 pixels
    filters_before = list(warnings.filters)

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2_000)  # > 2x limit -> DecompressionBombError
    with pytest.raises(ImageSkipped, match="decompression bomb"):
        load_rgb(path)

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 8_000)  # between 1x and 2x -> warning, made an error
    with pytest.raises(ImageSkipped, match="decompression bomb"):
        load_rgb(path)

    assert warnings.filters == filters_before  # global warning filters restored
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)
    assert load_rgb(path).size == (100, 100)


def test_missing_file_is_skipped(tmp_path):
    with pytest.raises(ImageSkipped, match="does not exist"):
        load_rgb(tmp_path / "nope.jpg")


# --------------------------------------------------------------------------------------------------- discovery


def test_discover_missing_path(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        discover_images(tmp_path / "missing")


def test_discover_empty_folder(tmp_path):
    with pytest.raises(InputError, match="empty"):
        discover_images(tmp_path)


def test_discover_folder_without_images(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(InputError) as ei:
        discover_images(tmp_path)
    msg = str(ei.value)
    assert "no images" in msg and "jpg" in msg and "png" in msg and "webp" in msg
    assert ".txt" in msg
    assert "\n" not in msg


def test_discover_single_file(tmp_path):
    path = _save_jpeg(tmp_path / "one.JPG")
    assert discover_images(path) == [path]
    other = tmp_path / "notes.txt"
    other.write_text("x")
    with pytest.raises(InputError, match="extension"):
        discover_images(other)


def test_discover_sorted_recursive_deterministic(tmp_path):
    names = ["b/z.png", "b/a.jpg", "a/c/d.jpeg", "a/x.JPG", "root.png", "a-b/y.webp", "B/q.tif"]
    for i, n in enumerate(names):
        p = tmp_path / n
        p.parent.mkdir(parents=True, exist_ok=True)
        _photo((8, 8), i).save(p, format="PNG" if not n.lower().endswith((".jpg", ".jpeg")) else "JPEG")
    (tmp_path / "a" / "readme.md").write_text("x")
    (tmp_path / "._root.png").write_bytes(b"\x00\x05")  # macOS resource fork
    (tmp_path / ".hidden").mkdir()
    _photo((8, 8)).save(tmp_path / ".hidden" / "h.png")

    got = [p.relative_to(tmp_path).as_posix() for p in discover_images(tmp_path)]
    assert got == ["B/q.tif", "a/c/d.jpeg", "a/x.JPG", "a-b/y.webp", "b/a.jpg", "b/z.png", "root.png"]
    assert discover_images(str(tmp_path)) == discover_images(tmp_path)

    flat = [p.relative_to(tmp_path).as_posix() for p in discover_images(tmp_path, recursive=False)]
    assert flat == ["root.png"]


def test_discover_non_recursive_hint(tmp_path):
    (tmp_path / "cls").mkdir()
    _save_jpeg(tmp_path / "cls" / "a.jpg")
    with pytest.raises(InputError, match="sub-folders"):
        discover_images(tmp_path, recursive=False)


def test_extension_list():
    for ext in ("jpg", "jpeg", "png", "bmp", "gif", "tif", "tiff", "webp", "ppm", "pgm"):
        assert f".{ext}" in IMAGE_EXTENSIONS


# ------------------------------------------------------------------------------------------ dataset + collate


def _mixed_folder(tmp_path: Path) -> list[Path]:
    good = [_save_jpeg(tmp_path / f"good{i}.jpg", size=(30 + i, 20), seed=i) for i in range(5)]
    bad_random = tmp_path / "bad_random.jpg"
    bad_random.write_bytes(os.urandom(1000))
    data = good[0].read_bytes()
    bad_trunc = tmp_path / "bad_trunc.jpg"
    bad_trunc.write_bytes(data[: len(data) // 2])
    empty = tmp_path / "bad_empty.png"
    empty.write_bytes(b"")
    return discover_images(tmp_path)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_skips_bad_images(tmp_path, num_workers):
    paths = _mixed_folder(tmp_path)
    assert len(paths) == 8
    ds = ImageFolderDataset(paths, _resize_to_tensor)
    loader = DataLoader(ds, batch_size=3, num_workers=num_workers, collate_fn=collate_skip_bad)
    seen, skipped = [], []
    for images, indices, sk in loader:
        assert indices.dtype == torch.long
        if images is None:
            assert len(indices) == 0
        else:
            assert images.shape == (len(indices), 3, 16, 16)
        seen.extend(indices.tolist())
        skipped.extend(sk)
    bad_names = {"bad_random.jpg", "bad_trunc.jpg", "bad_empty.png"}
    assert sorted(seen) == [i for i, p in enumerate(paths) if p.name not in bad_names]
    assert {paths[i].name for i, _ in skipped} == bad_names
    assert all(isinstance(r, str) and r for _, r in skipped)
    reports = ds.skipped_images(skipped)
    assert all(isinstance(r, SkippedImage) for r in reports)
    assert {Path(r.path).name for r in reports} == bad_names


def test_collate_all_bad_batch():
    images, indices, skipped = collate_skip_bad([BadSample(3, "corrupt"), BadSample(4, "truncated")])
    assert images is None
    assert indices.shape == (0,) and indices.dtype == torch.long
    assert skipped == [(3, "corrupt"), (4, "truncated")]


def test_dataset_default_transform_and_pickle(tmp_path):
    path = _save_jpeg(tmp_path / "a.jpg", size=(10, 6))
    ds = pickle.loads(pickle.dumps(ImageFolderDataset([path])))
    x, i = ds[0]
    assert i == 0 and x.shape == (3, 6, 10) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


# ------------------------------------------------------------------------------------------------------ labels


def test_labels_image_folder_layout(tmp_path):
    for cls, n in (("dog", 2), ("cat", 3)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            _save_jpeg(tmp_path / cls / f"{i}.jpg", seed=i)
    (tmp_path / "cat" / "sub").mkdir()
    _save_jpeg(tmp_path / "cat" / "sub" / "deep.jpg")
    (tmp_path / "empty_class").mkdir()
    paths = discover_images(tmp_path)
    labels, names = image_folder_labels(tmp_path, paths)
    assert names == ["cat", "dog"]
    assert labels == [0, 0, 0, 0, 1, 1]
    assert [p.parent.name for p in paths][:3] == ["cat", "cat", "cat"]
    # Also works with str paths and str root.
    assert image_folder_labels(str(tmp_path), [str(p) for p in paths]) == (labels, names)


def test_labels_flat_folder(tmp_path):
    for i in range(3):
        _save_jpeg(tmp_path / f"{i}.jpg", seed=i)
    assert image_folder_labels(tmp_path, discover_images(tmp_path)) == (None, None)


def test_labels_single_file(tmp_path):
    path = _save_jpeg(tmp_path / "a.jpg")
    assert image_folder_labels(path, [path]) == (None, None)


def test_labels_mixed_layout_rejected(tmp_path):
    _save_jpeg(tmp_path / "loose.jpg")
    (tmp_path / "cls").mkdir()
    _save_jpeg(tmp_path / "cls" / "a.jpg")
    with pytest.raises(InputError, match="sub-folder"):
        image_folder_labels(tmp_path, discover_images(tmp_path))


# ------------------------------------------------------------------------------------------------ sample_images


def test_sample_images_all_load_and_are_documented():
    paths = discover_images(SAMPLE_DIR)
    assert len(paths) >= 12
    sources = (SAMPLE_DIR / "SOURCES.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"^\| `([^`]+)` \|", sources, flags=re.M))
    on_disk = {p.name for p in paths}
    assert on_disk == listed, f"SOURCES.md out of sync: {on_disk ^ listed}"
    gray, non_square = [], []
    total = 0
    for p in paths:
        assert p.name == p.name.lower() and " " not in p.name
        total += p.stat().st_size
        with Image.open(p) as raw:
            if raw.mode in ("L", "I;16", "1"):
                gray.append(p.name)
            if raw.width != raw.height:
                non_square.append(p.name)
            assert max(raw.size) <= 512
        img = load_rgb(p)
        assert img.mode == "RGB" and min(img.size) > 0
    assert gray, "need at least one grayscale sample image"
    assert non_square, "need at least one non-square sample image"
    assert total < 3 * 1024 * 1024
