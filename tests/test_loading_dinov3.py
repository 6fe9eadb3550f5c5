"""DINOv3 in Meta's and Hugging Face's layouts (timm's own files: tests/test_loading_2026.py).

No installed library writes Meta's ``dinov3_vit*16_pretrain_*.pth`` layout, so the fixture is written by the inverse
of timm's converter from a random-init timm DINOv3 model, and the round trip through timm's own
``eva.checkpoint_filter_fn`` is proved before artifactscan reads it. HF folders are written by transformers'
``DINOv3ViTModel.save_pretrained``, and every block's token norms are compared with transformers' own forward."""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import timm
import torch
from safetensors.torch import save_file

from artifactscan.core.errors import CheckpointMismatchError, ModelLoadError, NotAViTError
from artifactscan.models import infer, native
from artifactscan.models.layouts import dinov3
from artifactscan.models.loading import load_model

from .conftest import loaded_block_norms, randomize
from .test_loading_2026 import timm_block_norms

TINY = dict(depth=2, embed_dim=64, num_heads=2, img_size=64)
VARIANTS = ["vit_small_patch16_dinov3", "vit_small_patch16_dinov3_qkvb", "vit_huge_plus_patch16_dinov3"]


def to_meta(timm_sd: dict[str, torch.Tensor], head_dim: int) -> dict[str, torch.Tensor]:
    """The inverse of timm's Eva converter: a timm DINOv3 state dict in Meta's original layout (storage_tokens,
    ls1.gamma, rope_embed.periods, a 2-d mask_token, qkv.bias with bias_mask: zero biases when the model has none,
    SwiGLU as w1/w2/w3)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in timm_sd.items():
        if k.endswith(".attn.q_bias") or k.endswith(".attn.v_bias"):
            continue
        k = k.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        k = k.replace("mlp.fc1_g.", "mlp.w1.").replace("mlp.fc1_x.", "mlp.w2.")
        if "mlp.w1." in k or "mlp.w2." in k or ("mlp.fc2." in k and any(".mlp.fc1_g." in x for x in timm_sd)):
            k = k.replace("mlp.fc2.", "mlp.w3.")
        out[k] = v
    width = timm_sd["cls_token"].shape[-1]
    for key in [k for k in timm_sd if k.endswith(".attn.qkv.weight")]:
        block = key[: -len(".qkv.weight")]
        q = timm_sd.get(f"{block}.q_bias", torch.zeros(width))
        v = timm_sd.get(f"{block}.v_bias", torch.zeros(width))
        out[f"{block}.qkv.bias"] = torch.cat([q, torch.zeros(width), v])
        out[f"{block}.qkv.bias_mask"] = torch.cat([torch.ones(width), torch.zeros(width), torch.ones(width)])
    out["mask_token"] = torch.zeros(1, width)
    out["rope_embed.periods"] = 100.0 ** (2 * torch.arange(head_dim // 4) / (head_dim // 2))
    return out


def meta_file(tmp_path, name: str, file_name: str = "dinov3_vits16_pretrain_lvd1689m-08c60483.pth", **kwargs):
    """(timm model, path of its Meta-layout .pth)."""
    kwargs = {**TINY, **kwargs}
    model = randomize(timm.create_model(name, pretrained=False, **kwargs), scale=0.1)
    sd = to_meta(model.state_dict(), kwargs["embed_dim"] // kwargs["num_heads"])
    path = tmp_path / file_name
    torch.save(sd, path)
    return model, path


# ----------------------------------------------------------------------------------------------- the fixture itself
@pytest.mark.parametrize("name", VARIANTS)
def test_meta_fixture_round_trips_through_timms_converter(name):
    from timm.models.eva import checkpoint_filter_fn

    model = randomize(timm.create_model(name, pretrained=False, **TINY), scale=0.1)
    meta = to_meta(model.state_dict(), 32)
    assert "storage_tokens" in meta and "blocks.0.ls1.gamma" in meta and meta["mask_token"].dim() == 2
    with contextlib.redirect_stdout(io.StringIO()):  # timm prints an exception per block without q_bias
        back = checkpoint_filter_fn(dict(meta), model)
    own = model.state_dict()
    assert back.keys() == own.keys() and all(torch.equal(back[k], own[k]) for k in own)


# ----------------------------------------------------------------------------------------------- Meta's files
@pytest.mark.parametrize("name", VARIANTS)
def test_meta_file_loads_and_norms_match_timm(tmp_path, name):
    model, path = meta_file(tmp_path, name)
    loaded = load_model(path, arch=name, arch_kwargs=TINY)
    own, ours = model.state_dict(), loaded.model.state_dict()
    assert ours.keys() == own.keys() and all(torch.equal(ours[k], v) for k, v in own.items())
    assert loaded.layout == "dinov3" and (loaded.num_cls_tokens, loaded.num_register_tokens) == (1, 4)
    assert any("left out what only pretraining uses: mask_token, rope_embed.periods, qkv.bias_mask" in n
               for n in loaded.notes)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded_block_norms(loaded, x), timm_block_norms(model.eval(), x), rtol=1e-4, atol=0)


def test_timms_prints_stay_out_of_json_stdout(tmp_path, image_dir):
    from typer.testing import CliRunner

    from artifactscan.cli.app import app

    _, path = meta_file(tmp_path, "vit_small_patch16_dinov3")  # no q_bias: timm prints once per block
    result = CliRunner().invoke(app, ["norms", str(path), str(image_dir), "--arch", "vit_small_patch16_dinov3",
                                      "--arch-kwargs", json.dumps(TINY), "--json", "--workers", "0"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["model"]["num_register_tokens"] == 4 and report["model"]["layout"] == "dinov3"


def real_size_meta(name: str, biases: bool) -> dict[str, torch.Tensor]:
    """A real-size DINOv3 in Meta's layout without the cost of an initialisation: shapes from the meta device,
    small random values (q/v biases non-zero only when ``biases``)."""
    gen = torch.Generator().manual_seed(0)
    shapes = infer._meta_model(name).state_dict()
    sd = {k: torch.randn(v.shape, generator=gen) * 0.02 for k, v in shapes.items()}
    sd = to_meta(sd, 64)
    if not biases:
        sd = {k: (torch.zeros_like(v) if k.endswith("qkv.bias") else v) for k, v in sd.items()}
    return sd


@pytest.mark.parametrize("biases,arch", [(False, "vit_small_patch16_dinov3"),
                                         (True, "vit_small_patch16_dinov3_qkvb")])
def test_without_arch_the_bias_variant_follows_the_files_biases(biases, arch):
    sd = real_size_meta("vit_small_patch16_dinov3_qkvb", biases)
    assert native.detect_layout(sd) == "dinov3"
    match, layout = infer.infer_from_file(sd, native.to_timm(sd, "dinov3"), "dinov3", "file.pth")
    assert (match.arch, layout) == (arch, "dinov3")


@pytest.mark.parametrize("name", ["vit_7b_patch16_dinov3", "vit_huge_plus_patch16_dinov3"])
def test_the_7b_and_swiglu_sizes_match_by_shapes(name):
    """On the meta device (shapes only): Meta's 7B has no qkv bias at all and an extra local_cls_norm."""
    shapes = infer._meta_model(name).state_dict()
    sd = to_meta(shapes, 64 if "7b" not in name else 128)
    if "7b" in name:
        sd = {k: v for k, v in sd.items() if not k.endswith(("qkv.bias", "qkv.bias_mask"))}
        sd.update({"local_cls_norm.weight": torch.empty(4096, device="meta"),
                   "local_cls_norm.bias": torch.empty(4096, device="meta")})
    assert "blocks.0.mlp.w1.weight" in sd and native.detect_layout(sd) == "dinov3"
    match, _ = infer.infer_from_file(sd, native.to_timm(sd, "dinov3"), "dinov3", "file.pth")
    assert match.arch == name


def test_real_size_meta_file_loads_without_arch(tmp_path):
    model = randomize(timm.create_model("vit_tiny_patch16_dinov3_qkvb", pretrained=False), scale=0.05)
    path = tmp_path / "dinov3_vitt16_pretrain_lvd1689m.pth"
    torch.save(to_meta(model.state_dict(), 64), path)
    loaded = load_model(path)
    assert loaded.arch == "vit_tiny_patch16_dinov3_qkvb" and loaded.layout == "dinov3"
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in model.state_dict().items())
    assert loaded.input_size == (256, 256) and loaded.data_config["mean"] == dinov3.IMAGENET["mean"]


def test_nonzero_biases_are_refused_never_dropped(tmp_path):
    model, path = meta_file(tmp_path, "vit_small_patch16_dinov3_qkvb")
    with pytest.raises(CheckpointMismatchError, match=r"non-zero query/value biases .* use the _qkvb variant") as e:
        load_model(path, arch="vit_small_patch16_dinov3", arch_kwargs=TINY)
    assert "\n" not in str(e.value) and path.name in str(e.value)
    sd = torch.load(path)
    sd["blocks.1.attn.qkv.bias_mask"] = torch.ones_like(sd["blocks.1.attn.qkv.bias_mask"])  # the key bias unmasked
    sd["blocks.1.attn.qkv.bias"][64:128] = 0.5
    torch.save(sd, path)
    with pytest.raises(CheckpointMismatchError, match=r"key biases of blocks 1 are non-zero"):
        load_model(path, arch="vit_small_patch16_dinov3_qkvb", arch_kwargs=TINY)


@pytest.mark.parametrize("file_name,mean,noted", [
    ("dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth", (0.430, 0.411, 0.296), False),
    ("dinov3_vits16_pretrain_lvd1689m-08c60483.pth", (0.485, 0.456, 0.406), False),
    ("my_dinov3.pth", (0.485, 0.456, 0.406), True),
])
def test_preprocessing_comes_from_the_file_names_tag(tmp_path, file_name, mean, noted):
    _, path = meta_file(tmp_path, "vit_small_patch16_dinov3", file_name=file_name)
    loaded = load_model(path, arch="vit_small_patch16_dinov3", arch_kwargs=TINY)
    assert tuple(loaded.data_config["mean"]) == mean
    assert any("carry no preprocessing" in n for n in loaded.notes) == noted


def test_sat493m_values_agree_with_timms_own_configuration():
    cfg = timm.models.get_pretrained_cfg("vit_large_patch16_dinov3.sat493m").to_dict()
    assert (tuple(cfg["mean"]), tuple(cfg["std"])) == (dinov3.PREPROCESSING["sat493m"]["mean"],
                                                       dinov3.PREPROCESSING["sat493m"]["std"])


@pytest.mark.parametrize("drop,missing", [("storage_tokens", "storage_tokens"),
                                          ("blocks.1.ls2.gamma", "blocks.1.ls2.gamma")])
def test_a_meta_file_missing_a_piece_says_which_in_one_line(tmp_path, drop, missing):
    _, path = meta_file(tmp_path, "vit_small_patch16_dinov3")
    sd = torch.load(path)
    del sd[drop]
    torch.save(sd, path)
    with pytest.raises(ModelLoadError, match=rf"{path.name} is a DINOv3 checkpoint in Meta's layout .* missing "
                                             rf"{missing}") as e:
        load_model(path, arch="vit_small_patch16_dinov3", arch_kwargs=TINY)
    assert "\n" not in str(e.value)


def test_dinov3_convnext_is_refused_as_not_a_vit(tmp_path):
    """Meta's ConvNeXt key names (dinov3/models/convnext.py: downsample_layers, stages, pwconv, gamma)."""
    sd = {"downsample_layers.0.0.weight": torch.zeros(8, 3, 4, 4), "stages.0.0.dwconv.weight": torch.zeros(8, 1, 7, 7),
          "stages.0.0.pwconv1.weight": torch.zeros(32, 8), "stages.0.0.gamma": torch.zeros(8),
          "norm.weight": torch.zeros(8)}
    path = tmp_path / "dinov3_convnext_tiny_pretrain_lvd1689m-21b726bb.pth"
    torch.save(sd, path)
    with pytest.raises(NotAViTError, match=r"is a DINOv3 ConvNeXt checkpoint .* not a Vision Transformer"):
        load_model(path)


# ----------------------------------------------------------------------------------------------- Hugging Face
transformers = pytest.importorskip("transformers")


def hf_dinov3(gated: bool = False, **overrides):
    config = transformers.DINOv3ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96 if gated else 128,
        num_register_tokens=4, image_size=64, use_gated_mlp=gated, hidden_act="silu" if gated else "gelu",
        **overrides)
    return randomize(transformers.DINOv3ViTModel(config), scale=0.1)


def hf_norms(model, x) -> torch.Tensor:
    with torch.no_grad():
        out = model(pixel_values=x, output_hidden_states=True)
    return torch.stack([torch.linalg.vector_norm(h, dim=-1) for h in out.hidden_states[1:]])


@pytest.mark.parametrize("gated,names", [(False, "save_pretrained"), (True, "save_pretrained"),
                                         (False, "in-memory")])
def test_hf_folder_norms_match_transformers(tmp_path, gated, names):
    model = hf_dinov3(gated)
    folder = tmp_path / "dinov3-hf"
    model.save_pretrained(folder)
    if names == "in-memory":  # transformers 5's loaded names (model.layer.N), saved by hand
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    from safetensors import safe_open

    keys = set(safe_open(str(folder / "model.safetensors"), "pt").keys())
    assert any(k.startswith("model.layer.0." if names == "in-memory" else "layer.0.") for k in keys)
    loaded = load_model(folder)
    assert loaded.arch == dinov3.ARCH and loaded.layout == "hf:dinov3_vit"
    assert (loaded.num_cls_tokens, loaded.num_register_tokens) == (1, 4)
    x = torch.randn(2, 3, 64, 64)
    ours, theirs = loaded_block_norms(loaded, x), hf_norms(model, x)
    assert ours.shape == theirs.shape == (2, 2, 5 + 16)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=0)


def test_hf_folder_without_query_bias_and_with_an_odd_size(tmp_path):
    model = hf_dinov3(query_bias=False, proj_bias=False)
    model.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m", img_size=48)  # RoPE: any multiple of the patch, any aspect
    x = torch.randn(1, 3, 48, 80)
    torch.testing.assert_close(loaded_block_norms(loaded, x), hf_norms(model, x), rtol=1e-4, atol=0)


def test_hf_converted_model_reloads_from_its_own_checkpoint(tmp_path):
    from artifactscan.models.checkpoint import save_checkpoint

    model = hf_dinov3(gated=True)
    model.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    save_checkpoint(tmp_path / "c.safetensors", loaded.model.state_dict(), loaded.meta)
    again = load_model(tmp_path / "c.safetensors")
    assert again.arch == dinov3.ARCH and all(torch.equal(again.model.state_dict()[k], v)
                                             for k, v in loaded.model.state_dict().items())


def test_hf_folder_whose_config_disagrees_with_its_weights(tmp_path):
    hf_dinov3().save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["num_register_tokens"] = 2
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"do not fit .*reg_token.*config\.json belong to these weights") as e:
        load_model(tmp_path / "m")
    assert "\n" not in str(e.value)


def test_hf_dinov3_convnext_folder_is_refused_as_not_a_vit(tmp_path):
    folder = tmp_path / "convnext"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "dinov3_convnext"}))
    save_file({"stages.0.weight": torch.zeros(1)}, str(folder / "model.safetensors"))
    with pytest.raises(NotAViTError, match="DINOv3 ConvNeXt .* not a Vision Transformer"):
        load_model(folder)


def test_hf_rope_is_timms_dinov3_rope():
    """The mapping's RoPE settings: HF's inverse frequencies are timm's 1 / periods (rope_theta = temperature)."""
    model = hf_dinov3()
    eva = dinov3.build_dinov3(**dinov3.hf_kwargs(model.config.to_dict()))
    periods = eva.rope.periods if hasattr(eva.rope, "periods") else None
    assert periods is not None
    torch.testing.assert_close(1 / periods.float(), model.rope_embeddings.inv_freq, rtol=1e-6, atol=0)
    assert math.isclose(model.config.rope_theta, 100.0)
