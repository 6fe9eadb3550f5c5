"""Fault injection, part 4: the cases of the first-contact survey (issue 20) - each with the right class.

* The machine refusing a write (a full disk, a read-only file system, no permission, a file-size limit) is a user or
  environment error wherever it happens: exit 1, one line naming the path and the problem, never "a bug".
* stdout: a reader that goes away (``| head -1``) ends the command quietly with exit 141; a closed (``>&-``) or full
  (``> /dev/full``) stdout is one error line, exit 1 - and the ``--out`` files are written either way.
* No input is opened unless it is a regular file: a named pipe (FIFO) is skipped with a warning or refused with a
  line that says what it is, never waited on (cases that could hang run under :func:`_without_hanging`).
* Messages say what is true, and names print escaped (a newline as ``\\n``).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from .conftest import REPO, save_planted_checkpoint
from .fault_tools import check, forbid_models, invoke, manifest, no_partial_files, save_tiny, tree


def _cli(*args: str, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "COLUMNS": "100"}
    return subprocess.run([sys.executable, "-m", "artifactscan", *map(str, args)], env=env, cwd=REPO,
                          timeout=timeout, **{"capture_output": True, "text": True, **popen})


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error:"), stderr
    assert "Traceback" not in stderr and "internal error" not in stderr and "Exception ignored" not in stderr, stderr
    assert all(ln.startswith(("warning:", "error:")) for ln in lines), stderr
    return lines[-1]


def _without_hanging(fifos, fn, *args, timeout: float = 120.0):
    """``fn(*args)`` in a thread. If it is still running after ``timeout`` (blocked opening a FIFO for reading), a
    writer opens each FIFO so that the reader wakes up, and the test fails instead of hanging the suite."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # re-raised in the test's thread
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        for fifo in fifos:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        thread.join(30)
        raise AssertionError(f"{fn.__name__}{args} blocked on a FIFO (a named pipe was opened for reading)")
    if "error" in box:
        raise box["error"]
    return box["value"]


# ----------------------------------------------------------------------------------------------- the machine refuses
def _refuse_writes_to(monkeypatch, name: str, code: int) -> None:
    """Writes of the atomic writer into the temporary of ``name`` fail with ``code``, as a full (or read-only ...)
    disk fails them: the write itself, not the open, and with no file name in the OSError."""
    import artifactscan.core.files as files

    class Refusing:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(code, os.strerror(code))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(path, mode="r", *a, **k):
        f = open(path, mode, *a, **k)
        return Refusing(f) if f"{os.sep}.{name}." in os.fspath(path) and "w" in mode else f

    monkeypatch.setattr(files, "open", fake_open, raising=False)


@pytest.mark.parametrize("code, words", [
    (errno.ENOSPC, "no space left on the device (ENOSPC)"),
    (errno.EFBIG, "file too large"),
    (errno.EROFS, "read-only file system (EROFS)"),
    (errno.EACCES, "permission denied (EACCES)"),
    (errno.EIO, "input/output error (EIO)"),
])
def test_a_refused_write_under_out_is_exit_1_naming_the_output(code, words, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _refuse_writes_to(monkeypatch, "report.json", code)
    line = check(invoke("norms", "demo", "synthetic:4", "--out", out, "--no-figures"), 1)
    assert f"cannot write {out}/report.json: {words}" in line, line
    no_partial_files(out)
    assert manifest(out)["complete"] is False and not (out / "report.json").exists()


def test_an_os_error_from_anywhere_is_classed_by_its_kind(monkeypatch):
    """The general rule at the command line's boundary: an OSError of a kind that describes the machine is exit 1
    with its path; any other (EBADF on a descriptor of our own) is still a bug."""
    import artifactscan.analysis.scan as scan_mod

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", "/data/x.jpg")

    monkeypatch.setattr(scan_mod, "scan", denied)
    line = check(invoke("norms", "demo", "synthetic:2"), 1)
    assert line == "error: /data/x.jpg: permission denied (EACCES); check the permissions or choose another place"

    def bad_descriptor(*a, **k):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(scan_mod, "scan", bad_descriptor)
    check(invoke("norms", "demo", "synthetic:2"), 2, "a bug in artifactscan")


def _file_size_limit(limit: int):
    def apply() -> None:  # runs in the child before it starts; Python ignores SIGXFSZ, so writes fail with EFBIG
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_real_file_size_limit_under_norms_out(tmp_path):
    """A real process whose writes the kernel refuses (RLIMIT_FSIZE: EFBIG, on Linux and macOS alike)."""
    out = tmp_path / "out"
    proc = _cli("norms", "demo", "synthetic:4", "--out", out, "--no-figures", preexec_fn=_file_size_limit(4096))
    assert proc.returncode == 1, proc.stderr
    line = _one_error_line(proc.stderr)
    assert f"cannot write {out}/report.json: file too large" in line and "(EFBIG)" in line, line
    no_partial_files(out)
    assert not (out / "report.json").exists()


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_real_file_size_limit_under_fix_out(suffix, tiny_phantom, tmp_path):
    """fix --save-model: safetensors (Rust) and torch.save (C++) report the refused write with its errno too."""
    path, _, _ = tiny_phantom
    target = tmp_path / f"fixed{suffix}"
    proc = _cli("fix", path, "synthetic:16", "--save-model", target, preexec_fn=_file_size_limit(16384))
    assert proc.returncode == 1, proc.stderr
    line = _one_error_line(proc.stderr)
    assert f"cannot write {target}: file too large" in line and "(EFBIG)" in line, line
    assert not target.exists()
    no_partial_files(tmp_path)


# ----------------------------------------------------------------------------------------------- stdout
def test_a_reader_that_goes_away_ends_quietly_with_141_and_keeps_the_outputs(tmp_path):
    """`artifactscan norms ... | head -1`: the reader has gone before the command prints. Exit 141, nothing on
    stderr (no "Exception ignored" at exit), and the --out files are complete."""
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for args in (["norms", "demo", "synthetic:4", "--out", str(out), "--no-figures"], ["--help"]):
        proc = subprocess.Popen([sys.executable, "-m", "artifactscan", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env, cwd=REPO)
        proc.stdout.close()  # as `head -1` does once it has its line
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 141 and err == b"", (args, proc.returncode, err.decode())
    assert manifest(out)["complete"] is True and (out / "report.json").is_file()
    no_partial_files(out)


def test_a_closed_stdout_is_one_line_exit_1(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["sh", "-c", 'exec "$@" >&-', "sh", sys.executable, "-m", "artifactscan", "norms", "demo",
                           "synthetic:4", "--out", str(out), "--no-figures"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, timeout=300)
    assert proc.returncode == 1, proc.stderr
    line = _one_error_line(proc.stderr)
    assert line.startswith("error: cannot write the results to stdout: it is closed (EBADF)"), line
    assert manifest(out)["complete"] is True  # the results are in --out all the same


_FULL_STDOUT = """
import errno, sys
class Full:  # as a write to /dev/full fails
    encoding = "utf-8"
    def write(self, text):
        raise OSError(errno.ENOSPC, "No space left on device")
    def flush(self):
        pass
    def isatty(self):
        return False
sys.stdout = Full()
from artifactscan.cli import main
main()
"""


def test_a_full_stdout_is_one_line_exit_1():
    """`> /dev/full`: the kernel's own where the device exists (Linux), and the same failure from Python."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    runs = [subprocess.run([sys.executable, "-c", _FULL_STDOUT, "phantom", "--describe"], capture_output=True,
                           text=True, env=env, cwd=REPO, timeout=300)]
    if os.path.exists("/dev/full"):
        with open("/dev/full", "w") as full:
            runs.append(_cli("phantom", "--describe", stdout=full, capture_output=False, stderr=subprocess.PIPE))
    for proc in runs:
        assert proc.returncode == 1, proc.stderr
        line = _one_error_line(proc.stderr)
        assert line.startswith("error: cannot write the results to stdout: no space left on the device (ENOSPC)")


# ----------------------------------------------------------------------------------------------- models, settings
@pytest.mark.parametrize("content, why", [(b"", "the file is empty (0 bytes)"), (b"garbage!", "header too large")])
def test_a_damaged_model_safetensors_in_a_hugging_face_folder_is_exit_1(content, why, tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "dinov2"}))
    (folder / "model.safetensors").write_bytes(content)
    line = check(invoke("norms", folder, "synthetic:2"), 1, why)
    assert f"{folder}/model.safetensors is not a readable safetensors file" in line
    check(invoke("norms", folder / "model.safetensors", "synthetic:2"), 1, why)  # as the file given alone


def test_calibrate_with_a_gain_that_overflows_is_exit_1():
    line = check(invoke("calibrate", "--gains", "1e308", "--fractions", "0.0625", "--images", "2"), 1)
    assert "--gains 1e+308" in line and "overflow" in line


def test_attention_figures_show_names_that_are_not_utf8_or_hold_dollars(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (32, 32), (120, 40, 200)).save(os.fsdecode(os.fsencode(folder) + b"/caf\xe9.png"))
    Image.new("RGB", (32, 32), (20, 140, 20)).save(folder / "a$\\frac{1}b$.png")  # mathtext that cannot parse
    ckpt = save_planted_checkpoint(tmp_path / "planted.safetensors", positions=range(6))
    out = tmp_path / "out"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check(invoke("attention", ckpt, folder, "--out", out), 0)
    assert not [w for w in caught if "Glyph" in str(w.message)]  # no raw matplotlib glyph warning
    assert len(list((out / "attention_maps").glob("*.png"))) == 2


def test_make_texts_literal_keeps_tick_math_and_line_breaks():
    from matplotlib.figure import Figure

    from artifactscan.render.style import make_texts_literal

    fig = Figure()
    ax = fig.subplots()
    ax.set_yscale("log")
    ax.plot([1, 2], [1, 1000])
    ax.set_title(os.fsdecode(b"caf\xe9.png") + "\n$x")
    make_texts_literal(fig)
    assert ax.get_title() == "caf\\xe9.png\n$x" and not ax.title.get_parse_math()
    assert all(t.get_parse_math() for t in ax.get_yticklabels())  # log ticks are mathtext by design


# ----------------------------------------------------------------------------------------------- manifests
@pytest.mark.parametrize("names", [["."], ["", "./", "./."], [".", "maps/.."]])
def test_a_manifest_listing_the_folder_itself_removes_nothing(names, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("mine")
    (out / ".artifactscan-manifest.json").write_text(json.dumps({"schema": "artifactscan.manifest/1",
                                                                  "files": names}))
    check(invoke("norms", "demo", "synthetic:2", "--out", out, "--no-figures"), 0)
    assert (out / "mine.txt").read_text() == "mine" and manifest(out)["complete"] is True


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_a_manifest_that_is_not_a_file_is_refused_before_any_model_runs(kind, tmp_path, monkeypatch):
    forbid_models(monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    target = out / ".artifactscan-manifest.json"
    target.mkdir() if kind == "folder" else os.mkfifo(target)
    before = tree(out)
    result = _without_hanging([target], invoke, "norms", "demo", "synthetic:2", "--out", out)
    what = "a folder" if kind == "folder" else "a named pipe (FIFO)"
    line = check(result, 1, f"its .artifactscan-manifest.json is {what}, not a manifest file")
    assert "remove it or choose another --out" in line and tree(out) == before


# ----------------------------------------------------------------------------------------------- FIFOs and links
def test_report_skips_a_fifo_named_json_with_a_warning(tmp_path, image_dir):
    out = tmp_path / "out"
    check(invoke("norms", "demo", image_dir, "--out", out, "--maps", "1"), 0)
    fifos = [out / "stuck.json", out / "maps" / "stuck.png", out / "metrics.jsonl"]
    for fifo in fifos:
        os.mkfifo(fifo)
    result = _without_hanging(fifos, invoke, "report", out)
    check(result, 0)
    warned = [ln for ln in result.stderr.splitlines() if ln.startswith("warning:")]
    for name in ("stuck.json", "maps/stuck.png", "metrics.jsonl"):
        assert f"warning: skipped {name}: a named pipe (FIFO), not a regular file" in warned, warned
    assert (out / "report.html").is_file()


def test_a_fifo_among_images_is_skipped_as_what_it_is(tmp_path, image_dir):
    fifo = image_dir / "pipe.png"
    os.mkfifo(fifo)
    result = _without_hanging([fifo], invoke, "norms", "demo", image_dir, "--json")
    check(result, 0)
    assert f"warning: skipped {fifo}: not a regular file: a named pipe (FIFO)" in result.stderr.splitlines()
    skipped = json.loads(result.stdout)["images"]["skipped"]
    assert [s["reason"] for s in skipped] == ["not a regular file: a named pipe (FIFO)"]


def test_paths_that_exist_are_never_said_not_to(tmp_path):
    fifo, loop, broken = tmp_path / "pipe.jpg", tmp_path / "loop.jpg", tmp_path / "broken.pt"
    os.mkfifo(fifo)
    loop.symlink_to(loop)
    broken.symlink_to(tmp_path / "gone.pt")
    cases = [
        (("norms", "demo", fifo), f"{fifo} is a named pipe (FIFO), not an image file or a folder"),
        (("norms", "demo", loop), f"{loop} is a symlink loop"),
        (("norms", fifo, "synthetic:2"), f"model {fifo} is a named pipe (FIFO), not a checkpoint file or a folder"),
        (("norms", loop, "synthetic:2"), f"model {loop} is a symlink loop"),
        (("norms", broken, "synthetic:2"), f"model {broken} is a broken symlink"),
        (("report", loop), f"results folder {loop} is a symlink loop"),
    ]
    for args, words in cases:
        line = check(_without_hanging([fifo], invoke, *args), 1, words)
        assert "does not exist" not in line, line


def test_fifos_among_checkpoints_and_annotations_are_never_opened(tmp_path):
    from artifactscan.core.errors import InputError
    from artifactscan.inputs.boxes import load_box_data, load_coco

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "dinov2"}))
    os.mkfifo(hf / "model.safetensors")
    run = tmp_path / "run"
    run.mkdir()
    save_tiny(run / "step_100.safetensors", meta_overrides={"step": 100})
    os.mkfifo(run / "step_200.safetensors")
    voc = tmp_path / "voc"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "Annotations").mkdir()
    Image.new("RGB", (32, 32)).save(voc / "JPEGImages" / "a.jpg")
    os.mkfifo(voc / "Annotations" / "a.xml")
    coco = tmp_path / "coco.json"
    os.mkfifo(coco)
    fifos = [hf / "model.safetensors", run / "step_200.safetensors", voc / "Annotations" / "a.xml", coco]

    check(_without_hanging(fifos, invoke, "norms", hf, "synthetic:2"), 1,
          "model.safetensors is a named pipe (FIFO), not a regular file")
    result = _without_hanging(fifos, invoke, "norms", run, "synthetic:2", "--json")
    check(result, 0)
    skipped = json.loads(result.stdout)["skipped"]
    assert [(Path(s["path"]).name, s["reason"]) for s in skipped] == [
        ("step_200.safetensors", "not a regular file: a named pipe (FIFO)")]
    for fn, arg, words in ((load_box_data, voc, "a.xml is a named pipe (FIFO)"),
                           (load_box_data, coco, "coco.json is a named pipe (FIFO)"),
                           (load_coco, coco, "coco.json is a named pipe (FIFO)")):
        with pytest.raises(InputError, match=r"named pipe \(FIFO\)") as caught:
            _without_hanging(fifos, fn, *((arg, 32) if fn is load_box_data else (arg,)))
        assert words in str(caught.value), caught.value


# ----------------------------------------------------------------------------------------------- messages
def test_report_on_a_busy_folder_names_it_without_a_flag_it_was_not_given(tmp_path, image_dir):
    out = tmp_path / "out"
    check(invoke("norms", "demo", image_dir, "--out", out, "--no-figures"), 0)
    held = os.open(out / ".artifactscan.lock", os.O_RDWR)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another run holds the folder
        line = check(invoke("report", out), 1, f"results folder {out} is in use by another artifactscan run")
        assert "--out" not in line
        check(invoke("report", out, "--out", out), 1, f"--out {out} is in use")  # given: named as given
    finally:
        os.close(held)


def test_newlines_in_names_print_as_backslash_n(tmp_path, image_dir):
    nl = tmp_path / "a\nb"
    for args, escaped in [(("norms", f"{nl}.pt", "synthetic:2"), "model file " + str(tmp_path) + "/a\\nb.pt"),
                          (("report", nl), f"results folder {tmp_path}/a\\nb does not exist"),
                          (("norms", "demo", nl), f"{tmp_path}/a\\nb does not exist")]:
        check(invoke(*args), 1, escaped)
    run = tmp_path / "run\nx"
    run.mkdir()
    (run / "bad.safetensors").write_bytes(b"")
    check(invoke("norms", run, "synthetic:2"), 1, f"{tmp_path}/run\\nx holds no self-describing checkpoints")
    out = tmp_path / "out\nx"
    result = invoke("norms", "demo", image_dir, "--out", out, "--no-figures")
    check(result, 0)
    assert f"files to {tmp_path}/out\\nx/" in result.stdout.replace("\n", "")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this would run",))


def test_a_malicious_pickle_in_a_run_folder_is_one_short_warning(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    save_tiny(run / "step_100.safetensors", meta_overrides={"step": 100})
    torch.save({"state_dict": _RunsCode()}, run / "evil.pt")
    result = invoke("norms", run, "synthetic:2", "--json")
    check(result, 0)
    (warning,) = [ln for ln in result.stderr.splitlines() if "evil.pt" in ln]
    assert warning.startswith(f"warning: skipped checkpoint {run}/evil.pt: a pickle that would run code when "
                              "loaded (") and ".system" in warning, warning  # the global it would call, named
    assert "--trust-checkpoint, only if you trust it" in warning and len(warning) < 250, warning
    assert "Weights only load failed" not in result.stderr
    reasons = [s["reason"] for s in json.loads(result.stdout)["skipped"]]
    assert reasons == [warning.split("evil.pt: ", 1)[1]]

