"""Loading a model with its images (analysis/opening.py): decoding begun before the model is built gives exactly the
scan a loaded model gives; a wrong guess, a failed load or bad images lose nothing and leak no worker; the library
imports without timm and leaves the garbage collector as it found it."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import artifactscan.analysis.opening as opening
from artifactscan import load_model, scan
from artifactscan.core.errors import InputError, ModelLoadError
from artifactscan.inputs.sources import ImageSource
from artifactscan.models.loading import builtin_models, peek_data_config

from .conftest import REPO


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("opening")
    rng = np.random.default_rng(0)
    for i in range(24):
        w, h = (160, 120) if i % 3 else (90, 140)
        yy, xx = np.mgrid[0:h, 0:w]
        arr = np.stack([xx * 255 // w, yy * 255 // h, (xx * yy) % 256], -1) + rng.integers(-30, 30, (h, w, 3))
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(folder / f"p{i:02d}.jpg", quality=90)
    return folder


@pytest.fixture
def spy(monkeypatch):
    """Records what ImageSource.start returned, which sources started early and which ones were closed."""
    seen = {"start": [], "started": [], "closed": []}
    start, close = ImageSource.start, ImageSource.close

    def spy_start(self, *a, **k):
        seen["start"].append(start(self, *a, **k))
        if seen["start"][-1]:
            seen["started"].append(self)
        return seen["start"][-1]

    def spy_close(self):
        seen["closed"].append(self)
        close(self)

    monkeypatch.setattr(ImageSource, "start", spy_start)
    monkeypatch.setattr(ImageSource, "close", spy_close)
    return seen


def _same_scan(a, b) -> None:
    assert [(l.median, l.max, l.num_outliers, l.threshold) for l in a.layers] == \
           [(l.median, l.max, l.num_outliers, l.threshold) for l in b.layers]
    assert [(o.image, o.layer, o.row, o.col, o.norm) for o in a.outliers] == \
           [(o.image, o.layer, o.row, o.col, o.norm) for o in b.outliers]
    assert a.images.num_scanned == b.images.num_scanned


def test_early_decoding_gives_the_same_scan(photos, spy):
    reference = scan(load_model("phantom"), photos, device="cpu", num_workers=1)
    assert spy["start"] == []  # a loaded model: nothing to overlap with
    early = scan("phantom", photos, device="cpu", num_workers=1)
    assert spy["start"] == [True]
    _same_scan(early, reference)
    assert early.images.num_scanned == 24


def test_no_early_pass_without_workers_or_for_tensors(photos, spy):
    scan("phantom", photos, device="cpu", num_workers=0)
    scan("phantom", torch.rand(8, 3, 32, 32), device="cpu")
    scan("phantom", "synthetic:8", device="cpu", num_workers=1)
    assert spy["start"] == [False]  # only the folder got as far as trying, and with no workers it did not start


def test_a_wrong_guess_is_thrown_away(photos, spy, monkeypatch):
    """The read-ahead config is only a hint: a config that prepares other pixels stops the early workers and the
    images are prepared again for the loaded model."""
    real = peek_data_config("phantom")
    monkeypatch.setattr(opening, "peek_data_config", lambda spec: dict(real, interpolation="nearest"))
    guessed = scan("phantom", photos, device="cpu", num_workers=1)
    # the early source is closed once the guess is found wrong, the scan's own source when the scan ends
    assert spy["start"] == [True] and len(spy["closed"]) == 2 and spy["closed"][0] is spy["started"][0]
    _same_scan(guessed, scan(load_model("phantom"), photos, device="cpu", num_workers=1))


def test_failed_load_stops_the_early_workers(photos, spy, monkeypatch):
    def broken(*a, **k):
        raise ModelLoadError("this checkpoint is broken")

    monkeypatch.setattr(opening, "load_model", broken)
    with pytest.raises(ModelLoadError, match="broken"):
        scan("phantom", photos, device="cpu", num_workers=1)
    assert spy["start"] == [True] and spy["closed"] == spy["started"]
    assert not [p for p in multiprocessing.active_children() if p.is_alive()]


def test_model_errors_still_come_before_image_errors(tmp_path):
    with pytest.raises(InputError, match="model file"):
        scan(str(tmp_path / "missing.safetensors"), tmp_path / "no-such-folder", device="cpu")
    with pytest.raises(InputError, match="no-such-folder"):
        scan("phantom", tmp_path / "no-such-folder", device="cpu", num_workers=1)


def test_peek_data_config_reads_only_self_describing_safetensors(tmp_path):
    for name in builtin_models():
        assert peek_data_config(name) == load_model(name).data_config
    assert peek_data_config(None) == load_model().data_config  # the embedded default
    assert peek_data_config("vit_small_patch16_224") is None  # timm's config needs timm
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    assert peek_data_config(tmp_path / "junk.safetensors") is None  # load_model will say what is wrong
    assert peek_data_config(tmp_path / "missing.safetensors") is None
    torch.save({"w": torch.zeros(1)}, tmp_path / "model.pt")
    assert peek_data_config(tmp_path / "model.pt") is None  # reading it means unpickling all of it


IMPORTS = """
import gc, sys
import artifactscan
from artifactscan import scan, probe, compare, fix, load_model, LoadedModel
import artifactscan.cli
assert "timm" not in sys.modules and "torchvision" not in sys.modules, sorted(m for m in sys.modules if "timm" in m)
report = scan("phantom", "{images}", device="cpu", num_workers=0)
assert "timm" in sys.modules  # the model needed it
assert gc.isenabled() and gc.get_freeze_count() == 0  # the library leaves the collector alone
print("ok")
"""


def test_library_imports_without_timm_and_leaves_gc_alone():
    out = subprocess.run([sys.executable, "-c", IMPORTS.format(images=REPO / "sample_images")], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr


def test_cli_command_ends_its_startup_phase(photos):
    """In the command line the collector rests until the model is loaded and is on again afterwards, also when the
    command fails before loading anything."""
    import gc

    from typer.testing import CliRunner

    from artifactscan.cli import app

    runner = CliRunner()
    assert runner.invoke(app, ["norms", "phantom", str(photos), "--json", "--workers", "1"]).exit_code == 0
    assert gc.isenabled()
    assert runner.invoke(app, ["norms", "phantom", str(photos / "missing")]).exit_code == 1
    assert gc.isenabled()


def test_cli_startup_phase_ends_when_the_model_is_loaded_through_a_callback(photos):
    """The library never calls the command line's start-up policy: load_model only calls what was registered in
    ``after_load``, and the command line registers the end of its start-up phase there, for the command only."""
    import gc

    from typer.testing import CliRunner

    from artifactscan.cli import app
    from artifactscan.models.loading import after_load

    registered = repr(after_load)
    seen = []
    remove = after_load.add(lambda loaded: seen.append((loaded.name, gc.isenabled())))  # before the CLI's own
    try:
        assert CliRunner().invoke(app, ["norms", "phantom", str(photos), "--json", "--workers", "0"]).exit_code == 0
    finally:
        remove()
    assert seen == [("phantom", False)]  # the collector rested until the model was loaded ...
    assert gc.isenabled() and repr(after_load) == registered  # ... and the command took its callback away again
    load_model("phantom")
    assert gc.isenabled()


class _CollectorState(torch.utils.data.Dataset):
    """Each item: whether the collector is on in the process that made it (a decoding worker)."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        import gc

        return torch.tensor(float(gc.isenabled())), i


@pytest.mark.skipif(multiprocessing.get_start_method() != "fork", reason="workers inherit the phase only by fork")
def test_decoding_workers_forked_during_startup_end_it_for_themselves():
    from artifactscan.cli.app import _in_startup_phase
    from artifactscan.core.startup import end_startup
    from artifactscan.inputs.sources import image_batches

    def worker_states() -> list[float]:
        source = ImageSource(_CollectorState(), ["a", "b", "c", "d"], "test", None, 4)
        states = [v for images, _, _ in image_batches(source, 2, 1) for v in images.tolist()]
        source.close()
        return states

    try:
        assert _in_startup_phase(worker_states) == [1.0] * 4  # the CLI's callback turned the worker's collector on
    finally:
        end_startup()
    import gc

    gc.disable()  # a library caller that turned it off itself: workers are left as they were forked
    try:
        assert worker_states() == [0.0] * 4
    finally:
        gc.enable()
