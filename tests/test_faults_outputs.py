"""Fault injection, part 2: output paths validated before any model runs, atomic files, one run per folder.

Every case asserts the exit code, one message line, no traceback, and the folder's state afterwards: nothing
partial, nothing stale, nothing of the user's removed.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO, save_planted_checkpoint
from .fault_tools import ARGS, check, forbid_models, invoke, manifest, no_partial_files, save_tiny, tree

PROC = Path("/proc/artifactscan-cannot-write-here")


# ----------------------------------------------------------------------------------------------- validated first
@pytest.mark.parametrize("command", ["norms", "compare", "probe", "attention", "calibrate", "discover"])
def test_out_that_is_a_file_is_refused_before_any_model_runs(command, tmp_path, monkeypatch):
    forbid_models(monkeypatch)
    out = tmp_path / "taken"
    out.write_text("the user's file")
    args = {"norms": ("norms", "demo", "synthetic:4"), "compare": ("compare", "demo", "demo-reg4", "synthetic:4"),
            "probe": ("probe", "demo", "synthetic:4"), "attention": ("attention", "demo", "synthetic:4"),
            "calibrate": ("calibrate",), "discover": ("discover", "demo", "synthetic-objects:4")}[command]
    check(invoke(*args, "--out", out), 1, "exists and is not a folder")
    assert out.read_text() == "the user's file"


@pytest.mark.parametrize("where", ["proc", "under_a_file"])
def test_unusable_out_folder_is_refused_before_any_model_runs(where, tmp_path, monkeypatch):
    forbid_models(monkeypatch)
    (tmp_path / "file").write_text("x")
    out = PROC if where == "proc" else tmp_path / "file" / "sub"
    line = check(invoke("norms", "demo", "synthetic:4", "--out", out), 1)
    assert ("cannot create output folder" in line) if where == "proc" else ("is a file, not a folder" in line)
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_folder(tmp_path, monkeypatch):
    forbid_models(monkeypatch)
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        check(invoke("norms", "demo", "synthetic:4", "--out", out), 1, "cannot write")
    finally:
        out.chmod(0o700)


@pytest.mark.parametrize("out, match", [
    ("fixed.txt", "must end in .safetensors or .pt"),
    ("a_folder", "is a folder"),
    (str(PROC / "x.safetensors"), "cannot create the folder"),
    ("blocker/x.safetensors", "is a file, not a folder"),
])
def test_fix_save_model_is_checked_before_the_scan(out, match, tmp_path, monkeypatch):
    forbid_models(monkeypatch)
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "blocker").write_text("x")
    before = tree(tmp_path)
    target = out if out.startswith("/") else tmp_path / out
    check(invoke("fix", "demo", "synthetic:4", "--save-model", target), 1, match)
    assert tree(tmp_path) == before


def test_phantom_build_out_is_checked_first(tmp_path):
    check(invoke("phantom", "--build", "--save-model", tmp_path / "phantom.txt"), 1, "must end in .safetensors or .pt")
    old = invoke("phantom", "--build", "--out", tmp_path / "phantom.txt")  # the old spelling: same check, one note
    check(old, 1, "--save-model")
    assert sum(ln.startswith("warning: deprecated: --out") for ln in old.stderr.splitlines()) == 1


def test_report_out_is_checked_before_the_folder_is_read(tmp_path):
    (tmp_path / "file").write_text("x")
    check(invoke("report", tmp_path, "-o", tmp_path / "file" / "r.html"), 1, "is a file, not a folder")
    check(invoke("report", tmp_path, "-o", PROC / "r.html"), 1, "cannot create the folder")
    check(invoke("report", tmp_path / "missing"), 1)


def test_train_reg_run_folder_that_is_a_file(tmp_path):
    (tmp_path / "run").write_text("x")
    check(invoke("train-reg", "--steps", "2", "--out", tmp_path / "run"), 1, "exists and is not a folder")


# ----------------------------------------------------------------------------------------------- one run per folder
def _norms(ckpt, images, out, *extra):
    return invoke("norms", ckpt, images, "--out", out, *extra)


def test_second_run_with_fewer_maps_leaves_no_stale_map_and_keeps_user_files(tmp_path, image_dir):
    ckpt = save_planted_checkpoint(tmp_path / "planted.safetensors", positions=range(6))
    out = tmp_path / "out"
    out.mkdir()
    (out / "my_notes.txt").write_text("mine")
    check(_norms(ckpt, image_dir, out, "--maps", "6"), 0)
    assert len(list((out / "maps").iterdir())) == 6
    first = manifest(out)
    assert first["complete"] and "report.json" in first["files"] and "maps/img0.png" in first["files"]
    (out / "maps" / "my_own.png").write_bytes(b"user's picture")
    check(_norms(ckpt, image_dir, out, "--maps", "1"), 0)
    assert sorted(p.name for p in (out / "maps").iterdir()) == ["img0.png", "my_own.png"]
    assert (out / "my_notes.txt").read_text() == "mine" and (out / "maps" / "my_own.png").read_bytes() == b"user's picture"
    assert set(manifest(out)["files"]) == {"report.json", "outliers.csv", "norm_histogram.png", "layer_norms.png",
                                          "maps/img0.png"}
    no_partial_files(out)


def test_html_report_sees_only_the_latest_run(tmp_path, image_dir):
    ckpt = save_planted_checkpoint(tmp_path / "planted.safetensors", positions=range(6))
    out = tmp_path / "out"
    check(_norms(ckpt, image_dir, out, "--maps", "4"), 0)
    check(invoke("report", out, "-o", tmp_path / "first.html"), 0)
    assert "img3" in (tmp_path / "first.html").read_text()
    check(_norms(ckpt, image_dir, out, "--no-figures"), 0)  # no figures this time: the old ones must go
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["outliers.csv", "report.json"]
    check(invoke("report", out, "-o", tmp_path / "second.html"), 0)
    assert "img3" not in (tmp_path / "second.html").read_text()


def test_failure_during_writing_leaves_complete_files_only(tmp_path, image_dir, monkeypatch):
    import artifactscan.render.plots as plots

    def broken(*a, **k):
        raise RuntimeError("disk on fire")

    ckpt = save_planted_checkpoint(tmp_path / "planted.safetensors", positions=range(6))
    out = tmp_path / "out"
    monkeypatch.setattr(plots, "plot_image_map", broken)
    check(_norms(ckpt, image_dir, out), 2, "RuntimeError: disk on fire")
    no_partial_files(out)
    json.loads((out / "report.json").read_text())  # what was written is whole
    assert manifest(out)["complete"] is False and "report.json" in manifest(out)["files"]
    monkeypatch.undo()
    check(_norms(ckpt, image_dir, out, "--no-figures"), 0)  # the next run cleans up after the broken one
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["outliers.csv", "report.json"]


def test_a_model_failure_keeps_the_previous_run_intact(tmp_path, image_dir):
    ckpt = save_planted_checkpoint(tmp_path / "planted.safetensors", positions=range(6))
    out = tmp_path / "out"
    check(_norms(ckpt, image_dir, out), 0)
    before = tree(out)
    (tmp_path / "empty.pt").write_bytes(b"")
    check(_norms(tmp_path / "empty.pt", image_dir, out), 1, "empty (0 bytes)")
    assert tree(out) == before  # the failed run wrote nothing, so the folder still holds the previous run


def test_killed_writers_temporaries_are_removed_by_the_next_run(tmp_path, image_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".report.json.ab12cd34.partial").write_text('{"half": ')
    (out / ".artifactscan-manifest.json").write_text(json.dumps({"files": ["report.json", "../outside.txt",
                                                                            "/etc/passwd"]}))
    (tmp_path / "outside.txt").write_text("not ours to remove")
    (out / "user.partial").write_text("a user's file that merely ends like ours")
    check(_norms("demo", image_dir, out, "--no-figures"), 0)
    assert not (out / ".report.json.ab12cd34.partial").exists()
    assert (tmp_path / "outside.txt").read_text() == "not ours to remove"
    assert (out / "user.partial").read_text().startswith("a user's")


def test_output_modes_are_consistent(tmp_path, image_dir):
    out = tmp_path / "out"
    check(_norms("demo", image_dir, out, "--maps", "1"), 0)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file() and p.name[0] != "."}
    ckpt = save_tiny(tmp_path / "ckpt.safetensors")
    expected = 0o666 & ~_umask()
    assert set(modes.values()) == {expected} and stat.S_IMODE(ckpt.stat().st_mode) == expected, modes


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------------------------- two processes
def _start_norms(out: Path, images: str, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "artifactscan", "norms", "demo", images, "--out", str(out),
                             "--no-figures", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=REPO)


def _wait_for_lock(out: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Until the lock file names ``proc`` (it writes its pid after taking the flock)."""
    deadline = time.time() + timeout
    lock = out / ".artifactscan.lock"
    while time.time() < deadline:
        if lock.is_file() and lock.read_text().strip() == str(proc.pid):
            return
        if proc.poll() is not None:
            raise AssertionError(f"first run ended early: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError("the first run never took the lock")


def test_concurrent_writer_fails_with_a_clear_line(tmp_path):
    """Two real processes: the second one into the same folder is refused while the first holds it."""
    out = tmp_path / "out"
    first = _start_norms(out, "synthetic:64")
    try:
        _wait_for_lock(out, first)
        os.kill(first.pid, signal.SIGSTOP)  # hold it there, lock taken, while the second one tries
        try:
            second = _start_norms(out, "synthetic:8")
            _, err = second.communicate(timeout=300)
        finally:
            os.kill(first.pid, signal.SIGCONT)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert second.returncode == 1, err
        assert lines[-1].startswith("error:") and "is in use by another artifactscan run" in lines[-1], err
        assert f"(pid {first.pid})" in lines[-1] and "Traceback" not in err
        _, err1 = first.communicate(timeout=300)
        assert first.returncode == 0, err1
    finally:
        if first.poll() is None:
            first.kill()
    data = json.loads((out / "report.json").read_text())
    assert data["images"]["num_scanned"] == 64  # the folder holds the first run's outputs only
    assert manifest(out)["complete"] and manifest(out)["pid"] == first.pid
    no_partial_files(out)


def test_the_lock_dies_with_its_process(tmp_path):
    out = tmp_path / "out"
    first = _start_norms(out, "synthetic:64")
    _wait_for_lock(out, first)
    first.kill()  # SIGKILL: no cleanup code runs; the OS releases the flock
    first.wait()
    check(invoke("norms", "demo", "synthetic:8", "--out", out, "--no-figures"), 0)
    assert json.loads((out / "report.json").read_text())["images"]["num_scanned"] == 8


def test_sigterm_stops_a_scan_with_130(tmp_path):
    out = tmp_path / "out"
    proc = _start_norms(out, "synthetic:2000", "--batch-size", "4")
    _wait_for_lock(out, proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 130 and lines[-1].startswith("interrupted") and "Traceback" not in err, err
    no_partial_files(out)
    assert not (out / "report.json").exists()  # stopped before writing: nothing half-written, nothing stale


def test_cli_arguments_before_the_command_are_still_a_one_line_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "artifactscan", "norms", "--maps", "x"], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, timeout=120)
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: Invalid value for '--maps'")


def test_fixed_checkpoint_path_messages_are_literal(tmp_path, tiny_ckpt, image_dir):
    """A --out path with rich markup in it: printed as it is, no crash in the printer."""
    out = tmp_path / "[red]x[/red]"
    result = invoke("norms", tiny_ckpt, image_dir, *ARGS, "--out", out, "--no-figures")
    check(result, 0)
    assert "[red]x[/red]" in result.stdout and (out / "report.json").is_file()


def test_report_html_inside_a_run_folder_goes_with_that_run(tmp_path, image_dir):
    out = tmp_path / "out"
    (out).mkdir()
    (out / "mine.txt").write_text("mine")
    check(_norms("demo", image_dir, out, "--maps", "1"), 0)
    check(invoke("report", out), 0)  # default: out/report.html, joins the scan's manifest
    assert "report.html" in manifest(out)["files"] and manifest(out)["command"] == "norms"
    assert "report.json" in manifest(out)["files"]
    check(_norms("demo", image_dir, out, "--no-figures"), 0)
    assert not (out / "report.html").exists()  # the page of the previous run went with it
    assert sorted(p.name for p in out.iterdir() if p.name[0] != ".") == ["mine.txt", "outliers.csv", "report.json"]
