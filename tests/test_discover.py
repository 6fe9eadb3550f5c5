"""LOST object discovery: the batched algorithm against the per-image reference, the feature capture (prefix
tokens excluded by the model's own counts), seeds on outliers against the norms scan, CorLoc and its data sets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from artifactscan.analysis.discover import (DiscoverReport, best_iou, centre_box, discover, discovery_run, iou,
                                            random_box)
from artifactscan.analysis.lost import FeatureCapture, default_k, lost_batched, lost_reference
from artifactscan.analysis.scan import scan
from artifactscan.core.errors import InputError, NotAViTError
from artifactscan.inputs.boxes import load_box_data
from artifactscan.inputs.synthetic_objects import SyntheticObjects
from artifactscan.models.loading import load_model, wrap_module

from .conftest import save_planted_checkpoint, tiny_vit


def _objects_features(B: int, gh: int, gw: int, D: int = 24, seed: int = 0) -> torch.Tensor:
    """Patch features with a background direction and one rectangular 'object' direction per image."""
    g = torch.Generator().manual_seed(seed)
    bg, obj = torch.randn(D, generator=g), torch.randn(D, generator=g)
    feats = bg + 0.8 * torch.randn(B, gh * gw, D, generator=g)
    for b in range(B):
        r0, c0 = int(torch.randint(0, gh - 2, (1,), generator=g)), int(torch.randint(0, gw - 2, (1,), generator=g))
        grid = feats[b].view(gh, gw, D)
        grid[r0:r0 + 3, c0:c0 + 2] += 2.5 * (obj - bg)
    return feats


@pytest.mark.parametrize("grid,k", [((6, 6), 5), ((5, 8), 1), ((7, 4), 28), ((8, 8), 9)])
def test_batched_lost_matches_reference(grid, k):
    feats = _objects_features(12, *grid, seed=grid[0] * 10 + k)
    got = lost_batched(feats, grid, k)
    boxes = set()
    for b in range(feats.shape[0]):
        seed, box, outside = lost_reference(feats[b], grid, k)
        assert int(got.seed[b]) == seed
        assert got.box[b].tolist() == box
        assert bool(got.seed_outside_mask[b]) == outside
        boxes.add(tuple(box))
    assert len(boxes) > 1  # the cases differ: not every image gives the whole grid


def test_ties_break_to_the_lowest_patch_index():
    # every patch identical: all degrees tie, the seed is patch 0 in both implementations
    feats = torch.ones(2, 12, 4)
    got = lost_batched(feats, (3, 4), 3)
    assert got.seed.tolist() == [0, 0]
    assert lost_reference(feats[0], (3, 4), 3)[0] == 0
    assert got.box[0].tolist() == [0, 0, 4, 3]


def test_default_k_scales_lost_100_to_the_grid():
    assert default_k(713) == 100
    assert default_k(64) == 9
    assert default_k(4) == 1
    assert default_k(37 * 37) == round(100 * 37 * 37 / 713)


def test_iou_and_baselines():
    assert iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)
    assert iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0
    assert best_iou([0, 0, 2, 2], [[5, 5, 6, 6], [0, 0, 2, 2]]) == 1.0
    assert centre_box(8, 4) == [2, 1, 6, 3]
    a, b = random_box((8, 8), 0, 3), random_box((8, 8), 0, 3)
    assert a == b and a[0] < a[2] <= 8 and a[1] < a[3] <= 8
    assert len({tuple(random_box((8, 8), 0, i)) for i in range(20)}) > 5


def test_synthetic_objects_are_several_patches_wide_and_deterministic():
    ds = SyntheticObjects(40, img_size=32)
    sides = [min(b[2] - b[0], b[3] - b[1]) for i in range(40) for b in ds.boxes(i)]
    assert min(sides) >= 12 and max(sides) <= 20  # 3..5 patches of 4 px
    assert np.array_equal(ds.render(7)[0], SyntheticObjects(40, img_size=32).render(7)[0])
    img, boxes = ds.render(3)
    x0, y0, x1, y1 = boxes[0]
    inside = img[:, y0:y1, x0:x1].reshape(3, -1)
    assert np.allclose(inside, inside[:, :1])  # a flat colour inside its box


def _manual_boxes(loaded, x: torch.Tensor, block: int, k: int, which: int = 1):
    """q/k/v (``which`` 0/1/2) of ``block`` taken by a plain hook, prefix cut by the model's count, LOST per image
    (the reference)."""
    taken = {}
    h = loaded.blocks[block].attn.qkv.register_forward_hook(lambda m, i, o: taken.__setitem__("qkv", o))
    with torch.inference_mode():
        loaded.model.forward_features(x)
    h.remove()
    B, T, three_d = taken["qkv"].shape
    keys = taken["qkv"].reshape(B, T, 3, three_d // 3)[:, :, which]
    P = loaded.num_prefix_tokens
    return [lost_reference(keys[b, P:], loaded.grid_size, k) for b in range(B)]


@pytest.mark.parametrize("features,which,block", [("keys", 1, -1), ("queries", 0, 1), ("values", 2, 0)])
def test_discovery_uses_the_models_prefix_count_not_token_0(features, which, block):
    model = tiny_vit(reg_tokens=2, class_token=False, global_pool="avg", patch_size=4)  # 2 registers, no CLS
    loaded = wrap_module(model, data_config={"input_size": (3, 32, 32), "mean": [0.5] * 3, "std": [0.5] * 3})
    assert loaded.num_prefix_tokens == 2 and loaded.num_cls_tokens == 0
    data = load_box_data("synthetic-objects:10", img_size=32)
    run = discovery_run(loaded, data, label="tiny", block=block, features=features, device="cpu", batch_size=4, k=5)
    x = torch.stack([data.image_source(loaded).dataset[i][0] for i in range(10)])
    want = _manual_boxes(loaded, x, block % len(loaded.blocks), 5, which)
    gw = loaded.grid_size[1]
    for d, (seed, box, _) in zip(run.images, want):
        assert d.seed == [seed // gw, seed % gw]
        assert d.box_patches == box


def test_the_pass_stops_at_the_chosen_block():
    loaded = load_model("demo")
    ran = []
    handle = loaded.blocks[-1].register_forward_hook(lambda *a: ran.append(1))
    try:
        with FeatureCapture(loaded, 1, "keys") as cap:
            feats, resid = cap.run(torch.zeros(2, 3, 32, 32))
    finally:
        handle.remove()
    assert ran == [] and feats.shape == resid.shape == (2, loaded.num_prefix_tokens + 64, loaded.model.embed_dim)
    assert not loaded.blocks[1]._forward_pre_hooks and not loaded.blocks[1].attn.qkv._forward_hooks  # removed


def test_shapes_set_gives_its_squares_as_boxes():
    data = load_box_data("synthetic:3", img_size=32)
    assert data.kind == "synthetic" and all(it.boxes for it in data.items)
    assert all(b[2] - b[0] == b[3] - b[1] <= 4 for it in data.items for b in it.boxes)


def test_batch_size_does_not_change_the_boxes():
    loaded = load_model("demo")
    data = load_box_data("synthetic-objects:12", img_size=32)
    a = discovery_run(loaded, data, label="a", batch_size=12, device="cpu")
    b = discovery_run(loaded, data, label="b", batch_size=5, device="cpu")
    assert [d.box for d in a.images] == [d.box for d in b.images]
    assert a.corloc == b.corloc


def test_corloc_counts_the_images(tmp_path):
    r = discover("demo", "synthetic-objects:16", device="cpu")
    run = r.runs[0]
    assert run.num_scored == 16
    assert run.corloc == pytest.approx(sum(d.correct for d in run.images) / 16)
    for d in run.images:
        assert d.iou == pytest.approx(best_iou(d.box, d.gt_boxes))
        assert d.correct == (d.iou >= 0.5)
    again = DiscoverReport.from_dict(json.loads(r.to_json()))
    assert again.runs[0].corloc == run.corloc and again.runs[0].images[3].box == run.images[3].box


def test_seed_flags_agree_with_the_norms_scan(tmp_path):
    # planted high-norm patches at 3 and 10, present from the patch embedding on: the scan flags them at every row
    ckpt = save_planted_checkpoint(tmp_path / "planted.safetensors", positions=(3, 10), strength=60.0)
    loaded = load_model(ckpt)
    data = load_box_data("synthetic-objects:24", img_size=32)
    for features, row_of in (("keys", lambda b: b - 1), ("tokens", lambda b: b)):
        run = discover(loaded, data, features=features, device="cpu").runs[0]
        report = scan(loaded, data.scan_images(), device="cpu", num_maps=0)
        row = row_of(run.block)
        gw = loaded.grid_size[1]
        flagged = {(o.image_index, o.row * gw + o.col) for o in report.outliers if o.layer == row}
        assert flagged, "the scan must flag the planted tokens"
        for d in run.images:
            assert d.seed_flagged == ((d.index, d.seed[0] * gw + d.seed[1]) in flagged)
        assert run.outlier_share == pytest.approx(report.layers[row].outlier_fraction)
    # a fixed threshold flags exactly the seeds above it
    run = discover(loaded, data, threshold=30.0, device="cpu").runs[0]
    assert run.threshold == 30.0
    flags = [d.seed_flagged for d in run.images]
    assert flags == [d.seed_norm > 30.0 for d in run.images] and any(flags) and not all(flags)


def test_compare_fix_installs_the_register_and_excludes_it(tiny_phantom):
    path, _, _ = tiny_phantom
    r = discover(path, "synthetic-objects:16", compare=["fix"], device="cpu", batch_size=8)
    assert [run.label for run in r.runs] == [r.runs[0].label, r.runs[0].label + " + test-time register"]
    before, after = r.runs
    assert after.model.num_prefix_tokens == before.model.num_prefix_tokens + 1
    assert after.num_images == before.num_images == 16


def test_two_models_one_report():
    r = discover(["demo", "demo-reg4"], "synthetic-objects:8", device="cpu")
    assert [run.label for run in r.runs] == ["demo", "demo-reg4"]
    assert r.runs[1].model.num_register_tokens == 4
    assert "demo-reg4" in r.headline


# ----------------------------------------------------------------------------------------------- data sets
def _voc(root: Path, boxes=((5, 6, 20, 30),), size=(40, 32), write_image=True, filename="a.jpg") -> Path:
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    if write_image:
        Image.new("RGB", size, (120, 30, 30)).save(root / "JPEGImages" / filename)
    objs = "".join(f"<object><name>cat</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>"
                   f"<ymax>{b[3]}</ymax></bndbox></object>" for b in boxes)
    (root / "Annotations" / "a.xml").write_text(
        f"<annotation><filename>{filename}</filename><size><width>{size[0]}</width><height>{size[1]}</height>"
        f"</size>{objs}</annotation>")
    return root


def test_voc_boxes_are_read_one_based_inclusive(tmp_path):
    data = load_box_data(_voc(tmp_path / "voc"), img_size=32)
    assert data.kind == "voc"
    assert data.items[0].boxes == [[4.0, 5.0, 20.0, 30.0]]
    r = discover("demo", data, device="cpu")
    assert r.runs[0].num_scored == 1 and r.runs[0].corloc is not None
    assert r.runs[0].images[0].size == [40, 32]


def test_coco_boxes(tmp_path):
    Image.new("RGB", (50, 40)).save(tmp_path / "x.png")
    ann = {"images": [{"id": 7, "file_name": "x.png", "width": 50, "height": 40}],
           "annotations": [{"image_id": 7, "bbox": [10, 5, 20, 30]}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    data = load_box_data(tmp_path / "ann.json", img_size=32)
    assert data.kind == "coco" and data.items[0].boxes == [[10.0, 5.0, 30.0, 35.0]]


def test_image_folder_without_boxes_reports_no_corloc(image_dir):
    r = discover("demo", image_dir, device="cpu")
    run = r.runs[0]
    assert run.corloc is None and run.num_scored == 0 and run.num_images == 8
    assert all(d.gt_boxes is None and d.iou is None for d in run.images)
    assert "no CorLoc" in r.headline


@pytest.mark.parametrize("case,match", [
    ("no-images", "is missing or empty"),
    ("missing-file", "which is not in"),
    ("outside", "lies outside"),
    ("coco-missing", "is not in"),
    ("coco-outside", "lies outside"),
    ("coco-empty", "lists no images"),
    ("empty-folder", "is empty"),
])
def test_bad_data_is_refused_in_one_line(tmp_path, case, match):
    if case == "no-images":
        spec = _voc(tmp_path / "voc", write_image=False)
    elif case == "missing-file":
        spec = _voc(tmp_path / "voc")
        (spec / "JPEGImages" / "a.jpg").rename(spec / "JPEGImages" / "b.jpg")
    elif case == "outside":
        spec = _voc(tmp_path / "voc", boxes=((5, 6, 60, 30),))
    elif case.startswith("coco"):
        Image.new("RGB", (50, 40)).save(tmp_path / "x.png")
        images = [] if case == "coco-empty" else [{"id": 1, "file_name": "y.png" if case == "coco-missing" else
                                                   "x.png", "width": 50, "height": 40}]
        ann = {"images": images, "annotations": [{"image_id": 1, "bbox": [40, 5, 20, 30]}]}
        spec = tmp_path / "ann.json"
        spec.write_text(json.dumps(ann))
    else:
        spec = tmp_path / "empty"
        spec.mkdir()
    with pytest.raises(InputError, match=match) as exc:
        load_box_data(spec, img_size=32)
    assert "\n" not in str(exc.value)


def test_eva_keys_are_the_rotated_keys_its_kernel_uses():
    """An Eva with separate q/k/v projections, qk-norm and RoPE: LOST's keys are what attention really uses (after
    the norm and the rotation), computed here by hand from the block's own modules; discovery runs on them."""
    import timm
    from timm.layers import apply_rot_embed_cat

    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=2, qkv_fused=False, num_classes=3).eval()
    loaded = wrap_module(model, data_config={"input_size": (3, 32, 32), "mean": [0.5] * 3, "std": [0.5] * 3})
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad(), FeatureCapture(loaded, 1, "keys") as cap:
        keys, resid = cap.run(x)
    attn = model.blocks[1].attn
    with torch.no_grad():
        h = model.blocks[1].norm1(resid)
        B, T, _ = h.shape
        k = attn.k_norm(attn.k_proj(h).reshape(B, T, attn.num_heads, -1).transpose(1, 2))
        P = attn.num_prefix_tokens
        k = torch.cat([k[:, :, :P], apply_rot_embed_cat(k[:, :, P:], model.rope.get_embed())], dim=2)
    torch.testing.assert_close(keys, k.transpose(1, 2).reshape(B, T, -1))
    assert discover(loaded, "synthetic-objects:2", device="cpu").runs[0].num_images == 2
    assert discover(loaded, "synthetic-objects:2", features="tokens", device="cpu").runs[0].num_images == 2


def test_bad_options():
    with pytest.raises(InputError, match="features="):
        discover("demo", "synthetic-objects:2", features="pixels")
    with pytest.raises(InputError, match="blocks=9"):
        discover("demo", "synthetic-objects:2", blocks=9, device="cpu")
    with pytest.raises(InputError, match="compare="):
        discover("demo", "synthetic-objects:2", compare=["registers"])
    with pytest.raises(InputError, match="synthetic-objects:N"):
        load_box_data("synthetic-objects:0", img_size=32)
