"""One CLI vocabulary (issue 21): ``--blocks`` everywhere, ``--maps``, ``--out`` a folder, the load and decode
options on every command, one table of defaults, and the old spellings still working for one version.

The CLI tests patch the one library function a command calls and compare the keyword arguments it received (the
fastapi-cli habit): an old spelling must reach the library exactly as its new one does, with one note on stderr.
"""

from __future__ import annotations

import inspect
import json

import pytest
from typer.testing import CliRunner

from artifactscan.cli import app
from artifactscan.core import defaults
from artifactscan.core.blocks import parse_block, parse_blocks, parse_blocks_up_to
from artifactscan.core.errors import InputError

runner = CliRunner()


class Captured(InputError):
    """Raised by the patched library function once it has recorded its arguments (exit 1, one line)."""


@pytest.fixture
def capture(monkeypatch):
    """``capture(module, name)`` patches ``module.name`` with a recorder; returns the list of kwargs it saw."""
    import importlib

    seen: list[dict] = []

    def patch(module: str, name: str) -> list[dict]:
        def fake(*args, **kwargs):
            seen.append({"args": args, **kwargs})
            raise Captured("captured")

        monkeypatch.setattr(importlib.import_module(module), name, fake)
        return seen

    return patch


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def notes(result) -> list[str]:
    return [ln for ln in result.stderr.splitlines() if ln.startswith("warning: deprecated:")]


# ----------------------------------------------------------------------------------------------- the one parser
def test_block_specs():
    assert parse_blocks("all", 6) == parse_blocks(None, 6) == [0, 1, 2, 3, 4, 5]
    assert parse_blocks("3", 6) == [3] and parse_blocks(-1, 6) == [5] and parse_blocks("-6", 6) == [0]
    assert parse_blocks("0,4:5,-1", 6) == [0, 4, 5]  # mixed, de-duplicated, sorted
    assert parse_blocks("2:4", 6) == [2, 3, 4]  # inclusive: "blocks 2 to 4"
    assert parse_blocks(":1", 6) == [0, 1] and parse_blocks("4:", 6) == [4, 5] and parse_blocks("-2:", 6) == [4, 5]
    assert parse_blocks([0, -1, 0], 6) == [0, 5]


@pytest.mark.parametrize("spec, match", [
    ("6", r"blocks=6 is out of range: this model has 6 blocks: valid are 0\.\.5 \(or -6\.\.-1"),
    ("-7", "blocks=-7 is out of range"),
    ("0:9", r"blocks='0:9': block 9 is out of range"),
    ("x", "'x' is not a block index"),
    ("1,,2", "'' is not a block index"),
    ("4:2", "ends before it starts"),
])
def test_bad_block_specs_are_one_line_naming_the_range(spec, match):
    """A Python caller reads the keyword (``blocks=6``), the command line the flag (``--blocks 6``)."""
    from artifactscan.core.errors import cli_spelling

    with pytest.raises(InputError, match=match) as info:
        parse_blocks(spec, 6, hint="; HINT")
    assert "\n" not in str(info.value)
    with cli_spelling(), pytest.raises(InputError, match=match.replace("blocks=", "--blocks ")):
        parse_blocks(spec, 6, hint="; HINT")


def test_single_block_measurements_refuse_lists():
    assert parse_block("-1", 6) == 5 and parse_block(None, 6) == 5 and parse_block("2:2", 6) == 2
    for spec in ("1,2", "2:3", "all"):
        with pytest.raises(InputError, match="reads one block"):
            parse_block(spec, 6)


def test_fix_searches_from_block_zero():
    assert parse_blocks_up_to("0:3", 6) == 3 and parse_blocks_up_to(":3", 6) == 3 and parse_blocks_up_to("0", 6) == 0
    assert parse_blocks_up_to(None, 6) is None
    with pytest.raises(InputError, match="write blocks=0:3"):
        parse_blocks_up_to("2:3", 6)


# ----------------------------------------------------------------------------------------------- defaults
def test_library_defaults_come_from_one_table():
    from artifactscan.analysis.attention_maps import attention_report
    from artifactscan.analysis.compare import compare
    from artifactscan.analysis.emergence import scan_run
    from artifactscan.analysis.training.verdict import verdict_for_run
    from artifactscan.analysis.discover import discover
    from artifactscan.analysis.fix import fix
    from artifactscan.analysis.probes import probe
    from artifactscan.analysis.scan import scan

    for fn in (scan, probe, attention_report, discover, fix, compare, scan_run, verdict_for_run):
        params = inspect.signature(fn).parameters
        assert params["batch_size"].default == defaults.BATCH_SIZE, fn.__name__
        assert params["device"].default == defaults.DEVICE, fn.__name__
        if "threshold" in params:
            assert params["threshold"].default == defaults.THRESHOLD, fn.__name__
        if "num_workers" in params:
            assert params["num_workers"].default == defaults.WORKERS, fn.__name__
    assert inspect.signature(attention_report).parameters["maps"].default == defaults.MAPS
    assert inspect.signature(discover).parameters["maps"].default == defaults.MAPS
    assert inspect.signature(scan).parameters["num_maps"].default == defaults.MAPS
    assert inspect.signature(fix).parameters["top_k"].default == defaults.TOP_K


@pytest.mark.parametrize("command, module, name, extra", [
    ("probe", "artifactscan.analysis.probes", "probe", []),
    ("compare", "artifactscan.analysis.compare", "compare", ["demo", "demo-reg4", "synthetic:4"]),
    ("attention", "artifactscan.analysis.attention_maps", "attention_report", []),
    ("discover", "artifactscan.analysis.discover", "discover", []),
    ("fix", "artifactscan.analysis.fix", "fix", []),
])
def test_cli_defaults_are_the_library_defaults(capture, command, module, name, extra):
    seen = capture(module, name)
    result = run(command, *extra)
    assert result.exit_code == 1 and "captured" in result.stderr, result.output
    kwargs = seen[0]
    assert kwargs["batch_size"] == defaults.BATCH_SIZE and kwargs["device"] == defaults.DEVICE
    assert kwargs["threshold"] == defaults.THRESHOLD


# ----------------------------------------------------------------------------------------------- old spellings
@pytest.mark.parametrize("command, module, name, old, new, keyword, value", [
    ("probe", "artifactscan.analysis.probes", "probe", ["--layer", "3"], ["--blocks", "3"], "blocks", "3"),
    ("attention", "artifactscan.analysis.attention_maps", "attention_report", ["--layers", "1,-1"],
     ["--blocks", "1,-1"], "blocks", "1,-1"),
    ("discover", "artifactscan.analysis.discover", "discover", ["--block", "2"], ["--blocks", "2"], "blocks", "2"),
    ("discover", "artifactscan.analysis.discover", "discover", ["--figure-images", "2"], ["--maps", "2"], "maps", 2),
    ("fix", "artifactscan.analysis.fix", "fix", ["--max-layer", "3"], ["--blocks", "0:3"], "blocks", "0:3"),
])
def test_old_spellings_reach_the_library_as_the_new_ones(capture, command, module, name, old, new, keyword, value):
    seen = capture(module, name)
    old_result, new_result = run(command, *old), run(command, *new)
    assert old_result.exit_code == new_result.exit_code == 1, (old_result.output, new_result.output)
    assert seen[0] == seen[1] and seen[0][keyword] == value
    assert len(notes(old_result)) == 1 and old[0] in notes(old_result)[0] and new[0] in notes(old_result)[0]
    assert notes(new_result) == []


def test_old_and_new_spelling_together_is_an_error(capture):
    capture("artifactscan.analysis.probes", "probe")
    result = run("probe", "--layer", "2", "--blocks", "3")
    assert result.exit_code == 1 and "--layer and --blocks name the same thing" in result.stderr


def test_short_l_is_blocks(capture):
    seen = capture("artifactscan.analysis.probes", "probe")
    result = run("probe", "-l", "4")
    assert seen[0]["blocks"] == "4" and notes(result) == []


def test_fix_out_with_a_checkpoint_suffix_still_saves_the_model(capture, tmp_path):
    seen = capture("artifactscan.analysis.fix", "fix")
    target = tmp_path / "fixed.safetensors"
    old = run("fix", "--out", target)
    new = run("fix", "--save-model", target)
    assert seen[0] == seen[1] and seen[0]["save_model"] == target
    assert len(notes(old)) == 1 and "--save-model" in notes(old)[0] and notes(new) == []
    both = run("fix", "--out", target, "--save-model", target)
    assert both.exit_code == 1 and "--save-model only" in both.stderr


def test_fix_out_is_a_folder_with_fix_json(monkeypatch, tmp_path):
    from artifactscan.analysis import fix as fix_module
    from tests.real_results import fix_result

    result_object = fix_result()
    monkeypatch.setattr(fix_module, "fix", lambda *a, **k: result_object)
    out = tmp_path / "fixout"
    result = run("fix", "--out", out)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "fix.json").read_text()) == json.loads(json.dumps(result_object.to_dict()))
    assert notes(result) == []


def test_fix_test_time_registers_flag(capture):
    seen = capture("artifactscan.analysis.fix", "fix")
    result = run("fix", "--test-time-registers")
    assert result.exit_code == 1 and len(seen) == 1 and len(notes(result)) == 1  # a no-op, deprecated
    result = run("fix", "--no-test-time-registers")
    assert result.exit_code == 1 and len(seen) == 1  # refused before any work
    assert result.stderr.strip().splitlines()[-1].startswith("error: --no-test-time-registers")


def test_report_out_is_a_folder(tmp_path):
    results = tmp_path / "results"
    assert run("norms", "demo", "synthetic:4", "--out", results, "--no-figures").exit_code == 0
    result = run("report", results, "--out", tmp_path / "pages")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "pages" / "report.html").is_file() and notes(result) == []
    result = run("report", results, "-o", tmp_path / "page.html")  # the old spelling: the page itself
    assert result.exit_code == 0, result.output
    assert (tmp_path / "page.html").is_file() and len(notes(result)) == 1
    assert (tmp_path / "page.html").read_bytes() == (tmp_path / "pages" / "report.html").read_bytes()


# ----------------------------------------------------------------------------------------------- nothing dropped
def test_compare_takes_the_load_options(capture):
    seen = capture("artifactscan.analysis.compare", "compare")
    run("compare", "demo", "demo-reg4", "synthetic:4", "--img-size", "64", "--weights", "raw", "--workers", "0")
    assert seen[0]["img_size"] == 64 and seen[0]["weights"] == "raw" and seen[0]["num_workers"] == "0"


def test_fix_takes_the_load_options(capture):
    seen = capture("artifactscan.analysis.fix", "fix")
    run("fix", "--arch", "vit_small_patch16_224", "--img-size", "64", "--exact-decode")
    assert seen[0]["arch"] == "vit_small_patch16_224" and seen[0]["img_size"] == 64 and seen[0]["exact_decode"]


def test_discover_takes_the_decode_options(capture):
    seen = capture("artifactscan.analysis.discover", "discover")
    run("discover", "--workers", "0", "--exact-decode")
    assert seen[0]["num_workers"] == "0"
    result = run("discover", "--gpu-decode")
    assert result.exit_code == 1 and "--gpu-decode does not apply to discover" in result.stderr and len(seen) == 1


@pytest.fixture
def run_dir(tmp_path):
    """A folder without config.json: norms reads it as a run of checkpoints (scan_run is patched)."""
    folder = tmp_path / "run"
    folder.mkdir()
    return folder


@pytest.mark.parametrize("flag", [["--arch", "vit_small_patch16_224"], ["--weights", "raw"], ["--maps", "2"],
                                  ["--trust-checkpoint"]])
def test_norms_of_a_run_refuses_what_does_not_apply(run_dir, capture, flag):
    seen = capture("artifactscan.analysis.emergence", "scan_run")
    result = run("norms", run_dir, "synthetic:4", *flag)
    assert result.exit_code == 1 and seen == []
    assert f"{flag[0]} only applies to a single model" in result.stderr


def test_norms_of_a_run_passes_the_decode_options(run_dir, capture):
    seen = capture("artifactscan.analysis.emergence", "scan_run")
    run("norms", run_dir, "synthetic:4", "--workers", "0", "--exact-decode", "--img-size", "64")
    assert seen[0]["num_workers"] == "0" and seen[0]["exact_decode"] and seen[0]["img_size"] == 64


# ----------------------------------------------------------------------------------------------- library keywords
def test_old_library_keywords_warn_and_mean_the_same():
    from artifactscan.analysis.fix import fix

    with pytest.warns(DeprecationWarning, match="max_layer= is deprecated"):
        with pytest.raises(InputError, match="block 99 is out of range"):
            fix("demo", "synthetic:4", max_layer=99, device="cpu")
    with pytest.raises(InputError, match="block 99 is out of range"):
        fix("demo", "synthetic:4", blocks="0:99", device="cpu")


@pytest.mark.parametrize("function, old", [
    ("artifactscan.analysis.probes:probe", {"layer": 9}),
    ("artifactscan.analysis.attention_maps:attention_report", {"layers": "9"}),
    ("artifactscan.analysis.discover:discover", {"block": 9}),
])
def test_old_block_keywords_warn_and_reach_the_one_parser(function, old):
    import importlib

    module, name = function.split(":")
    fn = getattr(importlib.import_module(module), name)
    (keyword, value), = old.items()
    with pytest.warns(DeprecationWarning, match=f"{keyword}= is deprecated; use blocks="):
        with pytest.raises(InputError, match="blocks=.*9.* is out of range: this model has 6 blocks"):
            fn("demo", "synthetic:4" if name != "discover" else "synthetic-objects:2", device="cpu", **old)
    with pytest.warns(DeprecationWarning), pytest.raises(InputError, match="name the same thing"):
        fn("demo", "synthetic:4" if name != "discover" else "synthetic-objects:2", device="cpu", blocks="2", **old)
