"""Perception Encoder, EVA02-CLIP, AIMv2, BEiT, SigLIP2 and RADIO in the layouts their users hold.

Every fixture is built by the family's own library with random weights and tiny configurations (timm, transformers,
open_clip); a layout no installed library writes (Meta's ``perception_models`` PE files) is written by the inverse
of timm's own converter, and the round trip through that converter is proven before artifactscan reads the file.
Per-block token norms must agree with the library's own forward within 1e-4 relative, with the prefix tokens
counted right."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from artifactscan.models import native
from artifactscan.models.loading import load_model

from .conftest import loaded_block_norms, randomize
from .test_loading_2026 import timm_block_norms

TINY = dict(depth=2, embed_dim=64, num_heads=2)


# ----------------------------------------------------------------------------------------------- Perception Encoder
def to_perception_models(timm_sd: dict[str, torch.Tensor], prefix: str = "visual.") -> dict[str, torch.Tensor]:
    """timm's PE keys back into Meta's ``perception_models`` layout: the inverse of timm's ``_convert_pe``."""
    out = {}
    for key, value in timm_sd.items():
        if key.startswith("attn_pool."):
            if key.startswith(("attn_pool.q.", "attn_pool.kv.")):
                continue  # fused below, as nn.MultiheadAttention holds them
            key = (key.replace("attn_pool.latent", "attn_pool.probe").replace("attn_pool.norm", "attn_pool.layernorm")
                   .replace("attn_pool.proj", "attn_pool.attn.out_proj").replace("mlp.fc1", "mlp.c_fc")
                   .replace("mlp.fc2", "mlp.c_proj"))
        elif key == "cls_token":
            key, value = "class_embedding", value[0, 0]
        elif key == "pos_embed":
            key, value = "positional_embedding", value[0]
        elif key.startswith("head."):
            if key == "head.weight":
                out[prefix + "proj"] = value.t()
            continue
        else:
            key = (key.replace("patch_embed.proj", "conv1").replace("norm_pre", "ln_pre").replace("blocks.",
                   "transformer.resblocks.").replace("gamma_1", "ls_1.gamma").replace("gamma_2", "ls_2.gamma")
                   .replace("norm1", "ln_1").replace("norm2", "ln_2").replace("attn.qkv.", "attn.in_proj_")
                   .replace("attn.proj", "attn.out_proj").replace("mlp.fc1", "mlp.c_fc").replace("mlp.fc2", "mlp.c_proj"))
            if key.startswith("norm."):
                key = "ln_post." + key[len("norm."):]
        out[prefix + key] = value
    for part in ("weight", "bias"):
        if f"attn_pool.q.{part}" in timm_sd:
            out[f"{prefix}attn_pool.attn.in_proj_{part}"] = torch.cat(
                [timm_sd[f"attn_pool.q.{part}"], timm_sd[f"attn_pool.kv.{part}"]])
    return out


def clip_text_tower(width: int = 32) -> dict[str, torch.Tensor]:
    """The text keys a whole PE CLIP checkpoint holds beside ``visual.*`` (what artifactscan must drop by name)."""
    return {"transformer.resblocks.0.attn.in_proj_weight": torch.zeros(3 * width, width),
            "token_embedding.weight": torch.zeros(10, width), "positional_embedding": torch.zeros(8, width),
            "ln_final.weight": torch.ones(width), "text_projection": torch.zeros(width, 16),
            "logit_scale": torch.tensor(1.0)}


PE = [  # (timm name, tiny kwargs): core (attention pool, CLIP projection), lang (layer scale, no ln_post), spatial
    ("vit_pe_core_tiny_patch16_384", {**TINY, "img_size": 64, "num_classes": 16}),
    ("vit_pe_lang_large_patch14_448", {**TINY, "img_size": 56}),
    ("vit_pe_spatial_tiny_patch16_512", {**TINY, "img_size": 64}),
]


def pe_model(name: str, kwargs: dict) -> torch.nn.Module:
    model = randomize(timm.create_model(name, pretrained=False, **kwargs), scale=0.1)
    if getattr(model.head, "bias", None) is not None:
        torch.nn.init.zeros_(model.head.bias)  # PE's `proj` has no bias: timm's converter gives the head zeros
    return model


@pytest.mark.parametrize("name,kwargs", PE, ids=[p[0] for p in PE])
@pytest.mark.parametrize("prefix", ["visual.", ""])
def test_pe_fixture_round_trips_through_timms_converter(name, kwargs, prefix):
    from timm.models.eva import checkpoint_filter_fn

    model = pe_model(name, kwargs)
    own = model.state_dict()
    back = checkpoint_filter_fn(to_perception_models(own, prefix), model)
    assert back.keys() == own.keys() and all(torch.equal(back[k], v) for k, v in own.items())


@pytest.mark.parametrize("name,kwargs", PE, ids=[p[0] for p in PE])
@pytest.mark.parametrize("prefix", ["visual.", ""])
def test_pe_native_file_loads_and_norms_match_timm(tmp_path, name, kwargs, prefix):
    model = pe_model(name, kwargs)
    sd = to_perception_models(model.state_dict(), prefix)
    if prefix:
        sd.update(clip_text_tower())  # a whole CLIP checkpoint: its text tower next to the image tower
    assert native.detect_layout(sd) == "pe"
    path = tmp_path / "PE-Core-T16-384.pt"
    torch.save(sd, path)
    arch_kwargs = {k: v for k, v in kwargs.items() if k != "num_classes"}
    loaded = load_model(path, arch=name, arch_kwargs=arch_kwargs)
    assert loaded.layout == "pe" and (loaded.num_cls_tokens, loaded.num_register_tokens) == (1, 0)
    assert any("PE CLIP projection" in n for n in loaded.notes) == ("num_classes" in kwargs)
    x = torch.randn(2, 3, kwargs["img_size"], kwargs["img_size"])
    ours, theirs = loaded_block_norms(loaded, x), timm_block_norms(model, x)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=0)


def test_openai_clip_is_still_openai_clip():
    """PE's detection claims no OpenAI / OpenCLIP file: those have ln_post and neither ls_N nor attn_pool."""
    from timm.models.vision_transformer import VisionTransformer  # noqa: F401  (the layout is timm's converter's)

    sd = {"visual.conv1.weight": torch.zeros(8, 3, 4, 4), "visual.class_embedding": torch.zeros(8),
          "visual.positional_embedding": torch.zeros(5, 8), "visual.ln_pre.weight": torch.ones(8),
          "visual.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(24, 8),
          "visual.ln_post.weight": torch.ones(8), "visual.proj": torch.zeros(8, 4), **clip_text_tower()}
    assert native.detect_layout(sd) == "openai_clip"


@pytest.mark.parametrize("name", ["vit_pe_core_tiny_patch16_384", "vit_pe_spatial_tiny_patch16_512"])
def test_real_size_pe_native_file_loads_without_arch(tmp_path, name):
    model = timm.create_model(name, pretrained=False)
    path = tmp_path / "pe.pt"
    torch.save(to_perception_models(model.state_dict()), path)
    loaded = load_model(path)
    assert loaded.arch == name and loaded.layout == "pe" and loaded.num_prefix_tokens == 1
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in own.items())
