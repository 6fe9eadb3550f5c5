""""Could not decide" is never "clean": a separated group with fewer tokens than the rule's minimum makes a layer
inconclusive, in the rule's result, the scan's JSON and headline, the gate, a run folder, compare, probe and the HTML page.

The 6-block ``phantom`` plants one artifact token per image from block 2 on: on 4 images the group has 4 tokens, one
short of the rule's minimum; on 8 images the rule decides (onset block 2).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from artifactscan.core.thresholds import AutoRule, images_to_decide, threshold_norms

from .fault_tools import check, invoke

PLANTED_FROM = 2  # the phantom's onset block (docs/phantom.md)


# ----------------------------------------------------------------------------------------------- the rule
def _bulk(seed: int = 3) -> np.ndarray:
    return np.exp(np.random.default_rng(seed).normal(0.0, 0.1, 5000))


@pytest.mark.parametrize("n", [1, 2, 4])
def test_a_separated_group_below_the_minimum_size_is_inconclusive(n):
    decision = threshold_norms(np.concatenate([_bulk(), np.full(n, 20.0)]))
    assert decision.value is None and decision.inconclusive
    assert decision.details["group_tokens"] == n
    assert decision.details["rejected"] == [f"only {n} token(s) (< 5)"]  # the size, and nothing else, failed
    assert decision.details["min_group_tokens"] == 5
    assert decision.reason.startswith("inconclusive:")


def test_five_tokens_decide_and_a_unimodal_layer_is_no_outliers():
    five = threshold_norms(np.concatenate([_bulk(), np.full(5, 20.0)]))
    assert five.value is not None and not five.inconclusive
    none = threshold_norms(_bulk())
    assert none.value is None and not none.inconclusive and none.reason.startswith("no outliers")


def test_a_small_group_that_fails_another_test_is_not_inconclusive():
    """Four tokens at 1.8x fail the ratio too: more images would not make them a group, so the layer is decided."""
    decision = threshold_norms(np.concatenate([_bulk(), np.full(4, 1.8)]))
    assert decision.value is None and not decision.inconclusive
    assert decision.reason.startswith("no outliers")


def test_a_larger_minimum_makes_a_five_token_group_inconclusive():
    decision = threshold_norms(np.concatenate([_bulk(), np.full(5, 20.0)]), AutoRule(min_group_tokens=8))
    assert decision.inconclusive and decision.details["min_group_tokens"] == 8


@pytest.mark.parametrize("tokens, images, needed", [(4, 4, 5), (1, 100, 500), (3, 2, 4), (2, 1, 3)])
def test_images_to_decide_at_the_groups_rate(tokens, images, needed):
    assert images_to_decide(tokens, images) == needed
    assert needed * tokens / images >= AutoRule().min_group_tokens  # enough ...
    assert (needed - 1) * tokens / images < AutoRule().min_group_tokens  # ... and no more than needed


def test_images_to_decide_refuses_an_empty_group():
    with pytest.raises(ValueError):
        images_to_decide(0, 4)


# ----------------------------------------------------------------------------------------------- norms
@pytest.fixture(scope="module")
def phantom_on_4(tmp_path_factory):
    """``norms phantom synthetic:4 --fail-above 0 --out DIR``: the result, the folder and the command's outcome."""
    out = tmp_path_factory.mktemp("inconclusive") / "out"
    result = invoke("norms", "phantom", "synthetic:4", "--fail-above", "0", "--out", out, "--no-figures")
    return result, out


def test_phantom_on_4_images_is_inconclusive_and_fails_the_gate(phantom_on_4):
    result, out = phantom_on_4
    line = check(result, 3, "inconclusive at blocks 2, 3, 4, 5")
    assert "an inconclusive scan does not pass --fail-above" in line
    assert "No high-norm outlier" not in result.stdout
    assert "INCONCLUSIVE, NOT CLEAN" in " ".join(result.stdout.split())
    report = json.loads((out / "report.json").read_text())  # the evidence is written before the gate fails
    assert report["schema"] == "artifactscan.scan/5"
    assert report["onset_layer"] is None
    undecided = [lay for lay in report["layers"] if lay["inconclusive"]]
    assert [lay["index"] for lay in undecided] == list(range(PLANTED_FROM, report["model"]["num_blocks"]))
    for lay in undecided:
        assert lay["threshold"] is None and lay["num_outliers"] == 0
        assert lay["separation"]["group_tokens"] == 4  # one planted token per image
        assert lay["images_to_decide"] == 5  # 5 images give 5 tokens at 1 per image
        assert lay["threshold_reason"].startswith("inconclusive:")
    decided = [lay for lay in report["layers"] if not lay["inconclusive"]]
    assert all(lay["images_to_decide"] is None for lay in decided)
    assert "5 images would give the 5 tokens needed to decide" in report["headline"]


def test_phantom_on_enough_images_gives_the_real_verdict():
    result = invoke("norms", "phantom", "synthetic:8", "--json")
    check(result, 0)
    report = json.loads(result.stdout)
    assert report["onset_layer"] == PLANTED_FROM
    assert not any(lay["inconclusive"] for lay in report["layers"])
    assert "INCONCLUSIVE" not in report["headline"]


@pytest.mark.parametrize("model", ["demo", "demo-deep", "demo-reg4"])
def test_clean_models_are_clean_not_inconclusive(model):
    """The shipped clean baselines on 64 held-out images: nothing flagged, nothing undecided, the gate passes."""
    result = invoke("norms", model, "synthetic:64", "--fail-above", "0", "--json", "--maps", "0")
    check(result, 0)
    report = json.loads(result.stdout)
    assert report["onset_layer"] is None
    assert not any(lay["inconclusive"] for lay in report["layers"]), report["headline"]
    assert report["headline"].startswith("No high-norm outlier tokens")


def test_an_older_report_reads_with_every_layer_decided(phantom_on_4):
    from artifactscan.analysis.scan import ScanReport

    data = json.loads((phantom_on_4[1] / "report.json").read_text())
    data["schema"] = "artifactscan.scan/3"
    for lay in data["layers"]:
        del lay["inconclusive"], lay["images_to_decide"]
    old = ScanReport.from_dict(data)
    assert old.inconclusive_layers == [] and old.inconclusive_problem() is None


def test_html_report_shows_an_inconclusive_scan_in_warning_colours(phantom_on_4, tmp_path):
    from artifactscan.render.html_report import build_html_report

    folder = tmp_path / "results"
    shutil.copytree(phantom_on_4[1], folder)
    page = build_html_report(folder)
    assert '<div class="verdict inconclusive">' in page
    assert '<div class="verdict clean">' not in page


# ----------------------------------------------------------------------------------------------- elsewhere
def test_a_run_folder_gate_fails_on_an_inconclusive_checkpoint(tmp_path):
    from artifactscan.models.demo import WEIGHTS_DIR

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(WEIGHTS_DIR / "phantom.safetensors", run / "step_1.safetensors")
    line = check(invoke("norms", run, "synthetic:4", "--fail-above", "0"), 3, "inconclusive at block(s) 2, 3, 4, 5")
    assert "step_1.safetensors" in line
    result = invoke("norms", run, "synthetic:4", "--json")
    check(result, 0)
    data = json.loads(result.stdout)
    assert data["schema"] == "artifactscan.emergence/4"
    assert data["groups"][0]["points"][0]["inconclusive_layers"] == [2, 3, 4, 5]
    assert any("inconclusive at blocks 2, 3, 4, 5" in note for note in data["notes"])


def test_compare_says_which_model_is_inconclusive():
    result = invoke("compare", "demo", "phantom", "synthetic:4", "--json")
    check(result, 0)
    data = json.loads(result.stdout)
    rows = {r["label"]: r for r in data["rows"]}
    assert rows["phantom"]["inconclusive_layers"] == [2, 3, 4, 5] and rows["demo"]["inconclusive_layers"] == []
    assert "INCONCLUSIVE for phantom (block(s) 2, 3, 4, 5)" in data["verdict"]


def test_probe_at_an_inconclusive_layer_is_inconclusive_not_clean():
    from artifactscan import probe

    report = probe("phantom", "synthetic:4", blocks=3)
    assert report.num_outliers == 0
    assert report.verdict.label == "inconclusive"
    assert report.verdict.reasons[0].startswith("inconclusive:")


def test_attention_and_fix_say_the_scan_was_inconclusive():
    from artifactscan import fix
    from artifactscan.analysis.attention_maps import attention_report

    attention = attention_report("phantom", "synthetic:4")
    assert "The norms scan is inconclusive at blocks 2, 3, 4, 5" in attention.headline
    repaired = fix("phantom", "synthetic:4")
    assert repaired.verdict.startswith("nothing to fix") and "inconclusive at blocks 2, 3, 4, 5" in repaired.verdict
