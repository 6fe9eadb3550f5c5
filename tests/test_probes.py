"""`artifactscan probe`: protocol correctness on cases whose answer is known, planted artifacts vs planted content,
early exit, labels, the too-few rule, CLI and JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from artifactscan.cli import app
from artifactscan.core.errors import InputError
from artifactscan.models.loading import PHANTOM_NOTE, wrap_module
from artifactscan.analysis.probes import (
    PROTOCOL, LayerTap, ProbeReport, fit_ridge, neighbour_similarity, patchify, probe,
)
from artifactscan.analysis.probes.probes import _local_metrics
from artifactscan.render.text import render_probe

from .conftest import TINY

runner = CliRunner()
ARGS = ["--arch", "vit_small_patch16_224", "--arch-kwargs", json.dumps(TINY)]


# ----------------------------------------------------------------------------------------------- planted models
def _store_pe(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
    module.planted_pe = output


class Planted(nn.Module):
    """Wraps a block: after it runs, overwrite ``n`` patch tokens per image.

    ``artifact``: the most redundant input patches (highest 4-neighbour cosine similarity of the patch embedding) get
    one large vector carrying an image-level summary (``scale`` x the spread of the patch tokens): no position, no
    pixels, global information. ``content``: the *least* redundant patches (object edges) are scaled by ``scale``:
    a high norm that keeps all local information.
    """

    def __init__(self, block: nn.Module, patch_embed: nn.Module, prefix: int, grid: tuple[int, int], mode: str,
                 n: int, scale: float):
        super().__init__()
        self.block = block
        self.__dict__["patch_embed_ref"] = patch_embed  # not a submodule: no duplicate parameters
        self.prefix, self.grid, self.mode, self.n, self.scale = prefix, grid, mode, n, scale

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        x = self.block(x, *args, **kwargs)
        pe = self.patch_embed_ref.planted_pe
        sims = neighbour_similarity(pe.reshape(pe.shape[0], -1, pe.shape[-1]), self.grid)
        idx = sims.topk(self.n, dim=1, largest=self.mode == "artifact").indices + self.prefix
        rows = torch.arange(x.shape[0])[:, None]
        x = x.clone()
        if self.mode == "artifact":
            t = x[:, self.prefix:]
            summary = ((t - t.mean(1, keepdim=True)) ** 2).mean(1, keepdim=True).sqrt() * self.scale
            x[rows, idx] = summary.expand(-1, self.n, -1)
        else:
            x[rows, idx] = x[rows, idx] * self.scale
        return x


def planted_vit(mode: str = "artifact", onset: int = 2, depth: int = 3, n: int = 3, scale: float = 30.0,
                seed: int = 0, **kwargs) -> nn.Module:
    """Tiny timm ViT (32 px, 4 px patches, 64 patches, dim 64) with planted high-norm tokens from block ``onset``."""
    torch.manual_seed(seed)
    m = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=4, embed_dim=64,
                          depth=depth, num_heads=2, num_classes=8, **kwargs).eval()
    with torch.no_grad():
        m.pos_embed.normal_(0, 0.5)  # tokens that carry their position
    m.patch_embed.register_forward_hook(_store_pe)
    for i in range(onset, depth):
        m.blocks[i] = Planted(m.blocks[i], m.patch_embed, m.num_prefix_tokens, tuple(m.patch_embed.grid_size),
                              mode, n, scale)
    return m


@pytest.fixture(scope="module")
def artifact_report() -> ProbeReport:
    torch.manual_seed(0)
    return probe(planted_vit("artifact", reg_tokens=2), "synthetic:240", blocks=-1, device="cpu", draws=3)


# ----------------------------------------------------------------------------------------------- protocol pieces
def test_position_probe_known_answers():
    g = torch.Generator().manual_seed(0)
    n_img, grid = 60, (4, 4)
    N = grid[0] * grid[1]
    codes = torch.randn(N, 40, generator=g) * 3

    def sample(img_ids):
        pos = torch.arange(N).repeat(len(img_ids))
        img = torch.tensor(img_ids).repeat_interleave(N)
        return pos, img

    pos_tr, img_tr = sample(range(40))
    pos_te, img_te = sample(range(40, n_img))
    pix_tr, pix_te = torch.randn(len(pos_tr), 12, generator=g), torch.randn(len(pos_te), 12, generator=g)
    mix = torch.randn(12, 40, generator=g)
    carry = {"feat": codes[pos_tr] + 0.1 * torch.randn(len(pos_tr), 40, generator=g) + pix_tr @ mix,
             "pos": pos_tr, "img": img_tr, "pix": pix_tr}
    carry_te = {"feat": codes[pos_te] + 0.1 * torch.randn(len(pos_te), 40, generator=g) + pix_te @ mix,
                "pos": pos_te, "img": img_te, "pix": pix_te}
    good = _local_metrics(carry, carry_te, grid, torch.device("cpu"), seed=0)
    assert good["position_top1"] > 0.97 and good["position_distance"] < 0.1
    assert good["reconstruction_fvu"] < 0.05  # pixels are a linear function of the tokens (plus position codes)

    noise = {**carry, "feat": torch.randn(len(pos_tr), 40, generator=g)}
    noise_te = {**carry_te, "feat": torch.randn(len(pos_te), 40, generator=g)}
    bad = _local_metrics(noise, noise_te, grid, torch.device("cpu"), seed=0)
    assert bad["position_top1"] < 3 / N  # chance is 1/16
    assert bad["reconstruction_fvu"] > 0.9
    assert bad["position_distance"] > 1.0


def test_ridge_chooses_penalty_and_regresses_exactly():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 10, generator=g)
    w = torch.randn(10, 3, generator=g)
    fit = fit_ridge(x, x @ w + 2.0, groups=torch.arange(400) // 10)
    assert torch.allclose(fit.predict(x).float(), (x @ w + 2.0), atol=1e-2)
    assert fit.alpha <= 1e-3


def test_patchify_matches_the_patch_embedding():
    m = planted_vit(depth=1, onset=1)
    x = torch.randn(2, 3, 32, 32)
    pe = m.patch_embed(x)  # [B, N, D]
    w = m.patch_embed.proj.weight.reshape(64, -1)  # D x (3*4*4), channel-major like the conv
    lin = patchify(x, (4, 4)) @ w.T + m.patch_embed.proj.bias
    assert torch.allclose(pe, lin, atol=1e-5)


def test_neighbour_similarity_finds_flat_regions():
    pe = torch.randn(1, 16, 8)
    pe[0, :8] = torch.ones(8)  # top half identical: every neighbour identical
    sims = neighbour_similarity(pe, (4, 4))[0]
    assert torch.allclose(sims[:4], torch.ones(4))  # first row: all neighbours inside the flat half
    assert sims[:4].min() > sims[12:].max()


# ----------------------------------------------------------------------------------------------- early exit
def test_early_exit_runs_only_the_needed_blocks():
    m = timm.create_model("vit_small_patch16_224", pretrained=False, **{**TINY, "depth": 4}).eval()
    loaded = wrap_module(m)
    ran: list[int] = []
    handles = [b.register_forward_pre_hook(lambda mod, inp, i=i: ran.append(i)) for i, b in enumerate(m.blocks)]
    x = torch.randn(2, 3, 32, 32)
    with LayerTap(loaded, 1) as tap:
        tokens, pe = tap.run(x)
    assert ran == [0, 1]
    ref = m.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True, output_fmt="NLC",
                                  return_prefix_tokens=True, norm=False)[0]
    patches, prefix = ref
    assert torch.allclose(tokens[:, 1:], patches) and torch.allclose(tokens[:, :1], prefix)
    for h in handles:
        h.remove()
    assert not m.blocks[1]._forward_hooks  # the tap removed its hooks


def test_layer_range_old_name_still_resolves():
    from artifactscan.probes import resolve_layer  # deprecated for one version: parse_block is the one parser

    with pytest.warns(DeprecationWarning, match="parse_block"):
        assert resolve_layer(-1, 6) == 5 and resolve_layer(0, 6) == 0 and resolve_layer(-6, 6) == 0
    with pytest.warns(DeprecationWarning), pytest.raises(InputError, match=r"valid are 0\.\.5 \(or -6\.\.-1"):
        resolve_layer(6, 6)


# ----------------------------------------------------------------------------------------------- planted verdicts
def test_planted_artifacts_are_artifact_like(artifact_report):
    r = artifact_report
    assert r.verdict.label == "artifact-like", r.verdict.reasons
    assert r.layer == 2 and r.num_outliers == 3 * 240
    out, norm, matched = r.row("outlier"), r.row("normal"), r.row("normal (n-matched)")
    assert out.local_status == "ok" and matched.local_train_tokens == out.local_train_tokens
    assert out.position_top1 < 0.3 < 0.9 < matched.position_top1
    assert out.position_distance > norm.position_distance + 1
    assert out.reconstruction_fvu > 1.5 * matched.reconstruction_fvu
    assert out.neighbour_similarity_median > norm.neighbour_similarity_median
    assert out.global_top1 > norm.global_top1 + 0.05  # the summary carries global information
    assert r.row("registers") is not None and r.row("cls") is not None
    assert "Position (Fig 5b)" in r.protocol


def test_high_norm_content_is_not_artifact_like():
    r = probe(planted_vit("content"), "synthetic:160", blocks=-1, device="cpu", draws=1, min_images=1000)
    assert r.num_outliers > 0
    assert r.verdict.label == "content-like", r.verdict.reasons
    assert r.row("outlier").position_top1 > 0.9


def test_clean_layer_still_probes_normal_tokens_and_cls():
    r = probe(planted_vit("artifact", onset=2), "synthetic:60", blocks=1, device="cpu", min_images=10, draws=1)
    assert r.verdict.label == "clean" and r.num_outliers == 0
    assert r.row("normal").local_status == "ok" and r.row("normal").position_top1 > 0.9
    assert r.row("cls").global_status == "ok"
    assert r.row("outlier").local_status == "none" and r.row("outlier").global_status == "none"


def test_too_few_outliers_says_so():
    r = probe(planted_vit("artifact", n=1), "synthetic:80", blocks=-1, device="cpu", min_images=100, draws=1)
    out = r.row("outlier")
    assert 0 < r.num_outliers == 80
    assert out.local_status.startswith("too few (n=") and out.position_top1 is None
    assert out.global_status.startswith("too few (n=") and out.global_top1 is None
    assert r.verdict.label == "inconclusive"
    r2 = probe(planted_vit("artifact", n=1, depth=2, onset=1), "synthetic:60", blocks=-1, device="cpu", min_tokens=10,
               min_images=1000, draws=1)
    assert r2.row("outlier").local_status == "ok"  # the minimum is an option


def test_fixed_threshold_matches_norm_rule():
    r = probe(planted_vit("artifact"), "synthetic:40", blocks=-1, device="cpu", threshold=1e9, draws=1)
    assert r.threshold_mode == "fixed" and r.num_outliers == 0 and r.verdict.label == "clean"


# ----------------------------------------------------------------------------------------------- labels
def _write_folder(root: Path, classes: dict[str, int] | None, n_loose: int = 0) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for cls, count in (classes or {}).items():
        (root / cls).mkdir()
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    for i in range(n_loose):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"loose{i}.png")
    return root


def test_labels_from_folders_and_synthetic(tmp_path):
    folder = _write_folder(tmp_path / "f", {"cat": 6, "dog": 6})
    r = probe(planted_vit(), folder, device="cpu", min_images=4, min_tokens=5, draws=2)
    assert r.labels.source == "folders" and r.labels.class_names == ["cat", "dog"] and r.labels.global_probe
    assert r.row("normal").global_images == 12
    syn = probe(planted_vit(), "synthetic:40", device="cpu", min_images=10, min_tokens=5, draws=2)
    assert syn.labels.source == "synthetic" and syn.labels.num_classes >= 4


def test_folder_without_classes_or_one_class_skips_global(tmp_path):
    loose = _write_folder(tmp_path / "loose", None, n_loose=8)
    r = probe(planted_vit(), loose, device="cpu", min_tokens=5)
    assert not r.labels.global_probe and "class sub-folders" in r.labels.message
    assert r.row("normal").global_status.startswith("skipped") and r.row("normal").local_status == "ok"
    one = _write_folder(tmp_path / "one", {"only": 8})
    r1 = probe(planted_vit(), one, device="cpu", min_tokens=5)
    assert not r1.labels.global_probe and "one class" in r1.labels.message


def test_tensor_with_labels():
    x = torch.rand(16, 3, 32, 32)
    r = probe(planted_vit(), x, labels=[i % 2 for i in range(16)], device="cpu", min_images=4, min_tokens=5, draws=2)
    assert r.labels.source == "given" and r.row("cls").global_status == "ok"


def test_too_few_images_says_how_many(tmp_path):
    few = _write_folder(tmp_path / "few", None, n_loose=3)
    with pytest.raises(InputError, match="at least 4 images"):
        probe(planted_vit(), few, device="cpu")


# ----------------------------------------------------------------------------------------------- reports
def test_json_round_trip_and_phantom_note(artifact_report):
    data = json.loads(artifact_report.to_json())
    assert data["schema"] == "artifactscan.probe/3" and data["verdict"]["label"] == "artifact-like"
    back = ProbeReport.from_dict(data)
    assert back.to_dict() == artifact_report.to_dict()
    loaded = wrap_module(planted_vit())
    loaded.kind, loaded.notes = "phantom", [PHANTOM_NOTE]
    r = probe(loaded, "synthetic:40", device="cpu", min_tokens=5, min_images=10, draws=2)
    assert r.model.calibration_note == PHANTOM_NOTE and PHANTOM_NOTE in r.notes
    from rich.console import Console

    console = Console(record=True, width=200)
    render_probe(r, console)
    assert "CALIBRATION PHANTOM" in console.export_text()


def test_figures(artifact_report, tmp_path):
    from artifactscan.render.plots_probe import plot_neighbour_similarity, plot_probe_bars, save_probe_figures

    fig, axes = plot_probe_bars(artifact_report)
    assert len(axes) == 3
    fig, ax = plot_neighbour_similarity(artifact_report)
    assert ax.get_legend() is not None
    paths = save_probe_figures(artifact_report, tmp_path)
    assert all(p.stat().st_size > 1000 for p in paths)


# ----------------------------------------------------------------------------------------------- CLI
@pytest.fixture
def planted_file(tmp_path) -> Path:
    path = tmp_path / "planted.pt"
    torch.save(planted_vit("artifact"), path)
    return path


def test_cli_json_only(planted_file):
    result = runner.invoke(app, ["probe", str(planted_file), "synthetic:160", "--trust-checkpoint", "--json",
                                 "--device", "cpu", "--draws", "1"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["verdict"]["label"] == "artifact-like"
    assert [r["name"] for r in data["rows"]][:3] == ["normal", "normal (n-matched)", "outlier"]


def test_cli_table_and_out(planted_file, tmp_path):
    out = tmp_path / "probe"
    result = runner.invoke(app, ["probe", str(planted_file), "synthetic:120", "--trust-checkpoint", "--blocks", "-1",
                                 "--out", str(out), "--device", "cpu", "--min-images", "20", "--draws", "2"])
    assert result.exit_code == 0, result.output
    assert "verdict: artifact-like" in result.output and "normal (n-matched)" in result.output
    assert {p.name for p in out.iterdir()} >= {"report.json", "probes.png", "neighbour_similarity.png"}


def test_cli_help_states_protocol():
    result = runner.invoke(app, ["probe", "--help"])
    assert result.exit_code == 0 and "PROTOCOL" in result.output and "n-matched" in result.output
    assert "Position (Fig 5b)" in PROTOCOL


@pytest.mark.parametrize("extra, match", [
    (["--blocks", "3"], "--blocks 3 is out of range"),
    (["--threshold", "nope"], "--threshold must be"),
    (["--test-fraction", "1.5"], "--test-fraction"),
])
def test_cli_bad_input_one_line(tiny_ckpt, extra, match):
    result = runner.invoke(app, ["probe", str(tiny_ckpt), "synthetic:20", *ARGS, *extra])
    assert result.exit_code == 1
    assert match in result.output and "Traceback" not in result.output


def test_cli_clean_model_exit_zero(tiny_ckpt, image_dir):
    result = runner.invoke(app, ["probe", str(tiny_ckpt), str(image_dir), *ARGS, "--min-tokens", "5"])
    assert result.exit_code == 0, result.output
    assert "verdict: clean" in result.output and "class sub-folders" in result.output
