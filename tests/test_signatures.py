"""``artifactscan signatures``: each signature recovered from a plant (or a known answer), on tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from typer.testing import CliRunner

from artifactscan.analysis.signatures import NO_BOXES, SignaturesReport, _PassState, signatures
from artifactscan.analysis.signatures_stats import (PositionShare, activation_slope, defect_directions,
                                                    hit_null_interval, linearisation_problem,
                                                    patch_centres_in_boxes, random_cos_quantile)
from artifactscan.core.errors import InputError
from artifactscan.models.hooks import capture


def tiny_vit(depth: int = 2, seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=depth, num_heads=2).eval()


def test_position_share_known_answer():
    """Tokens = a position vector (between variance 1) + noise (variance 1): share -> 1/2 plus ~1/n; shuffled ~1/n."""
    gen = torch.Generator().manual_seed(0)
    N, D, n = 16, 32, 400
    centres = torch.randn(N, D, generator=gen)
    centres = (centres - centres.mean(0)) / ((centres - centres.mean(0)) ** 2).sum(1).mean().sqrt()
    acc = PositionShare(N, D)
    for _ in range(n // 50):
        acc.update(centres + torch.randn(50, N, D, generator=gen) / D ** 0.5)
    assert acc.share == pytest.approx(0.5, abs=0.02)
    assert acc.shuffled_share == pytest.approx(1 / n, abs=0.004)


def test_position_share_recovers_planted_position_embedding_order():
    """A plain weight edit: the position embedding scaled by 0 / 1 / 4 orders the share, and 0 sits on its null."""
    model = tiny_vit()
    images = torch.randn(96, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    base = model.pos_embed.detach().clone()
    base.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    shares, nulls = [], []
    for scale in (0.0, 1.0, 4.0):
        with torch.no_grad():
            model.pos_embed.copy_(base * scale)
        acc = PositionShare(16, 64)
        with capture(model, {"blocks.0.resid_pre": lambda x: acc.update(x[:, 1:])}) as cap, torch.no_grad():
            cap.forward(images)
        shares.append(acc.share)
        nulls.append(acc.shuffled_share)
    assert shares[0] < shares[1] < shares[2]
    assert shares[0] == pytest.approx(nulls[0], abs=0.02)  # nothing planted: the share is its own null's size
    assert shares[2] > 3 * nulls[2]


def test_rank_one_amplifier_direction_recovered():
    """A rank-1 amplifier planted in block 1's attention (W_proj = 50 u u^T, W_v = I) is the defect direction from
    block 1 on, and its singular value beats a random matrix's."""
    model = tiny_vit(depth=4)
    D = 64
    u = torch.randn(D, generator=torch.Generator().manual_seed(3))
    u = u - u.mean()  # LayerNorm's centring would remove a mean component
    u = u / u.norm()
    with torch.no_grad():
        model.blocks[1].attn.qkv.weight[2 * D:] = torch.eye(D)
        model.blocks[1].attn.proj.weight.copy_(50 * torch.outer(u, u))
    assert linearisation_problem(list(model.blocks)) is None
    found = defect_directions(list(model.blocks))
    for d in found[1:]:
        assert abs(float(d.direction.double() @ u.double())) >= 0.9
        assert d.singular_value > 3 * d.random_singular_value


def test_activation_slope_known_answers():
    assert activation_slope(torch.nn.Identity()) == pytest.approx(1.0, abs=1e-6)
    assert activation_slope(torch.nn.ReLU()) == pytest.approx(0.5, abs=1e-3)  # E[z relu(z)] = 1/2
    # GELU: E[z * z Phi(z)] = E[z^2] / 2 by symmetry (z^2 Phi(z) + z^2 Phi(-z) = z^2); tanh: odd, slope E[z tanh z]
    assert activation_slope(torch.nn.GELU()) == pytest.approx(0.5, abs=1e-4)
    z = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert activation_slope(torch.nn.Tanh()) == pytest.approx(float((z * torch.tanh(z)).mean()), abs=3e-3)


def test_random_cos_quantile_matches_the_normal_approximation():
    assert random_cos_quantile(384) == pytest.approx(2.5758 / 384 ** 0.5, rel=0.05)


def test_unsupported_block_is_named():
    class Gated(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1_g = torch.nn.Linear(4, 4)

    model = tiny_vit()
    model.blocks[1].mlp = Gated()
    assert "block 1" in linearisation_problem(list(model.blocks))


def test_hit_ratio_and_chance_on_hand_made_boxes():
    """A 4x4 grid on a 32 px image: the box [0, 0, 16, 16] holds the top-left 2x2 patch centres (4 of 16)."""
    inside = patch_centres_in_boxes([[0, 0, 16, 16]], (4, 4), (32, 32))
    assert inside.reshape(4, 4)[:2, :2].all() and int(inside.sum()) == 4
    assert int(patch_centres_in_boxes([[0, 0, 3, 3]], (4, 4), (32, 32)).sum()) == 0  # centre (4, 4) outside

    class Loaded:  # the facts _PassState reads
        num_prefix_tokens, grid_size, num_cls_tokens = 1, (4, 4), 1

    state = _PassState(Loaded(), [[[0, 0, 16, 16]], [[16, 16, 32, 32]]])
    state.inside = [patch_centres_in_boxes(b, (4, 4), (32, 32)) for b in state.boxes]
    x = torch.randn(2, 17, 8, generator=torch.Generator().manual_seed(0))
    x[0, 0] = x[0, 1 + 0]  # image 0: CLS equals patch 0 (inside its box)
    x[1, 0] = x[1, 1 + 3]  # image 1: CLS equals patch 3 (top right: outside its bottom-right box)
    state.batch_indices = [0, 1]
    state.top_patch(5, x, None)
    assert state.hits[5][:2] == [1, 2]
    lo, hi = hit_null_interval([0.1, 0.2], 100)
    assert lo < 0.1 and hi > 0.2 and 0 <= lo and hi <= 1


@pytest.fixture(scope="module")
def phantom_result() -> SignaturesReport:
    return signatures("phantom", "synthetic-objects:24", null_seeds=1, device="cpu")


def test_register_units_found_on_the_phantoms_units(phantom_result):
    block2 = phantom_result.blocks[2]
    assert block2.num_flagged > 0
    assert block2.units[0].point == "blocks.2.artifact_units.post"
    calls = {c.signature: c for c in phantom_result.verdict}
    assert calls["high norm"].present and calls["register neurons"].present
    # the phantom's artifact units are outside what the linearisation models: said, not guessed
    assert calls["weights-only defect direction"].present is None and "artifact_units" in phantom_result.defect_note


def test_result_round_trips_and_carries_every_null(phantom_result):
    data = json.loads(json.dumps(phantom_result.to_dict()))
    back = SignaturesReport.from_dict(data)
    assert back.schema == "artifactscan.signatures/1" and back.headline == phantom_result.headline
    for row in phantom_result.blocks:
        assert row.position_null > 0 and len(row.null_hit_ratios) == 1 and row.null_interval is not None
    assert 0.1 < phantom_result.chance_hit_ratio < 0.6


def test_no_boxes_and_bad_input():
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    result = signatures("demo", images, null_seeds=1, device="cpu")
    assert result.chance_hit_ratio is None and result.boxes_note.startswith(NO_BOXES)
    assert all(r.hit_ratio is None and r.top_patch_flagged_share is not None for r in result.blocks)
    assert {c.signature: c for c in result.verdict}["lazy aggregation"].present is None
    with pytest.raises(InputError, match="null_seeds"):
        signatures("demo", images, null_seeds=0, device="cpu")


def test_cli_json_and_figure(tmp_path):
    from artifactscan.cli import app

    res = CliRunner().invoke(app, ["signatures", "phantom", "synthetic-objects:8", "--null-seeds", "1", "--device",
                                   "cpu", "--json", "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["schema"] == "artifactscan.signatures/1"
    assert (tmp_path / "out" / "signatures.png").stat().st_size > 0
