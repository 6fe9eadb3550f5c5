"""Shift consistency (PH-Reg) in ``artifactscan signatures``: a known answer on a ViT that is shift-equivariant by
construction, a planted position-tied artifact, the view geometry against pixels, and bad input."""

from __future__ import annotations

import json
import types

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from typer.testing import CliRunner

from artifactscan.analysis.signatures import SignaturesReport, signatures
from artifactscan.analysis.signatures_shift import (ShiftView, apply_view, candidate_views, cell_map,
                                                    median_null_quantile, shift_call, shift_consistency,
                                                    shift_residuals, view_plan)
from artifactscan.core.errors import InputError
from artifactscan.models.loading import load_model


def _attend_to_self_only(attn: torch.nn.Module) -> None:
    """Each token attends to itself alone: the attention's output is its own projected value (no token mixing)."""
    def forward(self, x, *args, **kwargs):
        D = x.shape[-1]
        return self.proj(self.qkv(x)[..., 2 * D:])

    attn.forward = types.MethodType(forward, attn)


@pytest.fixture()
def equivariant_vit():
    """No position embedding and no token mixing: every patch's feature is a function of its own pixels only."""
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=2).eval()
    for block in model.blocks:
        _attend_to_self_only(block.attn)
    with torch.no_grad():
        model.pos_embed.zero_()
    return load_model(model)


IMAGES = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(1))
FLAGGED = {b: {0: {5}, 3: {1, 2}} for b in range(3)}


def test_shifts_only_give_zero_on_an_equivariant_vit_and_a_planted_position_embedding_does_not(equivariant_vit):
    plan = view_plan((4, 4), 8, flips=False)  # every shift of one patch: all 8 neighbours
    assert not any(v.flip for v in plan)
    for s in shift_consistency(equivariant_vit, [(IMAGES, list(range(10)))], FLAGGED, plan, batch_size=18):
        assert s.num_normal + s.num_flagged == 160  # every cell has a counterpart in some view
        assert abs(s.median_normal) < 1e-5 and abs(s.median_flagged) < 1e-5 and s.share_above_normal == 0
    with torch.no_grad():
        equivariant_vit.model.pos_embed.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    for s in shift_consistency(equivariant_vit, [(IMAGES, list(range(10)))], FLAGGED, plan, batch_size=18):
        assert s.median_normal > 0.05  # measured 0.29
    # a flip changes a patch's own pixels, so flipped views are not a known zero: they must read above it
    with torch.no_grad():
        equivariant_vit.model.pos_embed.zero_()
    flipped = shift_consistency(equivariant_vit, [(IMAGES, list(range(10)))], FLAGGED, [ShiftView(0, 0, True)], 4)
    assert flipped[0].median_normal > 0.01


def test_a_position_tied_artifact_is_called_shift_inconsistent(equivariant_vit):
    """A large vector planted at one grid cell's position embedding, and that cell flagged in every image: the
    flagged patches disagree with their shifted views, the rest do not (beyond the null)."""
    with torch.no_grad():
        equivariant_vit.model.pos_embed[0, 1 + 5] = 20 * torch.randn(64, generator=torch.Generator().manual_seed(3))
    flagged = {b: {i: {5} for i in range(10)} for b in range(3)}
    summaries = shift_consistency(equivariant_vit, [(IMAGES, list(range(10)))], flagged, view_plan((4, 4), 6), 14)
    for s in summaries:
        assert s.num_flagged == 10 and s.median_flagged > s.flagged_null_99 > s.median_normal
        assert s.share_above_flagged > s.share_above_normal
    present, rule, evidence = shift_call(summaries, 10)
    assert present and "99%" in rule and "blocks [0, 1, 2]" in evidence
    assert shift_call([None, None], 4)[0] is None  # nothing flagged: not measurable, not absent


def test_cell_map_matches_the_pixels_apply_view_moves():
    """Each patch painted with its own index: after a view, the cell ``cell_map`` names holds that index."""
    grid, patch = (3, 4), (2, 2)
    index = torch.arange(12, dtype=torch.float32).reshape(3, 4) + 1
    image = index.repeat_interleave(2, 0).repeat_interleave(2, 1)[None, None]
    # a left-right symmetric pattern inside each patch, so a flip moves patches without changing them
    for view in candidate_views(grid):
        seen = apply_view(image, view, patch, grid)[0, 0, ::2, ::2].flatten()
        where = cell_map(view, grid)
        for cell in range(12):
            if where[cell] >= 0:
                assert seen[where[cell]] == cell + 1, (view, cell)
        assert int((seen > 0).sum()) == int((where >= 0).sum())  # every other cell came in empty


def test_a_cell_without_counterpart_has_no_residual():
    original = torch.randn(1, 2, 3)
    right = ShiftView(0, 1)  # on a 1x2 grid, cell 1's pixels leave the image
    where = cell_map(right, (1, 2))
    assert where.tolist() == [1, -1]
    residual = shift_residuals(original, [original[:, [1, 0]]], [where])
    assert residual[0, 0] == pytest.approx(0, abs=1e-6) and torch.isnan(residual[0, 1])


def test_median_null_quantile_is_near_the_median_for_many_draws_and_wide_for_few():
    values = torch.linspace(0, 1, 1001)
    assert median_null_quantile(values, 500) == pytest.approx(0.5, abs=0.06)
    assert median_null_quantile(values, 1) > 0.95  # one token's 99% quantile is the top 1%


def test_bad_views_are_one_line_errors():
    with pytest.raises(InputError, match="views=0"):
        view_plan((4, 4), 0)
    with pytest.raises(InputError, match="more than the 17 patch-aligned views a 4x4 grid allows"):
        view_plan((4, 4), 18)
    assert len(view_plan((14, 14), 97)) == 97  # 7 x 7 shifts x 2 flips, less the identity
    with pytest.raises(InputError, match="shift_images=0"):
        signatures("demo", torch.rand(2, 3, 32, 32), shift_images=0, device="cpu")
    from artifactscan.cli import app

    for views, says in (("0", "--views 0: at least 1 view"), ("50", "--views 50 is more than the 49")):
        res = CliRunner().invoke(app, ["signatures", "demo", "synthetic:4", "--views", views, "--device", "cpu"])
        assert res.exit_code == 1 and says in res.output and "Traceback" not in res.output, res.output


def test_signatures_carry_the_shift_columns_and_round_trip():
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    result = signatures("phantom", images, null_seeds=1, views=2, shift_images=4, device="cpu")
    assert result.shift_views == ["flip", "up 1"] and result.shift_images == 4
    assert all(r.shift is not None and r.shift.num_normal > 0 for r in result.blocks)
    assert "shift consistency" in {c.signature for c in result.verdict}
    back = SignaturesReport.from_dict(json.loads(result.to_json()))
    assert back.blocks[-1].shift == result.blocks[-1].shift


def test_reusing_the_scans_block_outputs_gives_the_same_residuals_as_forwarding_the_images_again(monkeypatch):
    """The unshifted images' block outputs kept from the scan's first forward (under REUSE_BYTES) give the same
    shift summaries, within float tolerance, as forwarding those images again with their views (bound 0)."""
    import artifactscan.analysis.signatures_shift as shift

    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    kwargs = dict(null_seeds=1, views=3, shift_images=5, device="cpu", batch_size=4)
    kept = signatures("phantom", images, **kwargs)
    monkeypatch.setattr(shift, "REUSE_BYTES", 0)
    again = signatures("phantom", images, **kwargs)
    assert any("were kept from the scan's first forward" in n for n in kept.notes)
    assert any("forwarded again" in n for n in again.notes)
    assert any(r.shift.num_flagged for r in kept.blocks)  # the flagged side is compared too
    for a, b in zip(kept.blocks, again.blocks):
        assert (a.shift.num_normal, a.shift.num_flagged) == (b.shift.num_normal, b.shift.num_flagged)
        for name in ("median_normal", "median_flagged", "share_above_normal", "share_above_flagged",
                     "flagged_null_99"):
            x, y = getattr(a.shift, name), getattr(b.shift, name)
            assert (x is None) == (y is None) and (x is None or x == pytest.approx(y, rel=1e-4, abs=1e-7)), name
