"""train-reg end to end through the CLI on a tiny model: trains the pair, scans both, and says it cannot confirm."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from artifactscan.cli import app

TINY = ["--steps", "4", "--depth", "2", "--dim", "32", "--heads", "2", "--img-size", "16", "--patch", "4",
        "--batch-size", "8", "--scan-images", "synthetic:24"]


def test_train_reg_pair_and_honest_verdict(tmp_path):
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train-reg", *TINY, "--out", str(run), "--json"])
    assert result.exit_code == 0, result.output
    verdict = json.loads(result.stdout)
    assert verdict["schema"] == "artifactscan.train_reg_verdict/2"
    rows = {r["label"]: r for r in verdict["comparison"]["rows"]}
    assert set(rows) == {"reg0", "reg4"} and rows["reg4"]["registers"] == 4
    assert rows["reg4"]["prefix_attention"]["registers"] > 0  # registers take attention even without artifacts
    assert verdict["verdict"].startswith("CANNOT CONFIRM THE FIX")
    assert json.loads((run / "held_out_comparison.json").read_text()) == verdict and (run / "compare.png").is_file()
    assert json.loads((run / "verdict.json").read_text()) == verdict  # its name before 0.3, for one version
    for reg in ("reg0", "reg4"):
        assert (run / reg / "final.safetensors").is_file()
    # --resume reuses finished variants; an option passed again with another value is refused
    again = CliRunner().invoke(app, ["train-reg", "--resume", str(run), "--scan-images", "synthetic:8", "--json"])
    assert again.exit_code == 0, again.output
    changed = CliRunner().invoke(app, ["train-reg", "--resume", str(run), "--steps", "9"])
    assert changed.exit_code == 1 and "steps" in changed.stderr


def test_train_reg_bad_inputs(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["train-reg", "--registers", "-2"])
    assert result.exit_code == 1 and "--registers must be 0 or more" in result.stderr
    result = runner.invoke(app, ["train-reg", "--resume", str(tmp_path)])
    assert result.exit_code == 1 and "cannot resume" in result.stderr
    result = runner.invoke(app, ["train-reg", "--arch", "resnet18", "--steps", "1", "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and "Traceback" not in result.output
