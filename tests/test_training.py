"""train-reg library: checkpoints, resume determinism, DDP, controlled pairs and every documented error."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn as nn

from artifactscan.models.checkpoint import read_meta
from artifactscan.core.errors import InputError, TrainingError
from artifactscan.analysis.training import (
    PRESETS,
    StepBatchSampler,
    TrainConfig,
    build_model,
    export_half,
    get_preset,
    parse_registers,
    resolve_config,
    resume,
    train_model,
    train_reg,
)

from artifactscan.monitor import read_monitor

from .conftest import join_two_rank_group


def tiny(**kw) -> TrainConfig:
    base = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, steps=8, batch_size=16,
                train_size=512, val_size=64, eval_every=4, ckpt_every=4, keep_ckpts=4, warmup_steps=2,
                device="cpu", num_threads=1, progress_every=2)
    base.update(kw)
    return get_preset("demo", **base)


def _load(path):
    from safetensors.torch import load_file
    import timm

    meta = read_meta(path)
    model = timm.create_model(meta.arch, pretrained=False, **meta.arch_kwargs)
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return model.eval(), meta


def test_demo_preset_matches_the_recipe():
    cfg = PRESETS["demo"]
    assert (cfg.arch, cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads) == (
        "vit_small_patch16_224", 32, 4, 128, 6, 4)
    assert (cfg.num_classes, cfg.class_token, cfg.lr, cfg.weight_decay, cfg.batch_size) == (8, True, 2e-3, 0.05, 64)
    assert (cfg.warmup_steps, cfg.clip_grad) == (200, 3.0)
    assert json.loads(cfg.to_json())["arch"] == cfg.arch
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg
    no_cls = get_preset("demo", class_token=False)
    assert no_cls.model_kwargs()["global_pool"] == "avg"


def test_real_data_preset_uses_the_architecture_sizes():
    cfg = get_preset(data="imagenet100/", arch="vit_tiny_patch16_224", epochs=100, device="cuda")
    assert cfg.steps is None and cfg.epochs == 100 and cfg.num_classes is None
    full = resolve_config(cfg)
    assert (full.img_size, full.patch_size, full.embed_dim, full.depth, full.num_heads) == (224, 16, 192, 12, 3)
    small = resolve_config(get_preset(arch="vit_tiny_patch16_224", img_size=64, depth=4))
    assert (small.img_size, small.depth, small.embed_dim) == (64, 4, 192)
    assert get_preset().img_size == 32  # no data, no arch: the CPU demo


def test_register_model_shares_initial_weights_with_baseline():
    cfg = tiny()
    base, reg = build_model(cfg, 0), build_model(cfg, 4)
    assert reg.num_prefix_tokens == 5 and reg.reg_token.shape == (1, 4, 32)
    rsd = reg.state_dict()
    for k, v in base.state_dict().items():
        assert torch.equal(v, rsd[k]), k


def test_step_sampler_is_stateless_and_shards():
    full = StepBatchSampler(100, 8, seed=3, start_step=0, total_steps=30)
    batches = list(full)
    later = StepBatchSampler(100, 8, seed=3, start_step=17, total_steps=30)
    assert list(later) == batches[17:]
    r0 = StepBatchSampler(100, 4, seed=3, start_step=0, total_steps=30, rank=0, world=2)
    r1 = StepBatchSampler(100, 4, seed=3, start_step=0, total_steps=30, rank=1, world=2)
    for k in (0, 13, 29):
        both = sorted(r0.batch(k) + r1.batch(k))
        assert both == sorted(batches[k]) and not set(r0.batch(k)) & set(r1.batch(k))


def test_train_model_writes_loadable_self_describing_checkpoints(tmp_path):
    cfg = tiny(registers=2)
    res = train_model(cfg, tmp_path / "run", progress=False, return_model=True)
    run = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "last.pt", "final.safetensors", "result.json"):
        assert (run / name).is_file(), name
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [4, 8]
    # the artifact monitor measured the same weights at each evaluation, the validation images its probe set
    history = read_monitor(run)
    assert history.steps == [4, 8] and history.num_blocks == 2
    assert history.last.model.num_register_tokens == 2 and history.last.images.num_scanned == 64
    assert {"loss", "val_acc", "img_per_s", "val_loss"} <= set(metrics[0])
    assert res.steps == 8 and 0.0 <= res.val_acc <= 1.0 and res.img_per_s > 0
    assert [p.name for p in res.checkpoints] == ["step_0000004.safetensors"]

    model, meta = _load(res.final_checkpoint)
    assert meta.arch == "vit_small_patch16_224" and meta.kind == "trained" and meta.step == 8
    assert meta.arch_kwargs["reg_tokens"] == 2 and meta.arch_kwargs["img_size"] == 16
    assert meta.arch_kwargs["embed_dim"] == 32 and meta.arch_kwargs["depth"] == 2
    assert meta.data_config["input_size"] == [3, 16, 16]
    assert {"mean", "std", "interpolation", "crop_pct"} <= set(meta.data_config)
    assert meta.extra["config"]["registers"] == 2
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x), res.model.eval()(x), atol=1e-6)
    snap_model, snap_meta = _load(res.checkpoints[0])
    assert snap_meta.step == 4
    # the resume file is a plain weights_only checkpoint that also describes itself
    blob = torch.load(run / "last.pt", weights_only=True)
    assert isinstance(blob["resume"]["rng_cpu"], torch.Tensor)
    assert read_meta(run / "last.pt").arch_kwargs["reg_tokens"] == 2


def test_snapshots_are_thinned_evenly(tmp_path):
    res = train_model(tiny(steps=9, ckpt_every=1, keep_ckpts=3, eval_every=9), tmp_path / "r", progress=False)
    steps = [int(p.stem.split("_")[1]) for p in res.checkpoints]
    assert len(steps) <= 3 and steps == sorted(steps)
    assert all(p.is_file() for p in res.checkpoints)
    assert len(list((tmp_path / "r" / "checkpoints").iterdir())) == len(steps)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    cfg = tiny(steps=8, ckpt_every=100)
    full = train_model(cfg, tmp_path / "full", progress=False, return_model=True)
    part = train_model(cfg, tmp_path / "part", progress=False, stop_at_step=4)
    assert part.steps == 4 and not (tmp_path / "part" / "final.safetensors").exists()
    resumed = resume(tmp_path / "part", progress=False)
    assert resumed.steps == 8
    a, _ = _load(full.final_checkpoint)
    b, _ = _load(resumed.final_checkpoint)
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), k
    m_full = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    m_res = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["val_loss"] for x in m_full] == [json.loads(x)["val_loss"] for x in m_res]
    # the resumed run continued monitor.jsonl: the same updates as the uninterrupted run's
    assert read_monitor(tmp_path / "part").outlier_fraction == read_monitor(tmp_path / "full").outlier_fraction
    assert read_monitor(tmp_path / "part").steps == [4, 8]


def test_train_reg_pair_and_baseline_reuse(tmp_path):
    cfg = tiny(steps=4, eval_every=4)
    res = train_reg(cfg, tmp_path / "pair", 2, parallel=False, progress=False)
    assert [v.registers for v in res.variants] == [0, 2]
    assert res.baseline.checkpoint.is_file() and res.variant(2).checkpoint.is_file()
    assert read_meta(res.checkpoints()[2]).arch_kwargs["reg_tokens"] == 2
    comp = json.loads(res.variants_path.read_text())
    assert res.variants_path.name == "variants.json" and [v["registers"] for v in comp["variants"]] == [0, 2]
    # its name before 0.3, still written for one version with the same content
    assert res.comparison_path.name == "comparison.json"
    assert json.loads(res.comparison_path.read_text()) == comp
    # only the register model is trained when a baseline is given
    res2 = train_reg(cfg, tmp_path / "only-reg", "1", baseline_checkpoint=res.baseline.checkpoint,
                     parallel=False, progress=False)
    assert [(v.registers, v.trained) for v in res2.variants] == [(0, False), (1, True)]
    assert not (tmp_path / "only-reg" / "reg0").exists()
    with pytest.raises(TrainingError, match="does not match"):
        train_reg(tiny(depth=3), tmp_path / "x", 4, baseline_checkpoint=res.baseline.checkpoint, progress=False)
    # folder already used
    with pytest.raises(TrainingError, match="already holds"):
        train_reg(cfg, tmp_path / "pair", 2, parallel=False, progress=False)


def test_train_reg_side_by_side_processes(tmp_path):
    cfg = tiny(steps=2, eval_every=2, ckpt_every=2)
    res = train_reg(cfg, tmp_path / "par", "0,1", parallel=True, progress=True)
    assert [v.registers for v in res.variants] == [0, 1]
    assert all(v.checkpoint.is_file() for v in res.variants)
    assert json.loads((tmp_path / "par" / "reg1" / "config.json").read_text())["num_threads"] == 1


def test_export_half(tmp_path):
    res = train_model(tiny(steps=2, eval_every=2), tmp_path / "r", progress=False)
    out = export_half(res.final_checkpoint, tmp_path / "demo.safetensors", description="a demo")
    model, meta = _load(out)
    assert meta.kind == "demo" and meta.description == "a demo" and meta.extra["dtype"] == "float16"


# ------------------------------------------------------------------------------------------------ DDP (gloo, CPU)

def _ddp_worker(rank: int, out: str) -> None:
    join_two_rank_group(rank, os.path.join(out, "rendezvous"))
    import torch.distributed as dist

    res = train_model(tiny(steps=4, eval_every=2, ckpt_every=2), os.path.join(out, "run"), progress=False,
                      return_model=True)
    torch.save({k: v.clone() for k, v in res.model.state_dict().items()}, os.path.join(out, f"rank{rank}.pt"))
    with open(os.path.join(out, f"acc{rank}.json"), "w") as f:
        json.dump({"val_acc": res.val_acc}, f)
    dist.destroy_process_group()


def test_ddp_two_processes_gloo(tmp_path):
    import torch.multiprocessing as tmp_mp

    tmp_mp.spawn(_ddp_worker, args=(str(tmp_path),), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    run = tmp_path / "run"
    assert (run / "final.safetensors").is_file() and (run / "last.pt").is_file()
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2  # rank 0 wrote once per eval
    assert len((run / "monitor.jsonl").read_text().splitlines()) == 2  # and the monitor's rank 0 alone too
    accs = [json.loads((tmp_path / f"acc{r}.json").read_text())["val_acc"] for r in (0, 1)]
    assert accs[0] == accs[1]  # sharded eval, all-reduced
    final, _ = _load(run / "final.safetensors")
    for k, v in final.state_dict().items():
        assert torch.equal(v, a[k]), k


# ------------------------------------------------------------------------------------------------ image folders
def test_image_folder_training_with_deterministic_split(tmp_path):
    from artifactscan.inputs.synthetic import write_image_folder

    root = write_image_folder(tmp_path / "shapes", 60, seed=0)
    cfg = tiny(data=str(root), num_classes=None, steps=2, eval_every=2, batch_size=8)
    res = train_model(cfg, tmp_path / "run", progress=False)
    meta = read_meta(res.final_checkpoint)
    assert meta.arch_kwargs["num_classes"] == 8
    assert meta.data_config["mean"] == [0.485, 0.456, 0.406]


def test_image_folder_with_train_and_val_subfolders(tmp_path):
    from artifactscan.inputs.synthetic import write_image_folder

    write_image_folder(tmp_path / "d" / "train", 40, seed=0)
    write_image_folder(tmp_path / "d" / "val", 10, seed=0, split="val")
    res = train_model(tiny(data=str(tmp_path / "d"), num_classes=None, steps=2, eval_every=2, batch_size=8),
                      tmp_path / "run", progress=False)
    assert res.steps == 2


# ------------------------------------------------------------------------------------------------ errors
def _one_image(path):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 20), (120, 30, 30)).save(path)


def test_error_data_folder_with_one_class(tmp_path):
    for i in range(3):
        _one_image(tmp_path / "data" / "cats" / f"{i}.png")
    with pytest.raises(InputError, match="only one class folder"):
        train_model(tiny(data=str(tmp_path / "data")), tmp_path / "run", progress=False)


def test_error_data_folder_without_images(tmp_path):
    (tmp_path / "data" / "a").mkdir(parents=True)
    (tmp_path / "data" / "b").mkdir(parents=True)
    with pytest.raises(InputError, match="no images"):
        train_model(tiny(data=str(tmp_path / "data")), tmp_path / "run", progress=False)
    _one_image(tmp_path / "loose" / "x.png")
    with pytest.raises(InputError, match="one sub-folder per class"):
        train_model(tiny(data=str(tmp_path / "loose")), tmp_path / "run", progress=False)
    with pytest.raises(InputError, match="does not exist"):
        train_model(tiny(data=str(tmp_path / "nope")), tmp_path / "run", progress=False)


def test_error_negative_registers(tmp_path):
    with pytest.raises(TrainingError, match="0 or more"):
        parse_registers("0,-1")
    with pytest.raises(TrainingError, match="integers"):
        parse_registers("four")
    with pytest.raises(TrainingError, match="0 or more"):
        train_reg(tiny(), tmp_path / "r", -2, progress=False)
    with pytest.raises(TrainingError, match="0 or more"):
        train_model(tiny(registers=-1), tmp_path / "r2", progress=False)
    assert parse_registers("0,1,2,4,8") == [0, 1, 2, 4, 8]


def test_error_non_vit_arch(tmp_path):
    with pytest.raises(TrainingError, match="not a timm VisionTransformer"):
        build_model(tiny(arch="resnet18"))
    with pytest.raises(TrainingError, match="not a timm VisionTransformer"):
        train_model(get_preset(arch="resnet18", steps=2), tmp_path / "r", progress=False)
    with pytest.raises(TrainingError, match="not a timm VisionTransformer"):
        train_reg(get_preset(arch="resnet18", steps=2), tmp_path / "r2", 4, progress=False)
    with pytest.raises(TrainingError, match="unknown timm architecture"):
        build_model(tiny(arch="no_such_model_xyz"))


def test_error_resume_without_checkpoint_or_with_other_config(tmp_path):
    with pytest.raises(TrainingError, match="not an artifactscan run folder"):
        resume(tmp_path, progress=False)
    (tmp_path / "started").mkdir()
    (tmp_path / "started" / "config.json").write_text(json.dumps(tiny().to_dict()))
    with pytest.raises(TrainingError, match="no checkpoint"):
        resume(tmp_path / "started", progress=False)
    train_model(tiny(steps=4), tmp_path / "run", progress=False, stop_at_step=2)
    with pytest.raises(TrainingError, match="different config.*depth"):
        resume(tmp_path / "run", {"depth": 3}, progress=False)
    with pytest.raises(TrainingError, match="different config"):
        train_model(tiny(steps=4, lr=1e-3), tmp_path / "run", resume=True, progress=False)
    with pytest.raises(TrainingError, match="already holds"):
        train_model(tiny(steps=4), tmp_path / "run", progress=False)
    # a train-reg folder whose variants never saved anything
    (tmp_path / "pair").mkdir()
    (tmp_path / "pair" / "config.json").write_text(json.dumps(tiny().to_dict()))
    (tmp_path / "pair" / "train_reg.json").write_text(json.dumps({"registers": [0, 4], "baseline_checkpoint": None}))
    with pytest.raises(TrainingError, match="no checkpoint"):
        resume(tmp_path / "pair", progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_error_cuda_absent(tmp_path):
    with pytest.raises(TrainingError, match="no CUDA GPU"):
        train_model(tiny(device="cuda"), tmp_path / "run", progress=False)


def test_error_cuda_oom_suggests_smaller_batch(tmp_path, monkeypatch):
    def boom(self, *a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(torch.optim.AdamW, "step", boom)
    with pytest.raises(TrainingError, match="out of memory at batch size 16.*batch_size=8"):
        train_model(tiny(), tmp_path / "run", progress=False)


def test_error_bad_shapes(tmp_path):
    with pytest.raises(TrainingError, match="not a multiple of patch_size"):
        train_model(tiny(img_size=18), tmp_path / "run", progress=False)
    with pytest.raises(TrainingError, match="unknown training option"):
        tiny(no_such_option=1)


def test_resume_a_train_reg_folder(tmp_path):
    cfg = resolve_config(tiny(steps=4, eval_every=2, ckpt_every=100))
    root = tmp_path / "pair"
    root.mkdir()
    (root / "config.json").write_text(json.dumps(cfg.to_dict()))
    (root / "train_reg.json").write_text(json.dumps({"registers": [0, 4], "baseline_checkpoint": None}))
    train_model(cfg, root / "reg0", progress=False, stop_at_step=2)  # killed half way; reg4 never started
    res = resume(root, parallel=False, progress=False)
    assert [(v.registers, v.steps) for v in res.variants] == [(0, 4), (4, 4)]
    assert all(v.checkpoint.is_file() for v in res.variants)
    assert json.loads(res.variants_path.read_text())["variants"][1]["registers"] == 4


def test_module_entry_point_is_only_the_worker(capsys):
    from artifactscan.analysis.training.worker import main

    assert main(["--preset", "demo"]) == 2
    assert "artifactscan train-reg" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ large photos
def _photo_classes(root, n_per_class=8, size=(400, 300)):
    from artifactscan.inputs.synthetic import write_photo_folder
    from .conftest import SAMPLE_IMAGES

    for c, names in (("a", ["astronaut.jpg", "coffee.jpg"]), ("b", ["chelsea.jpg", "rocket.jpg"])):
        write_photo_folder(root / c, n_per_class, [SAMPLE_IMAGES / n for n in names], size=size, seed=ord(c))
    return root


def test_image_folder_crops_decode_reduced_and_match_full_decode(tmp_path):
    from artifactscan.analysis.training.data import ImageFolderData, scan_image_folder

    classes, files, labels = scan_image_folder(_photo_classes(tmp_path / "photos"))
    train = ImageFolderData(files, labels, classes, 16, True, seed=3, crop_pct=1.0)
    a = torch.stack([train.load(i, epoch=1)[0] for i in range(len(files))])
    b = torch.stack([train.load(i, epoch=1)[0] for i in range(len(files))])
    assert torch.equal(a, b)  # seeded crops: the same pixels every time (what --resume relies on)
    import artifactscan.analysis.training.data as data_module

    full = ImageFolderData(files, labels, classes, 16, True, seed=3, crop_pct=1.0)
    full._decode = lambda i, _min_side: data_module.ImageFolderData._decode(full, i, None)  # exact decode
    c = torch.stack([full.load(i, epoch=1)[0] for i in range(len(files))])
    assert float((a - c).abs().mean()) < 0.02  # the same crops: only resampling differs


def test_resume_with_an_image_folder_is_bit_identical(tmp_path):
    root = _photo_classes(tmp_path / "photos", n_per_class=12)
    cfg = tiny(data=str(root), num_classes=None, steps=6, ckpt_every=100, batch_size=4, eval_every=6, img_size=16)
    full = train_model(cfg, tmp_path / "full", progress=False)
    train_model(cfg, tmp_path / "part", progress=False, stop_at_step=3)
    resumed = resume(tmp_path / "part", progress=False)
    a, _ = _load(full.final_checkpoint)
    b, _ = _load(resumed.final_checkpoint)
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), k


def test_error_unreadable_training_image(tmp_path):
    root = _photo_classes(tmp_path / "photos", n_per_class=4, size=(64, 48))
    (root / "a" / "photo0000.jpg").write_bytes(b"not an image")
    with pytest.raises(InputError, match=r"cannot read image .*photo0000.jpg \(corrupt.*delete or replace the file"):
        train_model(tiny(data=str(root), num_classes=None, steps=2, eval_every=2, batch_size=2), tmp_path / "run",
                    progress=False)
