"""Issue 22's bad input, at the command line: one clear line, exit 1, no traceback, never a crash.

A checkpoint truncated or rewritten while it is read (safetensors: read(), checked around the read; a PyTorch file:
memory-mapped by torch.load, then its weights copied out of the mapping so that a trainer saving in place cannot kill
a running scan with SIGBUS), a DINOv3 file or Hugging Face folder with a wrong or missing piece, and a model that the
machine cannot hold even in a half precision (refused before its weights are read, with the memory it needs and the
memory available; the memory is faked, no giant file). fp16 overflow: tests/test_precision.py
(test_fp16_overflow_is_the_nonfinite_error_with_the_bf16_hint); a NaFlex batch with an all-padding image: the NaFlex
tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from artifactscan.models import materialize

from .fault_tools import check, invoke, save_tiny
from .test_loading_dinov3 import TINY as DINOV3_TINY
from .test_loading_dinov3 import hf_dinov3, meta_file

TINY_VIT = dict(depth=2, embed_dim=64, num_heads=2, img_size=32)


def tiny_pth(path):
    import timm

    torch.save(timm.create_model("vit_small_patch16_224", num_classes=0, **TINY_VIT).state_dict(), path)
    return path


def test_a_truncated_safetensors_file(tmp_path):
    good = save_tiny(tmp_path / "good.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    check(invoke("norms", cut, "synthetic:2"), 1, "cut.safetensors is not a readable safetensors file: it is truncated")


def test_a_safetensors_file_rewritten_while_it_is_read(tmp_path, monkeypatch):
    path = save_tiny(tmp_path / "live.safetensors")
    original = materialize._read_exactly

    def trainer_saves_meanwhile(f, into, p, name):
        os.utime(path, ns=(0, 10**9))
        return original(f, into, p, name)

    monkeypatch.setattr(materialize, "_read_exactly", trainer_saves_meanwhile)
    check(invoke("norms", path, "synthetic:2"), 1, "live.safetensors changed while it was being read")


def test_a_pytorch_file_rewritten_while_it_is_copied_out_of_its_map(tmp_path, monkeypatch):
    path = tiny_pth(tmp_path / "live.pth")
    original = materialize.own_copies

    def trainer_saves_meanwhile(*args):
        os.utime(path, ns=(0, 10**9))
        return original(*args)

    monkeypatch.setattr(materialize, "own_copies", trainer_saves_meanwhile)
    check(invoke("norms", path, "synthetic:2", "--arch", "vit_small_patch16_224", "--arch-kwargs",
                 json.dumps(TINY_VIT)), 1, "live.pth changed while it was being read")


def test_a_pytorch_file_truncated_after_loading_does_not_kill_the_forward(tmp_path):
    """torch.save opens its file with "wb": a model still running on pages of the mapped file would die of SIGBUS
    (exit -7) at its next forward. In a child process, so that a regression cannot take pytest down with it."""
    path = tiny_pth(tmp_path / "live.pth")
    script = textwrap.dedent(f"""
        import os, torch
        from artifactscan.models.loading import load_model
        loaded = load_model({str(path)!r}, arch="vit_small_patch16_224", arch_kwargs={TINY_VIT!r}, precision="fp32")
        os.truncate({str(path)!r}, 0)
        print(tuple(loaded.model.forward_features(torch.randn(1, 3, 32, 32)).shape))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.strip().endswith("(1, 5, 64)")


def test_a_dinov3_file_without_storage_tokens(tmp_path):
    _, path = meta_file(tmp_path, "vit_small_patch16_dinov3")
    sd = torch.load(path)
    del sd["storage_tokens"]
    torch.save(sd, path)
    check(invoke("norms", path, "synthetic:2", "--arch", "vit_small_patch16_dinov3", "--arch-kwargs",
                 json.dumps(DINOV3_TINY)), 1, f"{path.name} is a DINOv3 checkpoint in Meta's layout")


def test_a_hugging_face_folder_whose_config_disagrees_with_its_weights(tmp_path):
    folder = tmp_path / "m"
    hf_dinov3().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_register_tokens"] = 2
    (folder / "config.json").write_text(json.dumps(config))
    check(invoke("norms", folder, "synthetic:2"), 1, "config.json belong to these weights")


@pytest.fixture
def tiny_memory(monkeypatch):
    """10 kB of memory available (less than the tiny models weigh in any precision): nothing may be read."""
    monkeypatch.setattr(materialize, "available_bytes", lambda device: 10**4)

    def must_not_read(*args, **kwargs):
        raise AssertionError("weights read before the memory check")

    monkeypatch.setattr(materialize, "read_safetensors", must_not_read)
    monkeypatch.setattr(materialize, "own_copies", must_not_read)


def test_a_safetensors_file_too_large_even_in_half_precision_is_refused_before_reading(tmp_path, tiny_memory):
    path = save_tiny(tmp_path / "big.safetensors")
    line = check(invoke("norms", path, "synthetic:2", "--precision", "bf16"), 1,
                 "big.safetensors needs 0.0 GiB of memory for its weights in bf16 and 0.0 GiB is available")
    assert "--precision" not in line.split("available", 1)[1]  # no smaller precision to suggest


def test_a_pytorch_file_too_large_is_refused_before_its_weights_are_copied(tmp_path, tiny_memory):
    path = tiny_pth(tmp_path / "big.pth")
    check(invoke("norms", path, "synthetic:2", "--arch", "vit_small_patch16_224", "--arch-kwargs",
                 json.dumps(TINY_VIT), "--precision", "fp16"), 1,
          "big.pth needs 0.0 GiB of memory for its weights in fp16 and 0.0 GiB is available")


def test_a_hugging_face_folder_too_large_is_refused_before_reading(tmp_path, monkeypatch):
    folder = tmp_path / "m"
    hf_dinov3().save_pretrained(folder)
    monkeypatch.setattr(materialize, "available_bytes", lambda device: 10**4)
    monkeypatch.setattr(materialize, "read_safetensors", lambda *a, **k: pytest.fail("read before the memory check"))
    check(invoke("norms", folder, "synthetic:2"), 1,
          "m needs 0.0 GiB of memory for its weights in bf16 and 0.0 GiB is available")
