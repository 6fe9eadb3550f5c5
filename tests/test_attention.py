"""`artifactscan attention`: captured probabilities are the real softmax, fused flags are restored, only the asked
blocks lose the fused kernel, CLS-less models name their query, a planted high-norm token that attracts attention
shows mass >> its share, the mass accounting is exact, the CLI, and one clear line per bad input."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from artifactscan.analysis.attention import AttentionCapture
from artifactscan.analysis.attention_maps import attention_report, parse_query_patch
from artifactscan.core.blocks import parse_blocks
from artifactscan.cli import app
from artifactscan.core.errors import InputError, NotAViTError
from artifactscan.models.loading import wrap_module
from artifactscan.inputs.sources import make_image_source
from artifactscan.analysis.scan import scan

from .conftest import TINY, tiny_vit

runner = CliRunner()
ARGS = ["--arch", "vit_small_patch16_224", "--arch-kwargs", json.dumps(TINY)]
PLANTED = 5  # flat patch index (row 1, col 1 on the 4x4 grid)


def _images(n: int = 6) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _normalised(loaded, images: torch.Tensor) -> torch.Tensor:
    ds = make_image_source(images, loaded).dataset
    return torch.stack([ds[i][0] for i in range(len(ds))])


def planted_vit(**overrides) -> nn.Module:
    """A tiny ViT with one patch token made huge (a large pos_embed row) and blocks 1-2 wired so that every query
    attends to it: q = const, k = const * <u, LN(x)> with u the planted direction."""
    m = tiny_vit(**overrides)
    D = TINY["embed_dim"]
    P = m.num_prefix_tokens
    g = torch.Generator().manual_seed(3)
    w = torch.randn(D, generator=g)
    w = (w - w.mean()) / w.std()  # LayerNorm maps big * w back to ~w
    u = w / w.norm()
    with torch.no_grad():
        m.pos_embed[0, (P if not getattr(m, "no_embed_class", False) else 0) + PLANTED] += 50.0 * w
        for b in (1, 2):
            qkv = m.blocks[b].attn.qkv
            qkv.weight[:D].zero_()
            qkv.bias[:D].fill_(1.0)
            qkv.weight[D:2 * D] = torch.outer(torch.ones(D), u)
            qkv.bias[D:2 * D].zero_()
    return m


def _manual_probs(block: nn.Module, x_in: torch.Tensor) -> torch.Tensor:
    attn = block.attn
    h = block.norm1(x_in)
    B, T, C = h.shape
    qkv = attn.qkv(h).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    return torch.softmax((q * attn.scale) @ k.transpose(-2, -1), dim=-1)


# ----------------------------------------------------------------------------------------------- capture
def test_captured_probabilities_equal_manual_softmax():
    loaded = wrap_module(tiny_vit())
    x = _normalised(loaded, _images(3))
    inputs = {}
    handle = loaded.blocks[1].register_forward_pre_hook(lambda mod, args: inputs.__setitem__("x", args[0]))
    seen = {}
    try:
        with torch.no_grad(), AttentionCapture(loaded, [1]) as cap:
            loaded.model.forward_features(x)
        with torch.no_grad(), AttentionCapture(loaded, [1], on_probs=lambda b, p: seen.__setitem__(b, p.clone())):
            loaded.model.forward_features(x)
        with torch.no_grad():
            expected = _manual_probs(loaded.blocks[1], inputs["x"])
    finally:
        handle.remove()
    assert cap.probs[1].shape == (3, TINY["num_heads"], 17, 17)
    torch.testing.assert_close(cap.probs[1], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen[1], expected, rtol=1e-5, atol=1e-6)
    assert list(seen) == [1]


def _record_fused(loaded):
    """Pre-hooks that record each block's fused_attn flag at the moment it runs."""
    log: list[tuple[int, bool]] = []
    handles = [blk.register_forward_pre_hook(lambda mod, args, b=b: log.append((b, bool(mod.attn.fused_attn))))
               for b, blk in enumerate(loaded.blocks)]
    return log, handles


def test_capturing_attention_leaves_the_forward_as_it_is_and_flags_restored():
    """The capture layer reads the kernel's q/k: a captured block still runs fused, an unfused block runs fused only
    while captured (the same attention), and every flag comes back."""
    loaded = wrap_module(tiny_vit())
    flags = [True, False, True]
    for blk, f in zip(loaded.blocks, flags):
        blk.attn.fused_attn = f
    log, handles = _record_fused(loaded)
    try:
        rep = attention_report(loaded, _images(4), blocks="1", device="cpu", maps=1, threshold=100)
    finally:
        for h in handles:
            h.remove()
    assert rep.blocks == [1]
    assert {b for b, fused in log if fused} == {0, 1, 2} and {b for b, fused in log if not fused} == {1}
    assert [blk.attn.fused_attn for blk in loaded.blocks] == flags
    assert torch.nn.functional.scaled_dot_product_attention.__name__ == "scaled_dot_product_attention"


def test_fused_flags_restored_after_an_exception():
    loaded = wrap_module(tiny_vit())
    flags = [True, False, True]
    for blk, f in zip(loaded.blocks, flags):
        blk.attn.fused_attn = f

    def boom(mod, args):
        if loaded.blocks[1].attn.fused_attn and loaded.blocks[1].attn._forward_pre_hooks:  # the attention pass
            raise RuntimeError("boom")

    handle = loaded.blocks[2].register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            attention_report(loaded, _images(2), blocks=[0, 1], device="cpu", threshold=100)
    finally:
        handle.remove()
    assert [blk.attn.fused_attn for blk in loaded.blocks] == flags
    assert not any(blk.attn._forward_hooks or blk.attn._forward_pre_hooks for blk in loaded.blocks)
    with pytest.raises(ValueError):
        with AttentionCapture(loaded, [0, 1]):
            raise ValueError("inside")
    assert [blk.attn.fused_attn for blk in loaded.blocks] == flags


# ----------------------------------------------------------------------------------------------- maps and mass
def test_maps_and_mass_accounting_are_exact():
    loaded = wrap_module(planted_vit())
    images = _images(5)
    rep = attention_report(loaded, images, threshold=100, device="cpu", maps=2, batch_size=2, query_patch="2,3",
                           heads="all")
    sr = scan(loaded, images, threshold=100, device="cpu")
    masks = torch.zeros(5, 4, 16, dtype=torch.bool)
    for o in sr.outliers:
        masks[o.image_index, o.layer, o.row * 4 + o.col] = True
    with torch.no_grad(), AttentionCapture(loaded) as cap:
        loaded.model.forward_features(_normalised(loaded, images))
    assert rep.blocks == [0, 1, 2] and rep.query.name == "cls"
    assert rep.layers[0].outlier_row is None and rep.layers[0].query.outliers is None
    for b in (1, 2):
        lay = rep.layers[b]
        probs = cap.probs[b]  # [5, H, 17, 17]
        mask = masks[:, b - 1].float()
        cls = probs[:, :, 0, :].mean(1)
        pq = probs[:, :, 1:, :].mean(2).mean(1)
        assert lay.outlier_row == b - 1
        assert lay.outlier_fraction == pytest.approx(float(mask.mean()))
        assert lay.query.outliers == pytest.approx(float((cls[:, 1:] * mask).sum(-1).mean()), rel=1e-5)
        assert lay.query.prefix["cls"] == pytest.approx(float(cls[:, 0].mean()), rel=1e-5)
        assert lay.query.patches == pytest.approx(float(cls[:, 1:].sum(-1).mean()), rel=1e-5)
        assert lay.patch_queries.outliers == pytest.approx(float((pq[:, 1:] * mask).sum(-1).mean()), rel=1e-5)
        expected_spike = float((cls[:, 1:] * mask).sum() / cls[:, 1:].sum()) / float(mask.mean())
        assert lay.query.spike == pytest.approx(expected_spike, rel=1e-5)
        per_head = (probs[:, :, 0, 1:] * mask[:, None]).sum(-1).mean(0)
        assert lay.query_outlier_mass_per_head == pytest.approx(per_head.tolist(), rel=1e-5)
    # Maps: first two images, CLS + the query patch, one map per head per block, exactly the probabilities.
    assert sorted({(m.image_index, m.query) for m in rep.maps}) == [
        (0, "cls"), (0, "patch(2,3)"), (1, "cls"), (1, "patch(2,3)")]
    cls0 = rep.maps_for()[0]
    got = torch.tensor(cls0.maps)  # [L, H, 4, 4]
    torch.testing.assert_close(got[2], cap.probs[2][0, :, 0, 1:].reshape(-1, 4, 4), rtol=1e-5, atol=1e-7)
    patch1 = [m for m in rep.maps if m.image_index == 1 and m.query.startswith("patch")][0]
    torch.testing.assert_close(torch.tensor(patch1.maps)[1],
                               cap.probs[1][1, :, 1 + 2 * 4 + 3, 1:].reshape(-1, 4, 4), rtol=1e-5, atol=1e-7)
    assert torch.tensor(cls0.flagged)[2].flatten().tolist() == masks[0, 1].tolist()


def test_planted_high_norm_token_draws_a_spike():
    rep = attention_report(wrap_module(planted_vit()), _images(6), threshold=100, device="cpu", maps=1)
    for lay in rep.layers[1:]:
        assert lay.outlier_fraction == pytest.approx(1 / 16)  # the planted token, in every image
        assert lay.images_with_outliers == 6
        assert lay.query.outliers > 0.5 and lay.patch_queries.outliers > 0.5  # mass >> fraction
        assert lay.query.spike > 8 and lay.patch_queries.spike > 8
    assert "Block" in rep.headline and "attention spike" in rep.headline
    json.loads(rep.to_json())  # serialisable


def test_mean_heads_maps_are_one_per_block_and_memory_bounded():
    rep = attention_report(wrap_module(tiny_vit()), _images(7), blocks="-1", device="cpu", maps=3, batch_size=2,
                           threshold=100)
    assert rep.blocks == [2]
    assert len(rep.maps) == 3 and all(len(m.maps) == 1 and len(m.maps[0]) == 1 for m in rep.maps)
    assert rep.layers[0].num_images == 7


# ----------------------------------------------------------------------------------------------- CLS-less models
def test_clsless_model_uses_first_register_and_says_so():
    m = planted_vit(class_token=False, reg_tokens=4, global_pool="avg")
    rep = attention_report(wrap_module(m), _images(3), threshold=100, device="cpu", maps=1)
    assert rep.query.name == "reg0" and rep.query.kind == "register" and rep.query.token_index == 0
    assert "no CLS" in rep.query.reason
    assert sorted({m.query for m in rep.maps}) == ["reg0", "reg1", "reg2", "reg3"]
    assert set(rep.layers[2].query.prefix) == {"reg0", "reg1", "reg2", "reg3"}
    assert rep.layers[2].query.spike > 8
    with pytest.raises(InputError, match="not a token of this model"):
        attention_report(wrap_module(m), _images(1), query="cls", device="cpu")


def test_model_without_prefix_tokens_uses_the_mean_query():
    m = tiny_vit(class_token=False, global_pool="avg")
    loaded = wrap_module(m)
    rep = attention_report(loaded, _images(3), device="cpu", maps=1, blocks="2", threshold=100)
    assert rep.query.name == "mean" and rep.query.token_index is None and "mean" in rep.query.reason
    lay = rep.layers[0]
    assert lay.query.prefix == {} and lay.query.patches == pytest.approx(1.0)
    with torch.no_grad(), AttentionCapture(loaded, [2]) as cap:
        loaded.model.forward_features(_normalised(loaded, _images(3)))
    expected = cap.probs[2][0].mean(0).mean(0).reshape(4, 4)  # heads, then all (patch) queries
    torch.testing.assert_close(torch.tensor(rep.maps[0].maps[0][0]), expected, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_one_clear_error():
    loaded = wrap_module(tiny_vit())
    with pytest.raises(InputError, match=r"out of range.*valid are 0\.\.2"):
        parse_blocks("3", 3)
    with pytest.raises(InputError, match="not a block index"):
        parse_blocks("1,x", 3)
    assert parse_blocks("-1,0,0", 3) == [0, 2]
    with pytest.raises(InputError, match="off the grid"):
        parse_query_patch("4,0", (4, 4))
    with pytest.raises(InputError, match="ROW,COL"):
        parse_query_patch("1", (4, 4))
    with pytest.raises(InputError, match="ROW,COL"):
        parse_query_patch("a,b", (4, 4))
    with pytest.raises(InputError, match="heads="):
        attention_report(loaded, _images(1), heads="some", device="cpu")
    broken = tiny_vit()
    broken.blocks[1].attn = nn.Identity()
    with pytest.raises(NotAViTError, match=r"blocks\.1\.attn\.pattern is not available"):
        attention_report(wrap_module(broken), _images(1), device="cpu")


# ----------------------------------------------------------------------------------------------- CLI
def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_cli_json_and_out(tiny_ckpt, image_dir, tmp_path):
    result = invoke("attention", tiny_ckpt, image_dir, *ARGS, "--json", "--maps", "2", "--blocks", "1,-1",
                    "--threshold", "150")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["schema"] == "artifactscan.attention/3" and data["blocks"] == [1, 2]
    assert data["query"]["name"] == "cls" and len(data["maps"]) == 2 and data["images"]["num_scanned"] == 8

    out = tmp_path / "attn"
    result = invoke("attention", tiny_ckpt, image_dir, *ARGS, "--out", out, "--maps", "1", "--heads", "all", "-t", "150",
                    "--query-patch", "1,2")
    assert result.exit_code == 0, result.output
    assert "query: cls" in result.output and "wrote" in result.output
    assert json.loads((out / "attention.json").read_text())["heads"] == "all"
    for name in ("attention_mass.png", "attention_maps/img0.png", "attention_maps/img0_patch.png",
                 "attention_heads/img0.png"):
        assert (out / name).stat().st_size > 1000, name


@pytest.mark.parametrize("extra, message", [
    (["--blocks", "5"], "valid are 0..2"),
    (["--query-patch", "9,9"], "off the grid"),
    (["--query-patch", "oops"], "ROW,COL"),
    (["--query", "reg2"], "not a token of this model"),
])
def test_cli_bad_input_is_one_line(tiny_ckpt, image_dir, extra, message):
    result = invoke("attention", tiny_ckpt, image_dir, *ARGS, *extra)
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
