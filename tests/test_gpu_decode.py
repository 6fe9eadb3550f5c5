"""--gpu-decode's logic, on the CPU: the batch decoder is replaced by a stand-in (Pillow, whole batch or nothing, as
nvJPEG fails a batch on one bad file), so the worker split, EXIF orientation, the device transform and the per-file
Pillow fallback are all exercised without a GPU."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader

from artifactscan import load_model
from artifactscan.core.errors import InputError
from artifactscan.inputs.gpu_decode import (
    EncodedJpeg,
    GpuJpegDecoder,
    apply_exif_orientation,
    collate_encoded,
    encoded_view,
)
from artifactscan.inputs.sources import make_image_source
from artifactscan.inputs.synthetic import write_photo_folder

from .conftest import SAMPLE_IMAGES


def pillow_batch_decoder(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Stand-in for nvJPEG: decodes the stored pixels (no EXIF rotation), and fails the whole batch on one bad file."""
    out = []
    for d in data:
        with Image.open(io.BytesIO(d.numpy().tobytes())) as im:
            im.load()
            out.append(torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).to(device))
    return out


@pytest.fixture
def folder(tmp_path):
    d = write_photo_folder(tmp_path / "photos", 6, [SAMPLE_IMAGES / "astronaut.jpg", SAMPLE_IMAGES / "coffee.jpg"],
                           size=(320, 240), seed=3)
    im = Image.open(d / "photo0001.jpg")
    exif = im.getexif()
    exif[0x0112] = 6  # stored sideways; upright is 90 degrees clockwise
    im.save(d / "photo0001_rotated.jpg", exif=exif, quality=95)
    Image.open(d / "photo0002.jpg").convert("L").save(d / "photo0002_gray.jpg", quality=95)
    Image.open(d / "photo0003.jpg").save(d / "photo0003.png")  # not a JPEG: the Pillow path, in the worker
    return d


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # the header still opens; the decode fails


def _batches(source, folder_ds, decoder, batch_size=16):
    loader = DataLoader(encoded_view(source.dataset, folder_ds), batch_size=batch_size, collate_fn=collate_encoded)
    return [decoder(*b) for b in loader]


def _pillow(source):
    loader = DataLoader(source.dataset, batch_size=64, collate_fn=source.collate)
    images, indices, skipped = next(iter(loader))
    return images, indices, skipped


@pytest.mark.parametrize("model", ["phantom", "demo"])
def test_device_path_matches_pillow(folder, model):
    loaded = load_model(model)
    source = make_image_source(folder, loaded, exact_decode=True)
    decoder = GpuJpegDecoder(source.data_config, torch.device("cpu"), source.folder_dataset,
                             decode=pillow_batch_decoder, applies_exif=False)
    (images, indices, skipped), = _batches(source, source.folder_dataset, decoder)
    ref_images, ref_indices, ref_skipped = _pillow(source)
    assert skipped == ref_skipped == []
    assert indices.tolist() == ref_indices.tolist() == list(range(len(source.names)))
    assert images.shape == ref_images.shape
    std = torch.tensor(source.data_config["std"]).view(1, 3, 1, 1)
    diff = ((images - ref_images) * std).abs()  # in [0, 1] pixel units
    assert float(diff.mean()) < 0.01 and decoder.fallbacks == 0
    rotated = source.names.index(str(folder / "photo0001_rotated.jpg"))
    assert float(diff[rotated].mean()) < 0.01  # EXIF orientation applied: same picture, same way up


def test_failed_batch_falls_back_to_pillow_file_by_file(folder):
    _truncate(folder / "photo0004.jpg")
    (folder / "photo0005.jpg").write_bytes(b"")
    loaded = load_model("phantom")
    source = make_image_source(folder, loaded)
    calls = []

    def decode(data, device):
        calls.append(len(data))
        return pillow_batch_decoder(data, device)

    decoder = GpuJpegDecoder(source.data_config, torch.device("cpu"), source.folder_dataset, decode=decode,
                             applies_exif=False)
    (images, indices, skipped), = _batches(source, source.folder_dataset, decoder)
    ref_images, ref_indices, ref_skipped = _pillow(source)
    assert skipped == ref_skipped and len(skipped) == 2  # the same files, the same reasons as without the option
    assert indices.tolist() == ref_indices.tolist()
    assert torch.equal(images, ref_images)  # the whole batch went through Pillow: identical to the CPU path
    assert calls == [7] and decoder.fallbacks == 7  # 7 JPEG-looking files went to the device decoder, then Pillow
    empty = source.names.index(str(folder / "photo0005.jpg"))
    assert any(i == empty and "empty" in reason for i, reason in skipped)


def test_only_plain_jpegs_reach_the_device(folder):
    loaded = load_model("phantom")
    source = make_image_source(folder, loaded)
    view = encoded_view(source.dataset, source.folder_dataset)
    kinds = {source.names[i].rsplit("/", 1)[-1]: isinstance(view[i], EncodedJpeg) for i in range(len(view))}
    assert kinds["photo0003.png"] is False
    assert kinds["photo0002_gray.jpg"] is True and kinds["photo0000.jpg"] is True
    rotated = view[source.names.index(str(folder / "photo0001_rotated.jpg"))]
    assert rotated.orientation == 6


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(orientation):
    arr = np.arange(3 * 4 * 6, dtype=np.uint8).reshape(4, 6, 3) * 3
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, format="PNG", exif=exif)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))))
    ours = apply_exif_orientation(torch.from_numpy(arr).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    assert np.array_equal(ours, upright)


def test_missing_torchcodec_is_one_clear_line(monkeypatch, folder):
    import sys

    monkeypatch.setitem(sys.modules, "torchcodec", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)
    loaded = load_model("phantom")
    source = make_image_source(folder, loaded, gpu_decode=True)
    with pytest.raises(InputError, match="pip install torchcodec") as err:
        GpuJpegDecoder(source.data_config, torch.device("cpu"), source.folder_dataset)
    assert "\n" not in str(err.value)


def test_unsupported_crop_mode_refused(folder):
    loaded = load_model("phantom")
    source = make_image_source(folder, loaded)
    cfg = {**source.data_config, "crop_mode": "border"}
    with pytest.raises(InputError, match="gpu_decode supports"):
        GpuJpegDecoder(cfg, torch.device("cpu"), source.folder_dataset, decode=pillow_batch_decoder)


def test_torchcodec_decoder_on_the_cpu_matches_pillow(folder):
    """The real decoder (TorchCodec, here on the CPU): upright by itself, the same pixels as the Pillow path."""
    pytest.importorskip("torchcodec.decoders")
    from artifactscan.inputs.gpu_decode import torchcodec_decode

    loaded = load_model("demo")
    source = make_image_source(folder, loaded, exact_decode=True)
    decoder = GpuJpegDecoder(source.data_config, torch.device("cpu"), source.folder_dataset,
                             decode=torchcodec_decode, applies_exif=True)
    (images, indices, skipped), = _batches(source, source.folder_dataset, decoder)
    ref_images, ref_indices, _ = _pillow(source)
    assert indices.tolist() == ref_indices.tolist() and decoder.fallbacks == 0
    std = torch.tensor(source.data_config["std"]).view(1, 3, 1, 1)
    diff = ((images - ref_images) * std).abs().mean(dim=(1, 2, 3))
    assert float(diff.max()) < 0.01  # every image, the rotated one included


def test_gpu_decode_without_cuda_is_one_clear_line():
    from typer.testing import CliRunner

    from artifactscan.cli import app

    res = CliRunner().invoke(app, ["norms", "phantom", str(SAMPLE_IMAGES), "--gpu-decode", "--device", "cpu", "--json"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    lines = [line for line in res.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "--gpu-decode" in lines[0] and "--device cuda" in lines[0]
