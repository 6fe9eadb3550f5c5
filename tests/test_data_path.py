"""The data path: reduced decoding (JPEG draft / integer reduce) bounded against the exact decode, worker counts,
persistent workers, bad files in workers, and the --workers option."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from artifactscan import load_model, scan
from artifactscan.cli import app
from artifactscan.inputs.images import load_rgb, reduced_decode_size
from artifactscan.inputs.sources import (
    MAX_PREFETCH,
    MIN_PREFETCH,
    PREFETCH_BYTES,
    auto_workers,
    decode_min_side,
    image_batches,
    make_image_source,
    parse_workers,
    prefetch_factor,
)
from artifactscan.inputs.synthetic import write_photo_folder

from .conftest import SAMPLE_IMAGES

PHOTOS = sorted(p for p in SAMPLE_IMAGES.iterdir() if p.suffix.lower() in (".jpg", ".png"))


@pytest.fixture(scope="module")
def large_jpegs(tmp_path_factory):
    return write_photo_folder(tmp_path_factory.mktemp("large") / "jpeg", 16, PHOTOS, seed=1)


def _flagged(report) -> set[tuple[int, int, int, int]]:
    return {(o.image_index, o.layer, o.row, o.col) for o in report.outliers}


def _planting(folder, exact: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The patch the phantom plants in each image (the most redundant one), the redundancies, their top-2 margin."""
    loaded = load_model("phantom")
    source = make_image_source(folder, loaded, exact_decode=exact)
    x = torch.cat([b for b, _, _ in image_batches(source, 64, 0)])
    with torch.inference_mode():
        loaded.model.forward_features(x)
    redundancy = loaded.model.patch_embed._state.redundancy.clone()
    top = redundancy.topk(2, dim=1).values
    return redundancy.argmax(dim=1), redundancy, top[:, 0] - top[:, 1]


@pytest.mark.parametrize("folder", ["sample", "large"])
def test_reduced_decode_matches_exact(folder, large_jpegs):
    """Per-layer medians within 1% and the same flagged tokens as the exact decode.

    The phantom plants one token per image, at the argmax of a patch-redundancy score whose top two are often within
    1e-4 of each other, while any change of resampling moves the scores by ~1e-2: where the picture does not decide
    the argmax (margin below that change), the phantom itself plants elsewhere. There the test asserts that each
    decode flags exactly what was planted in it; everywhere else, the very same tokens."""
    images = SAMPLE_IMAGES if folder == "sample" else large_jpegs
    exact = scan("phantom", images, device="cpu", exact_decode=True, num_workers=0)
    reduced = scan("phantom", images, device="cpu", num_workers=0)
    assert reduced.images.num_scanned == exact.images.num_scanned
    for a, b in zip(reduced.layers, exact.layers):
        assert a.median == pytest.approx(b.median, rel=0.01), f"layer {a.index} median"
        assert a.num_outliers == b.num_outliers and a.images_with_outliers == b.images_with_outliers
    assert exact.outliers, "the phantom plants outliers: the comparison must have some to compare"

    gw = exact.model.grid_size[1]
    planted_e, red_e, margin = _planting(images, exact=True)
    planted_r, red_r, _ = _planting(images, exact=False)
    moved = (red_e - red_r).abs().max(dim=1).values
    ties = {i for i in range(len(margin)) if margin[i] < moved[i]}
    for report, planted in ((exact, planted_e), (reduced, planted_r)):  # each decode: flagged == planted
        for o in report.outliers:
            assert o.row * gw + o.col == int(planted[o.image_index])
    differ = {i for i in range(len(margin)) if planted_e[i] != planted_r[i]}
    assert differ <= ties and len(differ) <= 1  # only a tie may move, and rarely
    same = lambda flags: {f for f in flags if f[0] not in differ}  # noqa: E731
    assert same(_flagged(reduced)) == same(_flagged(exact))


def test_reduced_decode_keeps_twice_the_resize(large_jpegs):
    loaded = load_model("phantom")
    side = decode_min_side(loaded.data_config)
    assert side == 2 * loaded.input_size[0]  # crop_pct 1.0: the resize targets the input size itself
    path = sorted(large_jpegs.iterdir())[0]
    full = load_rgb(path)
    small = load_rgb(path, side)
    assert full.size == (1600, 1200)
    assert side <= min(small.size) < 2 * side  # draft 1/8 (200x150), then reduce by 2: 100x75
    assert reduced_decode_size((1600, 1200), side) == (86, 64)
    assert reduced_decode_size((100, 80), side) is None  # not 2x larger: decoded as it is


def test_png_reduced_by_integer_factor(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (600, 800, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "big.png")
    out = load_rgb(tmp_path / "big.png", 64)
    assert out.size == (89, 67)  # 600 // 64 = 9: reduce(9) (edges rounded up), short side 67 >= 64
    expected = Image.fromarray(arr).reduce(9)
    assert np.array_equal(np.asarray(out), np.asarray(expected))


def test_exif_rotation_survives_draft(tmp_path):
    arr = np.zeros((600, 1000, 3), dtype=np.uint8)
    arr[:, :500] = 255  # left half white
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # stored rotated: upright is 90 degrees clockwise
    im.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    full, small = load_rgb(tmp_path / "rot.jpg"), load_rgb(tmp_path / "rot.jpg", 64)
    assert full.size == (600, 1000) and small.size[0] < small.size[1]
    f, s = np.asarray(full.resize(small.size, Image.BILINEAR), dtype=float), np.asarray(small, dtype=float)
    assert np.abs(f - s).mean() < 4  # same picture, same way up


def test_auto_workers_policy():
    assert auto_workers(15, 32, cores=16) == 0  # small folder: workers cost more than they save
    assert auto_workers(400, 32, cores=1) == 0  # one core: nothing runs beside the forward
    assert auto_workers(400, 32, cores=2) == 1  # CPU: half the cores decode, the other half runs the forward
    assert auto_workers(400, 32, cores=2, cuda=True) == 1  # CUDA: all cores but the main process's
    assert auto_workers(1000, 32, cores=16) == 8
    assert auto_workers(400, 32, cores=5, cuda=True) == 4
    assert auto_workers(100_000, 32, cores=64) == 8  # capped
    assert auto_workers(100_000, 32, cores=64, cuda=True) == 8
    assert auto_workers(96, 32, cores=16) == 1  # each worker gets at least two batches


@pytest.mark.parametrize("bad", [-1, "-1", "two", 1.5, "1.5"])
def test_parse_workers_refuses(bad):
    from artifactscan.core.errors import InputError

    with pytest.raises(InputError, match="num_workers="):
        parse_workers(bad)


def test_parse_workers_accepts():
    assert parse_workers("auto") is None and parse_workers(None) is None
    assert parse_workers("0") == 0 and parse_workers(3) == 3


@pytest.mark.parametrize("value", ["-1", "lots"])
def test_cli_workers_negative_is_one_line(value):
    res = CliRunner().invoke(app, ["norms", "phantom", str(SAMPLE_IMAGES), "--workers", value, "--json"])
    assert res.exit_code == 1
    lines = [line for line in res.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "--workers" in lines[0] and "Traceback" not in res.output


def _bad_folder(tmp_path, n_good=70):
    d = tmp_path / "mixed"
    write_photo_folder(d, n_good, PHOTOS[:2], size=(96, 80), seed=2)
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (d / "empty.png").write_bytes(b"")
    return d


def test_bad_files_counted_the_same_in_workers(tmp_path):
    d = _bad_folder(tmp_path)
    serial = scan("phantom", d, device="cpu", num_workers=0, batch_size=16)
    parallel = scan("phantom", d, device="cpu", num_workers=2, batch_size=16)
    assert len(serial.images.skipped) == 2
    assert serial.images.skipped == parallel.images.skipped
    assert serial.images.num_scanned == parallel.images.num_scanned == 70
    # The same pixels, but the forward runs on fewer threads beside the workers: float32 kernels may round
    # otherwise, a few ulps (1e-7 relative) at most.
    assert [lay.median for lay in serial.layers] == pytest.approx([lay.median for lay in parallel.layers], rel=1e-5)
    assert _flagged(serial) == _flagged(parallel)


def test_workers_persist_across_passes(tmp_path):
    d = _bad_folder(tmp_path, n_good=40)
    loaded = load_model("phantom")
    source = make_image_source(d, loaded)
    first = [idx.tolist() for _, idx, _ in image_batches(source, 16, 2)]
    loader = next(iter(source.loaders.values()))
    second = [idx.tolist() for _, idx, _ in image_batches(source, 16, 2)]
    assert first == second and len(source.loaders) == 1
    assert loader.persistent_workers and loader.prefetch_factor == prefetch_factor(source, 16, 2) == MAX_PREFETCH
    assert next(iter(source.loaders.values())) is loader  # the same DataLoader (its workers stay up)


def test_prefetch_depth_bounded_by_memory():
    """Small inputs prefetch deep (decoding runs ahead while the model is built), large ones stay at the floor."""
    small = make_image_source(SAMPLE_IMAGES, {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3})
    large = make_image_source(SAMPLE_IMAGES, {"input_size": (3, 518, 518), "mean": (0.5,) * 3, "std": (0.5,) * 3})
    assert prefetch_factor(small, 32, 2) == MAX_PREFETCH
    assert prefetch_factor(large, 32, 2) == MIN_PREFETCH
    mid = make_image_source(SAMPLE_IMAGES, {"input_size": (3, 64, 64), "mean": (0.5,) * 3, "std": (0.5,) * 3})
    depth = prefetch_factor(mid, 32, 4)
    assert MIN_PREFETCH <= depth <= MAX_PREFETCH and depth * 4 * 32 * 3 * 64 * 64 * 4 <= PREFETCH_BYTES


def test_threads_restored_after_a_pass_with_workers(tmp_path):
    d = _bad_folder(tmp_path, n_good=40)
    before = torch.get_num_threads()
    source = make_image_source(d, load_model("phantom"))
    for _ in image_batches(source, 16, 1):
        pass
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("flops, expected", [(None, 1), (1e8, 1), (5e9, 4)])
def test_forward_bound_pass_keeps_its_threads(tmp_path, monkeypatch, flops, expected):
    """Beside decoding workers a light forward gets the cores they leave; a heavy one (ViT-S: ~9 GFLOPs per image)
    keeps all of torch's threads, since it, not decoding, limits the pass."""
    import artifactscan.inputs.sources as sources

    d = _bad_folder(tmp_path, n_good=20)
    source = make_image_source(d, load_model("phantom"))
    source.forward_flops = flops
    monkeypatch.setattr(sources, "available_cores", lambda: 4)
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        seen = {torch.get_num_threads() for _ in image_batches(source, 8, 3)}
    finally:
        torch.set_num_threads(before)
    assert seen == {expected}


def test_forward_flops_estimate():
    from artifactscan.inputs.sources import FORWARD_BOUND_FLOPS, forward_flops

    phantom = load_model("phantom")
    n_params = sum(p.numel() for p in phantom.model.parameters())
    tokens = phantom.grid_size[0] * phantom.grid_size[1] + phantom.num_prefix_tokens
    assert forward_flops(phantom) == 2.0 * n_params * tokens < FORWARD_BOUND_FLOPS
    assert forward_flops({"input_size": (3, 32, 32)}) is None
