"""compare and emergence over a run folder: one row per model, checkpoints in step order, architectures apart."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from artifactscan.models.checkpoint import CheckpointMeta, save_checkpoint
from artifactscan.cli import app

from .conftest import TINY, tiny_vit

DATA = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear", "crop_pct": 1.0}
runner = CliRunner()


def _save(path, model, step, **kwargs):
    meta = CheckpointMeta("vit_small_patch16_224", {**TINY, **kwargs}, DATA, step=step)
    return save_checkpoint(path, model.state_dict(), meta)


def _run_folder(root):
    """A fake training run: the artifact grows with the step (as in the paper's Fig 4b), plus a register model."""
    for step, strength in ((100, 0.0), (200, 30.0), (300, 60.0)):
        model = tiny_vit()
        with torch.no_grad():
            model.pos_embed[0, 1 + 5] += strength
        _save(root / "reg0" / "checkpoints" / f"step_{step:07d}.safetensors", model, step)
        if step == 300:  # train-reg also writes the final weights beside the last snapshot: the same point
            _save(root / "reg0" / "final.safetensors", model, step)
    _save(root / "reg4" / "checkpoints" / "step_0000300.safetensors", tiny_vit(reg_tokens=4), 300, reg_tokens=4)
    (root / "reg0" / "last.pt").write_bytes(b"resume state, not a model checkpoint")


def test_emergence_over_a_run_folder(tmp_path):
    run = tmp_path / "run"
    _run_folder(run)
    out = tmp_path / "out"
    result = runner.invoke(app, ["norms", str(run), "synthetic:16", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["schema"] == "artifactscan.emergence/4"
    groups = {g["registers"]: g for g in data["groups"]}
    assert set(groups) == {0, 4}
    assert "2 different architectures" in data["notes"][0]
    steps = [p["step"] for p in groups[0]["points"]]
    onsets = [p["onset_layer"] for p in groups[0]["points"]]
    assert steps == [100, 200, 300] and onsets == [None, 0, 0]
    assert (out / "emergence.json").is_file() and (out / "emergence.png").is_file()


def test_compare_cli_rows_and_figure(tmp_path):
    planted = tiny_vit()
    with torch.no_grad():
        planted.pos_embed[0, 1 + 5] += 60.0
    a = _save(tmp_path / "planted.safetensors", planted, 1)
    b = _save(tmp_path / "reg4.safetensors", tiny_vit(reg_tokens=4), 1, reg_tokens=4)
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", str(a), str(b), "synthetic:16", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    rows = {r["label"]: r for r in data["rows"]}
    assert rows[str(a)]["onset_layer"] == 0 and rows[str(b)]["onset_layer"] is None
    assert rows[str(a)]["flagged_on_background"] is not None  # synthetic data: object masks are known
    assert "registers" in rows[str(b)]["prefix_attention"]
    assert (out / "compare.png").is_file()
    result = runner.invoke(app, ["compare", str(a), "synthetic:16"])
    assert result.exit_code == 1 and "at least two models" in result.stderr


def test_empty_run_folder_is_a_clear_error(tmp_path):
    (tmp_path / "run").mkdir()
    result = runner.invoke(app, ["norms", str(tmp_path / "run"), "synthetic:4"])
    assert result.exit_code == 1 and "no self-describing checkpoints" in result.stderr
