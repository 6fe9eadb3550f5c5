"""torchrun probes: two gloo processes on CPU must give the same report as one process on the same images.

Every sampling decision of ``probe`` (per-image caps, band reservoirs, the global probe's image store and token draws,
the n-matched control) is keyed by (seed, image index, token index), so the merged bounded samples are exactly those
of a single process; only float summation order may differ."""

from __future__ import annotations

import json
import os
import subprocess
import sys


from .conftest import TORCHRUN_TWO_RANKS, assert_json_close, save_planted_checkpoint



def test_torchrun_two_ranks_probe_equals_single_process(tmp_path):
    ckpt = save_planted_checkpoint(tmp_path / "planted.safetensors", (2, 6, 13))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["-m", "artifactscan", "probe", str(ckpt), "synthetic:48", "--json", "--device", "cpu",
            "--batch-size", "5", "--draws", "2", "--min-tokens", "5", "--min-images", "10"]
    single = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-2000:]
    multi = subprocess.run([sys.executable, *TORCHRUN_TWO_RANKS, *args], env=env, capture_output=True, text=True)
    assert multi.returncode == 0, multi.stderr[-2000:]
    a = json.loads(single.stdout)
    b = json.loads(multi.stdout)  # only rank 0 prints: exactly one JSON document on stdout
    rows = {r["name"]: r for r in a["rows"]}
    assert a["num_outliers"] == 48 * 3 and a["images"]["num_scanned"] == 48
    assert rows["outlier"]["local_status"] == "ok" and rows["normal"]["local_status"] == "ok"
    assert rows["normal"]["global_status"] == "ok" and rows["cls"]["global_status"] == "ok"
    # Sums and ridge fits in another order, on norms that may move by float32 ulps in other batch shapes (measured
    # under another ATEN_CPU_CAPABILITY for one side: 5e-8 relative at most; a near-zero bin edge -2e-17 vs 0).
    assert_json_close(a, b, rel=1e-6, abs_=1e-9)
