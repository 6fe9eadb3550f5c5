"""``signatures`` on VOC- and COCO-style data: boxes read by discover's reader, mapped through the model's own resize
and centre crop, and the hit ratio and the share of patches in boxes checked against hand-made answers.

The demo model's input is 32x32 (crop_pct 1: the short side resized to 32, then a centre crop of 32) on an 8x8 grid
of 4 px patches, whose centres sit at 2, 6, 10, ..., 30 px."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from artifactscan.analysis.signatures import NO_BOXES, signatures
from artifactscan.core.errors import InputError
from artifactscan.inputs.boxes import load_box_data
from artifactscan.inputs.sources import image_batches, make_image_source
from artifactscan.inputs.transforms import eval_transform
from artifactscan.models.hooks import block_point, capture
from artifactscan.models.loading import load_model

DEMO_CFG = {"crop_pct": 1.0, "input_size": (3, 32, 32), "interpolation": "bilinear", "mean": [0.5] * 3,
            "std": [0.5] * 3}


def grid_mask(cells: list[tuple[int, int]]) -> torch.Tensor:
    """The 8x8 row-major mask with ``(row, col)`` cells set: the answer written out by hand."""
    m = torch.zeros(8, 8, dtype=torch.bool)
    for r, c in cells:
        m[r, c] = True
    return m.flatten()


def rect(rows: range, cols: range) -> list[tuple[int, int]]:
    return [(r, c) for r in rows for c in cols]


def write_noise(path, width: int, height: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


def test_map_box_through_resize_and_centre_crop():
    """A 64x32 landscape image: resized to 64x32, cropped to x 16..48. One box inside, one cut, one cut off."""
    t = eval_transform(DEMO_CFG)
    assert t.map_box([20, 8, 36, 24], 64, 32) == [4, 8, 20, 24]
    assert t.map_box([8, 0, 24, 16], 64, 32) == [0, 0, 8, 16]  # cut by the crop's left edge: clipped
    assert t.map_box([0, 0, 10, 32], 64, 32) is None  # wholly left of the crop: dropped
    # a 128x64 file: resized by 1/2 first, then the same crop
    assert t.map_box([40, 16, 72, 48], 128, 64) == [4, 8, 20, 24]
    # crop_pct 0.5: the short side goes to 64 and the 32 px crop keeps its middle half
    half = eval_transform({**DEMO_CFG, "crop_pct": 0.5})
    assert half.map_box([0, 0, 32, 32], 64, 64) == [0, 0, 16, 16]
    assert half.map_box([0, 0, 15, 15], 64, 64) is None


def make_voc(root) -> dict[str, torch.Tensor]:
    """Two images; the patch-centre masks each should give, by hand."""
    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations").mkdir()
    write_noise(root / "JPEGImages" / "wide.png", 64, 32, 0)
    write_noise(root / "JPEGImages" / "square.png", 32, 32, 1)

    def obj(xmin, ymin, xmax, ymax):  # VOC: 1-based, inclusive
        return (f"<object><name>thing</name><bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax>"
                f"<ymax>{ymax}</ymax></bndbox></object>")

    def ann(name, w, h, objects):
        return (f"<annotation><filename>{name}</filename><size><width>{w}</width><height>{h}</height>"
                f"<depth>3</depth></size>{''.join(objects)}</annotation>")

    # wide.png, pixels [x0, x1): [20, 36) x [8, 24) -> crop [4, 20) x [8, 24); [8, 24) x [0, 16) -> [0, 8) x [0, 16);
    # [0, 10) x [0, 32) -> cut off
    (root / "Annotations" / "wide.xml").write_text(ann("wide.png", 64, 32, [obj(21, 9, 36, 24), obj(9, 1, 24, 16),
                                                                             obj(1, 1, 10, 32)]))
    (root / "Annotations" / "square.xml").write_text(ann("square.png", 32, 32, [obj(1, 1, 32, 8)]))
    return {
        # centres x in {6, 10, 14, 18} (cols 1-4) and y in {10, 14, 18, 22} (rows 2-5); x {2, 6} (cols 0-1), y 2-14
        "wide.png": grid_mask(rect(range(2, 6), range(1, 5)) + rect(range(0, 4), range(0, 2))),
        "square.png": grid_mask(rect(range(0, 2), range(8))),  # y [0, 8): rows 0 and 1
    }


def make_coco(root) -> dict[str, torch.Tensor]:
    """A COCO-style folder: annotations/instances_val.json, images in val/ (the split's folder)."""
    (root / "annotations").mkdir(parents=True)
    (root / "val").mkdir()
    write_noise(root / "val" / "tall.png", 32, 64, 2)  # cropped to y 16..48
    write_noise(root / "val" / "square.png", 32, 32, 3)
    data = {
        "images": [{"id": 1, "file_name": "tall.png", "width": 32, "height": 64},
                   {"id": 2, "file_name": "square.png", "width": 32, "height": 32}],
        "annotations": [{"id": 10, "image_id": 1, "bbox": [0, 16, 16, 16]},  # -> [0, 0, 16, 16]
                        {"id": 11, "image_id": 1, "bbox": [0, 0, 32, 8]},  # above the crop: dropped
                        {"id": 12, "image_id": 2, "bbox": [16, 16, 16, 16]}],
    }
    (root / "annotations" / "instances_val.json").write_text(json.dumps(data))
    return {"tall.png": grid_mask(rect(range(0, 4), range(0, 4))),
            "square.png": grid_mask(rect(range(4, 8), range(4, 8)))}


def hits_by_hand(paths: list[str], masks: list[torch.Tensor]) -> list[float]:
    """Per block, the share of images whose patch most similar to CLS lies in its hand-made mask: the demo model
    run directly through the capture layer on the same preprocessed images."""
    loaded = load_model("demo")
    source = make_image_source(paths, loaded)
    tops: dict[int, list[int]] = {}
    requests = {block_point(b, "resid_post"): (lambda x, b=b: tops.setdefault(b, []).extend(
        torch.nn.functional.cosine_similarity(x[:, 1:], x[:, :1], dim=-1).argmax(dim=1).tolist()))
        for b in range(len(loaded.blocks))}
    with capture(loaded, requests) as cap, torch.no_grad():
        for x, _, _ in image_batches(source, 8, 0, torch.device("cpu")):
            cap.forward(x)
    return [sum(bool(m[t]) for m, t in zip(masks, tops[b])) / len(masks) for b in sorted(tops)]


@pytest.mark.parametrize("maker", [make_voc, make_coco])
def test_hit_ratio_and_chance_on_voc_and_coco(tmp_path, maker):
    expected = maker(tmp_path / "data")
    boxed = load_box_data(tmp_path / "data", img_size=32)
    names = [it.name for it in boxed.items]
    masks = [expected[n] for n in names]
    result = signatures("demo", str(tmp_path / "data"), null_seeds=1, device="cpu", num_workers=0)
    assert result.boxes_note is None
    chance = float(torch.stack(masks).float().mean())
    assert result.chance_hit_ratio == pytest.approx(chance)
    by_hand = hits_by_hand([it.path for it in boxed.items], masks)
    assert [r.hit_ratio for r in result.blocks] == pytest.approx(by_hand)
    assert all(r.null_interval is not None for r in result.blocks)


def test_coco_folder_needs_one_annotation_file(tmp_path):
    make_coco(tmp_path)
    (tmp_path / "annotations" / "instances_train.json").write_text("{}")
    with pytest.raises(InputError, match="2 COCO annotation files"):
        load_box_data(tmp_path, img_size=32)


def test_plain_image_folder_has_no_boxes(tmp_path):
    write_noise(tmp_path / "a.png", 40, 32, 0)
    result = signatures("demo", str(tmp_path), null_seeds=1, device="cpu", num_workers=0)
    assert result.chance_hit_ratio is None and result.boxes_note == NO_BOXES


def test_null_subset_spreads_over_the_set_and_widens_the_range():
    from artifactscan.analysis.signatures import null_subset
    from artifactscan.analysis.signatures_stats import hit_null_interval

    assert null_subset(256, 64) == list(range(0, 256, 4))
    assert null_subset(10, 0) == list(range(10)) and null_subset(10, 64) == list(range(10))
    lo_all, hi_all = hit_null_interval([0.05, 0.08], 256)
    lo_few, hi_few = hit_null_interval([0.05, 0.08], 64)
    assert lo_few <= lo_all and hi_few > hi_all  # a null measured on fewer images is known less well


def test_null_runs_on_the_subset(tmp_path):
    result = signatures("demo", "synthetic-objects:12", null_seeds=2, null_images=5, device="cpu")
    assert result.null_images == 5 and len(result.blocks[0].null_hit_ratios) == 2
    assert all(r * 5 == pytest.approx(round(r * 5)) for row in result.blocks for r in row.null_hit_ratios)
    with pytest.raises(InputError, match="null_images"):
        signatures("demo", "synthetic-objects:12", null_images=-1, device="cpu")


def test_random_init_copy_is_timms_init_whatever_the_loader_did():
    """The loader builds timm ViTs with weight_init="skip"; the null must still be timm's init (trunc normal, std
    0.02), not PyTorch's default Linear init (std 1/sqrt(3 * 64) = 0.072 at width 64), and the model is untouched."""
    from artifactscan.analysis.signatures import random_init_copy

    loaded = load_model("demo")
    before = loaded.model.blocks[0].attn.qkv.weight.detach().clone()
    twin = random_init_copy(loaded, 0)
    assert float(twin.model.blocks[0].attn.qkv.weight.detach().std()) == pytest.approx(0.02, rel=0.1)
    assert torch.equal(loaded.model.blocks[0].attn.qkv.weight, before)
    again = random_init_copy(loaded, 0)
    assert torch.equal(again.model.blocks[0].attn.qkv.weight, twin.model.blocks[0].attn.qkv.weight)
