"""Folders given as MODEL: a training run's folder (train-reg's own output) is a run to scan checkpoint by checkpoint,
a save_pretrained folder is a Hugging Face model. Both hold a config.json; what tells them apart is train-reg's own
files and the weights a Hugging Face folder must hold."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from artifactscan.analysis.training import get_preset, train_reg
from artifactscan.cli import app
from artifactscan.models.hf import is_model_folder, is_training_run

T = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real train-reg run (0 and 2 registers), tiny settings."""
    out = tmp_path_factory.mktemp("runs") / "demo-pair"
    config = get_preset("demo", img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, steps=4,
                        batch_size=8, train_size=64, val_size=16, eval_every=2, ckpt_every=2, warmup_steps=1,
                        device="cpu", num_threads=1)
    train_reg(config, out, registers=2, parallel=False, progress=False)
    return out


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A real Hugging Face save_pretrained folder (a tiny random ViT)."""
    folder = tmp_path_factory.mktemp("hf") / "tiny-vit"
    torch.manual_seed(0)
    config = T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         image_size=32, patch_size=8)
    T.ViTModel(config).save_pretrained(folder)
    return folder


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_train_reg_folders_are_runs_not_hugging_face_models(run_dir):
    for folder in (run_dir, run_dir / "reg0", run_dir / "reg2"):
        assert (folder / "config.json").is_file()  # what used to make them look like Hugging Face folders
        assert is_training_run(folder) and not is_model_folder(folder)
    for folder in (run_dir / "reg0", run_dir):
        result = invoke("norms", folder, "synthetic:8", "--json")
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["schema"].startswith("artifactscan.emergence/")
        registers = sorted(g["registers"] for g in report["groups"])
        assert registers == ([0] if folder.name == "reg0" else [0, 2])
        assert all(g["points"] and g["points"][-1]["step"] == 4 for g in report["groups"])


def test_a_run_folder_where_one_model_is_expected_says_what_to_pass(run_dir):
    result = invoke("probe", run_dir / "reg0", "synthetic:8", "--blocks", "0")
    assert result.exit_code == 1
    assert "training run's folder, not a model" in result.stderr
    assert str(run_dir / "reg0" / "final.safetensors") in result.stderr


def test_save_pretrained_folder_is_a_hugging_face_model(hf_folder):
    assert is_model_folder(hf_folder) and not is_training_run(hf_folder)
    result = invoke("norms", hf_folder, "synthetic:4", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["schema"].startswith("artifactscan.scan/") and report["model"]["layout"] == "hf:vit"


def test_config_json_without_weights_is_not_a_model(hf_folder, tmp_path):
    broken = tmp_path / "no-weights"
    broken.mkdir()
    (broken / "config.json").write_bytes((hf_folder / "config.json").read_bytes())
    (broken / "other.safetensors").write_bytes((hf_folder / "model.safetensors").read_bytes())
    assert not is_model_folder(broken)
    result = invoke("norms", broken, "synthetic:4")
    assert result.exit_code == 1
    assert "has a config.json but none of the weights of a Hugging Face folder" in result.stderr
    assert "model.safetensors" in result.stderr and "Traceback" not in result.output
