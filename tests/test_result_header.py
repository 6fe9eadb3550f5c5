"""One result shape (issue 21): every command's ``--json`` starts with the same header, every result reads its own
JSON back, and each kind still reads the previous version's JSON (tests/data/schemas/, written by 0.1.0 on tiny
inputs) and refuses an unknown one in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import artifactscan
from artifactscan.analysis.attention_maps import AttentionReport
from artifactscan.analysis.calibrate import CalibrationReport
from artifactscan.analysis.compare import CompareReport
from artifactscan.analysis.emergence import EmergenceReport
from artifactscan.analysis.training.verdict import TrainRegVerdict
from artifactscan.analysis.discover import DiscoverReport
from artifactscan.analysis.fix import FixReport
from artifactscan.analysis.probes.types import ProbeReport
from artifactscan.analysis.scan import ScanReport
from artifactscan.cli import app
from artifactscan.core.errors import InputError
from artifactscan.core.summaries import header_fields
from artifactscan.models.phantom import PhantomDescription

OLD = Path(__file__).parent / "data" / "schemas"
HEADER = ("schema", "artifactscan_version", "model", "images", "headline")
# result class, its file of the previous schema, whether its ``model`` lists several models
KINDS = {
    "scan": (ScanReport, "scan-v4.json", False),
    "compare": (CompareReport, "compare-v2.json", True),
    "emergence": (EmergenceReport, "emergence-v3.json", True),
    "train_reg_verdict": (TrainRegVerdict, "train_reg_verdict-v1.json", True),
    "fix": (FixReport, "fix-v1.json", False),
    "discover": (DiscoverReport, "discover-v2.json", True),
    "attention": (AttentionReport, "attention-v2.json", False),
    "probe": (ProbeReport, "probe-v2.json", False),
    "calibration": (CalibrationReport, "calibration-v1.json", True),
    "phantom": (PhantomDescription, "phantom-v1.json", False),
}


def check_header(data: dict, cls: type, several: bool, *, fresh: bool = True) -> None:
    assert tuple(data)[:5] == HEADER == header_fields()
    assert data["schema"] == cls.SCHEMA
    if fresh:
        assert data["artifactscan_version"] == artifactscan.__version__
    assert isinstance(data["headline"], str) and data["headline"].strip()
    models = data["model"] if several else [data["model"]]
    assert isinstance(models, list) and models and all(isinstance(m, dict) and m["name"] for m in models)
    assert data["images"] is None if cls is PhantomDescription else isinstance(data["images"], dict)


@pytest.mark.parametrize("kind", KINDS)
def test_previous_schema_reads_into_the_current_shape(kind):
    cls, name, several = KINDS[kind]
    old = json.loads((OLD / name).read_text())
    assert old["schema"] in cls.OLDER_SCHEMAS and cls.SCHEMA not in cls.OLDER_SCHEMAS
    # this release bumps each kind by exactly one
    assert int(cls.SCHEMA.rsplit("/", 1)[1]) == int(old["schema"].rsplit("/", 1)[1]) + 1
    result = cls.from_dict(old)
    data = result.to_dict()
    check_header(data, cls, several, fresh=False)
    assert data["artifactscan_version"] == old.get("artifactscan_version", "unknown")
    assert cls.from_dict(data).to_dict() == data
    for key in old:  # nothing the old file said is lost: each key is still written (renamed keys too, for now)
        assert key in data, key


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_schema_is_one_clear_line(kind):
    cls, name, _ = KINDS[kind]
    data = json.loads((OLD / name).read_text())
    data["schema"] = cls.SCHEMA.rsplit("/", 1)[0] + "/99"
    with pytest.raises(InputError, match=r"of schema .*/99'; this version of artifactscan .* reads ") as caught:
        cls.from_dict(data)
    assert "\n" not in str(caught.value) and cls.SCHEMA in str(caught.value)


def run_json(*args) -> dict:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_every_command_json_has_the_header(tmp_path):
    """Each command on the cheapest input it takes; the header checked, and the JSON read back unchanged."""
    run = tmp_path / "run"
    outputs = {
        "scan": run_json("norms", "demo", "synthetic:4", "--json"),
        "compare": run_json("compare", "demo", "phantom", "synthetic:4", "--json"),
        "fix": run_json("fix", "phantom", "synthetic:8", "--json"),
        "discover": run_json("discover", "demo", "synthetic-objects:6", "--json", "--device", "cpu"),
        "attention": run_json("attention", "phantom", "synthetic:4", "--json", "--maps", "1"),
        "probe": run_json("probe", "phantom", "synthetic:16", "--json"),
        "calibration": run_json("calibrate", "--gains", "3", "--fractions", "0.0625", "--images", "4", "--json"),
        "phantom": run_json("phantom", "--describe", "--model", "phantom", "--json"),
        "train_reg_verdict": run_json("train-reg", "--steps", "2", "--depth", "2", "--dim", "32", "--heads", "2",
                                      "--img-size", "16", "--patch", "4", "--batch-size", "8", "--scan-images",
                                      "synthetic:8", "--out", run, "--json"),
    }
    outputs["emergence"] = run_json("norms", run, "synthetic:4", "--json")
    assert set(outputs) == set(KINDS)
    for kind, data in outputs.items():
        cls, _, several = KINDS[kind]
        check_header(data, cls, several)
        assert cls.from_dict(data).to_dict() == data, kind
    # the renamed headline keeps its old key for one version
    for kind in ("compare", "fix", "train_reg_verdict"):
        assert outputs[kind]["verdict"] == outputs[kind]["headline"]
    assert outputs["probe"]["headline"] == outputs["probe"]["verdict"]["summary"]
    assert len(outputs["compare"]["model"]) == 2 and outputs["compare"]["model"][1]["kind"] == "phantom"


def test_signatures_json_has_the_header():
    """The command added after the others (issue 24) carries the same header and reads back unchanged."""
    from artifactscan.analysis.signatures import SignaturesReport

    data = run_json("signatures", "demo", "synthetic-objects:4", "--null-seeds", "1", "--json")
    check_header(data, SignaturesReport, False)
    assert SignaturesReport.from_dict(data).to_dict() == data
