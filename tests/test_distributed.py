"""torchrun scans: two gloo processes on CPU must give the same report as one process on the same images."""

from __future__ import annotations

import json
import os
import subprocess
import sys


from .conftest import TORCHRUN_TWO_RANKS, assert_json_close, assert_text_close, save_planted_checkpoint

# Each rank runs its shard of the images in other batches than one process does, and a BLAS may pick another kernel
# for another batch shape: a token's norm may move by a few float32 ulps (measured: 1e-7 relative, under another
# ATEN_CPU_CAPABILITY for one side). Statistics of the norms follow within RELATIVE; a spread of near-equal values
# (the CLS token's std over images, ~1e-4 on norms ~1) loses relative precision to cancellation (6e-4 measured),
# hence ABSOLUTE, far below any norm or threshold in the report. Counts, positions and decisions stay exact.
RELATIVE, ABSOLUTE = 1e-5, 1e-6


def test_torchrun_two_ranks_equals_single_process(tmp_path, image_dir):
    ckpt = save_planted_checkpoint(tmp_path / "planted.safetensors", (6,))
    (image_dir / "broken.png").write_bytes(b"not a png")  # a skipped file must be reported once, by rank 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = tmp_path / "single"
    multi = tmp_path / "multi"
    args = ["-m", "artifactscan", "norms", str(ckpt), str(image_dir), "--no-figures", "--batch-size", "3"]
    one = subprocess.run([sys.executable, *args, "--out", str(single)], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    run = subprocess.run([sys.executable, *TORCHRUN_TWO_RANKS, *args, "--out", str(multi)],
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    a = json.loads((single / "report.json").read_text())
    b = json.loads((multi / "report.json").read_text())
    assert a["outliers"] and len(a["images"]["skipped"]) == 1
    assert_json_close(a, b, rel=RELATIVE, abs_=ABSOLUTE)
    assert_text_close((single / "outliers.csv").read_text(), (multi / "outliers.csv").read_text(), rel=RELATIVE,
                      abs_=ABSOLUTE, path="outliers.csv")
