"""Hugging Face folders are read straight into the precision's dtype and built on the meta device: an explicit
--precision bf16/fp16 never builds a float32 model first (issue 22; the peak RSS of a bf16 ViT-L folder is in
docs/experiments.md)."""

from __future__ import annotations

import pytest
import torch

from artifactscan.models import hf
from artifactscan.models.loading import load_model

from .conftest import loaded_block_norms, randomize

transformers = pytest.importorskip("transformers")


def dinov2_folder(tmp_path, dtype: torch.dtype):
    config = transformers.Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                    intermediate_size=64, image_size=28, patch_size=14,
                                                    num_register_tokens=2)
    model = randomize(transformers.Dinov2WithRegistersModel(config), scale=0.1).to(dtype)
    folder = tmp_path / f"dinov2-{str(dtype)[6:]}"
    model.save_pretrained(folder)
    return folder


@pytest.fixture
def assigned(monkeypatch):
    """The dtypes of the floating tensors handed to the meta-built model, and the dtype it was told to hold."""
    seen: list[tuple[set, torch.dtype]] = []
    real = hf.assign_weights

    def spy(model, state_dict, dtype):
        seen.append(({t.dtype for t in state_dict.values() if t.is_floating_point()}, dtype))
        assert all(p.is_meta for p in model.parameters())  # no random initialisation, no float32 model
        return real(model, state_dict, dtype)

    monkeypatch.setattr(hf, "assign_weights", spy)
    return seen


@pytest.mark.parametrize("file_dtype", [torch.bfloat16, torch.float32], ids=["bf16-file", "fp32-file"])
@pytest.mark.parametrize("precision,held", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_explicit_half_precision_is_read_into_it(tmp_path, assigned, file_dtype, precision, held):
    folder = dinov2_folder(tmp_path, file_dtype)
    loaded = load_model(folder, precision=precision)
    assert assigned == [({held}, held)]
    assert {p.dtype for p in loaded.model.parameters()} == {held} and loaded.checkpoint_dtype == file_dtype
    reference = load_model(folder, precision="fp32")  # the same weights in float32, then compared
    x = torch.randn(2, 3, 28, 28)
    ours, theirs = loaded_block_norms(loaded, x), loaded_block_norms(reference, x)
    assert ours.shape == theirs.shape == (2, 2, 1 + 2 + 4)
    torch.testing.assert_close(ours.float(), theirs, rtol=0.05, atol=0.05)


def test_auto_keeps_float32_and_remembers_the_files_dtype(tmp_path, assigned):
    loaded = load_model(dinov2_folder(tmp_path, torch.bfloat16))
    assert assigned == [({torch.float32}, torch.float32)]
    assert loaded.precision == "fp32" and loaded.checkpoint_dtype == torch.bfloat16  # what `fix --out` saves in


def test_a_folder_that_cannot_fit_is_refused_before_reading(tmp_path, monkeypatch):
    from artifactscan.core.errors import ResourceError
    from artifactscan.models import materialize

    folder = dinov2_folder(tmp_path, torch.bfloat16)
    monkeypatch.setattr(materialize, "available_bytes", lambda device: 1000)
    monkeypatch.setattr(hf, "read_safetensors", lambda *a, **k: pytest.fail("read before the check"))
    with pytest.raises(ResourceError, match=r"dinov2-bfloat16 needs .* GiB of memory for its weights in bf16"):
        load_model(folder, precision="bf16")


def test_a_timm_hub_folder_is_built_in_an_explicit_half_precision(tmp_path, monkeypatch):
    """timm names and hub folders: the model is created in the half dtype (timm's ``dtype=``) and the pretrained
    weights copied into it, never a float32 model first; ``auto`` leaves timm's float32 as it was."""
    import timm
    from timm.models._hub import save_for_hf

    from artifactscan.models import loading

    kwargs = dict(depth=2, img_size=32, patch_size=8, embed_dim=32, num_heads=2)
    save_for_hf(timm.create_model("vit_small_patch16_224", pretrained=False, **kwargs), tmp_path,
                model_config={"model_args": kwargs})
    created = []
    real = loading._create_pretrained
    monkeypatch.setattr(loading, "_create_pretrained", lambda name, **kw: created.append(kw.get("dtype")) or real(
        name, **kw))
    for precision, dtype in (("bf16", torch.bfloat16), ("auto", None)):
        loaded = load_model(tmp_path, precision=precision)
        assert created[-1] == dtype and loaded.source == "local-dir"
        assert {t.dtype for t in loaded.model.state_dict().values()} == {dtype or torch.float32}


@pytest.mark.parametrize("zipped", [True, False], ids=["zip-bin", "legacy-bin"])
def test_pytorch_bin_shards_load_in_the_precision_and_own_their_memory(tmp_path, zipped):
    """A folder holding ``pytorch_model.bin`` (zip: memory-mapped by torch.load, then copied out; the legacy format:
    read whole, only converted) gives the same model as its safetensors twin, in the precision asked for."""
    from safetensors.torch import load_file

    folder = dinov2_folder(tmp_path, torch.float32)
    reference = load_model(folder, precision="bf16")
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=zipped)
    loaded = load_model(folder, precision="bf16")
    assert {t.dtype for t in loaded.model.state_dict().values() if t.is_floating_point()} == {torch.bfloat16}
    for (name, a), b in zip(reference.model.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(a, b), name
    (folder / "pytorch_model.bin").write_bytes(b"")  # the file gone: the model does not live on its pages
    x = torch.randn(1, 3, 28, 28)
    assert torch.equal(loaded_block_norms(loaded, x)[-1], loaded_block_norms(reference, x)[-1])
