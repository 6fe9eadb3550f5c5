"""The loader's registry: built-in architectures, checkpoint extensions and shipped weights register themselves,
whatever was imported first; the loader itself knows none of them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import timm
import torch

from artifactscan.analysis.fix import fix
from artifactscan.core.errors import ModelLoadError
from artifactscan.models import registry
from artifactscan.models.checkpoint import CheckpointMeta, save_checkpoint
from artifactscan.models.loading import builtin_models, load_model

from .conftest import PHANTOM_DATA as DATA, PHANTOM_KW as KW

FRESH = """
import json, sys
from artifactscan.models.loading import load_model
fixed = load_model(sys.argv[1])
phantom = load_model("phantom")
print(json.dumps({"fixed_prefix": fixed.prefix_names, "fixed_notes": fixed.notes,
                  "phantom_kind": phantom.kind, "phantom_arch": phantom.arch}))
"""


@pytest.fixture(scope="module")
def fixed_checkpoint(tiny_phantom):
    phantom, _, folder = tiny_phantom
    fix(phantom, "synthetic:32", top_k=4, save_model=folder / "registry-fixed.safetensors")
    return folder / "registry-fixed.safetensors"


def test_fresh_interpreter_loads_a_fixed_checkpoint_and_the_phantom_by_name(fixed_checkpoint):
    """Nothing imported first but the loader: the test-time register and the phantom are still registered."""
    if "phantom" not in builtin_models():
        pytest.skip("no shipped phantom in this install")
    out = subprocess.run([sys.executable, "-c", FRESH, str(fixed_checkpoint)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["fixed_prefix"] == ["cls", "reg0"]
    assert any("test-time register installed" in n for n in got["fixed_notes"])
    assert got["phantom_kind"] == "phantom" and got["phantom_arch"] == "artifactscan_phantom_vit"


def test_built_ins_are_registered():
    assert registry.architecture_builder("artifactscan_phantom_vit") is not None
    assert {"demo", "demo-reg4"} <= set(registry.builtin_weights())


def test_a_registered_checkpoint_extension_is_applied(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "_extensions", dict(registry._extensions))
    seen = []
    registry.register_checkpoint_extension("test_note", lambda loaded, data: loaded.notes.append(data["text"]) or
                                           seen.append(data))
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", **KW)
    path = save_checkpoint(tmp_path / "m.safetensors", model.state_dict(),
                           CheckpointMeta("vit_small_patch16_224", KW, DATA, extra={"test_note": {"text": "hello"}}))
    loaded = load_model(path)
    assert seen == [{"text": "hello"}] and "hello" in loaded.notes


def test_an_unregistered_artifactscan_architecture_is_a_clear_error(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", **KW)
    path = save_checkpoint(tmp_path / "m.safetensors", model.state_dict(),
                           CheckpointMeta("artifactscan_future_vit", KW, DATA))
    with pytest.raises(ModelLoadError, match="artifactscan_future_vit.*none is registered"):
        load_model(path)
