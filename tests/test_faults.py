"""Fault injection, part 1: inputs, models, messages and exit codes across the commands.

Each case asserts the exit code, one message line on stderr, no traceback, and what the output folder holds after.
Parts 2 and 3: tests/test_faults_outputs.py (output folders, atomic writes, concurrency), test_faults_train.py.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from .conftest import TINY, save_planted_checkpoint, tiny_vit
from .fault_tools import ARGS, check, forbid_models, invoke, no_partial_files, planted, save_tiny, tree


# ----------------------------------------------------------------------------------------------- non-finite weights
def _two_nans(model) -> None:
    model.pos_embed[0, 3, 0] = float("nan")
    model.pos_embed[0, 7, 1] = float("nan")


def test_nan_weights_are_refused_naming_the_tensor(tmp_path, image_dir):
    ckpt = save_tiny(tmp_path / "nan.safetensors", _two_nans)
    out = tmp_path / "out"
    line = check(invoke("norms", ckpt, image_dir, "--out", out), 1, "non-finite weights")
    assert "pos_embed (2 NaN, 0 Inf)" in line and "norms --allow-nonfinite" in line
    assert not out.exists()  # nothing ran, and the folder it had created for the run is gone again


def test_nan_weights_with_allow_nonfinite_are_never_clean(tmp_path, image_dir):
    ckpt = save_tiny(tmp_path / "nan.safetensors", _two_nans)
    out = tmp_path / "out"
    result = invoke("norms", ckpt, image_dir, "--allow-nonfinite", "--out", out, "--no-figures")
    check(result, 0)
    data = json.loads((out / "report.json").read_text())
    assert data["headline"].startswith("NON-FINITE VALUES")
    assert "No high-norm outlier" not in data["headline"] and "separated high-norm group" not in data["headline"]
    assert data["nonfinite_weights"] == ["pos_embed (2 NaN, 0 Inf)"]
    assert all(lay["num_nonfinite"] > 0 for lay in data["layers"])
    assert "NON-FINITE" in result.stdout


def test_inf_weights_refused_in_compare_too(tmp_path):
    bad = save_tiny(tmp_path / "inf.safetensors", lambda m: m.cls_token.fill_(float("inf")))
    good = save_tiny(tmp_path / "good.safetensors")
    check(invoke("compare", good, bad, "synthetic:4"), 1, "cls_token (0 NaN, 32 Inf)")


def test_nonfinite_activations_counted_per_layer_and_exit_1(tmp_path, image_dir):
    """Finite weights whose sum overflows float32: the scan counts the Inf/NaN norms, writes the report, exits 1."""
    ckpt = save_tiny(tmp_path / "overflow.safetensors", lambda m: m.pos_embed[0, 6].fill_(3e38))
    out = tmp_path / "out"
    line = check(invoke("norms", ckpt, image_dir, "--out", out, "--no-figures"), 1, "non-finite token norms")
    assert "from block 0 on" in line
    data = json.loads((out / "report.json").read_text())  # kept: the evidence of where the values start
    assert data["layers"][0]["num_nonfinite"] > 0 and data["nonfinite_weights"] == []
    assert data["headline"].startswith("NON-FINITE VALUES")


# ----------------------------------------------------------------------------------------------- checkpoints
def _meta_case(tmp_path, name, edit):
    """A .pt checkpoint whose artifactscan metadata was edited by hand."""
    from artifactscan.models.checkpoint import CheckpointMeta

    model = tiny_vit()
    meta = json.loads(CheckpointMeta("vit_small_patch16_224", dict(TINY),
                                     {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}).to_json())
    edit(meta)
    path = tmp_path / f"{name}.pt"
    torch.save({"state_dict": model.state_dict(), "artifactscan": meta}, path)
    return path


@pytest.mark.parametrize("name, edit, field", [
    ("kwargs_list", lambda m: m.update(arch_kwargs=[1, 2]), "arch_kwargs: must be a JSON object"),
    ("depth", lambda m: m["arch_kwargs"].update(depth=-1), "arch_kwargs.depth: must be an integer >= 1"),
    ("no_input_size", lambda m: m["data_config"].pop("input_size"), "data_config.input_size: missing"),
    ("mean_text", lambda m: m["data_config"].update(mean="abc"), "data_config.mean: must be 3 finite numbers"),
    ("std_zero", lambda m: m["data_config"].update(std=[0, 0, 0]), "data_config.std: must be positive"),
    ("ttr_list", lambda m: m["extra"].update(test_time_register=[1]), "extra.test_time_register: must be a JSON"),
    ("ttr_neuron", lambda m: m["extra"].update(test_time_register={
        "neurons": [{"block": 0, "site": "blocks.0.mlp.act", "index": -4}], "num_blocks": 3, "embed_dim": 32,
        "max_layer": 0, "model_name": "x"}), "extra.test_time_register.neurons[0].index"),
    ("arch_missing", lambda m: m.pop("arch"), "arch: missing"),
])
def test_malformed_checkpoint_metadata_is_a_user_error(tmp_path, image_dir, name, edit, field):
    path = _meta_case(tmp_path, name, edit)
    line = check(invoke("norms", path, image_dir), 1, "checkpoint metadata invalid: " + field)
    assert line.startswith(f"error: {name}.pt: checkpoint metadata invalid")


def test_empty_pt_says_why(tmp_path, image_dir):
    (tmp_path / "empty.pt").write_bytes(b"")
    check(invoke("norms", tmp_path / "empty.pt", image_dir), 1, "empty (0 bytes)")


def test_truncated_safetensors(tmp_path, image_dir):
    good = save_tiny(tmp_path / "good.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:300])
    check(invoke("norms", cut, image_dir), 1, "not a readable safetensors file")


def test_pickled_module_without_trust(tmp_path, image_dir):
    torch.save(tiny_vit(), tmp_path / "whole.pt")
    check(invoke("norms", tmp_path / "whole.pt", image_dir), 1, "--trust-checkpoint")


def test_img_size_that_cannot_fit_is_refused_at_once():
    # 32 images: a batch of 32 (a batch is never larger than the images), 8 GiB each at 4096 px
    line = check(invoke("norms", "phantom", "synthetic:32", "--img-size", "4096"), 1, "GiB of activations")
    assert "4096x4096" in line and "available" in line and "1,048,577 tokens" in line


# ----------------------------------------------------------------------------------------------- options and usage
@pytest.mark.parametrize("args, match", [
    (("norms", "--maps", "-3"), "--maps must be 0 or more"),
    (("attention", "--maps", "-3"), "--maps must be 0 or more"),
    (("norms", "--fail-above", "2"), "fraction between 0 and 1"),
    (("norms", "--maps", "abc"), "valid integer"),
    (("norms", "--no-such-option"), "no such option"),
    (("no-such-command",), "no such command"),
])
def test_bad_options_are_one_line_exit_1(args, match):
    line = check(invoke(*args), 1, match)
    assert "╭" not in line


def test_swapped_arguments_get_a_hint(image_dir):
    line = check(invoke("norms", image_dir, "demo"), 1, "did you mean")
    assert f"artifactscan norms demo {image_dir}" in line


def test_markup_in_a_path_is_printed_literally(tmp_path):
    line = check(invoke("norms", "demo", tmp_path / "[/nope]" / "[bold]x"), 1, "does not exist")
    assert "[/nope]/[bold]x" in line


def test_internal_error_is_exit_2_with_the_debug_hint(monkeypatch, image_dir):
    import artifactscan.analysis.opening as scan_mod  # where scan() loads its model

    def broken(*a, **k):
        raise ValueError("[/oops] a bug\nsecond line")

    monkeypatch.setattr(scan_mod, "load_model", broken)
    line = check(invoke("norms", "demo", image_dir), 2, "--debug")
    assert "ValueError: [/oops] a bug second line" in line


def test_keyboard_interrupt_is_130_and_leaves_no_folder(monkeypatch, tmp_path, image_dir):
    import artifactscan.analysis.opening as scan_mod  # where scan() loads its model

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(scan_mod, "load_model", stop)
    out = tmp_path / "new" / "out"
    check(invoke("norms", "demo", image_dir, "--out", out), 130)
    assert not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------------------------- the gate
def test_fail_above_gate_exits_3_after_writing(tmp_path, image_dir):
    ckpt = save_planted_checkpoint(tmp_path / "planted.safetensors", positions=range(6))
    out = tmp_path / "out"
    line = check(invoke("norms", ckpt, image_dir, "--out", out, "--fail-above", "0.01", "--no-figures"), 3,
                 "above --fail-above 0.01")
    assert "block 2:" in line
    assert json.loads((out / "report.json").read_text())["onset_layer"] == 0
    from .fault_tools import manifest

    assert manifest(out)["complete"] is True  # the gate judges a finished, complete run


def test_fail_above_passes_a_clean_model(tiny_ckpt, image_dir):
    check(invoke("norms", tiny_ckpt, image_dir, *ARGS, "--fail-above", "0.01"), 0)


# ----------------------------------------------------------------------------------------------- image files
def _corrupt(path):
    path.write_bytes(b"\x89PNG\r\n\x1a\n not really")


def test_skipped_names_with_markup_and_newlines_stay_on_one_line(tmp_path, image_dir):
    _corrupt(image_dir / "[bold]x.png")
    _corrupt(image_dir / "two\nlines.png")
    out = tmp_path / "out"
    result = invoke("norms", "demo", image_dir, "--json", "--out", out, "--no-figures")
    check(result, 0)
    warnings = [ln for ln in result.stderr.splitlines() if ln.startswith("warning:")]
    assert any("[bold]x.png: corrupt" in w for w in warnings), warnings
    assert any("two\\nlines.png: corrupt" in w for w in warnings), warnings
    assert len(result.stderr.splitlines()) == len(warnings)  # nothing spilled onto a line of its own
    skipped = {s["path"].rsplit("/", 1)[-1]: s for s in json.loads(result.stdout)["images"]["skipped"]}
    assert skipped["two\\nlines.png"]["path_hex"].endswith(b"two\nlines.png".hex())
    assert skipped["[bold]x.png"]["path_hex"] is None  # printable: the name is exact as it is


def test_non_utf8_names_are_escaped_with_their_bytes(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    raw = os.fsencode(folder) + b"/caf\xe9.png"
    Image.new("RGB", (32, 32), (120, 40, 200)).save(os.fsdecode(raw))
    Image.new("RGB", (32, 32), (20, 140, 20)).save(folder / "plain.png")
    ckpt = save_planted_checkpoint(tmp_path / "planted.safetensors", positions=range(6))
    out = tmp_path / "out"
    check(invoke("norms", ckpt, folder, "--out", out, "--threshold", "30", "--maps", "2"), 0)
    data = json.loads((out / "report.json").read_text())
    weird = [o for o in data["outliers"] if o["image"].endswith("caf\\xe9.png")]
    assert weird and weird[0]["image_hex"] == raw.hex()
    assert os.fsencode(os.fsdecode(bytes.fromhex(weird[0]["image_hex"]))) == raw  # other tools find the file
    rows = (out / "outliers.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0].endswith(",image_hex") and any(r.endswith(raw.hex()) for r in rows[1:])
    assert {p.name for p in (out / "maps").iterdir()} == {"caf_xe9.png", "plain.png"} or len(
        list((out / "maps").iterdir())) == 2


def test_avif_is_decoded_and_other_files_counted(tmp_path, image_dir):
    from PIL import features

    if not features.check("avif"):
        pytest.skip("this Pillow cannot decode AVIF")
    from PIL import Image

    Image.new("RGB", (48, 48), (200, 30, 30)).save(image_dir / "photo.avif")
    (image_dir / "logo.svg").write_text("<svg/>")
    (image_dir / "notes.txt").write_text("hi")
    result = invoke("norms", "demo", image_dir, "--json")
    check(result, 0)
    data = json.loads(result.stdout)
    assert data["images"]["num_scanned"] == 9 and data["images"]["num_other_files"] == 2
    assert any("ignored 2 file(s) that are not images" in ln for ln in result.stderr.splitlines())


# ----------------------------------------------------------------------------------------------- run folders
def _run(tmp_path):
    run = tmp_path / "run"
    for step in (100, 200, 300):
        save_tiny(run / "reg0" / "checkpoints" / f"step_{step:07d}.safetensors", planted if step > 100 else None,
                  {"step": step})
    return run


def test_truncated_checkpoint_in_a_run_folder_is_warned_and_recorded(tmp_path):
    run = _run(tmp_path)
    bad = run / "reg0" / "checkpoints" / "step_0000200.safetensors"
    bad.write_bytes(bad.read_bytes()[:100])
    out = tmp_path / "out"
    result = invoke("norms", run, "synthetic:8", "--json", "--out", out)
    check(result, 0)
    data = json.loads(result.stdout)
    assert [p["step"] for p in data["groups"][0]["points"]] == [100, 300]
    assert len(data["skipped"]) == 1 and data["skipped"][0]["path"].endswith("step_0000200.safetensors")
    assert data["skipped"][0]["reason"].startswith("unreadable")
    warnings = [ln for ln in result.stderr.splitlines() if ln.startswith("warning: skipped checkpoint")]
    assert len(warnings) == 1 and "step_0000200.safetensors: unreadable" in warnings[0]
    assert json.loads((out / "emergence.json").read_text())["skipped"] == data["skipped"]


def test_run_folder_of_only_bad_checkpoints(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "step_1.safetensors").write_bytes(b"")
    check(invoke("norms", tmp_path / "run", "synthetic:4"), 1, "1 skipped: step_1.safetensors: unreadable")


def test_malformed_metadata_in_a_run_folder_is_skipped_with_the_field(tmp_path):
    run = _run(tmp_path)
    save_tiny(run / "reg0" / "checkpoints" / "step_0000400.safetensors", None, {"step": 400},
              data_config={"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0, 0, 0]})
    result = invoke("norms", run, "synthetic:8", "--json")
    check(result, 0)
    skipped = json.loads(result.stdout)["skipped"]
    assert len(skipped) == 1 and "data_config.std" in skipped[0]["reason"]


def test_fail_above_on_a_run_folder_judges_the_latest_checkpoint(tmp_path):
    run = _run(tmp_path)
    check(invoke("norms", run, "synthetic:8", "--fail-above", "0.01"), 3, "step_0000300.safetensors (step 300)")
    no_partial_files(run)
    assert set(tree(run)) == {f"reg0/checkpoints/step_{s:07d}.safetensors" for s in (100, 200, 300)}


def test_memory_estimate_refuses_with_a_batch_size_that_fits():
    from artifactscan.analysis.memory import activation_bytes, check_fits
    from artifactscan.core.errors import ResourceError
    from artifactscan.models.loading import load_model

    loaded = load_model("demo")
    need, per_image = activation_bytes(loaded, 32)
    assert need == 32 * per_image and per_image > 0
    check_fits(loaded, 32, torch.device("cpu"), available=need)  # exactly enough: runs
    with pytest.raises(ResourceError, match="use batch_size=3 or smaller"):
        check_fits(loaded, 32, torch.device("cpu"), available=3 * per_image + 1)
    attn, _ = activation_bytes(loaded, 32, explicit_attention=True)
    assert attn > need  # captured attention holds heads x T x T more


def test_attention_at_an_img_size_that_cannot_fit():
    check(invoke("attention", "phantom", "synthetic:2", "--img-size", "4096"), 1, "GiB of activations")


def test_nonfinite_activations_refused_by_compare_and_fix(tmp_path):
    bad = save_tiny(tmp_path / "overflow.safetensors", lambda m: m.pos_embed[0, 6].fill_(3e38))
    good = save_tiny(tmp_path / "good.safetensors")
    check(invoke("compare", good, bad, "synthetic:4"), 1, "non-finite token norms")
    out = tmp_path / "fixed.safetensors"
    check(invoke("fix", bad, "synthetic:4", "--save-model", out), 1, "nothing to fix")
    assert not out.exists()
    attn = tmp_path / "attn"
    check(invoke("attention", bad, "synthetic:4", "--out", attn), 1, "attention maps of such a pass mean nothing")
    assert not attn.exists()
    check(invoke("probe", bad, "synthetic:16", "--blocks", "0"), 1, "probes of them would mean nothing")


def test_readers_accept_the_previous_schemas(tmp_path, image_dir):
    from artifactscan.analysis.emergence import EmergenceReport
    from artifactscan.analysis.scan import ScanReport

    result = invoke("norms", "demo", image_dir, "--json")
    check(result, 0)
    data = json.loads(result.stdout)
    assert data["schema"] == "artifactscan.scan/5"
    old = json.loads(json.dumps(data))
    old["schema"] = "artifactscan.scan/2"
    old.pop("nonfinite_weights")
    old["images"].pop("num_other_files")
    for lay in old["layers"]:
        lay.pop("num_nonfinite")
    back = ScanReport.from_dict(old)
    assert back.num_nonfinite == 0 and back.nonfinite_problem() is None and back.images.num_other_files == 0
    em = EmergenceReport.from_dict({"run_dir": "r", "images": "synthetic:8", "groups": [], "notes": [],
                                    "schema": "artifactscan.emergence/1"})
    assert em.skipped == []


@pytest.mark.parametrize("args, match", [
    (("--top-k", "0"), "--top-k must be at least 1"),
    (("--blocks", "0:99"), "block 99 is out of range"),
])
def test_fix_options_are_checked_even_when_there_is_nothing_to_fix(args, match):
    check(invoke("fix", "demo", "synthetic:4", *args), 1, match)


def test_a_diverged_checkpoint_in_a_run_is_named_and_fails_the_command(tmp_path):
    run = _run(tmp_path)
    save_tiny(run / "reg0" / "checkpoints" / "step_0000400.safetensors", _two_nans, {"step": 400})
    out = tmp_path / "out"
    line = check(invoke("norms", run, "synthetic:8", "--out", out), 1, "1 checkpoint(s) of the run hold non-finite")
    assert "step_0000400.safetensors" in line and "pos_embed (2 NaN, 0 Inf)" in line
    data = json.loads((out / "emergence.json").read_text())  # written first: the other points are still there
    assert [p["step"] for p in data["groups"][0]["points"]] == [100, 200, 300]
    assert data["skipped"][0]["reason"].startswith("non-finite: ")
    result = invoke("norms", run, "synthetic:8", "--json", "--allow-nonfinite")
    check(result, 0)
    assert [p["step"] for p in json.loads(result.stdout)["groups"][0]["points"]] == [100, 200, 300, 400]


def test_a_closed_pipe_is_no_traceback():
    """`artifactscan report --help | head -1`: the reader goes away mid-output; no traceback from the error path."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "artifactscan", "report", "--help"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "COLUMNS": "80"})
    proc.stdout.readline()
    proc.stdout.close()  # as `head -1` does
    _, err = proc.communicate(timeout=60)
    assert b"Traceback" not in err and b"AttributeError" not in err, err.decode()[-500:]
