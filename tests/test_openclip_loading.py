"""OpenCLIP / OpenAI CLIP files (a state dict with the text tower, an open_clip training checkpoint, OpenAI's
TorchScript archive), built with open_clip itself from a tiny random-init config and first loaded by open_clip;
artifactscan's image tower must give the same per-block token norms as open_clip's own visual forward."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from artifactscan.core.errors import UntrustedCheckpointError
from artifactscan.models.loading import load_model

from .conftest import hooked_block_norms, loaded_block_norms, randomize
from .test_native_layouts import cli_error, cli_model

open_clip = pytest.importorskip("open_clip")

KW = dict(embed_dim=64, depth=2, num_heads=2, patch_size=8, img_size=32)


def tiny_clip(quick_gelu: bool):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = CLIP(16, CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=8, image_size=32),
                 CLIPTextCfg(context_length=8, vocab_size=50, width=32, heads=2, layers=1), quick_gelu=quick_gelu)
    return randomize(model, scale=0.1)


def reference_norms(model, x):
    blocks = list(model.visual.transformer.resblocks)
    return hooked_block_norms(blocks, model.encode_image, x, batch_first=model.visual.transformer.batch_first)


@pytest.mark.parametrize("quick_gelu,arch", [(False, "vit_base_patch16_clip_224"),
                                             (True, "vit_base_patch16_clip_quickgelu_224")])
def test_state_dict_and_training_checkpoint(tmp_path, quick_gelu, arch):
    model = tiny_clip(quick_gelu)
    bare = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), bare)
    train = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
                "optimizer": {}}, train)
    check = tiny_clip(quick_gelu)
    open_clip.load_checkpoint(check, str(train))  # open_clip's own reader of its training checkpoints
    x = torch.randn(2, 3, 32, 32)
    ref = reference_norms(model, x)
    torch.testing.assert_close(reference_norms(check, x), ref)
    for path in (bare, train):
        loaded = load_model(path, arch=arch, arch_kwargs=KW)
        assert loaded.layout == "openai_clip" and loaded.num_prefix_tokens == 1
        assert loaded.model.num_classes == 16  # visual.proj, as timm maps it
        torch.testing.assert_close(loaded_block_norms(loaded, x), ref, rtol=1e-4, atol=1e-4)
    assert any("CLIP text tower" in n for n in load_model(bare, arch=arch, arch_kwargs=KW).notes)
    report = cli_model(train, "--arch", arch, "--arch-kwargs", json.dumps(KW))
    assert (report["num_blocks"], report["num_cls_tokens"], report["layout"]) == (2, 1, "openai_clip")


def test_openai_torchscript_needs_trust(tmp_path):
    model = tiny_clip(True)
    path = tmp_path / "ViT-B-16.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(model), str(path))
    arch = "vit_base_patch16_clip_quickgelu_224"
    with pytest.raises(UntrustedCheckpointError, match="TorchScript archive.*executes its code.*trust_checkpoint=True"):
        load_model(path, arch=arch, arch_kwargs=KW)
    assert "TorchScript" in cli_error(path, "--arch", arch, "--arch-kwargs", json.dumps(KW))
    loaded = load_model(path, arch=arch, arch_kwargs=KW, trust_checkpoint=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded_block_norms(loaded, x), reference_norms(model, x), rtol=1e-4, atol=1e-4)


def test_openclip_with_a_timm_trunk_needs_no_arch(tmp_path):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    model = CLIP(16, CLIPVisionCfg(timm_model_name="vit_tiny_patch16_224", timm_model_pretrained=False, timm_pool="",
                                   timm_proj="linear"),
                 CLIPTextCfg(context_length=8, vocab_size=50, width=32, heads=2, layers=1)).eval()
    path = tmp_path / "open_clip_model.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = load_model(path)  # visual.trunk.* is a timm ViT-Ti/16: inferred from its shapes
    assert (loaded.arch, loaded.layout) == ("vit_tiny_patch16_224", "openclip_timm")
    assert any("1 keys of the OpenCLIP projection head" in n for n in loaded.notes)
    x = torch.randn(1, 3, 224, 224)
    ref = hooked_block_norms(list(model.visual.trunk.blocks), model.encode_image, x)
    torch.testing.assert_close(loaded_block_norms(loaded, x), ref, rtol=1e-4, atol=1e-4)
