"""The one table the loader dispatches through (models/layouts/table.py): every family module's layouts are in it,
and every entry of it is exercised here by a tiny fixture in that layout's native form, loaded through load_model,
which must name the layout and count the prefix tokens as the family says. (Each family's own test file checks the
norms against its library; this file checks that adding a family cannot skip the table or its fixture.)"""

from __future__ import annotations

import importlib
import pkgutil
import re

import pytest
import timm
import torch

from artifactscan.core.errors import NotAViTError
from artifactscan.models import infer, layouts, native
from artifactscan.models.layouts import base, table
from artifactscan.models.loading import load_model

from .conftest import loaded_block_norms, randomize
from .test_native_layouts import DEIT3, DINO, DINO_KW, SMALL_KW, VIT, dinov2_native

transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")


def _layout_objects(module) -> list:
    return [v for v in vars(module).values() if isinstance(v, (base.FileLayout, base.FolderLayout, base.Family))]


def _family_modules():
    for info in pkgutil.iter_modules(layouts.__path__):
        module = importlib.import_module(f"artifactscan.models.layouts.{info.name}")
        if _layout_objects(module):
            yield module


def test_every_layout_a_module_defines_is_in_the_table():
    modules = list(_family_modules())
    assert len(modules) >= 10  # the families moved into this form, and the 2025-26 ones
    for module in modules:
        for obj in _layout_objects(module):
            where = f"{module.__name__}: {obj!r:.80}"
            if isinstance(obj, base.Family):
                assert obj in table.FAMILIES, where
                assert set(obj.known) <= set(table.KNOWN_CONFIGS), where
            else:
                assert obj in (table.FILE_LAYOUTS if isinstance(obj, base.FileLayout) else table.FOLDER_LAYOUTS), where
                assert any(obj in f.files + f.folders for f in table.FAMILIES), where


def test_the_table_is_what_the_loader_reads():
    assert table.FILE_LAYOUTS[-1] is table.TIMM and table.TIMM.recognise({})  # timm's own keys: the fallback, last
    names = [layout.name for layout in table.FILE_LAYOUTS]
    assert len(names) == len(set(names))
    model_types = [t for layout in table.FOLDER_LAYOUTS for t in layout.model_types]
    assert len(model_types) == len(set(model_types))  # one converter per model_type
    assert infer.known_configs()[:len(table.KNOWN_CONFIGS)] == list(table.KNOWN_CONFIGS)
    assert {f.name: f for f in table.FAMILIES}.keys() >= {"timm", "dinov2", "deit3", "mae", "clip", "hf_vit"}


def test_pe_is_tried_before_openai_clip():
    """PE's native keys are OpenAI CLIP's plus its own: both recognise a PE file, and PE is tried first."""
    from .test_loading_families import pe_model, to_perception_models

    sd = to_perception_models(pe_model("vit_pe_lang_large_patch14_448", dict(depth=2, embed_dim=64, num_heads=2,
                                                                              img_size=56)).state_dict())
    sd["visual.class_embedding"] = sd.get("visual.class_embedding", torch.zeros(64))
    recognising = [layout.name for layout in table.FILE_LAYOUTS if layout.recognise(sd)]
    assert recognising[:2] == ["pe", "openai_clip"] and native.detect_layout(sd) == "pe"


# ----------------------------------------------------------------------------------------------- one fixture each
def _save(tmp_path, name: str, sd: dict) -> object:
    path = tmp_path / name
    torch.save(sd, path)
    return path


def _convnext(tmp_path):
    model = timm.create_model("convnext_atto", pretrained=False)
    return _save(tmp_path, "dinov3_convnext_tiny_pretrain_lvd1689m-21b726bb.pth", model.state_dict()), {}, None


def _pe(tmp_path):
    from .test_loading_families import TINY, clip_text_tower, pe_model, to_perception_models

    kwargs = {**TINY, "img_size": 64}
    sd = {**to_perception_models(pe_model("vit_pe_core_tiny_patch16_384", {**kwargs, "num_classes": 16}).state_dict()),
          **clip_text_tower()}
    return (_save(tmp_path, "PE-Core-T16-384.pt", sd), dict(arch="vit_pe_core_tiny_patch16_384", arch_kwargs=kwargs),
            (1, 0))


def _openai_clip(tmp_path):
    from .test_openclip_loading import KW, tiny_clip

    return (_save(tmp_path, "open_clip_pytorch_model.bin", tiny_clip(False).state_dict()),
            dict(arch="vit_base_patch16_clip_224", arch_kwargs=KW), (1, 0))


def _dinov3(tmp_path):
    from .test_loading_dinov3 import TINY, meta_file

    _, path = meta_file(tmp_path, "vit_small_patch16_dinov3")
    return path, dict(arch="vit_small_patch16_dinov3", arch_kwargs=TINY), (1, 4)


def _openclip_timm(tmp_path):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    model = CLIP(16, CLIPVisionCfg(timm_model_name="vit_tiny_patch16_224", timm_model_pretrained=False, timm_pool="",
                                   timm_proj="linear", image_size=32),
                 CLIPTextCfg(context_length=8, vocab_size=50, width=32, heads=2, layers=1))
    return (_save(tmp_path, "open_clip_model.pt", model.state_dict()),
            dict(arch="vit_tiny_patch16_224", arch_kwargs={"img_size": 32}), (1, 0))


def _mae(tmp_path):
    enc = randomize(timm.create_model(VIT, pretrained=False, num_classes=0, **SMALL_KW))
    decoder = {"mask_token": torch.randn(1, 1, 16), "decoder_embed.weight": torch.randn(16, 32),
               "decoder_pos_embed": torch.randn(1, 17, 16), "decoder_pred.weight": torch.randn(192, 16)}
    return (_save(tmp_path, "mae_pretrain_full.pth", {"model": {**enc.state_dict(), **decoder}}),
            dict(arch=VIT, arch_kwargs=SMALL_KW), (1, 0))


def _dinov2(tmp_path):
    model = randomize(timm.create_model(DINO, pretrained=False, num_classes=0, **DINO_KW))
    return _save(tmp_path, "dinov2_vits14_reg4_pretrain.pth", dinov2_native(model)), dict(
        arch=DINO, arch_kwargs=DINO_KW), (1, 4)


def _deit3(tmp_path):
    model = randomize(timm.create_model(DEIT3, pretrained=False, **SMALL_KW))
    sd = {re.sub(r"ls([12])\.gamma", r"gamma_\1", k): v for k, v in model.state_dict().items()}
    return _save(tmp_path, "deit_3_small_224_1k.pth", {"model": sd}), dict(arch=DEIT3, arch_kwargs=SMALL_KW), (1, 0)


def _timm(tmp_path):
    model = randomize(timm.create_model("vit_small_patch16_224", pretrained=False, reg_tokens=2, **SMALL_KW))
    args = {"model": "vit_small_patch16_224", "model_kwargs": {"reg_tokens": 2, **SMALL_KW}}
    return _save(tmp_path, "checkpoint-3.pth.tar", {"state_dict": model.state_dict(), "arch": args["model"],
                                                    "args": args}), {}, (1, 2)


FILE_FIXTURES = {"convnext": _convnext, "pe": _pe, "openai_clip": _openai_clip, "dinov3": _dinov3,
                 "openclip_timm": _openclip_timm, "mae": _mae, "dinov2": _dinov2, "deit3": _deit3, "timm": _timm}


def _hf_vit():
    return randomize(transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=28, patch_size=14,
        num_register_tokens=3)), scale=0.1), (1, 3)


def _hf_dinov3():
    from .test_loading_dinov3 import hf_dinov3

    return hf_dinov3(), (1, 4)


def _hf_aimv2():
    from .test_loading_families import hf_aimv2

    return hf_aimv2(), (0, 0)


def _hf_beit():
    from .test_loading_families import hf_beit

    return hf_beit(), (1, 0)


def _hf_radio():
    from .test_loading_families import hf_radio

    return hf_radio(), (1, 9)  # RADIO's 3 summary tokens and 7 registers: 1 CLS + 9 registers in timm's count


FOLDER_FIXTURES = {"dinov2": _hf_vit, "dinov3_vit": _hf_dinov3, "aimv2_vision_model": _hf_aimv2, "beit": _hf_beit,
                   "radio": _hf_radio}


def test_every_table_entry_has_a_fixture():
    assert list(FILE_FIXTURES) == [layout.name for layout in table.FILE_LAYOUTS]
    assert [table.folder_layout(t) for t in FOLDER_FIXTURES] == list(table.FOLDER_LAYOUTS)


def _check(loaded, prefix: tuple[int, int]) -> None:
    assert (loaded.num_cls_tokens, loaded.num_register_tokens) == prefix
    x = torch.randn(1, 3, *loaded.input_size)
    norms = loaded_block_norms(loaded, x)  # one forward through the capture layer: every block, every token
    grid = loaded.grid_size
    assert norms.shape[-1] == loaded.num_prefix_tokens + grid[0] * grid[1] and torch.isfinite(norms).all()


@pytest.mark.parametrize("name", list(FILE_FIXTURES))
def test_each_file_layout_loads_its_native_fixture(tmp_path, name):
    path, kwargs, prefix = FILE_FIXTURES[name](tmp_path)
    layout = table.file_layout(name)
    if layout.refusal is not None:
        with pytest.raises(NotAViTError, match="not a Vision Transformer"):
            load_model(path, **kwargs)
        return
    loaded = load_model(path, **kwargs)
    assert loaded.layout == (None if name == "timm" else name)
    _check(loaded, prefix)


@pytest.mark.parametrize("model_type", list(FOLDER_FIXTURES))
def test_each_folder_layout_loads_its_native_fixture(tmp_path, model_type):
    model, prefix = FOLDER_FIXTURES[model_type]()
    model.save_pretrained(tmp_path / model_type)
    loaded = load_model(tmp_path / model_type)
    assert loaded.layout == f"hf:{model.config.model_type}" and loaded.arch == table.folder_layout(model_type).arch
    _check(loaded, prefix)
