"""artifactscan's own outputs never become its inputs: image discovery leaves out exactly the files a manifest lists
(and what the output folders being written hold), says so once, and still scans a user's images beside them."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from artifactscan.core.errors import InputError
from artifactscan.core.files import MANIFEST_NAME, OutputFolder, atomic_write_text
from artifactscan.inputs.images import discover_images

from .fault_tools import check, invoke


def _manifest(folder: Path, files: list[str], complete: bool = True) -> None:
    (folder / MANIFEST_NAME).write_text(json.dumps({"schema": "artifactscan.manifest/1", "command": "norms",
                                                    "complete": complete, "files": files}))


def _found(root: Path, said: list[str] | None = None) -> list[str]:
    warn = (lambda m: said.append(m)) if said is not None else (lambda m: None)
    return [p.relative_to(root).as_posix() for p in discover_images(root, warn=warn)]


def test_an_out_folder_inside_the_images_is_never_scanned(image_dir):
    """The survey's case: `norms demo imgs/ --out imgs/out`, three times; 8 images stay 8 (not 8, 14, 20)."""
    for run in range(3):
        result = invoke("norms", "demo", image_dir, "--out", image_dir / "out", "--maps", "3", "--json")
        check(result, 0)
        assert json.loads(result.stdout)["images"]["num_found"] == 8
        said = [ln for ln in result.stderr.splitlines() if "that artifactscan wrote" in ln]
        # One line, once there is something to leave out; this test's runs share one process, which has said it
        # by the third (each command line is a process of its own and says it every time).
        assert len(said) == (1 if run == 1 else 0), result.stderr
        if run == 1:
            assert said[0].startswith("warning: left out") and "out/.artifactscan-manifest.json" in said[0]
    assert len(list((image_dir / "out" / "maps").glob("*.png"))) == 3  # the outputs are there, only not scanned


def test_exactly_the_listed_files_are_left_out(tmp_path, image_dir):
    root = tmp_path / "photos"
    shutil.copytree(image_dir, root)
    (root / "out").mkdir()
    for name in ("a.png", "b.png"):
        shutil.copy(root / "img0.png", root / "out" / name)
    _manifest(root / "out", ["a.png", "../img1.png", "/etc/passwd", ".", "", 7])  # only a.png is a safe name
    said: list[str] = []
    found = _found(root, said)
    assert "out/a.png" not in found and "out/b.png" in found  # b.png is the user's, beside the outputs
    assert "img1.png" in found  # a name outside the manifest's folder is never taken from it
    assert len(found) == 9
    assert len(said) == 1 and "left out 1 file(s)" in said[0]


def test_said_once_however_often_the_folder_is_discovered(tmp_path, image_dir):
    root = tmp_path / "photos"
    shutil.copytree(image_dir, root)
    shutil.copy(root / "img0.png", root / "figure.png")
    _manifest(root, ["figure.png"])
    said: list[str] = []
    for _ in range(3):  # compare, fix and RUN_DIR discover the same folder again for every model
        assert len(_found(root, said)) == 8
    assert len(said) == 1


def test_images_inside_an_output_folder_are_left_out_too(tmp_path, image_dir):
    out = tmp_path / "out"
    (out / "maps").mkdir(parents=True)
    for name in ("x.png", "y.png"):
        shutil.copy(image_dir / "img0.png", out / "maps" / name)
    _manifest(out, ["maps/x.png", "maps/y.png"])
    with pytest.raises(InputError, match="holds only files artifactscan wrote"):
        discover_images(out / "maps", warn=lambda m: None)
    shutil.copy(image_dir / "img1.png", out / "maps" / "mine.png")
    assert _found(out / "maps") == ["mine.png"]
    assert discover_images(out / "maps" / "x.png") == [out / "maps" / "x.png"]  # a file named outright is scanned


def test_a_link_to_the_folder_still_meets_its_manifest(tmp_path, image_dir):
    shutil.copy(image_dir / "img0.png", image_dir / "figure.png")
    _manifest(image_dir, ["figure.png"])
    link = tmp_path / "link"
    link.symlink_to(image_dir, target_is_directory=True)
    assert len(_found(link)) == 8 and "figure.png" not in _found(link)


def test_the_out_folder_being_written_is_left_out(tmp_path, image_dir):
    """This process's own output folders: a train-reg run folder (no manifest) whole, a manifest folder's new files."""
    run = image_dir / "run"
    with OutputFolder(run, "train-reg", manifest=False):
        (run / "figure.png").write_bytes((image_dir / "img0.png").read_bytes())
        said: list[str] = []
        assert len(_found(image_dir, said)) == 8
        assert "the --out folder this run writes" in said[0]
    assert len(_found(image_dir)) == 9  # once that run is over, a file it did not list is an ordinary file
    out = image_dir / "out"
    with OutputFolder(out, "norms"):
        atomic_write_text(out / "x.png", "not an image: written by this run")
        assert len(_found(image_dir)) == 9  # its file is listed (in its manifest and in the run) and left out
    assert len(_found(image_dir)) == 9


@pytest.mark.parametrize("kind", ["fifo", "folder", "garbage"])
def test_a_manifest_that_is_not_a_manifest_is_ignored(kind, image_dir):
    path = image_dir / MANIFEST_NAME
    if kind == "fifo":
        os.mkfifo(path)  # opening it would block forever: never opened
    elif kind == "folder":
        path.mkdir()
    else:
        path.write_text("{not json")
    assert len(_found(image_dir)) == 8


def test_reports_hint_never_puts_results_among_the_images(image_dir):
    line = check(invoke("report", image_dir), 1, "it holds images")
    words = line.replace("`", " ").split()
    out = Path(words[words.index("--out") + 1])
    assert out.name == "imgs-results" and out.parent == image_dir.parent  # a folder of its own, beside the images


def test_readme_and_docs_suggest_no_out_folder_inside_the_images():
    """Every `--out` in the docs' commands goes beside the images it scans, never inside them."""
    from .conftest import REPO

    texts = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    checked = 0
    for path in texts:
        for line in path.read_text().splitlines():
            words = line.replace("`", " ").split()
            if "artifactscan" not in words or "--out" not in words:
                continue
            out = words[words.index("--out") + 1].rstrip("/")
            inputs = [w.rstrip("/") for w in words[words.index("artifactscan") + 2:words.index("--out")]
                      if not w.startswith("-")]
            assert not any(out.startswith(folder + "/") for folder in inputs if folder), (path.name, line)
            checked += 1
    assert checked >= 10  # the documented commands with an --out were found and read
