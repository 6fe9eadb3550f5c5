"""Model loading: every way in, and a clear error for every way it can go wrong."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from artifactscan.models.checkpoint import CheckpointMeta, read_meta, save_checkpoint
from artifactscan.core.errors import (CheckpointMismatchError, InputError, ModelLoadError, NotAViTError, OfflineError,
                                 UntrustedCheckpointError)
from artifactscan.models.loading import load_model, parse_arch_kwargs, wrap_module

from .conftest import TINY, tiny_vit

ARCH = "vit_small_patch16_224"
ARCH_KWARGS = {k: v for k, v in TINY.items()}


def test_bare_state_dict_of_unknown_config_needs_arch(tiny_ckpt):
    with pytest.raises(ModelLoadError, match=r"a bare state dict\): its shapes \(depth 3, width 32, patch 8, grid 4x4, "
                                             r"CLS, 0 registers\) match no known ViT configuration; closest: .*Pass arch="):
        load_model(tiny_ckpt)
    loaded = load_model(tiny_ckpt, arch=ARCH, arch_kwargs=ARCH_KWARGS)
    assert loaded.num_prefix_tokens == 1 and loaded.input_size == (32, 32) and loaded.grid_size == (4, 4)
    ref = tiny_vit()
    assert torch.equal(loaded.model.pos_embed, ref.pos_embed)


def test_self_describing_checkpoint_loads_without_arch(tmp_path):
    model = tiny_vit(reg_tokens=4)
    meta = CheckpointMeta(arch=ARCH, arch_kwargs={**ARCH_KWARGS, "reg_tokens": 4},
                          data_config={"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3,
                                       "interpolation": "bicubic", "crop_pct": 1.0}, step=7)
    for suffix in (".safetensors", ".pt"):
        path = save_checkpoint(tmp_path / f"m{suffix}", model.state_dict(), meta)
        assert read_meta(path).step == 7
        loaded = load_model(path)
        assert (loaded.num_cls_tokens, loaded.num_register_tokens) == (1, 4)
        assert loaded.prefix_names == ["cls", "reg0", "reg1", "reg2", "reg3"]
        assert torch.equal(loaded.model.reg_token, model.reg_token)


def test_pt_state_dict_with_ddp_prefix(tmp_path):
    path = tmp_path / "ddp.pth"
    torch.save({"model": {f"module.{k}": v for k, v in tiny_vit().state_dict().items()}}, path)
    assert load_model(path, arch=ARCH, arch_kwargs=ARCH_KWARGS).num_prefix_tokens == 1


def test_checkpoint_mismatch_names_the_keys(tiny_ckpt):
    with pytest.raises(CheckpointMismatchError, match=r"unexpected: .*reg_token|missing: reg_token"):
        load_model(tiny_ckpt, arch=ARCH, arch_kwargs={**ARCH_KWARGS, "reg_tokens": 4})
    with pytest.raises(CheckpointMismatchError, match="wrong shape"):
        load_model(tiny_ckpt, arch=ARCH, arch_kwargs={**ARCH_KWARGS, "embed_dim": 48})


def test_pickled_module_needs_trust(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(tiny_vit(), path)
    with pytest.raises(UntrustedCheckpointError, match="trust_checkpoint=True"):
        load_model(path)
    assert load_model(path, trust_checkpoint=True).source == "pickled-module"


def test_unknown_timm_name_suggests_near_names():
    with pytest.raises(ModelLoadError, match="Did you mean: .*vit_small_patch16_224"):
        load_model("vit_smal_patch16_224")


def test_non_vit_is_refused():
    with pytest.raises(NotAViTError, match="not a Vision Transformer"):
        wrap_module(timm.create_model("resnet18", pretrained=False))


def test_non_vit_checkpoint_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "resnet.safetensors"
    save_file(timm.create_model("resnet18", pretrained=False).state_dict(), str(path))
    with pytest.raises(NotAViTError):
        load_model(path, arch="resnet18")


def test_hub_model_offline_fails_fast_with_advice(monkeypatch):
    import artifactscan.models.loading as loading

    monkeypatch.setattr(loading, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setenv("HF_HOME", "/nonexistent-cache")
    with pytest.raises(OfflineError, match="unreachable.*local checkpoint"):
        load_model("vit_small_patch16_224.augreg_in21k")


def test_missing_model_file_and_folder(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_model(str(tmp_path / "nope.safetensors"))
    with pytest.raises(InputError, match="is a folder"):
        load_model(str(tmp_path))


def test_damaged_checkpoint(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x00" * 20)
    with pytest.raises(ModelLoadError, match="not a readable safetensors"):
        load_model(path, arch=ARCH)


def test_img_size_override_resamples_positions(tiny_ckpt):
    loaded = load_model(tiny_ckpt, arch=ARCH, arch_kwargs=ARCH_KWARGS, img_size=48)
    assert loaded.grid_size == (6, 6)
    with pytest.raises(InputError, match="multiple of the patch size"):
        load_model(tiny_ckpt, arch=ARCH, arch_kwargs=ARCH_KWARGS, img_size=50)


def test_arch_kwargs_parsing():
    assert parse_arch_kwargs('{"reg_tokens": 4}') == {"reg_tokens": 4}
    with pytest.raises(InputError, match="JSON object"):
        parse_arch_kwargs("reg_tokens=4")
    with pytest.raises(InputError, match="JSON object"):
        parse_arch_kwargs(json.dumps([1, 2]))
