"""The capture layer's contract: the exact hook names of every supported family (a timm or transformers refactor
fails here, in one obvious place), and that each name reads what it says, checked against the family's own
library (timm's forward_intermediates, transformers' output_hidden_states / eager attentions)."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from artifactscan.core.errors import InputError, NotAViTError
from artifactscan.models.hooks import (HookPointUnavailable, UnknownHookPoint, capture, family_of, hook_names,
                                       intervene, unit_points, unwrap_model)

transformers = pytest.importorskip("transformers")

PER_BLOCK = ["resid_pre", "attn.q", "attn.k", "attn.v", "attn.pattern", "mlp.post", "resid_post"]


def expected_names(depth: int, extra: dict[int, list[str]] | None = None) -> list[str]:
    names = ["patch_embed.post"]
    for i in range(depth):
        block = [f"blocks.{i}.{p}" for p in PER_BLOCK]
        block[-1:-1] = [f"blocks.{i}.{p}" for p in (extra or {}).get(i, [])]
        names += block
    return names + ["final_norm"]


def tiny_timm(name="vit_small_patch16_224", **kw):
    torch.manual_seed(0)
    args = dict(pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)
    return timm.create_model(name, **{**args, **kw}).eval()


def hf_model(kind: str, attn: str = "sdpa"):
    torch.manual_seed(0)
    T = transformers
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
    config = {
        "Dinov2Model": lambda: T.Dinov2Config(**common, mlp_ratio=2),
        "Dinov2WithRegistersModel": lambda: T.Dinov2WithRegistersConfig(**common, mlp_ratio=2, num_register_tokens=4),
        "ViTModel": lambda: T.ViTConfig(**common, intermediate_size=64),
        "CLIPVisionModel": lambda: T.CLIPVisionConfig(**common, intermediate_size=64),
        "SiglipVisionModel": lambda: T.SiglipVisionConfig(**common, intermediate_size=64),
        "DINOv3ViTModel": lambda: T.DINOv3ViTConfig(**common, intermediate_size=64, num_register_tokens=4),
    }[kind]()
    config._attn_implementation = attn
    return getattr(T, kind)(config).eval()


HF_KINDS = ["Dinov2Model", "Dinov2WithRegistersModel", "ViTModel", "CLIPVisionModel", "SiglipVisionModel"]
HF_ROPE_KINDS = ["DINOv3ViTModel"]  # q/k rotated inside the attention module


# ----------------------------------------------------------------------------------------------- the exact names
@pytest.mark.parametrize("name,family", [("vit_small_patch16_224", "timm-vit"),
                                         ("eva02_tiny_patch14_224", "timm-vit"),
                                         ("vit_small_patch16_dinov3", "timm-vit"),
                                         ("beit_base_patch16_224", "timm-vit")])
def test_timm_names(name, family):
    model = tiny_timm(name)
    assert family_of(model).name == family
    assert hook_names(model) == expected_names(2)
    assert unit_points(model) == ["blocks.0.mlp.post", "blocks.1.mlp.post"]


def test_phantom_names_include_its_artifact_units():
    from artifactscan.models.loading import load_model

    loaded = load_model("phantom")
    onset = loaded.model.phantom_onset
    assert family_of(loaded).name == "phantom"
    assert hook_names(loaded) == expected_names(len(loaded.blocks), {onset: ["artifact_units.post"]})
    assert f"blocks.{onset}.artifact_units.post" in unit_points(loaded, [onset])


@pytest.mark.parametrize("kind", HF_KINDS + HF_ROPE_KINDS)
def test_hf_names(kind):
    model = hf_model(kind)
    assert family_of(model).name == "hf-vision"
    assert hook_names(model) == expected_names(2)


def test_hf_dinov3_points_use_transformers_5_in_memory_paths():
    from artifactscan.models.hooks import hook_points

    points = hook_points(hf_model("DINOv3ViTModel"))
    assert {n: points[n].module for n in ("patch_embed.post", "blocks.1.resid_pre", "blocks.1.attn.k",
                                          "blocks.1.mlp.post", "blocks.1.resid_post", "final_norm")} == {
        "patch_embed.post": "embeddings.patch_embeddings", "blocks.1.resid_pre": "model.layer.1",
        "blocks.1.attn.k": "model.layer.1.attention", "blocks.1.mlp.post": "model.layer.1.mlp.down_proj",
        "blocks.1.resid_post": "model.layer.1", "final_norm": "norm"}
    assert family_of(hf_model("DINOv3ViTModel")).prefix_tokens(hf_model("DINOv3ViTModel")) == (1, 4)


def test_unknown_and_unavailable_names_say_so():
    model = tiny_timm()
    with pytest.raises(UnknownHookPoint, match=r"'blocks\.7\.resid_post' is not a hook point.*blocks\.\{0\.\.1\}"
                                                r"\.resid_post") as err:
        capture(model, ["blocks.7.resid_post"])
    assert isinstance(err.value, InputError) and "\n" not in str(err.value)
    with pytest.raises(HookPointUnavailable, match="applied to the pooled CLS token only"):
        capture(hf_model("CLIPVisionModel"), ["final_norm"])
    model.blocks[1].attn = nn.Identity()
    with pytest.raises(NotAViTError, match=r"blocks\.1\.attn\.k is not available"):
        capture(model, ["blocks.1.attn.k"])
    with pytest.raises(NotAViTError, match="not a model family"):
        capture(nn.Linear(2, 2), ["blocks.0.resid_post"])


# ----------------------------------------------------------------------------------------------- what they read
@pytest.mark.parametrize("name", ["vit_small_patch16_224", "eva02_tiny_patch14_224", "beit_base_patch16_224"])
def test_timm_residual_stream_matches_forward_intermediates(name):
    model = tiny_timm(name)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, output_fmt="NLC", return_prefix_tokens=True, norm=False)
        with capture(model, ["blocks.*.resid_post", "final_norm", "patch_embed.post"]) as cap:
            out = cap.forward(x)
    for i, (patches, prefix) in enumerate(inter):
        torch.testing.assert_close(cap[f"blocks.{i}.resid_post"], torch.cat([prefix, patches], dim=1))
    torch.testing.assert_close(out, final)
    torch.testing.assert_close(cap["final_norm"], final)
    assert cap["patch_embed.post"].shape == (2, 16, 32)


@pytest.mark.parametrize("kind", HF_KINDS)
def test_hf_residual_stream_and_attention_match_transformers(kind):
    x = torch.randn(2, 3, 32, 32)
    eager = hf_model(kind, "eager")
    sdpa = hf_model(kind, "sdpa")
    sdpa.load_state_dict(eager.state_dict())
    with torch.no_grad():
        ref = eager(pixel_values=x, output_hidden_states=True, output_attentions=True)
    for model in (eager, sdpa):
        with torch.no_grad(), capture(model, ["blocks.*.resid_post", "blocks.*.attn.pattern", "blocks.1.attn.k",
                                              "blocks.1.resid_pre"]) as cap:
            cap.forward(x)
        for i in range(2):
            torch.testing.assert_close(cap[f"blocks.{i}.resid_post"], ref.hidden_states[i + 1])
            torch.testing.assert_close(cap[f"blocks.{i}.attn.pattern"], ref.attentions[i], rtol=1e-5, atol=1e-6)
        attention = family_of(model).blocks(model)[1]
        attention = getattr(attention, "attention", None) or attention.self_attn
        with torch.no_grad():
            norm = [m for n, m in family_of(model).blocks(model)[1].named_children() if isinstance(m, nn.LayerNorm)][0]
            keys = attention.k_proj(norm(cap["blocks.1.resid_pre"]))
        torch.testing.assert_close(cap["blocks.1.attn.k"], keys)


def rotate_patch_tokens(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on ``[B, heads, T, d]`` as DINOv3 applies it: patch tokens only (the last ``len(cos)``), rotate-half."""
    prefix, patches = x[:, :, : x.shape[2] - cos.shape[0]], x[:, :, x.shape[2] - cos.shape[0]:]
    half = patches.shape[-1] // 2
    rotated = torch.cat([-patches[..., half:], patches[..., :half]], dim=-1)
    return torch.cat([prefix, patches * cos + rotated * sin], dim=2)


@pytest.mark.parametrize("kind", HF_ROPE_KINDS)
def test_hf_rope_stream_attention_and_rotated_keys_match_transformers(kind):
    x = torch.randn(2, 3, 32, 48)  # not square: a 4x6 grid of rotations
    eager, sdpa = hf_model(kind, "eager"), hf_model(kind, "sdpa")
    sdpa.load_state_dict(eager.state_dict())
    with torch.no_grad():
        ref = eager(pixel_values=x, output_hidden_states=True, output_attentions=True)
        cos, sin = eager.rope_embeddings(x)  # the model's own rope
    def hooks(model):  # transformers keeps hooks of its own (output recording) after an output_hidden_states call
        return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]

    before = hooks(eager)
    for model in (eager, sdpa):
        with torch.no_grad(), capture(model, ["blocks.*.resid_post", "blocks.*.attn.pattern", "blocks.1.attn.k",
                                              "blocks.1.attn.q", "blocks.1.resid_pre", "final_norm"]) as cap:
            out = cap.forward(x)
        for i in range(2):
            torch.testing.assert_close(cap[f"blocks.{i}.resid_post"], ref.hidden_states[i + 1])
            torch.testing.assert_close(cap[f"blocks.{i}.attn.pattern"], ref.attentions[i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out, ref.last_hidden_state)
        torch.testing.assert_close(cap["final_norm"], ref.last_hidden_state)
        layer = family_of(model).blocks(model)[1]
        with torch.no_grad():
            for part in ("k", "q"):
                projected = getattr(layer.attention, f"{part}_proj")(layer.norm1(cap["blocks.1.resid_pre"]))
                heads = projected.view(2, projected.shape[1], 2, -1).transpose(1, 2)
                expected = rotate_patch_tokens(heads, cos, sin).transpose(1, 2).reshape(projected.shape)
                torch.testing.assert_close(cap[f"blocks.1.attn.{part}"], expected)
                assert not torch.allclose(cap[f"blocks.1.attn.{part}"], projected)  # the rotation is there
    assert hooks(eager) == before  # the capture's own hooks, and the rotation keeper, are gone


def test_timm_attention_pattern_is_the_softmax_and_the_forward_is_unchanged():
    model = tiny_timm(qkv_bias=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        plain = model.forward_features(x)
        with capture(model, ["blocks.1.attn.pattern", "blocks.1.attn.q", "blocks.1.attn.k", "blocks.1.resid_pre"]
                     ) as cap:
            out = cap.forward(x)
        attn = model.blocks[1].attn
        h = model.blocks[1].norm1(cap["blocks.1.resid_pre"])
        B, T, C = h.shape
        q, k, _ = attn.qkv(h).reshape(B, T, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        expected = torch.softmax((q * attn.scale) @ k.transpose(-2, -1), dim=-1)
    assert torch.equal(out, plain)  # capturing attention does not change the computation
    torch.testing.assert_close(cap["blocks.1.attn.pattern"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cap["blocks.1.attn.k"], k.transpose(1, 2).reshape(B, T, C))
    assert torch.nn.functional.scaled_dot_product_attention.__name__ == "scaled_dot_product_attention"
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_stop_early_runs_no_later_block_and_reduce_runs_inside_the_hook():
    model = tiny_timm(depth=4)
    ran = []
    handle = model.blocks[3].register_forward_hook(lambda *a: ran.append(3))
    try:
        with torch.no_grad(), capture(model, ["blocks.1.resid_post"], reduce=lambda t: t.norm(dim=-1),
                                      stop_early=True) as cap:
            assert cap.forward(torch.randn(2, 3, 32, 32)) is None and cap.stopped_early
            assert cap["blocks.1.resid_post"].shape == (2, 17)
            cap.forward(torch.randn(1, 3, 32, 32))  # a second forward is captured afresh
            assert cap["blocks.1.resid_post"].shape == (1, 17)
    finally:
        handle.remove()
    assert ran == []


def test_live_wrappers_are_unwrapped():
    model = tiny_timm()

    class DistributedDataParallel(nn.Module):  # the attribute layout torch's wrapper has
        def __init__(self, module):
            super().__init__()
            self.module = module

    class Compiled(nn.Module):
        def __init__(self, module):
            super().__init__()
            self._orig_mod = module

    assert unwrap_model(Compiled(DistributedDataParallel(model))) is model
    assert hook_names(DistributedDataParallel(model)) == hook_names(model)


def test_intervene_edits_and_comes_off():
    model = tiny_timm()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model.forward_features(x)
        with intervene(model, {"blocks.1.resid_pre": torch.zeros_like}):
            with capture(model, ["blocks.1.resid_pre"]) as cap:
                cap.forward(x)
            assert torch.count_nonzero(cap["blocks.1.resid_pre"]) == 0
        assert torch.equal(model.forward_features(x), plain)
    with pytest.raises(HookPointUnavailable, match="read but not edited"):
        intervene(model, {"blocks.0.attn.k": torch.zeros_like})
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_only_the_capture_layer_registers_hooks_or_looks_up_module_paths():
    """Every measurement reads activations through models/hooks.py; families declare their module paths in
    models/layouts/ (and the phantom's in models/phantom.py); the one intervention is models/interventions.py."""
    from pathlib import Path

    import artifactscan

    root = Path(artifactscan.__file__).parent
    allowed = {"models/hooks.py", "models/interventions.py", "models/phantom.py"}
    calls = ("register_forward_hook", "register_forward_pre_hook", "register_full_backward", ".get_submodule(",
             ".named_modules(")
    offenders = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel in allowed or rel.startswith("models/layouts/"):
            continue
        text = path.read_text()
        offenders += [f"{rel}: {c}" for c in calls if c in text]
    assert offenders == []
