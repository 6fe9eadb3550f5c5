"""Hugging Face transformers models: tiny random-init save_pretrained folders (Dinov2, Dinov2WithRegisters, ViT,
CLIPVision, CLIPModel, SigLIP vision), loaded first by transformers itself; the converted timm model must give the
HF model's own per-block token norms (output_hidden_states). Then hub ids: precedence and offline behaviour."""

from __future__ import annotations

import time

import pytest
import torch

from artifactscan.core.errors import OfflineError
from artifactscan.models.loading import load_model

from .conftest import loaded_block_norms, randomize
from .test_native_layouts import cli_error, cli_model

T = pytest.importorskip("transformers")

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _cases():
    return {
        "dinov2": (lambda: T.Dinov2Model(T.Dinov2Config(**SMALL, image_size=28, patch_size=14, mlp_ratio=2)),
                   lambda: T.BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}),
                   28, (1, 0)),
        "dinov2_swiglu": (lambda: T.Dinov2Model(T.Dinov2Config(**SMALL, image_size=28, patch_size=14,
                                                                use_swiglu_ffn=True)), None, 28, (1, 0)),
        "dinov2_reg": (lambda: T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(
            **SMALL, image_size=28, patch_size=14, num_register_tokens=3)), None, 28, (1, 3)),
        "vit": (lambda: T.ViTModel(T.ViTConfig(**SMALL, image_size=32, patch_size=8)),
                lambda: T.ViTImageProcessor(size={"height": 32, "width": 32}), 32, (1, 0)),
        # a large epsilon, so that ignoring the config's layer_norm_eps would show in the norms
        "vit_eps": (lambda: T.ViTModel(T.ViTConfig(**SMALL, image_size=32, patch_size=8, layer_norm_eps=0.05)),
                    None, 32, (1, 0)),
        "vit_classifier": (lambda: T.ViTForImageClassification(T.ViTConfig(**SMALL, image_size=32, patch_size=8,
                                                                            num_labels=3)), None, 32, (1, 0)),
        "clip_vision": (lambda: T.CLIPVisionModel(T.CLIPVisionConfig(**SMALL, image_size=32, patch_size=8)),
                        lambda: T.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32), 32, (1, 0)),
        "clip": (lambda: T.CLIPModel(T.CLIPConfig(text_config=dict(SMALL, vocab_size=50, max_position_embeddings=8),
                                                  vision_config=dict(SMALL, image_size=32, patch_size=8),
                                                  projection_dim=16)), None, 32, (1, 0)),
        "siglip": (lambda: T.SiglipVisionModel(T.SiglipVisionConfig(**SMALL, image_size=32, patch_size=8)),
                   lambda: T.SiglipImageProcessor(size={"height": 32, "width": 32}), 32, (0, 0)),
    }


def hf_block_norms(model, x):
    vision = model.vision_model if hasattr(model, "text_model") else model
    with torch.no_grad():
        out = vision(pixel_values=x, output_hidden_states=True)
    return torch.stack([torch.linalg.vector_norm(h.float(), dim=-1) for h in out.hidden_states[1:]])


@pytest.fixture
def hf_folder(tmp_path, request):
    build, processor, size, prefix = _cases()[request.param]
    torch.manual_seed(0)
    folder = tmp_path / request.param
    randomize(build(), scale=0.1).save_pretrained(folder)
    if processor is not None:
        processor().save_pretrained(folder)
    return folder, size, prefix


@pytest.mark.parametrize("hf_folder", list(_cases()), indirect=True)
def test_hf_folder_matches_transformers(hf_folder):
    folder, size, (cls, reg) = hf_folder
    ref = T.AutoModel.from_pretrained(folder).eval()  # transformers' own loader: the fixture is known good
    loaded = load_model(folder)
    assert (loaded.num_cls_tokens, loaded.num_register_tokens) == (cls, reg)
    assert loaded.arch == "artifactscan_vit" and loaded.layout.startswith("hf:")
    x = torch.randn(2, 3, size, size)
    torch.testing.assert_close(loaded_block_norms(loaded, x), hf_block_norms(ref, x), rtol=1e-4, atol=1e-4)
    if (folder / "preprocessor_config.json").is_file():
        pp = T.AutoImageProcessor.from_pretrained(folder)
        assert list(loaded.data_config["mean"]) == pytest.approx(list(pp.image_mean))
        assert loaded.input_size == (size, size)


@pytest.mark.parametrize("hf_folder", ["dinov2_reg", "clip"], indirect=True)
def test_hf_folder_through_the_cli(hf_folder, tmp_path):
    folder, _, (cls, reg) = hf_folder
    model = cli_model(folder)  # a model folder, not taken for a training run's folder
    assert (model["num_blocks"], model["num_cls_tokens"], model["num_register_tokens"]) == (2, cls, reg)
    assert model["layout"].startswith("hf:")
    # the converted model describes itself (artifactscan_vit + JSON kwargs), so what `fix --out` saves reloads
    from artifactscan.models.checkpoint import save_checkpoint

    loaded = load_model(folder)
    path = save_checkpoint(tmp_path / "converted.safetensors", loaded.model.state_dict(), loaded.meta)
    again = load_model(path)
    x = torch.randn(1, 3, *loaded.input_size)
    torch.testing.assert_close(loaded_block_norms(again, x), loaded_block_norms(loaded, x))


def _fake_cache(cache, repo_id: str, folder):
    """The layout huggingface_hub keeps downloads in: models--ORG--NAME/snapshots/<rev>/, refs/main."""
    rev = "0" * 40
    root = cache / f"models--{repo_id.replace('/', '--')}"
    snap = root / "snapshots" / rev
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(rev)


@pytest.mark.parametrize("hf_folder", ["vit"], indirect=True)
def test_hub_ids(hf_folder, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    import artifactscan.models.loading as loading

    folder, size, _ = hf_folder
    monkeypatch.setattr(loading, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    # offline, a transformers id found in the local cache loads
    _fake_cache(tmp_path / "hub", "someorg/tiny-vit", folder)
    loaded = load_model("someorg/tiny-vit")
    assert loaded.source == "hf-transformers" and len(loaded.blocks) == 2
    # offline, an id not in the cache fails in seconds, saying what it was taken for and what works
    start = time.monotonic()
    with pytest.raises(OfflineError, match="taken as a Hugging Face model id.*unreachable.*local file"):
        load_model("someorg/not-cached")
    with pytest.raises(OfflineError, match="unreachable"):
        load_model("hf-hub:timm/vit_tiny_patch16_224.augreg_in21k")  # timm's hub loading, not a path
    assert "taken as a Hugging Face model id" in cli_error("someorg/not-cached")
    assert time.monotonic() - start < 10
    # an existing path always wins over an id of the same spelling
    monkeypatch.chdir(tmp_path)
    (tmp_path / "someorg").mkdir()
    folder.rename(tmp_path / "someorg" / "not-cached")
    assert load_model("someorg/not-cached").source == "hf-folder"
    with pytest.raises(Exception, match="does not exist"):
        load_model("someorg/missing.safetensors")
