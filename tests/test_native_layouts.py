"""Checkpoints in the layouts people hold (DINOv2 repo, DeiT-III, MAE, timm train.py, DDP + compile, SSL training),
each built from a random-init tiny model, saved in its native key layout and first loaded by timm's own
pretrained-file path (the reference); then loaded by artifactscan and compared block by block."""

from __future__ import annotations

import argparse
import json
import re

import pytest
import timm
import torch
from typer.testing import CliRunner

from artifactscan.cli import app
from artifactscan.core.errors import CheckpointMismatchError, InputError, ModelLoadError
from artifactscan.models.loading import load_model

from .conftest import hooked_block_norms, loaded_block_norms, randomize

runner = CliRunner()

DINO = "vit_small_patch14_reg4_dinov2"
DINO_KW = dict(embed_dim=32, depth=2, num_heads=2, img_size=28)  # patch 14: a 2x2 grid
DEIT3 = "deit3_small_patch16_224"
SMALL_KW = dict(embed_dim=32, depth=2, num_heads=2, img_size=32, patch_size=8)
VIT = "vit_small_patch16_224"


def reference(arch: str, path, **kwargs):
    """timm's own loader for pretrained files (the route it takes for hub weights): the fixture is known good."""
    return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs).eval()


def assert_same_norms(loaded, ref, size: int, n: int = 2):
    x = torch.randn(n, 3, size, size)
    ours = loaded_block_norms(loaded, x)
    theirs = hooked_block_norms(list(ref.blocks), ref.forward_features, x)
    assert ours.shape == theirs.shape and len(loaded.blocks) == len(ref.blocks)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def cli_model(path, *args) -> dict:
    result = runner.invoke(app, ["norms", str(path), "synthetic:4", "--json", *map(str, args)])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["model"]


def cli_error(path, *args) -> str:
    result = runner.invoke(app, ["norms", str(path), "synthetic:4", *map(str, args)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


def fast_random(arch: str, **kwargs):
    """A real-size random model without timm's slow truncated-normal init (torch's default init, random tokens)."""
    model = timm.create_model(arch, pretrained=False, weight_init="skip", **kwargs).eval()
    with torch.no_grad():  # what timm's init would have set (left empty by weight_init="skip")
        for name, p in model.named_parameters():
            if name in ("cls_token", "reg_token", "pos_embed") or name.endswith("gamma"):
                p.normal_(0, 0.1)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return model


def dinov2_native(model) -> dict[str, torch.Tensor]:
    """The DINOv2 repo's key layout of a timm reg DINOv2 (inverse of timm's converter): registers as
    `register_tokens`, the CLS position row inside `pos_embed`, a `mask_token`."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    cls_row = torch.randn(1, 1, sd["cls_token"].shape[-1])
    sd["register_tokens"] = sd.pop("reg_token")
    sd["pos_embed"] = torch.cat([cls_row, sd["pos_embed"]], 1)
    sd["cls_token"] = sd["cls_token"] - cls_row
    sd["mask_token"] = torch.zeros(1, sd["cls_token"].shape[-1])
    return {k: v for k, v in sd.items() if not k.startswith("head.")}


@pytest.fixture
def dino_files(tmp_path):
    teacher = randomize(timm.create_model(DINO, pretrained=False, num_classes=0, **DINO_KW), seed=1)
    student = randomize(timm.create_model(DINO, pretrained=False, num_classes=0, **DINO_KW), seed=2)
    hub = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(dinov2_native(teacher), hub)
    head = {"dino_head.mlp.0.weight": torch.randn(8, 32), "dino_head.last_layer.weight": torch.randn(16, 8)}
    train = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": {**{f"backbone.{k}": v for k, v in dinov2_native(teacher).items()}, **head}}, train)
    final = tmp_path / "model_final.pth"
    both = {f"{who}.backbone.{k}": v for who, m in (("teacher", teacher), ("student", student))
            for k, v in dinov2_native(m).items()}
    torch.save({"model": {**both, **{f"teacher.{k}": v for k, v in head.items()}}, "iteration": 9}, final)
    return hub, train, final, teacher, student


def test_dinov2_hub_file(dino_files):
    hub, *_ = dino_files
    ref = reference(DINO, hub, num_classes=0, **DINO_KW)  # timm's DINOv2 converter folds the CLS position row
    loaded = load_model(hub, arch=DINO, arch_kwargs=DINO_KW)
    assert (loaded.num_cls_tokens, loaded.num_register_tokens, loaded.layout) == (1, 4, "dinov2")
    assert_same_norms(loaded, ref, 28)
    model = cli_model(hub, "--arch", DINO, "--arch-kwargs", json.dumps(DINO_KW))
    assert (model["num_blocks"], model["num_cls_tokens"], model["num_register_tokens"]) == (2, 1, 4)


def test_dinov2_training_checkpoints_teacher_by_default(dino_files):
    hub, train, final, teacher, student = dino_files
    ref_teacher = reference(DINO, hub, num_classes=0, **DINO_KW)
    for path in (train, final):
        loaded = load_model(path, arch=DINO, arch_kwargs=DINO_KW)
        assert_same_norms(loaded, ref_teacher, 28)
    assert load_model(final, arch=DINO, arch_kwargs=DINO_KW).weights == "ema (model: teacher.backbone.)"
    raw = load_model(final, arch=DINO, arch_kwargs=DINO_KW, weights="raw")
    assert raw.weights == "raw (model: student.backbone.)"
    torch.testing.assert_close(raw.model.reg_token, student.reg_token)
    model = cli_model(train, "--arch", DINO, "--arch-kwargs", json.dumps(DINO_KW))
    assert model["weights"] is None and model["num_register_tokens"] == 4  # one set of weights: nothing to choose
    with pytest.raises(InputError, match="holds no raw weights"):
        load_model(train, arch=DINO, arch_kwargs=DINO_KW, weights="raw")


def test_deit3_original_gamma_keys(tmp_path):
    model = randomize(timm.create_model(DEIT3, pretrained=False, num_classes=7, **SMALL_KW))
    sd = {re.sub(r"ls([12])\.gamma", r"gamma_\1", k): v for k, v in model.state_dict().items()}
    path = tmp_path / "deit_3_small_224_1k.pth"
    torch.save({"model": sd, "epoch": 3}, path)
    ref = reference(DEIT3, path, num_classes=7, **SMALL_KW)  # timm's DeiT-III filter: adapt_layer_scale=True
    loaded = load_model(path, arch=DEIT3, arch_kwargs=SMALL_KW)
    assert loaded.layout == "deit3" and loaded.model.num_classes == 7
    assert_same_norms(loaded, ref, 32)
    # the wrong family (position rows for CLS) cannot be converted: one line, not an internal error
    line = cli_error(path, "--arch", VIT, "--arch-kwargs", json.dumps(SMALL_KW))
    assert "(deit3 layout) does not fit --arch vit_small_patch16_224" in line


def test_timm_train_checkpoint_uses_recorded_arch_and_args(tmp_path):
    raw = randomize(timm.create_model(VIT, pretrained=False, num_classes=5, **SMALL_KW), seed=3)
    ema = randomize(timm.create_model(VIT, pretrained=False, num_classes=5, **SMALL_KW), seed=4)
    args = argparse.Namespace(model=VIT, img_size=32, num_classes=5, in_chans=None,
                              model_kwargs={k: v for k, v in SMALL_KW.items() if k != "img_size"})
    path = tmp_path / "checkpoint-3.pth.tar"
    torch.save({"epoch": 3, "arch": VIT, "state_dict": raw.state_dict(), "state_dict_ema": ema.state_dict(),
                "optimizer": {}, "version": 2, "args": args}, path)
    ref = timm.create_model(VIT, pretrained=False, num_classes=5, **SMALL_KW).eval()
    timm.models.load_checkpoint(ref, str(path), use_ema=True)  # timm's own reader of its training checkpoints
    loaded = load_model(path)  # no --arch, no --trust-checkpoint: the Namespace is allowed, not "a whole module"
    assert loaded.arch == VIT and loaded.weights == "ema (state_dict_ema)"
    assert_same_norms(loaded, ref, 32)
    assert torch.equal(load_model(path, weights="raw").model.pos_embed, raw.pos_embed)
    model = cli_model(path, "--weights", "raw")
    assert model["weights"] == "raw (state_dict)" and model["num_blocks"] == 2


def test_compile_ddp_prefixes(tmp_path):
    model = randomize(timm.create_model(VIT, pretrained=False, num_classes=5, **SMALL_KW))
    path = tmp_path / "compiled.pth"
    torch.save({f"_orig_mod.module.{k}": v for k, v in model.state_dict().items()}, path)
    ref = reference(VIT, path, num_classes=5, **SMALL_KW)
    assert_same_norms(load_model(path, arch=VIT, arch_kwargs=SMALL_KW), ref, 32)


def test_mae_encoder_and_full_pretrain(tmp_path):
    enc = randomize(timm.create_model(VIT, pretrained=False, num_classes=0, **SMALL_KW))
    only = tmp_path / "mae_encoder.pth"
    torch.save({"model": enc.state_dict()}, only)  # no head: fine, the tool needs the encoder
    decoder = {"mask_token": torch.randn(1, 1, 16), "decoder_embed.weight": torch.randn(16, 32),
               "decoder_pos_embed": torch.randn(1, 17, 16), "decoder_blocks.0.norm1.weight": torch.randn(16),
               "decoder_norm.weight": torch.randn(16), "decoder_pred.weight": torch.randn(192, 16)}
    full = tmp_path / "mae_pretrain_full.pth"
    torch.save({"model": {**enc.state_dict(), **decoder}, "epoch": 799}, full)
    ref = reference(VIT, only, num_classes=0, **SMALL_KW)
    for path in (only, full):
        loaded = load_model(path, arch=VIT, arch_kwargs=SMALL_KW)
        assert loaded.model.num_classes == 0
        assert_same_norms(loaded, ref, 32)
    assert any("6 keys of the MAE decoder" in n for n in load_model(full, arch=VIT, arch_kwargs=SMALL_KW).notes)


def test_bare_timm_state_dict_needs_no_arch(tmp_path):
    """The design card's command on `torch.save(timm_vit.state_dict())` of a real ViT-Ti/16 (at 64 px: 4x4 grid)."""
    model = fast_random("vit_tiny_patch16_224", img_size=64)
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    loaded = load_model(path)
    assert loaded.arch == "vit_tiny_patch16_224" and loaded.inferred["num_heads"] == 3
    assert loaded.inferred["equivalent"] == ["deit_tiny_patch16_224"] and loaded.input_size == (64, 64)
    assert_same_norms(loaded, model, 64)
    report = cli_model(path)
    assert report["inferred"]["arch"] == "vit_tiny_patch16_224" and report["num_blocks"] == 12


def test_mismatch_messages(tmp_path, tiny_ckpt):
    # a wrapped checkpoint of an unknown configuration is called a training checkpoint, not "bare"
    path = tmp_path / "wrapped.pth"
    torch.save({"model": randomize(timm.create_model(VIT, pretrained=False, **SMALL_KW)).state_dict(), "epoch": 1},
               path)
    assert "(a training checkpoint): its shapes" in cli_error(path)
    # keys of a foreign layout: no --arch-kwargs hint (no kwarg can fix it); the file's top-level keys are named
    foreign = tmp_path / "foreign.pth"
    torch.save({"encoder": {"layer.0.weight": torch.randn(2, 2)}, "epoch": 1}, foreign)
    with pytest.raises(ModelLoadError, match="top-level keys are encoder, epoch"):
        load_model(foreign, arch=VIT)
    weird = tmp_path / "weird.pth"
    torch.save({"model": {**timm.create_model(VIT, pretrained=False, **SMALL_KW).state_dict(),
                          "adapter.weight": torch.randn(2)}}, weird)
    with pytest.raises(CheckpointMismatchError) as info:
        load_model(weird, arch=VIT, arch_kwargs=SMALL_KW)
    assert "adapter.weight" in str(info.value) and "Check arch and arch_kwargs" not in str(info.value)
    assert "top-level keys: model" in str(info.value)
    with pytest.raises(CheckpointMismatchError, match="Check arch and arch_kwargs"):  # a kwarg (reg_tokens) could fix this one
        load_model(tiny_ckpt, arch=VIT, arch_kwargs={**SMALL_KW, "reg_tokens": 2})
    line = cli_error(weird, "--weights", "ema")
    assert "holds no ema weights" in line


def test_pickled_module_message_and_weights_elsewhere(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(timm.create_model(VIT, pretrained=False, **SMALL_KW), path)
    assert "pickled Python objects" in cli_error(path) and "--trust-checkpoint" in cli_error(path)
    assert "chooses between the EMA and raw" in cli_error("demo", "--weights", "raw")
    assert "--weights must be one of ema, raw" in cli_error(path, "--weights", "best")


def test_dinov2_hub_file_needs_no_arch(tmp_path):
    """A real-size DINOv2 ViT-S/14 reg4 file in the repo's layout (at 56 px): inferred, registers counted."""
    model = fast_random(DINO, num_classes=0, img_size=56)
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(dinov2_native(model), path)  # (timm's own reading of this layout is checked at tiny size above)
    loaded = load_model(path)
    assert loaded.arch == DINO and loaded.inferred["arch_kwargs"] == {"num_classes": 0, "img_size": 56}
    assert (loaded.num_cls_tokens, loaded.num_register_tokens, loaded.input_size) == (1, 4, (56, 56))
    assert_same_norms(loaded, model, 56)  # the CLS position row folded back: the original's forward


def test_timm_hub_folder_and_fix_out_of_a_converted_file(tmp_path, dino_files):
    from timm.models._hub import save_for_hf  # how timm writes a hub repo: config.json naming the architecture

    model = randomize(timm.create_model(VIT, pretrained=False, num_classes=5, **SMALL_KW))
    save_for_hf(model, str(tmp_path / "timm-repo"), model_config={"img_size": 32})
    loaded = load_model(tmp_path / "timm-repo")  # timm's local-dir: loader, not the transformers converter
    assert loaded.source == "local-dir"
    assert_same_norms(loaded, model, 32)
    # a converted native file now describes itself, so what `fix --out` would save reloads without --arch
    from artifactscan.models.checkpoint import save_checkpoint

    hub, *_ = dino_files
    native_loaded = load_model(hub, arch=DINO, arch_kwargs=DINO_KW)
    saved = save_checkpoint(tmp_path / "fixed.safetensors", native_loaded.model.state_dict(), native_loaded.meta)
    assert_same_norms(load_model(saved), native_loaded.model, 28)
