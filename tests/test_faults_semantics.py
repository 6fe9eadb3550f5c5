"""Fault injection, part 4: what used to be wrong but silent, or confusing.

Each case of the first-contact survey (issue 20) either becomes a refusal in one line that names the option and the
values involved, or a correct result that says what was adjusted: options passed again to ``train-reg --resume``,
``--epochs 0``, ``fix --top-k`` beyond the units and its verdict on damaged outputs, ``compare`` of a model with
itself, batch sizes and worker counts beyond the images, ``--img-size`` beyond memory, interruptions at any moment of
``train-reg``, COCO annotations that do not match their images, ``phantom`` modes mixed, and flags named in messages
that do not exist.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from artifactscan.core.errors import InputError, ResourceError, RunInterrupted

from .conftest import REPO, SAMPLE_IMAGES
from .fault_tools import check, invoke


# ----------------------------------------------------------------------------------------------- train-reg --resume
def _run_folder(root: Path, registers=(0, 4), baseline: str | None = None, **config) -> Path:
    """What train-reg writes before its first checkpoint: the run's config and its variants (the option checks come
    first, so a refused option is refused here, and an accepted one reaches "no checkpoint yet")."""
    from artifactscan.analysis.training import get_preset, resolve_config

    cfg = resolve_config(get_preset("demo", steps=400, depth=1, embed_dim=16, num_heads=2, img_size=8,
                                    patch_size=4, batch_size=4, **config))
    root.mkdir()
    (root / "config.json").write_text(json.dumps(cfg.to_dict()))
    (root / "train_reg.json").write_text(json.dumps({"registers": list(registers), "baseline_checkpoint": baseline}))
    return root


@pytest.mark.parametrize("args, named", [
    (("--registers", "8"), "--registers: the run has 0,4, given 8 (it would train 0,8)"),
    (("--registers", "0,4,8"), "--registers: the run has 0,4, given 0,4,8"),
    (("--steps", "9"), "--steps: the run has 400, given 9"),
    (("--epochs", "2"), "--epochs: the run has None, given 2.0"),
    (("--batch-size", "8"), "--batch-size: the run has 4, given 8"),
    (("--lr", "0.5"), "--lr: the run has 0.002, given 0.5"),
    (("--depth", "2"), "--depth: the run has 1, given 2"),
    (("--dim", "32"), "--dim: the run has 16, given 32"),
    (("--heads", "4"), "--heads: the run has 2, given 4"),
    (("--img-size", "16"), "--img-size: the run has 8, given 16"),
    (("--patch", "2"), "--patch: the run has 4, given 2"),
    (("--no-cls",), "--no-cls: the run has True, given False"),
    (("--arch", "vit_base_patch16_224"), "--arch: the run has 'vit_small_patch16_224', given 'vit_base_patch16_224'"),
    (("--data", "imgs"), "--data: the run has None, given 'imgs'"),
    (("--preset", "imagenet"), "--preset imagenet: --lr: the run has 0.002, given 0.001"),
    (("--baseline", "base.safetensors"), "--baseline: the run has none (it trains its own 0-register model), given"),
])
def test_resume_refuses_every_option_that_differs_naming_both_values(tmp_path, args, named):
    run = _run_folder(tmp_path / "run")
    line = check(invoke("train-reg", "--resume", run, *args), 1, named)
    assert "was trained with a different config" in line


def test_resume_lists_all_conflicts_in_one_line(tmp_path):
    run = _run_folder(tmp_path / "run")
    line = check(invoke("train-reg", "--resume", run, "--registers", "8", "--steps", "9"), 1)
    assert "--steps: the run has 400, given 9" in line and "--registers: the run has 0,4, given 8" in line


@pytest.mark.parametrize("args", [(), ("--registers", "4"), ("--registers", "0,4"), ("--registers", "4,0"),
                                  ("--steps", "400", "--dim", "16"), ("--preset", "demo", "--steps", "400",
                                  "--depth", "1", "--dim", "16", "--heads", "2", "--img-size", "8", "--patch", "4",
                                  "--batch-size", "4")])
def test_resume_accepts_options_equal_to_the_run(tmp_path, args):
    run = _run_folder(tmp_path / "run")  # accepted: the check passes, then the folder is found without a checkpoint
    check(invoke("train-reg", "--resume", run, *args), 1, "has no checkpoint yet")


def test_resume_with_a_baseline_checks_the_baseline_and_registers(tmp_path):
    base = tmp_path / "base.safetensors"
    base.write_bytes(b"")
    run = _run_folder(tmp_path / "run", registers=(4,), baseline=str(base))
    check(invoke("train-reg", "--resume", run, "--registers", "4", "--baseline", base), 1, "has no checkpoint yet")
    check(invoke("train-reg", "--resume", run, "--registers", "2"), 1, "--registers: the run has 4, given 2")
    check(invoke("train-reg", "--resume", run, "--baseline", tmp_path / "other.safetensors"), 1,
          f"--baseline: the run has {base}, given")


def test_resume_refuses_another_out_folder(tmp_path):
    run = _run_folder(tmp_path / "run")
    check(invoke("train-reg", "--resume", run, "--out", tmp_path / "elsewhere"), 1, "name different folders")
    assert not (tmp_path / "elsewhere").exists()
    check(invoke("train-reg", "--resume", run, "--out", run), 1, "has no checkpoint yet")  # the same folder: fine


def test_resume_of_a_single_model_folder_checks_registers(tmp_path):
    from artifactscan.analysis.training import train_model

    from .test_training import tiny

    train_model(tiny(steps=2, ckpt_every=1, registers=4), tmp_path / "one", progress=False, stop_at_step=1)
    line = check(invoke("train-reg", "--resume", tmp_path / "one", "--registers", "8", "--steps", "3"), 1)
    assert line.endswith("(--steps: the run has 2, given 3; --registers: the run has 4, given 8); drop those options "
                         "to continue it as it was, or start a new run folder"), line
    check(invoke("train-reg", "--resume", tmp_path / "one", "--registers", "4", "--steps", "3"), 1,
          "(--steps: the run has 2, given 3)")  # 4 is the count of this one model


def test_runtime_options_apply_on_resume(tmp_path, monkeypatch):
    """--device and --compile change where a run continues; they are passed on, not ignored."""
    import artifactscan.analysis.training as training

    seen = {}

    def fake_resume(run_dir, expected=None, **kwargs):
        seen.update(kwargs, expected=expected)
        return None  # a single-model folder's result: the command reports it and ends

    monkeypatch.setattr(training, "resume", fake_resume)
    run = _run_folder(tmp_path / "run")
    check(invoke("train-reg", "--resume", run, "--device", "cpu", "--compile", "--registers", "4",
                 "--scan-images", "synthetic:4"), 0)
    assert seen["device"] == "cpu" and seen["compile"] is True and seen["registers"] == "4"


def test_every_train_reg_option_is_classified_for_resume():
    """A new train-reg option must be compared on --resume (it defines the run), or be one of those that may change
    (where it runs, the verdict's images, the output form): this list is the place to decide."""
    import typer

    from artifactscan.cli import app

    command = typer.main.get_command(app).commands["train-reg"]
    names = {p.name for p in command.params}
    compared = {"data", "arch", "preset", "registers", "baseline", "out", "epochs", "steps", "batch_size", "lr",
                "depth", "dim", "heads", "img_size", "patch", "no_cls"}
    may_change = {"resume", "compile_model", "device", "scan_images", "json_out", "debug"}
    assert names == compared | may_change, names ^ (compared | may_change)


# ----------------------------------------------------------------------------------------------- train-reg options
@pytest.mark.parametrize("args, match", [
    (("--epochs", "0"), "--epochs must be a positive number"),
    (("--epochs", "-1"), "--epochs must be a positive number"),
    (("--epochs", "nan"), "--epochs must be a positive number"),
    (("--steps", "0"), "--steps must be positive"),
    (("--lr", "0"), "--lr must be a positive number"),
    (("--depth", "0"), "--depth must be positive"),
    (("--patch", "0"), "--patch must be positive"),
])
def test_train_reg_refuses_empty_schedules_and_sizes(tmp_path, args, match):
    check(invoke("train-reg", *args, "--out", tmp_path / "run"), 1, match)
    assert not (tmp_path / "run").exists()


def test_train_reg_img_size_beyond_memory_is_refused_up_front(tmp_path):
    line = check(invoke("train-reg", "--img-size", "100000", "--patch", "4", "--steps", "2",
                        "--out", tmp_path / "run"), 1, "--img-size 100000 with --patch 4")
    assert "625,000,001 tokens per image" in line and "GiB" in line and "alloc" not in line.lower()
    assert not (tmp_path / "run").exists()


def test_training_memory_estimate_is_a_bound_checked_against_the_memory_available(monkeypatch):
    import artifactscan.core.memory as memory
    from artifactscan.analysis.training.config import check_training_fits, get_preset, resolve_config, \
        training_bytes

    cfg = resolve_config(get_preset("demo"))
    need, tokens = training_bytes(cfg)
    assert tokens == (32 // 4) ** 2 + 1 and need > 4 * 4 * cfg.depth * 12 * cfg.embed_dim ** 2
    monkeypatch.setattr(memory, "available_bytes", lambda device: need)
    check_training_fits(cfg, torch.device("cpu"))  # exactly enough
    monkeypatch.setattr(memory, "available_bytes", lambda device: need - 1)
    with pytest.raises(ResourceError, match="lower img_size or batch_size"):
        check_training_fits(cfg, torch.device("cpu"))


# ----------------------------------------------------------------------------------------------- train-reg interrupted
def test_sequential_variant_stopped_names_the_run_folder(tmp_path, monkeypatch):
    """One variant stopped (variants one after the other): the command continues the run, not that variant."""
    import artifactscan.analysis.training.orchestration as orchestration

    from .test_training import tiny

    def stopped(config, run_dir, **kwargs):
        raise RunInterrupted(f"SIGINT: stopped {run_dir} after step 3 of 8 and saved its resume state; continue "
                             f"with: artifactscan train-reg --resume {run_dir}")

    monkeypatch.setattr(orchestration, "train_model", stopped)
    run = tmp_path / "run"
    with pytest.raises(RunInterrupted) as exc:
        orchestration.train_reg(tiny(steps=8), run, 4, parallel=False, progress=False)
    assert str(exc.value) == (f"SIGINT: stopped {run / 'reg0'} after step 3 of 8 and saved its resume state; "
                              f"continue with: artifactscan train-reg --resume {run}")


def test_interrupted_before_any_step_says_so(tmp_path, monkeypatch):
    import artifactscan.analysis.training.orchestration as orchestration

    from .test_training import tiny

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(orchestration, "train_model", interrupted)
    run = tmp_path / "run"
    with pytest.raises(RunInterrupted, match="before its first training step was saved: there is nothing to resume"):
        orchestration.train_reg(tiny(steps=8), run, 4, parallel=False, progress=False)
    (run / "reg0").mkdir()
    (run / "reg0" / "final.safetensors").write_bytes(b"")
    (run / "reg4").mkdir()
    (run / "reg4" / "last.pt").write_bytes(b"")
    with pytest.raises(RunInterrupted) as exc:
        orchestration.train_reg(tiny(steps=8), run, 4, parallel=False, progress=False, resume=True)
    assert str(exc.value) == (f"stopped {run} (reg0 finished; reg4 saved a resume state earlier); continue with: "
                              f"artifactscan train-reg --resume {run}")


def test_a_workers_bug_is_one_line_not_a_childs_traceback(tmp_path, monkeypatch, capsys):
    import artifactscan.analysis.training.orchestration as orchestration

    from .test_training import tiny

    def bug(*args, **kwargs):
        raise ValueError("something unexpected")

    monkeypatch.setattr(orchestration, "train_model", bug)
    cfg = tmp_path / "worker-config.json"
    cfg.write_text(json.dumps(tiny().to_dict()))
    assert orchestration.worker_main(str(cfg), str(tmp_path / "reg0"), False) == 2
    event = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert event == {"type": "error", "kind": "internal", "message": "ValueError: something unexpected"}


def _train_reg_process(run: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = ["--steps", "2000", "--depth", "1", "--dim", "16", "--heads", "2", "--img-size", "8", "--patch", "4",
            "--batch-size", "4", "--scan-images", "synthetic:64", "--out", str(run), *extra]
    # its own process group, signalled as a whole: what Ctrl-C in a terminal and `timeout -s INT` do
    return subprocess.Popen([sys.executable, "-m", "artifactscan", "train-reg", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO, start_new_session=True)


def _sigint_when(proc: subprocess.Popen, ready, delay: float = 0.0) -> str:
    try:
        deadline = time.time() + 300
        while not ready():
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "the moment never came"
            time.sleep(0.05)
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("reg", "step"))]
    assert len(lines) == 1 and lines[0].startswith("interrupted:"), err
    return lines[0]


def test_sigint_during_start_up_says_nothing_was_saved(tmp_path):
    run = tmp_path / "run"
    line = _sigint_when(_train_reg_process(run), lambda: (run / "train_reg.json").is_file())
    assert "there is nothing to resume; run the same command again" in line, line
    assert not any(run.glob("reg*/last.pt"))


def test_sigint_while_training_names_the_steps_and_the_resume_command(tmp_path):
    run = tmp_path / "run"
    # a variant writes its config.json just before its training loop: 3 s later both are training
    line = _sigint_when(_train_reg_process(run), lambda: all((run / r / "config.json").is_file()
                                                              for r in ("reg0", "reg4")), delay=3.0)
    assert line.endswith(f"continue with: artifactscan train-reg --resume {run}"), line
    for reg in ("reg0", "reg4"):
        step = torch.load(run / reg / "last.pt", weights_only=True)["resume"]["step"]
        assert f"{run / reg} after step {step} of 2000" in line


def test_sigint_during_the_verdict_says_the_training_is_complete(tmp_path):
    run = tmp_path / "run"
    proc = _train_reg_process(run, "--steps", "8")
    line = _sigint_when(proc, lambda: (run / "variants.json").is_file())
    assert line == (f"interrupted: stopped while scanning for the verdict; the training in {run} is complete; get "
                    f"the verdict with: artifactscan train-reg --resume {run}"), line


def test_a_child_started_while_sigint_is_held_keeps_it_until_it_releases_it():
    from artifactscan.analysis.training.orchestration import sigint_held

    # what the worker sees: SIGINT still blocked (so a Ctrl-C during its imports neither kills it nor is lost in the
    # parent), then ignored and unblocked once released, until the training loop's own handler takes it
    code = ("import signal\nfrom artifactscan.analysis.training.orchestration import release_inherited_sigint\n"
            "held = signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])\nrelease_inherited_sigint()\n"
            "print(held, signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []), "
            "signal.getsignal(signal.SIGINT) == signal.SIG_IGN)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with sigint_held():
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    assert child.communicate(timeout=120)[0].split() == ["True", "False", "True"]
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # the parent's mask is back


def test_a_ctrl_c_caught_inside_an_exec_still_exits_130(tmp_path):
    # A Ctrl-C during a lazy import often lands in code that exec() runs from a string (every @dataclass builds its
    # methods so); CPython then marks the interrupt unhandled even though the command caught it, and `python -m`
    # would die by SIGINT (-2) after printing its "interrupted:" line
    (tmp_path / "interrupted_command.py").write_text(
        "import importlib\nimport sys\n\ncli = importlib.import_module('artifactscan.cli.app')\n\n"
        "def command():\n    try:\n        exec('raise KeyboardInterrupt')\n"
        "    except KeyboardInterrupt:\n        sys.exit(130)\n\n"
        "cli.app = command\ncli.main()\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    proc = subprocess.run([sys.executable, "-m", "interrupted_command"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 130, proc.stderr


# ----------------------------------------------------------------------------------------------- fix
def test_fix_top_k_beyond_the_units_is_refused():
    check(invoke("fix", "phantom", SAMPLE_IMAGES, "--top-k", "100000"), 1,
          "--top-k 100000 is more than the 1,540 MLP hidden units of blocks 0 to 2")


def test_fix_that_damages_the_outputs_says_damaged_not_removed(tmp_path):
    res = invoke("fix", "phantom", SAMPLE_IMAGES, "--top-k", "1000", "--json")
    check(res, 0)
    report = json.loads(res.stdout)
    assert report["feature_cosine_mean"] < 0.9
    assert report["verdict"].startswith("DAMAGED: the test-time register (1000 neurons) changed the model's outputs")


@pytest.mark.parametrize("cosine, start", [(1.0, "The test-time register removed 100%"),
                                           (0.95, "The test-time register removed 100%"),
                                           (0.47, "DAMAGED")])
def test_fix_verdict_is_judged_with_the_output_cosine(cosine, start):
    from artifactscan.analysis.fix import fix_verdict

    verdict = fix_verdict(1.0, 0.0156, 0.0, cosine, cosine - 0.1, 0.9, 4)
    assert verdict.startswith(start)
    assert ("outputs moved" in verdict) == (0.9 <= cosine < 0.99)
    assert ("not a repair" in verdict) == (cosine < 0.9)


def test_fix_with_nothing_to_fix_says_no_file_was_written(tmp_path):
    out = tmp_path / "fixed.safetensors"
    res = invoke("fix", "demo", "synthetic:4", "--save-model", out)
    check(res, 0)
    assert f"warning: no file written to {out}: nothing to fix" in res.stderr
    assert not out.exists()


# ----------------------------------------------------------------------------------------------- compare
def test_compare_a_model_with_itself_is_refused(tmp_path):
    check(invoke("compare", "demo", "demo", "synthetic:4"), 1, "compare got the model demo twice")
    from .fault_tools import save_tiny

    ckpt = save_tiny(tmp_path / "a.safetensors")
    line = check(invoke("compare", ckpt, f"{tmp_path}/./a.safetensors", "synthetic:4"), 1, "twice")
    assert f"model {ckpt} twice (the second time as {tmp_path}/./a.safetensors)" in line and "pass each model once" in line


def test_compare_of_one_model_says_one_model():
    from rich.console import Console

    from artifactscan.analysis.compare import compare
    from artifactscan.render.text import render_compare

    report = compare(["demo"], "synthetic:4", device="cpu")
    assert report.verdict.startswith("0 of 1 model has high-norm outliers")
    console = Console(record=True, width=200)
    render_compare(report, console)
    assert "1 model on synthetic:4" in console.export_text() and "1 models" not in console.export_text()


# ----------------------------------------------------------------------------------------------- batches and workers
@pytest.fixture
def four_images(tmp_path: Path) -> Path:
    d = tmp_path / "four"
    d.mkdir()
    for name in sorted(p.name for p in SAMPLE_IMAGES.iterdir() if p.suffix in (".jpg", ".png"))[:4]:
        shutil.copy(SAMPLE_IMAGES / name, d / name)
    return d


def test_batch_size_is_capped_at_the_number_of_images(four_images):
    res = invoke("norms", "phantom", four_images, "--batch-size", "1000000", "--json")
    check(res, 0)
    assert json.loads(res.stdout)["images"]["num_scanned"] == 4


def test_memory_check_sees_the_batch_really_formed(monkeypatch):
    import artifactscan.analysis.passes as passes_mod  # where every command's pass checks its memory
    import artifactscan.analysis.scan as scan_mod

    seen = []
    real = passes_mod.check_fits
    monkeypatch.setattr(passes_mod, "check_fits", lambda loaded, batch, *a, **k: (seen.append(batch),
                                                                               real(loaded, batch, *a, **k)))
    scan_mod.scan("phantom", "synthetic:3", device="cpu", batch_size=10**6)
    assert seen == [3]


def test_workers_beyond_the_batches_are_capped_with_one_line_of_ours(four_images, monkeypatch):
    import artifactscan.inputs.sources as sources

    monkeypatch.setattr(sources, "_workers_said", set())
    res = invoke("norms", "phantom", four_images, "--workers", "500", "--json")
    check(res, 0)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines == ["warning: --workers 500: using 1 (1 batch to decode; more processes would only wait)"], lines


def test_workers_are_capped_at_the_cores(tmp_path, monkeypatch, capsys):
    import artifactscan.inputs.sources as sources
    from artifactscan.inputs.synthetic import write_photo_folder

    monkeypatch.setattr(sources, "_workers_said", set())
    monkeypatch.setattr(sources, "available_cores", lambda: 2)
    d = tmp_path / "photos"
    write_photo_folder(d, 40, [SAMPLE_IMAGES / "astronaut.jpg"], size=(48, 40), seed=0)
    source = sources.make_image_source(d, {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3})
    assert sources.resolve_workers(source, 4, 500) == 2
    assert sources.resolve_workers(source, 4, 500) == 2  # said once, not once per pass
    assert sources.resolve_workers(source, 4, 1) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == ["warning: num_workers=500: using 2 (2 CPU cores available; more processes would only wait)"]


# ----------------------------------------------------------------------------------------------- --img-size
def test_img_size_beyond_memory_is_one_line_of_ours():
    line = check(invoke("norms", "phantom", "synthetic:2", "--img-size", "100000"), 1,
                 "--img-size 100000 makes a 25,000x25,000 grid of 4-pixel patches (625,000,000 tokens per image)")
    assert "position embeddings alone need" in line and "allocat" not in line.lower()


def test_img_size_refused_from_the_memory_available(monkeypatch):
    import artifactscan.models.loading as loading

    monkeypatch.setattr(loading, "available_bytes", lambda device: 1000)
    with pytest.raises(ResourceError, match=r"img_size=64 makes a 16x16 grid .* \(the model's own is 32\)"):
        loading.load_model("phantom", img_size=64)


def test_allocator_failure_while_resampling_is_said_in_our_words(monkeypatch):
    import timm.models.vision_transformer as vit

    import artifactscan.models.loading as loading

    def no_memory(self, *args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(loading, "available_bytes", lambda device: None)
    monkeypatch.setattr(vit.VisionTransformer, "set_input_size", no_memory)
    with pytest.raises(ResourceError) as exc:
        loading.load_model("phantom", img_size=64)
    assert "ran out of memory" in str(exc.value) and "enforce" not in str(exc.value)


# ----------------------------------------------------------------------------------------------- COCO boxes
def _coco(tmp_path: Path, images: list[dict], annotations: list[dict], files=((50, 40, "x.png"),)) -> Path:
    for w, h, name in files:
        Image.new("RGB", (w, h), (90, 120, 200)).save(tmp_path / name)
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def test_coco_missing_images_are_skipped_and_counted(tmp_path):
    from artifactscan.inputs.boxes import load_box_data

    spec = _coco(tmp_path, [{"id": 1, "file_name": "x.png", "width": 50, "height": 40},
                            {"id": 2, "file_name": "gone.png", "width": 50, "height": 40}],
                 [{"id": 10, "image_id": 1, "bbox": [5, 5, 20, 20]}, {"id": 11, "image_id": 2, "bbox": [5, 5, 9, 9]},
                  {"id": 12, "image_id": 99, "bbox": [1, 1, 2, 2]}])
    data = load_box_data(spec, img_size=32)
    assert [it.name for it in data.items] == ["x.png"]
    assert data.warnings == [
        f"ann.json: 1 of 2 listed images are not in {tmp_path} (first: gone.png); skipped, with their boxes",
        "ann.json: 1 annotation(s) name image ids that 'images' does not list (first: id 99); ignored"]


def test_coco_missing_image_through_discover_is_a_warning(tmp_path):
    spec = _coco(tmp_path, [{"id": 1, "file_name": "x.png", "width": 50, "height": 40},
                            {"id": 2, "file_name": "gone.png"}], [{"image_id": 1, "bbox": [5, 5, 20, 20]}])
    res = invoke("discover", "demo", spec, "--json")
    check(res, 0)
    assert "warning: ann.json: 1 of 2 listed images are not in" in res.stderr
    assert any("gone.png" in n for n in json.loads(res.stdout)["notes"])


def test_coco_size_scaled_uniformly_keeps_its_boxes_with_a_warning(tmp_path):
    from artifactscan.inputs.boxes import load_box_data

    spec = _coco(tmp_path, [{"id": 1, "file_name": "x.png", "width": 100, "height": 80}],
                 [{"image_id": 1, "bbox": [10, 10, 40, 40]}])  # the file is 50x40: half the annotated size
    data = load_box_data(spec, img_size=32)
    assert data.items[0].boxes == [[10.0, 10.0, 50.0, 50.0]] and (data.items[0].width, data.items[0].height) == (100, 80)
    assert data.warnings == ["ann.json: 1 image file(s) have another size than annotated, at the same shape (first: "
                             "x.png); their boxes are read relative to the annotated size"]


def test_coco_size_of_another_shape_is_refused(tmp_path):
    spec = _coco(tmp_path, [{"id": 1, "file_name": "x.png", "width": 40, "height": 50}],
                 [{"image_id": 1, "bbox": [5, 5, 20, 20]}])
    check(invoke("discover", "demo", spec), 1, f"the annotation says 40x50 but {tmp_path / 'x.png'} is 50x40 (not "
          "the same shape): its boxes cannot be placed on it")


@pytest.mark.parametrize("image, bbox, match", [
    ({"id": 1, "file_name": "x.png", "width": 50, "height": 40}, [5, "five", 20, 20],
     "ann.json (image x.png), annotation 7: bbox value 'five' is not a number"),
    ({"id": 1, "file_name": "x.png", "width": 50, "height": 40}, [5, None, 20, 20],
     "ann.json (image x.png), annotation 7: bbox value None is not a number"),
    ({"id": 1, "file_name": "x.png", "width": "wide", "height": 40}, [5, 5, 20, 20],
     "ann.json (image x.png): width 'wide' is not a number"),
])
def test_coco_non_numbers_are_a_one_line_user_error(tmp_path, image, bbox, match):
    spec = _coco(tmp_path, [image], [{"id": 7, "image_id": 1, "bbox": bbox}])
    check(invoke("discover", "demo", spec), 1, match)
    with pytest.raises(InputError, match=re.escape(match)):
        from artifactscan.inputs.boxes import load_box_data

        load_box_data(spec, img_size=32)


def test_voc_size_of_another_shape_is_refused(tmp_path):
    from artifactscan.inputs.boxes import load_box_data

    from .test_discover import _voc

    root = _voc(tmp_path / "voc")
    (root / "JPEGImages" / "a.jpg").unlink()
    Image.new("RGB", (20, 60)).save(root / "JPEGImages" / "a.jpg")
    with pytest.raises(InputError, match="not the same shape"):
        load_box_data(root, img_size=32)


# ----------------------------------------------------------------------------------------------- phantom, calibrate
@pytest.mark.parametrize("args, match", [
    (("--build", "--describe"), "--build and --describe are two modes"),
    (("--describe", "--out", "p.safetensors"), "--out only applies to --build; drop it or add --build"),
    (("--onset", "3", "--gain", "4"), "--onset, --gain only apply to --build; drop them or add --build"),
    (("--build", "--model", "phantom"), "--model only applies to --describe"),
])
def test_phantom_modes_are_not_mixed_silently(tmp_path, monkeypatch, args, match):
    monkeypatch.chdir(tmp_path)
    check(invoke("phantom", *args), 1, match)
    assert not (tmp_path / "p.safetensors").exists()


@pytest.mark.parametrize("args, match", [
    (("--gains", "0.5", "--fractions", "0.02"), "--gains 0.5 must be above 1"),
    (("--gains", "2", "--fractions", "0.5"), "--fractions 0.5 is outside"),
])
def test_calibrate_names_its_own_flags(args, match):
    check(invoke("calibrate", *args, "--images", "2"), 1, match)


def _string_constants(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.value


# Options of other programs that messages rightly name (torchrun's).
OTHER_PROGRAMS_FLAGS = {"--nproc-per-node"}


def test_every_flag_named_in_the_package_exists():
    """Every ``--flag`` quoted anywhere in the package's strings (messages, help, docstrings) is an option of some
    command (or of the app itself): a message that names a flag the user cannot type sends them nowhere."""
    import typer

    from artifactscan.cli import app

    group = typer.main.get_command(app)
    flags = {"--help", "--version"} | OTHER_PROGRAMS_FLAGS
    for command in group.commands.values():
        for param in command.params:
            flags.update(o for o in [*param.opts, *param.secondary_opts] if o.startswith("--"))
    unknown = {}
    for path in sorted((REPO / "artifactscan").rglob("*.py")):
        for text in _string_constants(path):
            # CSS custom properties (var(--ink), --ink: #000) are not flags
            for flag in re.findall(r"(?<![\w(-])--[a-z][a-z0-9-]*(?![\w:-])", text):
                if flag not in flags:
                    unknown.setdefault(flag, path.relative_to(REPO).as_posix())
    assert not unknown, unknown
