"""torchrun scans: two gloo processes on CPU must give the same report as one process on the same images."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from artifactscan.checkpoint import CheckpointMeta, save_checkpoint

from .conftest import TINY, tiny_vit


def _planted_checkpoint(path):
    model = tiny_vit()
    with torch.no_grad():
        model.pos_embed[0, 1 + 6] += 60.0
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
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12), path  # float64 sums added in another order
    else:
        assert a == b, path


def test_torchrun_two_ranks_equals_single_process(tmp_path, image_dir):
    ckpt = _planted_checkpoint(tmp_path / "planted.safetensors")
    (image_dir / "broken.png").write_bytes(b"not a png")  # a skipped file must be reported once, by rank 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = tmp_path / "single"
    multi = tmp_path / "multi"
    cmd = [sys.executable, "-m", "artifactscan", "norms", str(ckpt), str(image_dir), "--no-figures",
           "--batch-size", "3"]
    subprocess.run(cmd + ["--out", str(single)], check=True, env=env, capture_output=True)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", "29533", "-m", "artifactscan", "norms", str(ckpt), str(image_dir),
                          "--no-figures", "--batch-size", "3", "--out", str(multi)],
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    a = json.loads((single / "report.json").read_text())
    b = json.loads((multi / "report.json").read_text())
    assert a["outliers"] and len(a["images"]["skipped"]) == 1
    _close(a, b)
    assert (single / "outliers.csv").read_text() == (multi / "outliers.csv").read_text()
