"""Fault injection, part 3: train-reg under kills and signals.

A kill during the first save leaves temporaries and no checkpoint: the next start removes them and restarts. SIGTERM /
SIGINT make every worker (side-by-side processes, DDP ranks) agree on a step, save its resume state and exit 130;
``--resume`` from there ends bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from artifactscan.analysis.training import resolve_config, resume, train_model, train_reg
from artifactscan.core.errors import RunInterrupted, TrainingError

from .conftest import REPO, join_two_rank_group
from .fault_tools import check, invoke
from .test_training import tiny


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _sigterm_at(step: int):
    def on_event(ev: dict) -> None:
        if ev["type"] == "step" and ev["step"] == step:
            os.kill(os.getpid(), signal.SIGTERM)
    return on_event


def test_sigterm_saves_the_step_and_resume_is_bit_identical(tmp_path):
    cfg = tiny(steps=12, ckpt_every=100, eval_every=4, progress_every=1)
    full = train_model(cfg, tmp_path / "full", progress=False)
    with pytest.raises(RunInterrupted, match="SIGTERM: stopped .* after step 6 of 12"):
        train_model(cfg, tmp_path / "part", progress=False, on_event=_sigterm_at(6))
    blob = torch.load(tmp_path / "part" / "last.pt", weights_only=True)
    assert blob["resume"]["step"] == 6 and not (tmp_path / "part" / "final.safetensors").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone again
    resumed = resume(tmp_path / "part", progress=False)
    assert resumed.steps == 12
    _same_weights(full.final_checkpoint, resumed.final_checkpoint)
    m_full = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    m_res = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [m["val_loss"] for m in m_full] == [m["val_loss"] for m in m_res]


def test_evaluations_after_the_last_save_are_not_duplicated_on_resume(tmp_path):
    cfg = tiny(steps=8, ckpt_every=100, eval_every=2)
    full = train_model(cfg, tmp_path / "full", progress=False)
    train_model(cfg, tmp_path / "part", progress=False, stop_at_step=4)
    with (tmp_path / "part" / "metrics.jsonl").open("a") as f:  # what a kill after step 6's evaluation leaves
        f.write(json.dumps({"step": 6, "val_loss": 123.0}) + "\n" + '{"step": 8, "val_lo')
    resumed = resume(tmp_path / "part", progress=False)
    _same_weights(full.final_checkpoint, resumed.final_checkpoint)
    steps = [json.loads(x)["step"] for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8]


def _killed_during_first_save(root: Path) -> None:
    """What SIGKILL during the first save leaves: the run's JSON, a temporary, no checkpoint."""
    cfg = resolve_config(tiny(steps=4, eval_every=2, ckpt_every=100))
    root.mkdir()
    (root / "config.json").write_text(json.dumps(cfg.to_dict()))
    (root / "train_reg.json").write_text(json.dumps({"registers": [0, 4], "baseline_checkpoint": None}))
    (root / "reg0").mkdir()
    (root / "reg0" / "config.json").write_text(json.dumps(cfg.to_dict()))
    (root / "reg0" / "metrics.jsonl").write_text(json.dumps({"step": 2, "val_loss": 1.0}) + "\n")
    (root / "reg0" / ".last.pt.k3j2h1gf.tmp").write_bytes(b"\0" * 4096)  # the earlier versions' temporary name
    (root / "reg0" / ".last.pt.k3j2h1gf.partial").write_bytes(b"\0" * 4096)
    (root / "reg0" / "my_notes.txt").write_text("mine")


def test_a_folder_killed_during_its_first_save_restarts(tmp_path):
    root = tmp_path / "pair"
    _killed_during_first_save(root)
    with pytest.raises(TrainingError, match="no checkpoint yet.*restarts"):
        resume(root, progress=False)
    res = train_reg(tiny(steps=4, eval_every=2, ckpt_every=100), root, 4, parallel=False, progress=False)
    assert [v.steps for v in res.variants] == [4, 4]
    assert not list(root.rglob("*.tmp")) and not list(root.rglob("*.partial"))
    assert (root / "reg0" / "my_notes.txt").read_text() == "mine"
    steps = [json.loads(x)["step"] for x in (root / "reg0" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]  # the killed attempt's evaluation is gone, not repeated


def test_cli_restart_and_resume_messages(tmp_path):
    root = tmp_path / "pair"
    _killed_during_first_save(root)
    check(invoke("train-reg", "--resume", root), 1, "start it again with the same command without --resume")
    check(invoke("train-reg", "--resume", tmp_path / "missing"), 1, "is not a folder")


# ----------------------------------------------------------------------------------------------- real processes
CLI_TINY = ["--steps", "200", "--depth", "1", "--dim", "16", "--heads", "2", "--img-size", "8", "--patch", "4",
            "--batch-size", "4", "--lr", "0.001", "--scan-images", "synthetic:8"]


def _cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "artifactscan", "train-reg", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def test_sigterm_to_train_reg_stops_both_variants_and_resume_matches(tmp_path):
    """Side-by-side child processes: SIGTERM to the CLI; each child saves its step; --resume ends bit-identical."""
    run, ref = tmp_path / "run", tmp_path / "ref"
    proc = _cli(*CLI_TINY, "--out", str(run))
    try:
        deadline = time.time() + 240
        while not all((run / r / "config.json").is_file() for r in ("reg0", "reg4")):
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "the variants never started"
            time.sleep(0.1)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("reg", "step"))]
    assert proc.returncode == 130, err
    assert lines[-1].startswith("interrupted:") and "--resume" in lines[-1] and "Traceback" not in err, err
    stopped = [reg for reg in ("reg0", "reg4") if not (run / reg / "final.safetensors").exists()]
    assert stopped, "both variants finished before the signal: nothing was interrupted"  # (a very fast machine)
    for reg in stopped:
        state = torch.load(run / reg / "last.pt", weights_only=True)["resume"]
        assert 0 < state["step"] < 200, state["step"]
    again = _cli("--resume", str(run), "--json")
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    uninterrupted = _cli(*CLI_TINY, "--out", str(ref), "--json")
    _, err = uninterrupted.communicate(timeout=600)
    assert uninterrupted.returncode == 0, err
    for reg in ("reg0", "reg4"):
        _same_weights(ref / reg / "final.safetensors", run / reg / "final.safetensors")



def _ddp(rank: int, run: str, mode: str) -> None:
    join_two_rank_group(rank, f"{run}-{mode}.rendezvous")
    import torch.distributed as dist

    cfg = tiny(steps=12, eval_every=4, ckpt_every=100, progress_every=2)
    hook = _sigterm_at(4) if (mode == "stop" and rank == 1) else None  # only rank 1 is signalled
    try:
        train_model(cfg, run, progress=False, resume=mode == "resume", on_event=hook)
        outcome = "done"
    except RunInterrupted as exc:
        outcome = str(exc)
    Path(run, f"outcome{rank}.txt").write_text(outcome)
    dist.destroy_process_group()


def test_ddp_ranks_agree_on_the_stop_step_and_resume_matches(tmp_path):
    import torch.multiprocessing as mp

    run, ref = str(tmp_path / "run"), str(tmp_path / "ref")
    mp.spawn(_ddp, args=(run, "stop"), nprocs=2, join=True)
    outcomes = [Path(run, f"outcome{r}.txt").read_text() for r in (0, 1)]
    assert all("after step 4 of 12" in o for o in outcomes), outcomes  # rank 0 was not signalled, yet stopped
    assert torch.load(Path(run, "last.pt"), weights_only=True)["resume"]["step"] == 4
    mp.spawn(_ddp, args=(run, "resume"), nprocs=2, join=True)
    mp.spawn(_ddp, args=(ref, "fresh"), nprocs=2, join=True)
    _same_weights(Path(ref, "final.safetensors"), Path(run, "final.safetensors"))
