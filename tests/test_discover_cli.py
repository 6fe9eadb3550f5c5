"""``artifactscan discover`` through Typer's runner: JSON alone on stdout, the output folder, the report section,
and one clear line per bad input."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from artifactscan.cli import app
from artifactscan.cli.discover import split_args

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_json_is_the_only_stdout():
    result = invoke("discover", "demo", "synthetic-objects:6", "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["schema"] == "artifactscan.discover/3"
    run = data["runs"][0]
    assert run["label"] == "demo" and run["num_images"] == 6 and run["features"] == "keys"
    assert len(run["images"]) == 6 and run["corloc"] is not None


def test_two_models_out_folder_and_report(tmp_path):
    out = tmp_path / "disc"
    result = invoke("discover", "demo", "demo-reg4", "synthetic-objects:6", "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "demo-reg4" in result.output and "CorLoc" in result.output
    data = json.loads((out / "discover.json").read_text())
    assert [r["label"] for r in data["runs"]] == ["demo", "demo-reg4"]
    assert (out / "discover.png").stat().st_size > 1000
    page = tmp_path / "page.html"
    result = invoke("report", out, "-o", page)
    assert result.exit_code == 0, result.output
    html = page.read_text()
    assert "Object discovery" in html and "demo-reg4" in html and "discover.png" in html


def test_one_argument_is_data_or_model(tmp_path):
    assert split_args([]) == ([None], None)
    assert split_args(["synthetic-objects:8"]) == ([None], "synthetic-objects:8")
    assert split_args([str(tmp_path)]) == ([None], str(tmp_path))
    assert split_args(["demo"]) == (["demo"], None)
    assert split_args(["a", "b", "voc/"]) == (["a", "b"], "voc/")


@pytest.mark.parametrize("case,match", [
    ("voc_without_images", "is missing or empty"),
    ("missing_file", "which is not in"),
    ("box_outside", "lies outside"),
    ("bad_compare", "--compare"),
    ("bad_features", "--features"),
])
def test_bad_input_gives_one_clear_line(tmp_path, case, match):
    voc = tmp_path / "voc"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "Annotations").mkdir()
    xmax = 60 if case == "box_outside" else 20
    (voc / "Annotations" / "a.xml").write_text(
        "<annotation><filename>a.jpg</filename><size><width>40</width><height>32</height></size><object><name>x"
        f"</name><bndbox><xmin>2</xmin><ymin>2</ymin><xmax>{xmax}</xmax><ymax>20</ymax></bndbox></object>"
        "</annotation>")
    if case not in ("voc_without_images",):
        Image.new("RGB", (40, 32)).save(voc / "JPEGImages" / ("b.jpg" if case == "missing_file" else "a.jpg"))
    args = {"bad_compare": ["demo", "synthetic-objects:2", "--compare", "registers"],
            "bad_features": ["demo", "synthetic-objects:2", "--features", "pixels"]}.get(case, ["demo", voc])
    result = invoke("discover", *args, "--device", "cpu")
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert match in lines[0]
