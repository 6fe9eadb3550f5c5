"""The norms core through the Python API: planted outliers are found exactly, clean models stay clean."""

from __future__ import annotations

import json

import pytest
import torch

from artifactscan import scan
from artifactscan.models.loading import wrap_module
from artifactscan.core.errors import ArtifactScanError
from artifactscan.analysis.scan import ScanReport
from artifactscan.core.stats import NormStatistics

from .conftest import tiny_vit

PLANTED = [5, 10]  # patch indices on the 4x4 grid


def _planted_model(**overrides):
    model = tiny_vit(**overrides)
    prefix = model.num_prefix_tokens
    with torch.no_grad():
        for p in PLANTED:
            # timm adds pos_embed to patch tokens only when it has no prefix rows (no_embed_class for reg models).
            offset = 0 if model.no_embed_class else prefix
            model.pos_embed[0, offset + p] += 60.0
    return model


@pytest.mark.parametrize("overrides", [
    {},                                                                   # CLS
    {"reg_tokens": 4},                                                    # CLS + 4 registers
    {"class_token": False, "reg_tokens": 2, "global_pool": "avg"},        # *_reg*_gap layout: registers, no CLS
    {"class_token": False, "global_pool": "avg"},                         # no prefix tokens at all
])
def test_planted_patches_are_exactly_the_flagged_ones(overrides):
    model = _planted_model(**overrides)
    report = scan(wrap_module(model), torch.rand(24, 3, 32, 32))
    # gap models normalise after pooling (model.norm is Identity): their final row is the last block's tokens.
    final_is_identity = isinstance(model.norm, torch.nn.Identity)
    blocks = [lay for lay in report.layers if final_is_identity or not lay.is_final_norm]
    assert report.onset_layer == 0
    for lay in blocks:
        assert lay.num_outliers == 24 * len(PLANTED)
        assert lay.images_with_outliers == 24
        assert lay.outlier_fraction == pytest.approx(len(PLANTED) / 16)
    flagged = {(o.layer, o.image_index, o.row * 4 + o.col) for o in report.outliers}
    expected = {(lay.index, i, p) for lay in blocks for i in range(24) for p in PLANTED}
    assert flagged == expected
    assert report.model.num_prefix_tokens == model.num_prefix_tokens
    assert report.outlier_records_complete


def test_unimodal_model_has_no_outliers():
    report = scan(wrap_module(tiny_vit()), torch.rand(32, 3, 32, 32))
    assert report.onset_layer is None
    assert all(lay.num_outliers == 0 and lay.threshold is None for lay in report.layers)
    assert report.layers[0].threshold_reason.startswith("no outliers")
    assert "No high-norm outlier" in report.headline


def test_huge_prefix_tokens_are_not_counted_as_patches():
    model = tiny_vit(reg_tokens=2)
    with torch.no_grad():
        model.cls_token.fill_(300.0)
        model.reg_token.fill_(500.0)
    report = scan(wrap_module(model), torch.rand(16, 3, 32, 32))
    assert report.onset_layer is None
    last = report.last_block
    names = [p.name for p in last.prefix]
    assert names == ["cls", "reg0", "reg1"]
    assert min(p.mean for p in last.prefix) > 50 * last.median
    assert last.max < 10 * last.median  # patch statistics untouched by prefix norms


def test_fixed_threshold_and_paper_fraction():
    model = _planted_model()
    report = scan(wrap_module(model), torch.rand(8, 3, 32, 32), threshold=150)
    assert report.threshold_mode == "fixed"
    for lay in report.layers:
        above = [o for o in report.outliers if o.layer == lay.index]
        assert lay.num_outliers == len(above)
        assert all(o.norm > 150 for o in above)
        assert lay.fraction_above_150 == pytest.approx(lay.outlier_fraction)


def test_batch_size_does_not_change_the_report():
    model = wrap_module(_planted_model())
    x = torch.rand(20, 3, 32, 32)
    a, b = scan(model, x, batch_size=3), scan(model, x, batch_size=20)
    for la, lb in zip(a.layers, b.layers):
        assert (la.median, la.p99, la.num_outliers) == pytest.approx((lb.median, lb.p99, lb.num_outliers), rel=1e-5)
        assert la.threshold == lb.threshold  # the auto threshold sits on a histogram bin edge: identical
    assert [(o.image_index, o.layer, o.row, o.col) for o in a.outliers] == \
           [(o.image_index, o.layer, o.row, o.col) for o in b.outliers]


def test_late_outliers_trigger_exact_second_pass():
    """Outliers only in the last images: records must still be complete and equal the histogram counts."""
    model = tiny_vit()
    x = torch.rand(40, 3, 32, 32)

    class LateArtifacts(torch.nn.Module):
        def __init__(self, block):
            super().__init__()
            self.block, self.calls = block, 0

        def forward(self, t):
            out = self.block(t)
            out = out.clone()
            out[-3:, 3] *= 40  # the last three images of the batch get a huge token 3 (patch 2): >= 5 in all
            return out

    model.blocks[1] = LateArtifacts(model.blocks[1])
    report = scan(wrap_module(model), x, batch_size=20)
    lay = report.layers[1]
    assert lay.num_outliers == len([o for o in report.outliers if o.layer == 1]) == 6


def test_json_round_trip_and_schema():
    report = scan(wrap_module(_planted_model()), torch.rand(6, 3, 32, 32))
    data = json.loads(report.to_json())
    assert data["schema"] == "artifactscan.scan/5"
    assert data["model"]["weights"] is None and data["model"]["inferred"] is None
    for key in ("index", "median", "p99", "max", "threshold", "outlier_fraction", "images_with_outliers", "prefix"):
        assert key in data["layers"][0]
    assert set(data["outliers"][0]) >= {"image", "layer", "row", "col", "norm"}
    again = ScanReport.from_dict(data)
    assert again.to_json() == report.to_json()
    assert isinstance(again.layers[0].prefix[0].mean, float)
    old = {**data, "schema": "artifactscan.scan/2",
           "model": {k: v for k, v in data["model"].items() if k not in ("weights", "layout", "inferred")}}
    assert ScanReport.from_dict(old).model.weights is None  # /2 reports have no weights/layout/inferred keys


def test_statistics_merge_equals_single_stream():
    norms = torch.rand(3, 10, 17) * 50
    whole = NormStatistics(3, ["cls"])
    whole.update(norms)
    parts = [NormStatistics(3, ["cls"]) for _ in range(2)]
    parts[0].update(norms[:, :4])
    parts[1].update(norms[:, 4:])
    parts[0].merge(parts[1])
    for name, tensor in whole.tensors().items():
        merged = parts[0].tensors()[name]
        if tensor.is_floating_point() and name.endswith(("sum", "sumsq")):
            # float64 sums taken in another grouping: equal up to float64 rounding, not bit for bit
            torch.testing.assert_close(merged, tensor, rtol=1e-12, atol=0, msg=name)
        else:
            assert torch.equal(tensor, merged), name  # counts add and maxima take the max: exact
    assert parts[0].num_images == 10


def test_memory_state_does_not_grow_with_images():
    stats = NormStatistics(4, ["cls"])
    sizes = []
    for _ in range(3):
        stats.update(torch.rand(4, 64, 50))
        sizes.append(sum(t.numel() for t in stats.tensors().values()))
    assert sizes[0] == sizes[-1]


def test_image_folder_with_grayscale_and_non_square(image_dir):
    report = scan(wrap_module(tiny_vit()), image_dir)
    assert report.images.num_scanned == 8 and report.images.num_found == 8
    assert report.maps and len(report.maps[0].norms) == 4


def test_corrupt_image_is_skipped_and_counted(image_dir):
    (image_dir / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    warnings = []
    report = scan(wrap_module(tiny_vit()), image_dir, warn=warnings.append)
    assert report.images.num_scanned == 8 and report.images.num_found == 9
    assert [s.path.endswith("broken.jpg") for s in report.images.skipped] == [True]
    assert "broken.jpg" in warnings[0]
    assert "1 unreadable" in report.headline


def test_eva_family_is_supported():
    import timm

    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=28, embed_dim=32, depth=2,
                              num_heads=2, num_classes=0)
    report = scan(wrap_module(model), torch.rand(4, 3, 28, 28))
    assert report.model.num_cls_tokens == 1 and report.model.grid_size == [2, 2]


@pytest.mark.parametrize("arch, prefix, cls, regs", [
    ("vit_small_patch14_reg4_dinov2", 5, 1, 4),     # DINOv2 with registers (LayerScale, no_embed_class)
    ("vit_small_patch14_dinov2", 1, 1, 0),
    ("vit_base_patch16_clip_224", 1, 1, 0),         # CLIP image tower (pre-norm)
    ("vit_base_patch16_siglip_224", 0, 0, 0),       # SigLIP: no CLS, attention-pool head
    ("deit3_small_patch16_224", 1, 1, 0),
    ("vit_base_patch16_reg4_gap_256", 4, 0, 4),     # registers, no CLS
])
def test_real_vit_layouts_split_prefix_tokens_by_their_own_counts(arch, prefix, cls, regs):
    import timm

    patch = 14 if "patch14" in arch else 16
    model = timm.create_model(arch, pretrained=False, img_size=2 * patch, embed_dim=32, depth=2, num_heads=2,
                              num_classes=0)
    report = scan(wrap_module(model, name=arch), torch.rand(3, 3, 2 * patch, 2 * patch))
    m = report.model
    assert (m.num_prefix_tokens, m.num_cls_tokens, m.num_register_tokens) == (prefix, cls, regs)
    assert m.grid_size == [2, 2] and len(report.layers[0].prefix) == prefix


def test_separation_is_written_under_its_old_key_too_and_read_from_either():
    """layers[].separation was layers[].bimodality before 0.3: both keys, same value, for one version."""
    report = scan(wrap_module(_planted_model()), torch.rand(6, 3, 32, 32))
    data = json.loads(report.to_json())
    assert all(lay["separation"] == lay["bimodality"] for lay in data["layers"])
    assert any(lay["separation"] for lay in data["layers"])  # the planted token's layers have a group
    assert ScanReport.from_dict(data).to_dict() == report.to_dict()
    assert report.layers[1].bimodality is report.layers[1].separation  # the Python name of 0.2 still reads


def test_reads_a_version_1_report_and_refuses_an_unknown_schema():
    """Readers accept the previous schema (the mixture rule's bimodality keys) and name the unknown one."""
    data = json.loads(scan(wrap_module(_planted_model()), torch.rand(6, 3, 32, 32)).to_json())
    data["schema"] = "artifactscan.scan/1"
    for layer in data["layers"]:
        del layer["separation"]  # its name before 0.3 is the only one a /1 file has
        layer["bimodality"] = {"lower_median": 1.0, "upper_median": 20.0, "ashman_d": 9.0}
    assert ScanReport.from_dict(data).layers[0].separation["ashman_d"] == 9.0
    data["schema"] = "artifactscan.scan/9"
    with pytest.raises(ArtifactScanError, match="scan/9"):
        ScanReport.from_dict(data)
