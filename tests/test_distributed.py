"""torchrun scans: two gloo processes on CPU must give the same report as one process on the same images."""

from __future__ import annotations

import json
import os
import subprocess
import sys


from .conftest import assert_json_close, free_port, save_planted_checkpoint


def test_torchrun_two_ranks_equals_single_process(tmp_path, image_dir):
    ckpt = save_planted_checkpoint(tmp_path / "planted.safetensors", (6,))
    (image_dir / "broken.png").write_bytes(b"not a png")  # a skipped file must be reported once, by rank 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = tmp_path / "single"
    multi = tmp_path / "multi"
    cmd = [sys.executable, "-m", "artifactscan", "norms", str(ckpt), str(image_dir), "--no-figures",
           "--batch-size", "3"]
    subprocess.run(cmd + ["--out", str(single)], check=True, env=env, capture_output=True)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(free_port()), "-m", "artifactscan", "norms", str(ckpt), str(image_dir),
                          "--no-figures", "--batch-size", "3", "--out", str(multi)],
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    a = json.loads((single / "report.json").read_text())
    b = json.loads((multi / "report.json").read_text())
    assert a["outliers"] and len(a["images"]["skipped"]) == 1
    assert_json_close(a, b, rel=1e-9)
    assert (single / "outliers.csv").read_text() == (multi / "outliers.csv").read_text()
