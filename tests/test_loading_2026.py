"""timm's own files of the 2024-26 ViT families (DINOv3, EVA02, the RoPE ViTs, PE core, BEiT, flexivit).

Each fixture is a random-init model of timm's own class saved with ``state_dict()``: it must load with ``--arch``
unchanged, give the per-block token norms timm's own ``forward_intermediates(norm=False)`` gives, and count its
prefix tokens right. Without ``--arch``, the real configurations are matched by their shapes: small real-size files
end to end, the rest on the meta device (shapes only, no memory)."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

import artifactscan
from artifactscan.core.errors import ModelLoadError
from artifactscan.models import infer, native
from artifactscan.models.loading import load_model

from .conftest import loaded_block_norms, randomize

TINY = dict(depth=2, embed_dim=64, num_heads=2, img_size=64)

# (timm name, tiny kwargs, (CLS tokens, register tokens))
FAMILIES = [
    ("vit_small_patch16_dinov3", TINY, (1, 4)),
    ("vit_small_patch16_dinov3_qkvb", TINY, (1, 4)),
    ("eva02_tiny_patch14_224", {**TINY, "img_size": 56}, (1, 0)),
    ("vit_base_patch16_rope_224", TINY, (1, 0)),
    ("vit_small_patch16_rope_mixed_ape_224", TINY, (1, 0)),
    ("vit_betwixt_patch16_rope_reg4_gap_256", TINY, (0, 4)),
    ("vit_medium_patch16_rope_reg1_gap_256", TINY, (0, 1)),
    ("vit_pe_core_tiny_patch16_384", TINY, (1, 0)),
    ("beit_base_patch16_224", TINY, (1, 0)),
    ("beitv2_base_patch16_224", TINY, (1, 0)),
    ("beit3_base_patch16_224", TINY, (1, 0)),
    ("flexivit_small", {**TINY, "img_size": 48}, (1, 0)),
]


def save_timm(tmp_path, name: str, **kwargs):
    """A random-init model of timm's own class and its ``state_dict()`` saved as safetensors."""
    model = randomize(timm.create_model(name, pretrained=False, **kwargs), scale=0.1)
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def timm_block_norms(model, x) -> torch.Tensor:
    """``[num_blocks, B, T]`` token norms from timm's own intermediates (before the final norm)."""
    with torch.no_grad():
        blocks = model.forward_intermediates(x, norm=False, intermediates_only=True, output_fmt="NLC",
                                             return_prefix_tokens=True)
    return torch.stack([torch.linalg.vector_norm(torch.cat([prefix, patches], 1), dim=-1)
                        for patches, prefix in blocks])


@pytest.mark.parametrize("name,kwargs,prefix", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_timm_state_dict_loads_with_arch_unchanged_and_norms_match(tmp_path, name, kwargs, prefix):
    model, path = save_timm(tmp_path, name, **kwargs)
    loaded = load_model(path, arch=name, arch_kwargs=kwargs)
    own, ours = model.state_dict(), loaded.model.state_dict()
    assert ours.keys() == own.keys() and all(torch.equal(ours[k], v) for k, v in own.items())
    assert loaded.layout is None and not any("converted" in n for n in loaded.notes)  # read as it is
    assert (loaded.num_cls_tokens, loaded.num_register_tokens) == prefix
    assert loaded.num_prefix_tokens == model.num_prefix_tokens
    size = kwargs["img_size"]
    x = torch.randn(2, 3, size, size)
    ours_norms, theirs = loaded_block_norms(loaded, x), timm_block_norms(model.eval(), x)
    assert ours_norms.shape == theirs.shape == (2, 2, sum(prefix) + (size // loaded.patch_size[0]) ** 2)
    torch.testing.assert_close(ours_norms, theirs, rtol=1e-4, atol=0)


@pytest.mark.parametrize("name,arch", [
    ("vit_tiny_patch16_dinov3_qkvb", "vit_tiny_patch16_dinov3_qkvb"),  # gamma_N keys read as they are
    ("eva02_tiny_patch14_224", "eva02_tiny_patch14_224"),
    ("vit_pe_core_tiny_patch16_384", "vit_pe_core_tiny_patch16_384"),
])
def test_real_size_state_dict_loads_without_arch(tmp_path, name, arch):
    model, path = save_timm(tmp_path, name)
    loaded = load_model(path)
    assert loaded.arch == arch and loaded.inferred["arch"] == arch and loaded.layout is None
    own = model.state_dict()
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in own.items())
    assert loaded.num_prefix_tokens == model.num_prefix_tokens
    assert loaded.input_size == tuple(model.pretrained_cfg["input_size"][1:])  # from the configuration


def meta_state_dict(name: str, **kwargs) -> dict[str, torch.Tensor]:
    return infer._meta_model(name, **kwargs).state_dict()


# One name per family and size class, matched on the meta device (no memory): every family's real configurations.
SHAPE_ONLY = ["vit_small_patch16_dinov3", "vit_small_plus_patch16_dinov3", "vit_large_patch16_dinov3_qkvb",
              "vit_7b_patch16_dinov3", "eva02_base_patch16_clip_224", "vit_large_patch16_rope_mixed_224",
              "vit_mediumd_patch16_rope_reg1_gap_256", "vit_pe_core_large_patch14_336", "beit_large_patch16_512",
              "beit3_base_patch16_224", "flexivit_base"]


@pytest.mark.parametrize("name", SHAPE_ONLY)
def test_known_configurations_match_by_shapes(name):
    sd = meta_state_dict(name)
    converted = native.to_timm(sd, native.detect_layout(sd))
    match, layout = infer.infer_from_file(sd, converted, native.detect_layout(sd), name)
    assert match.arch == name and layout == "timm"


def test_equivalent_configurations_load_as_the_first():
    """eva02 at 224 and at 448 read at 224 compute the same function (same shapes, heads and RoPE settings)."""
    match = infer.infer_architecture(meta_state_dict("eva02_small_patch14_224"))
    assert (match.arch, match.equivalent) == ("eva02_small_patch14_224", ["eva02_small_patch14_336"])
    settings = infer._behaviour("vit_small_patch16_rope_224")[2]
    assert "temperature" in settings and "grid_indexing" in settings  # RoPE settings separate look-alikes


def test_ambiguous_file_names_the_candidates(monkeypatch):
    """vit_*_rope_ape_224 has exactly the keys and shapes of DeiT-III's original files: with it in the table, such a
    file is refused naming both readings (that is why the table leaves it out)."""
    monkeypatch.setattr(infer, "_extra_known", [])
    sd = meta_state_dict("vit_small_patch16_rope_ape_224")
    converted = native.to_timm(sd, "deit3")
    assert infer.infer_from_file(sd, converted, "deit3")[0].arch == "deit3_small_patch16_224"
    infer.register_known_config("vit_small_patch16_rope_ape_224", "rope", 384, 16)
    with pytest.raises(ModelLoadError, match=r"vit_small_patch16_rope_ape_224.*deit3_small_patch16_224.*Pass arch"):
        infer.infer_from_file(sd, converted, "deit3")


def test_no_position_embedding_is_not_refused_as_a_bad_grid():
    sd = meta_state_dict("vit_small_patch16_dinov3", depth=3)
    with pytest.raises(ModelLoadError, match=r"depth 3, width 384, patch 16, no absolute position embedding, CLS, "
                                             r"4 registers.*match no known ViT configuration"):
        infer.infer_architecture(sd)


@pytest.mark.parametrize("name,size", [("vit_small_patch16_dinov3", 96), ("vit_base_patch16_rope_224", 80)])
def test_rope_models_take_any_multiple_of_the_patch(tmp_path, name, size):
    model, path = save_timm(tmp_path, name, **TINY)
    loaded = load_model(path, arch=name, arch_kwargs=TINY, img_size=size)
    assert loaded.input_size == (size, size) and loaded.grid_size == (size // 16, size // 16)
    x = torch.randn(1, 3, size, size)
    model.set_input_size(img_size=size)
    torch.testing.assert_close(loaded_block_norms(loaded, x), timm_block_norms(model.eval(), x), rtol=1e-4, atol=0)


def test_scan_counts_dinov3_prefix_tokens_apart(tmp_path):
    _, path = save_timm(tmp_path, "vit_small_patch16_dinov3", **TINY)
    report = artifactscan.scan(path, torch.rand(2, 3, 64, 64), arch="vit_small_patch16_dinov3", arch_kwargs=TINY,
                               img_size=64, device="cpu", num_workers=0)
    assert (report.model.num_cls_tokens, report.model.num_register_tokens) == (1, 4)
    assert [p.name for p in report.layers[0].prefix] == ["cls", "reg0", "reg1", "reg2", "reg3"]


def test_naflex_is_named_not_contradicted(tmp_path):
    kwargs = dict(depth=2, embed_dim=64, num_heads=2)
    _, path = save_timm(tmp_path, "naflexvit_base_patch16_gap", **kwargs)
    with pytest.raises(ModelLoadError, match="NaFlexViT.*arch.*naflexvit_<size>") as err:
        load_model(path)
    assert "no patch_embed.proj.weight / blocks.N" not in str(err.value)
    loaded = load_model(path, arch="naflexvit_base_patch16_gap", arch_kwargs=kwargs)
    assert loaded.data_config["naflex"]["patch_size"] == 16
