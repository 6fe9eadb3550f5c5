"""Loading without waste (meta-device build, tensors assigned, buffers recomputed) and ``--precision``.

Every 2024-26 family is built on the meta device and must end with the buffers timm's own build computes; half
precision holds the weights in it and runs the forward in it, with float32 statistics; ``auto`` falls back to the
file's half dtype only when float32 does not fit; a file cut short or rewritten while it is read is one clear error.
"""

from __future__ import annotations

import os

import pytest
import torch

from artifactscan import scan
from artifactscan.core.errors import InputError, ModelLoadError, ResourceError
from artifactscan.models import loading, materialize
from artifactscan.models.loading import load_model

from .conftest import loaded_block_norms
from .fault_tools import check, invoke, save_tiny
from .test_loading_2026 import FAMILIES, save_timm


@pytest.mark.parametrize("name,kwargs,prefix", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_every_family_is_built_on_meta_and_its_buffers_recomputed(tmp_path, monkeypatch, name, kwargs, prefix):
    model, path = save_timm(tmp_path, name, **kwargs)
    built_on: list[str] = []
    build = loading._build_arch

    def spy(*args, **kw):
        m = build(*args, **kw)
        built_on.append(next(m.parameters()).device.type)
        return m

    monkeypatch.setattr(loading, "_build_arch", spy)
    loaded = load_model(path, arch=name, arch_kwargs=kwargs)
    assert built_on == ["meta"]  # one build, shapes only: no random initialisation, no fallback
    assert not materialize.meta_tensors(loaded.model)
    theirs = dict(model.named_buffers())  # persistent or not: RoPE periods, k_bias, relative position index ...
    ours = dict(loaded.model.named_buffers())
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key
    size = kwargs["img_size"]
    x = torch.randn(1, 3, size, size)
    torch.testing.assert_close(loaded_block_norms(loaded, x), loaded_block_norms(loading.wrap_module(model), x),
                               rtol=0, atol=0)


def test_assigned_tensors_are_the_read_ones_not_copies(tmp_path, monkeypatch):
    name, kwargs = FAMILIES[0][0], FAMILIES[0][1]
    _, path = save_timm(tmp_path, name, **kwargs)
    read: dict[str, torch.Tensor] = {}
    original = materialize.read_safetensors
    monkeypatch.setattr(materialize, "read_safetensors", lambda header, dtype=None: read.update(
        original(header, dtype)) or read)
    loaded = load_model(path, arch=name, arch_kwargs=kwargs, precision="fp32")
    params = dict(loaded.model.named_parameters())
    assert params["blocks.0.attn.qkv.weight"].data_ptr() == read["blocks.0.attn.qkv.weight"].data_ptr()


def test_bf16_holds_the_weights_and_the_statistics_stay_float32():
    loaded = load_model("phantom-deep", precision="bf16")
    assert loaded.precision == "bf16" and loaded.checkpoint_dtype == torch.float16
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert any(n.startswith("weights held and run in bf16") for n in loaded.notes)  # the report says so
    x = torch.randn(2, 3, *loaded.input_size)  # float32 pixels: cast where they enter
    norms = loaded_block_norms(loaded, x)
    assert norms.dtype == torch.float32 and torch.isfinite(norms).all()


def test_fp32_and_bf16_flag_the_same_tokens_on_phantom_deep():
    def flagged(precision):
        report = scan("phantom-deep", "synthetic:16", precision=precision, num_maps=0)
        assert report.outlier_records_complete
        return {(r.image_index, r.layer, r.row, r.col) for r in report.outliers}  # every block's flagged tokens

    full, half = flagged("fp32"), flagged("bf16")
    assert len(full) >= 100  # enough tokens for the index to mean something
    assert len(full & half) / len(full | half) >= 0.99


def test_auto_is_fp32_when_it_fits_else_the_files_half_dtype(monkeypatch):
    assert load_model("phantom").precision == "fp32"  # the shipped fp16 models keep float32 compute
    sizes = {n: p.numel() for n, p in load_model("phantom").model.named_parameters()}
    need32 = sum(sizes.values()) * 4
    monkeypatch.setattr(materialize, "available_bytes", lambda device: need32 // 2 + 1024)
    loaded = load_model("phantom")
    assert loaded.precision == "fp16"  # the file's own half dtype
    note = [n for n in loaded.notes if n.startswith("--precision auto")]
    assert len(note) == 1 and "do not fit" in note[0] and "fp16" in note[0]


def test_a_model_that_fits_in_no_precision_is_refused_before_loading(monkeypatch):
    monkeypatch.setattr(materialize, "available_bytes", lambda device: 1000)
    monkeypatch.setattr(materialize, "read_safetensors", lambda *a, **k: pytest.fail("read before the check"))
    with pytest.raises(ResourceError, match=r"needs [\d.]+ GiB of memory for its weights in fp16 and 0.0 GiB is "
                                            "available"):
        load_model("phantom")
    with pytest.raises(ResourceError, match="in fp32"):
        load_model("phantom", precision="fp32")


def test_unknown_precision_is_one_clear_error():
    with pytest.raises(InputError, match="must be one of auto, fp32, bf16, fp16, got 'fp8'"):
        load_model("demo", precision="fp8")


def test_truncated_safetensors_is_refused_before_any_read(tmp_path):
    good = save_tiny(tmp_path / "good.safetensors")
    cut = tmp_path / "cut.safetensors"
    data = good.read_bytes()
    cut.write_bytes(data[:len(data) - 100])
    with pytest.raises(ModelLoadError, match="it is truncated: tensor .* ends at byte"):
        load_model(cut)


def test_a_file_rewritten_while_it_is_read_is_refused(tmp_path, monkeypatch):
    path = save_tiny(tmp_path / "live.safetensors")
    original = materialize._read_exactly
    touched = []

    def trainer_writes_meanwhile(f, into, p, name):
        if not touched:  # a trainer truncates the file in place and writes it again, a moment later
            data = path.read_bytes()
            with open(path, "r+b") as out:
                out.truncate(0)
                out.write(data)
            os.utime(path, ns=(0, 10**9))
            touched.append(name)
        return original(f, into, p, name)

    monkeypatch.setattr(materialize, "_read_exactly", trainer_writes_meanwhile)
    with pytest.raises(ModelLoadError, match="changed while it was being read"):
        materialize.read_safetensors(materialize.read_safetensors_header(path))


def test_fp16_overflow_is_the_nonfinite_error_with_the_bf16_hint(tmp_path):
    ckpt = save_tiny(tmp_path / "loud.safetensors", lambda m: m.patch_embed.proj.weight.fill_(1000.0))
    line = check(invoke("norms", ckpt, "synthetic:2", "--precision", "fp16"), 1, "non-finite token norms")
    assert "--precision bf16" in line
    check(invoke("norms", ckpt, "synthetic:2", "--precision", "bf16"), 0)


@pytest.mark.parametrize("command", ["norms", "probe", "attention", "fix", "discover", "compare", "signatures"])
def test_every_forward_command_takes_precision(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0 and "--precision" in result.output


def test_fix_saves_in_the_checkpoints_own_dtype(tmp_path):
    out = tmp_path / "fixed.safetensors"
    check(invoke("fix", "phantom", "synthetic:8", "--precision", "bf16", "--save-model", out), 0)
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F16"}  # the shipped phantom's own dtype, not the bf16 it was run in
