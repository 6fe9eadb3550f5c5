"""Fault injection, part 4: nothing of a complete earlier run is lost when the next run into its folder is stopped.

A run into an ``--out`` folder that holds a complete earlier run writes into ``.artifactscan-staging/`` and swaps its
files in only when it completes. Real processes are stopped mid-write (SIGINT and SIGKILL, while they write per-image
maps) and every file of the earlier run must be byte for byte as it was; then a run that completes replaces them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from artifactscan.core.files import LOCK_NAME, MANIFEST_NAME, STAGING_NAME, OutputFolder, atomic_write_text

from .conftest import REPO
from .fault_tools import check, invoke, manifest, no_partial_files, tree

MAPS = 24  # per-image maps the earlier run writes: the interrupted run is stopped while it writes its own


def _results(folder: Path) -> dict[str, bytes]:
    """The folder's files without the lock (its content is the holder's pid) and the staging folder."""
    return {k: v for k, v in tree(folder).items() if k != LOCK_NAME and not k.startswith(STAGING_NAME + "/")}


def _norms(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "artifactscan", "norms", "demo", f"synthetic:{MAPS}", "--out", str(out), *extra]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory) -> Path:
    """A complete run with MAPS maps, a user's own files beside and among its outputs."""
    out = tmp_path_factory.mktemp("staging") / "out"
    done = subprocess.run(_norms(out, "--maps", str(MAPS)), capture_output=True, text=True, env=ENV, cwd=REPO,
                          timeout=900)
    assert done.returncode == 0, done.stderr
    assert len(list((out / "maps").glob("*.png"))) == MAPS and manifest(out)["complete"] is True
    (out / "notes.txt").write_text("the user's own file")
    (out / "maps" / "mine.png").write_bytes(b"the user's own image")
    return out


def _staged_maps(out: Path) -> int:
    folder = out / STAGING_NAME / "maps"
    return len([p for p in folder.glob("*.png")]) if folder.is_dir() else 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_a_run_stopped_mid_write_leaves_the_earlier_run_intact(sig, earlier_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(earlier_run, out)
    before = _results(out)
    proc = subprocess.Popen(_norms(out, "--maps", str(MAPS), "--threshold", "150"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)
    try:
        deadline = time.time() + 600
        while _staged_maps(out) < 2:  # mid-write: some of its maps are written, not all
            assert proc.poll() is None, f"the run ended before it could be stopped: {proc.communicate()}"
            assert time.time() < deadline, "the run never started writing"
            time.sleep(0.02)
        assert _results(out) == before  # while it writes, the earlier run is untouched
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == (130 if sig == signal.SIGINT else -signal.SIGKILL), err
    assert _results(out) == before  # every earlier file and the earlier manifest, byte for byte
    assert (out / LOCK_NAME).is_file()
    if sig == signal.SIGINT:  # cleanup ran: no staged file is left behind
        assert not (out / STAGING_NAME).exists() and "Traceback" not in err
        no_partial_files(out)

    # Then a run that completes replaces the earlier run's files: only its own are left, with the user's.
    done = subprocess.run(_norms(out, "--maps", "0", "--no-figures"), capture_output=True, text=True, env=ENV,
                          cwd=REPO, timeout=900)
    assert done.returncode == 0, done.stderr
    after = _results(out)
    assert set(after) == {MANIFEST_NAME, "report.json", "outliers.csv", "notes.txt", "maps/mine.png"}
    assert after["notes.txt"] == before["notes.txt"] and after["maps/mine.png"] == before["maps/mine.png"]
    assert json.loads(after["report.json"])["threshold_mode"] == "auto"
    assert manifest(out)["complete"] is True and sorted(manifest(out)["files"]) == ["outliers.csv", "report.json"]
    assert not (out / STAGING_NAME).exists()
    no_partial_files(out)


# ----------------------------------------------------------------------------------------------- in one process
def _complete_run(out: Path, names: dict[str, str]) -> dict[str, bytes]:
    with OutputFolder(out, "norms"):
        for name, text in names.items():
            atomic_write_text(out / name, text)
    return _results(out)


def test_a_failing_run_discards_its_staged_files(tmp_path):
    out = tmp_path / "out"
    before = _complete_run(out, {"report.json": "old", "maps/a.png": "old a", "maps/b.png": "old b"})
    with pytest.raises(KeyboardInterrupt):
        with OutputFolder(out, "norms"):
            atomic_write_text(out / "report.json", "new")
            atomic_write_text(out / "extra/c.png", "new c")
            assert (out / STAGING_NAME / "report.json").read_text() == "new"
            assert _results(out) == before
            raise KeyboardInterrupt
    assert _results(out) == before
    assert not (out / STAGING_NAME).exists() and not (out / "extra").exists()


def test_a_completed_run_swaps_in_and_removes_only_the_earlier_runs_files(tmp_path):
    out = tmp_path / "out"
    _complete_run(out, {"report.json": "old", "maps/a.png": "old a", "maps/b.png": "old b"})
    (out / "maps" / "mine.png").write_text("user")
    after = _complete_run(out, {"report.json": "new", "maps/a.png": "new a"})
    assert after == {MANIFEST_NAME: after[MANIFEST_NAME], "report.json": b"new", "maps/a.png": b"new a",
                     "maps/mine.png": b"user"}
    assert manifest(out)["complete"] is True and manifest(out)["files"] == ["report.json", "maps/a.png"]
    assert not (out / STAGING_NAME).exists()


def test_ctrl_c_during_the_swap_waits_for_it(tmp_path, monkeypatch):
    """SIGINT arriving between two renames of the swap is acted on after it: no folder holds two runs' files."""
    import artifactscan.core.files as files

    out = tmp_path / "out"
    _complete_run(out, {"report.json": "old", "maps/a.png": "old a", "maps/b.png": "old b"})
    real_replace = os.replace
    sent = []

    def replace(src, dst):
        if STAGING_NAME in os.fspath(src) and STAGING_NAME not in os.fspath(dst) and not sent:  # the swap's first move
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        _complete_run(out, {"report.json": "new", "maps/a.png": "new a"})
    assert sent
    assert _results(out) == {MANIFEST_NAME: _results(out)[MANIFEST_NAME], "report.json": b"new", "maps/a.png": b"new a"}
    assert manifest(out)["complete"] is True


def test_a_killed_runs_staging_folder_is_removed_by_the_next_run_and_named_by_report(tmp_path):
    out = tmp_path / "out"
    check(invoke("norms", "demo", "synthetic:4", "--out", out, "--no-figures"), 0)
    before = _results(out)
    (out / STAGING_NAME).mkdir()
    (out / STAGING_NAME / "report.json").write_text("half a run")  # what SIGKILL leaves
    result = invoke("report", out, "-o", tmp_path / "page.html")
    assert "a later run into this folder was interrupted" in result.stderr
    assert _results(out) == before
    _complete_run(out, {"report.json": "new"})
    assert not (out / STAGING_NAME).exists() and (out / "report.json").read_text() == "new"


def test_report_joining_a_complete_run_is_staged_and_keeps_the_run(tmp_path):
    out = tmp_path / "out"
    check(invoke("norms", "demo", "synthetic:4", "--out", out, "--no-figures"), 0)
    before = _results(out)
    check(invoke("report", out), 0)
    after = _results(out)
    assert {k: v for k, v in after.items() if k not in (MANIFEST_NAME, "report.html")} == {
        k: v for k, v in before.items() if k != MANIFEST_NAME}
    assert manifest(out)["complete"] is True and "report.html" in manifest(out)["files"]
    assert not (out / STAGING_NAME).exists()


def test_report_on_an_interrupted_folder_says_it_holds_partial_results(tmp_path):
    out = tmp_path / "out"
    check(invoke("norms", "demo", "synthetic:4", "--out", out, "--no-figures"), 0)
    data = manifest(out)
    data["complete"] = False  # as a run stopped while writing into a folder of its own leaves it
    (out / MANIFEST_NAME).write_text(json.dumps(data))
    result = invoke("report", out)
    check(result, 0)
    warnings = [ln for ln in result.stderr.splitlines() if "interrupted run's partial results" in ln]
    assert len(warnings) == 1 and warnings[0].startswith("warning:")
    assert "interrupted run&#x27;s partial results" in (out / "report.html").read_text() or \
        "interrupted run's partial results" in (out / "report.html").read_text()
    assert manifest(out)["complete"] is False  # joining an interrupted run's folder does not finish that run
