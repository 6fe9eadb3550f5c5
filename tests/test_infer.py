"""Shape inference for bare state dicts, on real sizes built on the meta device (no memory, no weights): each
file layout is matched to the one known timm architecture it is, ambiguity and unknown sizes are refused."""

from __future__ import annotations

import re

import pytest
import timm
import torch

from artifactscan.core.errors import ModelLoadError
from artifactscan.models import infer, native


def meta_sd(arch: str, **kwargs) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return dict(timm.create_model(arch, pretrained=False, **kwargs).state_dict())


def match(blob) -> infer.Match:
    ckpt = native.unwrap(blob)
    sd = native.to_timm(ckpt.state_dict, ckpt.layout) if ckpt.layout != "timm" else ckpt.state_dict
    return infer.infer_architecture(sd, ckpt.layout)


def dinov2_repo_layout(sd: dict[str, torch.Tensor], swiglu: bool = False) -> dict[str, torch.Tensor]:
    """The DINOv2 repo's names for a timm DINOv2 (meta tensors): register_tokens, the CLS row inside pos_embed,
    a mask_token, and (giant) the SwiGLU's w12 / w3."""
    out = {}
    for k, v in sd.items():
        if swiglu:
            k = k.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3")
        out[k] = v
    if "reg_token" in out:
        out["register_tokens"] = out.pop("reg_token")
        out["pos_embed"] = torch.empty(1, out["pos_embed"].shape[1] + 1, out["cls_token"].shape[-1], device="meta")
    out["mask_token"] = torch.empty(1, out["cls_token"].shape[-1], device="meta")
    return {k: v for k, v in out.items() if not k.startswith("head.")}


@pytest.mark.parametrize("arch", ["vit_small_patch14_reg4_dinov2", "vit_giant_patch14_dinov2",
                                  "vit_large_patch14_reg4_dinov2"])
def test_dinov2_repo_files(arch):
    m = match(dinov2_repo_layout(meta_sd(arch, num_classes=0), swiglu="giant" in arch))
    assert m.arch == arch and "img_size" not in m.kwargs and m.kwargs["num_classes"] == 0
    assert m.facts.reg_tokens == (4 if "reg4" in arch else 0) and m.facts.layer_scale


def test_grid_gives_img_size():
    m = match(meta_sd("vit_base_patch14_dinov2", img_size=224, num_classes=0))
    assert m.arch == "vit_base_patch14_dinov2" and m.kwargs["img_size"] == 224 and m.facts.grid == [16, 16]
    assert m.facts.pos_embed_on_prefix is True


def test_deit3_original_and_mae_pretrain_and_siglip():
    deit3 = {re.sub(r"ls([12])\.gamma", r"gamma_\1", k): v for k, v in meta_sd("deit3_base_patch16_224").items()}
    m = match({"model": deit3})
    assert m.arch == "deit3_base_patch16_224" and m.facts.pos_embed_on_prefix is False and m.kwargs["num_classes"] == 1000
    mae = {**meta_sd("vit_base_patch16_224", num_classes=0), "decoder_embed.weight": torch.empty(512, 768),
           "decoder_pos_embed": torch.empty(1, 197, 512), "mask_token": torch.empty(1, 1, 512)}
    m = match({"model": mae})
    assert m.arch == "vit_base_patch16_224.mae" and "vit_base_patch16_224" in m.equivalent
    siglip = match(meta_sd("vit_so400m_patch14_siglip_224"))  # head dim 72: only the table knows 16 heads
    assert (siglip.arch, siglip.num_heads, siglip.facts.class_token) == ("vit_so400m_patch14_siglip_224", 16, False)


def test_openai_and_openclip_share_keys_so_activation_is_refused():
    open_clip = pytest.importorskip("open_clip")
    with torch.device("meta"):
        model = open_clip.model.CLIP(**open_clip.get_model_config("ViT-B-16"))
    sd = dict(model.state_dict())  # visual.* and the text tower, OpenAI's key layout
    with pytest.raises(ModelLoadError, match=r"vit_base_patch16_clip_224 \(12 heads, GELU\); "
                                             r"vit_base_patch16_clip_quickgelu_224 \(12 heads, QuickGELU\).*Pass arch with"):
        match(sd)
    ckpt = native.unwrap(sd)
    assert ckpt.layout == "openai_clip" and ckpt.dropped["CLIP text tower"] > 0
    # what an OpenAI TorchScript archive tells beyond its shapes: QuickGELU
    timm_sd = native.to_timm(ckpt.state_dict, ckpt.layout)
    m = infer.infer_architecture(timm_sd, ckpt.layout, activation="QuickGELU")
    assert (m.arch, m.act, m.kwargs["num_classes"]) == ("vit_base_patch16_clip_quickgelu_224", "QuickGELU", 512)


def test_unknown_configuration_is_refused_not_guessed():
    with pytest.raises(ModelLoadError, match=r"depth 10, width 384.*match no known ViT configuration; closest: "
                                             r"vit_small_patch16_224.*Pass arch=TIMM_NAME \(and arch_kwargs"):
        match(meta_sd("vit_small_patch16_224", depth=10))
    with pytest.raises(ModelLoadError, match="not a square grid"):
        match(meta_sd("vit_small_patch16_224", img_size=(224, 160)))


def test_registered_config_joins_the_table(monkeypatch):
    monkeypatch.setattr(infer, "_extra_known", [])
    sd = meta_sd("test_vit")  # timm's own tiny test architecture: not in the table
    with pytest.raises(ModelLoadError, match="no known ViT configuration"):
        match(sd)
    infer.register_known_config("test_vit", "vit", 64, 16)
    assert match(sd).arch == "test_vit"
