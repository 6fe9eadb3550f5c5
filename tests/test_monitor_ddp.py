"""The monitor's callbacks in a real 2-rank CPU (gloo) DDP run: Lightning's Trainer(strategy="ddp", devices=2) and
the Hugging Face Trainer under torchrun. Each run finishes (a hang fails the test at its timeout, the whole process
group killed), rank 0 alone writes monitor.jsonl, and fail_above (here on the NaN norms of a run that diverges at
step 3) stops both ranks at the same step. The runs themselves: tests/monitor_ddp_runs.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from artifactscan.monitor import read_monitor

RUNS = Path(__file__).with_name("monitor_ddp_runs.py")
TIMEOUT_S = 300  # minutes less than a hang; generous for a shared 2-core machine (each run takes ~15-25 s alone)


def _run(command: list[str], out: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(RUNS.parents[1]), "OMP_NUM_THREADS": "1"}
    # a session of its own: on a timeout every rank (Lightning starts the second one itself) is killed with it
    proc = subprocess.Popen(command, cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"the 2-rank run hung (killed after {TIMEOUT_S} s):\n{output[-3000:]}")
    assert proc.returncode == 0, output[-3000:]


def _check_ranks(out: Path, monitor_folder: Path) -> None:
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    # both ranks stopped at the update that saw the NaN norms, not at max_steps=10
    assert [r["global_step"] for r in ranks] == [4, 4]
    assert all("NaN or Inf" in r["stop_reason"] and "fail_above=0.5" in r["stop_reason"] for r in ranks)
    assert ranks[0]["measured"] == [0, 2, 4] and ranks[1]["measured"] == []  # rank 0 alone measures
    history = read_monitor(monitor_folder)
    assert history.steps == [0, 2, 4]  # one line per update: rank 0 alone wrote
    assert history.updates[-1].num_nonfinite > 0 and history.updates[0].num_nonfinite == 0


def test_lightning_ddp_two_ranks(tmp_path):
    pytest.importorskip("lightning")
    _run([sys.executable, str(RUNS), "lightning", str(tmp_path)], tmp_path)
    _check_ranks(tmp_path, tmp_path / "mon")


def test_hf_trainer_two_ranks_under_torchrun(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    pytest.importorskip("tensorboard")
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(RUNS), "hf",
          str(tmp_path)], tmp_path)
    _check_ranks(tmp_path, tmp_path / "artifacts")
    # the callback's own TensorBoard writer: made by rank 0 alone
    assert len(list((tmp_path / "artifacts" / "tensorboard").glob("events.out.tfevents.*"))) == 1
