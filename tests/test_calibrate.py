"""artifactscan calibrate: the rule's detection limit on phantoms, and its bad grids."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from artifactscan.analysis.calibrate import CalibrationReport, calibrate
from artifactscan.cli import app
from artifactscan.core.errors import InputError

runner = CliRunner()


@pytest.fixture(scope="module")
def small_grid() -> CalibrationReport:
    return calibrate("demo", gains=[1.5, 10.0], fractions=[1 / 64, 4 / 64], num_images=48)


def test_strong_groups_are_found_and_weak_ones_are_not(small_grid):
    strong = [c for c in small_grid.cells if c.gain == 10.0]
    weak = [c for c in small_grid.cells if c.gain == 1.5]
    for c in strong:
        assert c.found and c.onset_error == 0 and c.blocks_detected == c.blocks_planted
        assert c.ratio > 5  # the measured ratio, not the gain parameter, is what is reported
    for c in weak:
        assert c.recall == 0 and math.isnan(c.precision) and c.detected_onset is None
        assert c.ratio < 2.5  # under the rule's minimum ratio: blind there by design
    assert [c.planted_per_image for c in strong] == [1, 4]
    assert small_grid.found_from is not None and small_grid.blind_below is not None
    assert small_grid.blind_below < small_grid.found_from
    assert "blind" in small_grid.headline


def test_measured_ratio_rises_with_the_gain(small_grid):
    by_gain = {c.gain: c.ratio for c in small_grid.cells if c.planted_per_image == 1}
    assert by_gain[10.0] > 4 * by_gain[1.5]


def test_json_round_trip(small_grid):
    data = json.loads(small_grid.to_json())
    assert data["schema"] == "artifactscan.calibration/2"
    assert data["cells"][0]["precision"] is None  # nothing flagged: undefined, written as null
    again = CalibrationReport.from_dict(data)
    assert len(again.cells) == 4 and again.cells[-1].recall == small_grid.cells[-1].recall


@pytest.mark.parametrize("kwargs, match", [
    (dict(gains=[1.0]), "must be above 1"),
    (dict(fractions=[0.1]), r"outside \(0, 0.08\]"),
    (dict(onset=6), "choose a block from 0 to 5"),
    (dict(num_images=0), "at least 1"),
])
def test_impossible_grids_are_refused_before_any_build(kwargs, match):
    with pytest.raises(InputError, match=match):
        calibrate("demo", **kwargs)


def test_cli_writes_table_json_and_figure(tmp_path):
    out = tmp_path / "cal"
    result = runner.invoke(app, ["calibrate", "--gains", "1.5,10", "--fractions", "0.02", "--images", "32",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Detection limit" in result.output and "blind" in result.output
    assert (out / "calibration.json").is_file() and (out / "calibration.png").stat().st_size > 10_000


@pytest.mark.parametrize("args, match", [
    (["--gains", "0.5"], "must be above 1"),
    (["--gains", "2,x"], "comma-separated list of numbers"),
    (["--fractions", "0.2"], "at most 8%"),
    (["--onset", "9"], "outside the model"),
])
def test_cli_bad_grid_is_one_line_exit_1(args, match):
    result = runner.invoke(app, ["calibrate", *args])
    assert result.exit_code == 1
    assert match in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
