"""Installed as users install packages: a wheel built from the sources, installed outside the checkout, runs the
embedded default (`artifactscan norms`: the phantom on the sample photos) from any folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .conftest import REPO, SAMPLE_IMAGES

# What a wheel is built from (everything else in a clone is development material).
SOURCES = ("pyproject.toml", "README.md", "artifactscan", "sample_images")


def pip(*args: str, cwd: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "pip", *args, "--no-index", "--disable-pip-version-check", "-q"],
                         cwd=cwd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built offline from a copy of the sources (a build writes build/ and *.egg-info where it runs)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    pip("wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(root / "dist"), str(src), cwd=root)
    (built,) = (root / "dist").glob("artifactscan-*.whl")
    return built


def test_the_wheel_holds_the_code_the_weights_and_the_sample_photos(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    code = {p.relative_to(REPO).as_posix() for p in (REPO / "artifactscan").rglob("*.py")}
    assert code - names == set()  # every package of the source tree is listed in pyproject.toml
    weights = {f"artifactscan/weights/{p.name}" for p in (REPO / "artifactscan" / "weights").glob("*.safetensors")}
    assert weights and weights - names == set()
    photos = {f"artifactscan/sample_images/{p.name}" for p in SAMPLE_IMAGES.iterdir() if p.is_file()}
    assert len(photos) >= 15 and photos - names == set()  # the photos and SOURCES.md, their licences


def test_the_default_runs_from_a_wheel_installed_outside_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    pip("install", "--no-deps", "--target", str(site), str(wheel), cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()  # no sample_images/ here, and the checkout is not on the path
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import artifactscan; print(artifactscan.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, timeout=120)
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout + where.stderr
    command = site / "bin" / "artifactscan"  # the console script the wheel installs
    out = subprocess.run([str(command), "norms", "--json"], cwd=elsewhere, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["model"]["name"] == "phantom-deep"
    assert Path(report["images"]["source"]).is_relative_to(site / "artifactscan" / "sample_images")
    assert report["images"]["num_scanned"] == len([p for p in SAMPLE_IMAGES.iterdir() if p.suffix != ".md"])
