"""Test-time registers: on a phantom the repair must find the built-in units and remove the outliers at no cost."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from typer.testing import CliRunner

from artifactscan import load_model, scan
from artifactscan.cli import app
from artifactscan.core.errors import InputError, NotAViTError
from artifactscan.models.hooks import capture
from artifactscan.models.interventions import (RegisterNeuron, TestTimeRegister, apply_test_time_register,
                                               install_test_time_register)
from artifactscan.analysis.fix import fix
from artifactscan.models.loading import wrap_module

from .conftest import PHANTOM_KW as KW


def test_fix_finds_the_built_in_units_and_removes_the_outliers(tiny_phantom):
    path, spec, d = tiny_phantom
    result = fix(path, "synthetic:48", top_k=4, save_model=d / "fixed.safetensors")
    assert {n.site for n in result.neurons} == {f"blocks.{spec.onset}.artifact_units.post"}
    assert sorted(n.index for n in result.neurons) == [0, 1, 2, 3]
    assert result.outliers_removed >= 0.95
    assert result.feature_cosine_min >= 0.99
    fixed = load_model(d / "fixed.safetensors")  # the neuron list travels with the weights
    assert fixed.num_register_tokens == 1 and fixed.prefix_names == ["cls", "reg0"]
    assert scan(fixed, "synthetic:48").onset_layer is None


def test_register_is_per_image_and_per_neuron(tiny_phantom):
    path, spec, _ = tiny_phantom
    loaded = load_model(path)
    report = scan(loaded, "synthetic:8")
    from artifactscan.analysis.fix import find_register_neurons

    register = find_register_neurons(loaded, "synthetic:8", report, top_k=2)
    apply_test_time_register(loaded, register)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad(), capture(loaded, [register.neurons[0].site]) as cap:  # hooked after the installer's
        cap.forward(x)
    out = cap.values[register.neurons[0].site]  # register neuron values live only on the register token
    idx = [n.index for n in register.neurons]
    reg_pos = loaded.num_prefix_tokens - 1
    others = torch.cat([out[:, :reg_pos, idx], out[:, reg_pos + 1:, idx]], dim=1)
    assert torch.all(others == 0)
    assert torch.all(out[:, reg_pos, idx] > 0)  # every image, not only batch element 0


def test_the_register_comes_off_exactly_and_old_site_names_still_load(tiny_phantom):
    path, spec, _ = tiny_phantom
    loaded = load_model(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = loaded.model.forward_features(x)
    counts = (loaded.num_prefix_tokens, loaded.model.num_prefix_tokens, loaded.num_register_tokens)
    legacy = TestTimeRegister([RegisterNeuron(spec.onset, f"blocks.{spec.onset}.artifact_units.post", 0, 1.0, 0.0)],
                              num_blocks=len(loaded.blocks), embed_dim=int(loaded.model.embed_dim), max_layer=1,
                              model_name="0.2 file")  # artifactscan 0.2 recorded module paths
    with install_test_time_register(loaded, legacy) as handle:
        assert loaded.num_prefix_tokens == counts[0] + 1 and handle.note in loaded.notes
        with torch.no_grad():
            assert loaded.model.forward_features(x).shape[1] == before.shape[1] + 1
    assert (loaded.num_prefix_tokens, loaded.model.num_prefix_tokens, loaded.num_register_tokens) == counts
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in loaded.model.modules())
    with torch.no_grad():
        assert torch.equal(loaded.model.forward_features(x), before)
    wrong = TestTimeRegister([RegisterNeuron(0, "blocks.0.attn.k", 0, 1.0, 0.0)], num_blocks=len(loaded.blocks),
                             embed_dim=int(loaded.model.embed_dim), max_layer=1, model_name="x")
    with pytest.raises(InputError, match="not a unit hook point"):
        install_test_time_register(loaded, wrong)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in loaded.model.modules())


def test_nothing_to_fix_on_a_clean_model():
    torch.manual_seed(0)
    clean = wrap_module(timm.create_model("vit_small_patch16_224", **KW))
    result = fix(clean, torch.rand(8, 3, 32, 32))
    assert result.neurons == [] and result.verdict.startswith("nothing to fix")


def test_mismatched_neuron_file_and_unsupported_models(tiny_phantom):
    path, _, _ = tiny_phantom
    register = TestTimeRegister([], num_blocks=12, embed_dim=768, max_layer=1, model_name="other")
    with pytest.raises(InputError, match="does not match the model"):
        apply_test_time_register(load_model(path), register)
    eva = wrap_module(timm.create_model("eva02_tiny_patch14_224", img_size=28, embed_dim=32, depth=2, num_heads=2))
    with pytest.raises(NotAViTError, match="rotary"):
        apply_test_time_register(eva, register)


def test_fix_cli(tiny_phantom, tmp_path):
    path, _, _ = tiny_phantom
    runner = CliRunner()
    result = runner.invoke(app, ["fix", str(path), "synthetic:32", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["schema"] == "artifactscan.fix/2" and data["outliers_removed"] >= 0.95
    result = runner.invoke(app, ["fix", str(path), "synthetic:32", "--top-k", "0"])
    assert result.exit_code == 1 and "--top-k must be at least 1" in result.stderr
    result = runner.invoke(app, ["fix", str(path), "synthetic:32", "--blocks", "0:9"])
    assert result.exit_code == 1 and "block 9 is out of range" in result.stderr and "valid are 0..3" in result.stderr
