"""`--json` on every command (the README promises it): the result alone on stdout, one JSON document."""

from __future__ import annotations

import json

import typer
from typer.testing import CliRunner

from artifactscan.cli import app
from artifactscan.models.phantom import PhantomDescription


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_every_command_has_json():
    group = typer.main.get_command(app)
    without = [name for name, command in group.commands.items()
               if not any("--json" in param.opts for param in command.params)]
    assert without == []


def test_report_json_is_the_only_stdout(tmp_path):
    results = tmp_path / "results"
    assert invoke("norms", "demo", "synthetic:4", "--out", results, "--no-figures").exit_code == 0
    result = invoke("report", results, "-o", tmp_path / "page.html", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["schema"] == "artifactscan.html_report/1"
    assert summary["out_path"] == str(tmp_path / "page.html") and (tmp_path / "page.html").is_file()
    assert [r["kind"] for r in summary["results"]] == ["scan"] and summary["bytes"] > 0


def test_phantom_describe_json_says_what_the_text_says():
    text = invoke("phantom", "--describe", "--model", "phantom")
    result = invoke("phantom", "--describe", "--model", "phantom", "--json")
    assert text.exit_code == 0 and result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["schema"] == "artifactscan.phantom/2" and data["model"]["name"] == "phantom"
    assert (data["num_blocks"], data["spec"]["onset"], data["spec"]["base"]) == (6, 2, "demo")
    # the printed description is rendered from the same result (rich wraps its lines at the terminal's width)
    assert " ".join(PhantomDescription.from_dict(data).text().split()) == " ".join(text.stdout.split())


def test_phantom_build_json_describes_the_file_written(tmp_path):
    out = tmp_path / "built.safetensors"
    result = invoke("phantom", "--build", "--from", "demo", "--onset", "3", "--save-model", out, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model"]["name"] == str(out) and out.is_file()
    assert data["spec"]["onset"] == 3 and data["rebuild"].endswith(f"--onset 3 --fraction 0.02 --units 4 --out {out}")
