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


# ----------------------------------------------------------------------------------------------- EVA02-CLIP
def test_eva02_clip_through_open_clip_loads_and_norms_match(tmp_path):
    """OpenCLIP's EVA02 (a timm trunk, ``visual.trunk.*``, next to its text tower) at its real size: open_clip has
    no smaller EVA02 configuration, and its trunk takes no size arguments."""
    open_clip = pytest.importorskip("open_clip")
    from .conftest import hooked_block_norms

    torch.manual_seed(0)
    model = open_clip.create_model("EVA02-B-16", pretrained=None).eval()
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), path)
    loaded = load_model(path)
    assert loaded.arch == "eva02_base_patch16_clip_224" and loaded.layout == "openclip_timm"
    assert (loaded.num_cls_tokens, loaded.num_register_tokens) == (1, 0)
    assert any("CLIP text tower" in n for n in loaded.notes)
    x = torch.randn(1, 3, 224, 224)
    trunk = model.visual.trunk
    theirs = hooked_block_norms(list(trunk.blocks), lambda images: model.encode_image(images), x)
    ours = loaded_block_norms(loaded, x)
    assert ours.shape == theirs.shape == (12, 1, 1 + 14 * 14)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=0)


# ----------------------------------------------------------------------------------------------- AIMv2
def test_timm_aimv2_state_dict_loads_with_arch_and_norms_match(tmp_path):
    kwargs = {**TINY, "img_size": 56}
    model = randomize(timm.create_model("aimv2_large_patch14_224", pretrained=False, **kwargs), scale=0.1)
    path = tmp_path / "aimv2.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = load_model(path, arch="aimv2_large_patch14_224", arch_kwargs=kwargs)
    assert loaded.layout is None and (loaded.num_cls_tokens, loaded.num_register_tokens) == (0, 0)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():  # no prefix tokens: timm returns the patch tokens alone
        blocks = model.forward_intermediates(x, norm=False, intermediates_only=True, output_fmt="NLC")
    theirs = torch.stack([torch.linalg.vector_norm(b, dim=-1) for b in blocks])
    ours = loaded_block_norms(loaded, x)
    assert ours.shape == theirs.shape == (2, 2, 16)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=0)


transformers = pytest.importorskip("transformers")


def hf_hidden_norms(model, x, **inputs) -> torch.Tensor:
    """``[num_blocks, B, T]`` from transformers' own ``output_hidden_states`` (each block's output)."""
    with torch.no_grad():
        out = model(pixel_values=x, output_hidden_states=True, **inputs)
    return torch.stack([torch.linalg.vector_norm(h, dim=-1) for h in out.hidden_states[1:]])


def hf_aimv2(**overrides):
    config = transformers.Aimv2VisionConfig(**{**dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, image_size=56,
        patch_size=14), **overrides})
    return randomize(transformers.Aimv2VisionModel(config), scale=0.1)


@pytest.mark.parametrize("overrides", [{}, {"qkv_bias": True}, {"mlp_bias": True}], ids=["plain", "qkv", "mlp"])
def test_hf_aimv2_folder_norms_match_transformers(tmp_path, overrides):
    model = hf_aimv2(**overrides)
    model.save_pretrained(tmp_path / "aimv2")
    loaded = load_model(tmp_path / "aimv2")
    assert loaded.arch == "artifactscan_aimv2" and loaded.layout == "hf:aimv2_vision_model"
    assert (loaded.num_cls_tokens, loaded.num_register_tokens) == (0, 0)
    assert any("head" in n for n in loaded.notes)  # the attention-pooling head, dropped by name
    x = torch.randn(2, 3, 56, 56)
    ours, theirs = loaded_block_norms(loaded, x), hf_hidden_norms(model, x)
    assert ours.shape == theirs.shape == (2, 2, 16)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=0)


def test_hf_aimv2_converted_model_reloads_from_its_own_checkpoint(tmp_path):
    from artifactscan.models.checkpoint import save_checkpoint

    model = hf_aimv2()
    model.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    save_checkpoint(tmp_path / "ckpt.safetensors", loaded.model.state_dict(), loaded.meta)
    again = load_model(tmp_path / "ckpt.safetensors")
    assert again.arch == "artifactscan_aimv2"
    x = torch.randn(1, 3, 56, 56)
    torch.testing.assert_close(loaded_block_norms(again, x), hf_hidden_norms(model, x), rtol=1e-4, atol=0)


def test_hf_aimv2_native_resolution_is_refused_in_one_line(tmp_path):
    from artifactscan.core.errors import ModelLoadError

    hf_aimv2(is_native=True).save_pretrained(tmp_path / "m")
    with pytest.raises(ModelLoadError, match="native-resolution variant") as err:
        load_model(tmp_path / "m")
    assert "\n" not in str(err.value)


def live_capture_matches(model, x, cls: int) -> None:
    """A live HF model hooked as it is: names, prefix tokens, and every block's residual stream as transformers'
    own hidden states."""
    from artifactscan.models.hooks import capture, family_of, hook_names

    depth = model.config.num_hidden_layers
    assert family_of(model).name == "hf-vision" and family_of(model).prefix_tokens(model) == (cls, 0)
    assert {f"blocks.{i}.{p}" for i in range(depth) for p in ("resid_post", "attn.q", "mlp.post")} <= set(
        hook_names(model))
    with torch.no_grad():
        hidden = model(pixel_values=x, output_hidden_states=True).hidden_states[1:]
        with capture(model, ["blocks.*.resid_post"]) as cap:
            cap.forward(x)
    for i, h in enumerate(hidden):
        torch.testing.assert_close(cap[f"blocks.{i}.resid_post"], h)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_live_hf_aimv2_is_hooked_by_its_in_memory_names(attn):
    model = hf_aimv2()
    model.config._attn_implementation = attn
    live_capture_matches(model, torch.randn(2, 3, 56, 56), cls=0)


# ----------------------------------------------------------------------------------------------- no --arch
@pytest.mark.parametrize("name", [f"aimv2_{s}_patch14_{r}" for s in ("large", "huge", "1b", "3b") for r in (224, 336)]
                         + ["vit_pe_lang_gigantic_patch14_448", "vit_pe_spatial_base_patch16_512",
                            "vit_pe_spatial_large_patch14_448", "vit_base_patch16_radio_v3", "vit_giant_patch16_radio_v3",
                            "vit_so400m_patch16_radio_v4", "vit_huge_patch16_radio_v4"])
def test_new_families_match_by_shapes(name):
    """Every real configuration, on the meta device (no memory): a bare state dict finds its architecture."""
    from artifactscan.models import infer

    sd = infer._meta_model(name).state_dict()
    match = infer.infer_architecture(sd, "timm", name)
    # the 336 towers are the 224 ones read at 336 (equivalent configurations load as the table's first)
    assert match.arch == name.replace("_336", "_224")
    built = infer._meta_model(match.arch, **match.kwargs).state_dict()
    assert {k: v.shape for k, v in built.items()} == {k: v.shape for k, v in sd.items()}


# ----------------------------------------------------------------------------------------------- BEiT
BEIT = {  # BEiT v1 fine-tuned (relative bias per layer, mean pooling), v1 pretraining (shared bias, absolute
    # position embedding, final LayerNorm), BEiT v2 (as v1, layer scale)
    "v1": dict(use_relative_position_bias=True, use_mean_pooling=True),
    "shared": dict(use_shared_relative_position_bias=True, use_absolute_position_embeddings=True,
                   use_mean_pooling=False, layer_scale_init_value=0.0),
    "v2": dict(use_relative_position_bias=True, use_mean_pooling=True, layer_scale_init_value=0.1),
}


def hf_beit(task: bool = False, **overrides):
    config = transformers.BeitConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=32, patch_size=8, num_labels=3, **overrides)
    cls = transformers.BeitForImageClassification if task else transformers.BeitModel
    model = randomize(cls(config), scale=0.1)
    inner = model.beit if task else model
    for layer in inner.layers:  # BEiT has no key bias: transformers keeps none either
        assert layer.attention.k_proj.bias is None
    return model


@pytest.mark.parametrize("variant", list(BEIT))
def test_hf_beit_folder_norms_match_transformers(tmp_path, variant):
    model = hf_beit(**BEIT[variant])
    model.save_pretrained(tmp_path / "beit")
    from safetensors import safe_open

    assert any(k.startswith("encoder.layer.0.attention.attention.") for k in safe_open(
        str(tmp_path / "beit" / "model.safetensors"), "pt").keys())  # on-disk names, not the in-memory ones
    loaded = load_model(tmp_path / "beit")
    assert loaded.arch == "artifactscan_beit" and loaded.layout == "hf:beit"
    assert (loaded.num_cls_tokens, loaded.num_register_tokens) == (1, 0)
    x = torch.randn(2, 3, 32, 32)
    ours, theirs = loaded_block_norms(loaded, x), hf_hidden_norms(model, x)
    assert ours.shape == theirs.shape == (2, 2, 17)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=0)


def test_hf_beit_in_memory_names_and_task_model(tmp_path):
    """transformers 5's in-memory names (``layers.N.attention.q_proj``) saved by hand, and a classifier's ``beit.``
    wrapper with its head dropped."""
    model = hf_beit(task=True, **BEIT["v1"])
    model.save_pretrained(tmp_path / "m")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m" / "model.safetensors"))
    loaded = load_model(tmp_path / "m")
    assert any("classifier" in n for n in loaded.notes)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded_block_norms(loaded, x), hf_hidden_norms(model.beit, x), rtol=1e-4, atol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_live_hf_beit_is_hooked_by_its_in_memory_names(attn):
    model = hf_beit(**BEIT["v2"])
    model.config._attn_implementation = attn
    live_capture_matches(model, torch.randn(2, 3, 32, 32), cls=1)


# ----------------------------------------------------------------------------------------------- SigLIP2
def test_siglip2_fixres_folder_loads_and_norms_match(tmp_path):
    """SigLIP2's fixed-resolution checkpoints are ``SiglipModel`` folders (model_type ``siglip``): text tower and
    attention-pool head dropped, no CLS."""
    config = transformers.SiglipConfig(
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2))
    model = randomize(transformers.SiglipModel(config), scale=0.1)
    model.save_pretrained(tmp_path / "siglip2")
    loaded = load_model(tmp_path / "siglip2")
    assert loaded.layout == "hf:siglip" and (loaded.num_cls_tokens, loaded.num_register_tokens) == (0, 0)
    x = torch.randn(2, 3, 32, 32)
    ours, theirs = loaded_block_norms(loaded, x), hf_hidden_norms(model.vision_model, x)
    assert ours.shape == theirs.shape == (2, 2, 16)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=0)


@pytest.mark.parametrize("vision_only", [True, False])
def test_siglip2_naflex_folder_loads(tmp_path, vision_only):
    """SigLIP2 NaFlex folders (vision tower alone, or with its text tower) load on transformers' own model; the
    padding and the norms are tested in tests/test_naflex.py."""
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=8)
    if vision_only:
        model = transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(**vision))
    else:
        model = transformers.Siglip2Model(transformers.Siglip2Config(vision_config=vision, text_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)))
    model.save_pretrained(tmp_path / "naflex")
    loaded = load_model(tmp_path / "naflex")
    assert loaded.num_prefix_tokens == 0 and loaded.patch_size == (8, 8) and len(loaded.blocks) == 1
    assert loaded.data_config["naflex"]["max_num_patches"] == 256  # Siglip2ImageProcessor's default


def test_live_siglip2_naflex_is_hooked_by_its_own_family():
    from artifactscan.models.hooks import family_of, hook_points

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=8)
    model = transformers.Siglip2Model(transformers.Siglip2Config(vision_config=vision, text_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)))
    assert family_of(model).name == "hf-siglip2"
    assert hook_points(model)["blocks.0.resid_post"].module == "vision_model.encoder.layers.0"


# ----------------------------------------------------------------------------------------------- RADIO
@pytest.mark.parametrize("name,prefix", [("vit_base_patch16_radio_v3", (1, 7)), ("vit_huge_patch16_radio_v4", (1, 9))])
def test_timm_radio_state_dict_loads_and_prefix_tokens_stay_out(tmp_path, name, prefix):
    kwargs = {**TINY, "img_size": 64}
    model = randomize(timm.create_model(name, pretrained=False, **kwargs), scale=0.1)
    path = tmp_path / "radio.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = load_model(path, arch=name, arch_kwargs=kwargs)
    assert (loaded.num_cls_tokens, loaded.num_register_tokens) == prefix and loaded.num_prefix_tokens == sum(prefix)
    x = torch.randn(2, 3, 64, 64)
    ours, theirs = loaded_block_norms(loaded, x), timm_block_norms(model, x)
    assert ours.shape == theirs.shape == (2, 2, sum(prefix) + 16)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=0)


def test_radio_scan_keeps_its_ten_prefix_tokens_out_of_patch_statistics(tmp_path):
    """The scan's patch statistics are the patch tokens' alone (timm's patch tokens), its 10 prefix tokens apart."""
    import artifactscan

    name, kwargs = "vit_huge_patch16_radio_v4", {**TINY, "img_size": 64}
    model = randomize(timm.create_model(name, pretrained=False, **kwargs), scale=0.1)
    with torch.no_grad():
        model.reg_token.mul_(100)  # prefix tokens far above every patch: any leak into patch statistics shows
    path = tmp_path / "radio.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    images = torch.rand(2, 3, 64, 64)
    report = artifactscan.scan(path, images, arch=name, arch_kwargs=kwargs, img_size=64, device="cpu",
                               num_workers=0)
    assert [p.name for p in report.layers[0].prefix] == ["cls"] + [f"reg{i}" for i in range(9)]
    loaded = load_model(path, arch=name, arch_kwargs=kwargs)
    x = torch.stack([torch.as_tensor(i) for i in images])
    mean, std = (torch.tensor(loaded.data_config[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        blocks = model.forward_intermediates((x - mean) / std, norm=False, intermediates_only=True, output_fmt="NLC")
    for layer, patches in zip(report.layers, blocks):
        assert layer.max == pytest.approx(float(torch.linalg.vector_norm(patches, dim=-1).max()), rel=1e-3)


def hf_radio(**overrides):
    config = transformers.RadioConfig(**{**dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64, max_img_size=128, patch_size=16,
        patch_dim=768, norm_mean=[0.4, 0.5, 0.6], norm_std=[0.2, 0.25, 0.3]), **overrides})
    return randomize(transformers.RadioModel(config), scale=0.1)


def test_hf_radio_folder_norms_match_transformers(tmp_path):
    """RADIO's 3 summary tokens and 7 registers are all prefix tokens; its in-model normalisation is the
    preprocessing (transformers gets the raw pixels, artifactscan's model the normalised ones)."""
    model = hf_radio()
    model.save_pretrained(tmp_path / "radio")
    loaded = load_model(tmp_path / "radio")
    assert loaded.layout == "hf:radio" and loaded.num_prefix_tokens == 10
    assert loaded.data_config["mean"] == pytest.approx((0.4, 0.5, 0.6))
    assert loaded.data_config["std"] == pytest.approx((0.2, 0.25, 0.3))
    pixels = torch.rand(2, 3, 64, 64)
    mean, std = (torch.tensor(loaded.data_config[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    ours, theirs = loaded_block_norms(loaded, (pixels - mean) / std), hf_hidden_norms(model, pixels)
    assert ours.shape == theirs.shape == (2, 2, 10 + 16)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=0)


def test_hf_radio_in_memory_names_load_too(tmp_path):
    model = hf_radio()
    model.save_pretrained(tmp_path / "m")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m" / "model.safetensors"))
    loaded = load_model(tmp_path / "m")
    pixels = torch.rand(1, 3, 64, 64)
    mean, std = (torch.tensor(loaded.data_config[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    torch.testing.assert_close(loaded_block_norms(loaded, (pixels - mean) / std), hf_hidden_norms(model, pixels),
                               rtol=1e-4, atol=0)
