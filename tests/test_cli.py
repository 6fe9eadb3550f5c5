"""The CLI through Typer's runner: tables, JSON on stdout, output folder, and one clear line per bad input."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from artifactscan.cli import app

from .conftest import TINY

runner = CliRunner()
ARGS = ["--arch", "vit_small_patch16_224", "--arch-kwargs", json.dumps(TINY)]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_norms_table_and_headline(tiny_ckpt, image_dir):
    result = invoke("norms", tiny_ckpt, image_dir, *ARGS)
    assert result.exit_code == 0, result.output
    assert "block 0" in result.output and "final norm" in result.output
    assert "No high-norm outlier" in result.output


def test_norms_json_is_the_only_stdout(tiny_ckpt, image_dir):
    result = invoke("norms", tiny_ckpt, image_dir, *ARGS, "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["images"]["num_scanned"] == 8
    assert len(data["layers"]) == TINY["depth"] + 1


def test_norms_out_folder(tiny_ckpt, image_dir, tmp_path):
    out = tmp_path / "report"
    result = invoke("norms", tiny_ckpt, image_dir, *ARGS, "--out", out, "--threshold", "150", "--no-figures")
    assert result.exit_code == 0, result.output
    data = json.loads((out / "report.json").read_text())
    assert data["threshold_mode"] == "fixed"
    assert (out / "outliers.csv").read_text().splitlines()[0] == "image,image_index,layer,row,col,norm"


@pytest.mark.parametrize("case, match", [
    ("missing_images", "does not exist"),
    ("empty_folder", "empty"),
    ("no_images", "no images"),
    ("bad_threshold", "--threshold must be 'auto' or a positive number"),
    ("unknown_model", "Did you mean"),
    ("pickled", "--trust-checkpoint"),
    ("mismatch", "does not match --arch"),
    ("cuda_absent", "no CUDA GPU"),
])
def test_bad_input_gives_one_clear_line(case, match, tiny_ckpt, image_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "notes.txt").write_text("hi")
    whole = tmp_path / "whole.pt"
    if case == "pickled":
        from .conftest import tiny_vit
        torch.save(tiny_vit(), whole)
    if case == "cuda_absent" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    args = {
        "missing_images": ("norms", tiny_ckpt, tmp_path / "nope", *ARGS),
        "empty_folder": ("norms", tiny_ckpt, tmp_path / "empty", *ARGS),
        "no_images": ("norms", tiny_ckpt, tmp_path / "text", *ARGS),
        "bad_threshold": ("norms", tiny_ckpt, image_dir, *ARGS, "--threshold", "-3"),
        "unknown_model": ("norms", "vit_smal_patch16_224", image_dir),
        "pickled": ("norms", whole, image_dir),
        "mismatch": ("norms", tiny_ckpt, image_dir, "--arch", "vit_small_patch16_224", "--arch-kwargs",
                     json.dumps({**TINY, "reg_tokens": 4})),
        "cuda_absent": ("norms", tiny_ckpt, image_dir, *ARGS, "--device", "cuda"),
    }[case]
    result = invoke(*args)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error:") and match.lower() in " ".join(lines).lower(), result.stderr


def test_debug_shows_traceback(tmp_path, tiny_ckpt):
    result = invoke("norms", tiny_ckpt, tmp_path / "nope", *ARGS, "--debug")
    assert result.exit_code == 1 and "Traceback" in result.stderr


def test_help_teaches():
    result = invoke("norms", "--help")
    assert result.exit_code == 0
    assert "separated" in result.output and "--threshold" in result.output  # the auto rule: a separated group
