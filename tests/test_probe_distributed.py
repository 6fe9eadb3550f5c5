"""torchrun probes: two gloo processes on CPU must give the same report as one process on the same images.

Every sampling decision of ``probe`` (per-image caps, band reservoirs, the global probe's image store and token draws,
the n-matched control) is keyed by (seed, image index, token index), so the merged bounded samples are exactly those
of a single process; only float summation order may differ."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from artifactscan.checkpoint import CheckpointMeta, save_checkpoint

from .conftest import TINY, tiny_vit

PORT = "29547"  # not test_distributed's 29533: the two tests may run at the same time


def _planted_checkpoint(path):
    model = tiny_vit()
    with torch.no_grad():
        for p in (2, 6, 13):  # three high-norm patch positions per image (16 patches): plenty of outlier tokens
            model.pos_embed[0, 1 + p] += 60.0
    meta = CheckpointMeta(arch="vit_small_patch16_224", arch_kwargs=dict(TINY),
                          data_config={"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3,
                                       "interpolation": "bilinear", "crop_pct": 1.0})
    return save_checkpoint(path, model.state_dict(), meta)


def _close(a, b, path="") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9), path  # sums and ridge fits in another order
    else:
        assert a == b, path


def test_torchrun_two_ranks_probe_equals_single_process(tmp_path):
    ckpt = _planted_checkpoint(tmp_path / "planted.safetensors")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["-m", "artifactscan", "probe", str(ckpt), "synthetic:48", "--json", "--device", "cpu",
            "--batch-size", "5", "--draws", "2", "--min-tokens", "5", "--min-images", "10"]
    single = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-2000:]
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                            "--master-port", PORT, *args], env=env, capture_output=True, text=True)
    assert multi.returncode == 0, multi.stderr[-2000:]
    a = json.loads(single.stdout)
    b = json.loads(multi.stdout)  # only rank 0 prints: exactly one JSON document on stdout
    rows = {r["name"]: r for r in a["rows"]}
    assert a["num_outliers"] == 48 * 3 and a["images"]["num_scanned"] == 48
    assert rows["outlier"]["local_status"] == "ok" and rows["normal"]["local_status"] == "ok"
    assert rows["normal"]["global_status"] == "ok" and rows["cls"]["global_status"] == "ok"
    _close(a, b)
