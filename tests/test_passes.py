"""The pass runner (analysis/passes.py): measurements of one plan share one forward per batch and get what they
would get alone; the forward stops after the last block any of them needs; the decoding workers stop on every way
out of a pass, an error or an interrupt in a measurement included."""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest
import torch
from PIL import Image

from artifactscan.analysis.passes import (OUTPUT, PATCH_EMBED, Batch, PassSettings, block_output, open_pass,
                                          token_norms)
from artifactscan.analysis.scan import NormsMeasurement
from artifactscan.models.loading import wrap_module

from .conftest import tiny_vit


class Keep:
    """A measurement that keeps what it is given (the points it names, up to block ``last``)."""

    def __init__(self, points: dict, last: int | None = None, fail_at: int | None = None,
                 error: type[BaseException] = RuntimeError):
        self.points, self.last, self.fail_at, self.error = points, last, fail_at, error
        self.seen: dict[str, list[torch.Tensor]] = {name: [] for name in points}
        self.batches = 0

    def hook_names(self):
        return self.points

    def stop_after(self):
        return self.last

    def on_batch(self, batch: Batch) -> None:
        self.batches += 1
        if self.fail_at == self.batches:
            raise self.error("measurement failed")
        for name in self.points:
            self.seen[name].append(batch.captured[name].clone())

    def finish(self):
        return {name: torch.cat(parts) for name, parts in self.seen.items()}


class CountingForward:
    def __init__(self, loaded):
        self.calls = 0
        self.inner = loaded.model.forward_features
        loaded.model.forward_features = self

    def __call__(self, x):
        self.calls += 1
        return self.inner(x)


@pytest.fixture
def model():
    return wrap_module(tiny_vit())


def _settings(**kw) -> PassSettings:
    return PassSettings(device="cpu", **{"batch_size": 5, **kw})


def test_a_plan_shares_one_forward_and_gets_what_each_gets_alone(model):
    images = torch.rand(12, 3, 32, 32)
    norms_points = {block_output(i): token_norms for i in range(len(model.blocks))} | {OUTPUT: token_norms}
    raw_points = {block_output(1): None, PATCH_EMBED: None}
    with open_pass(model, images, settings=_settings()) as opened:
        counter = CountingForward(opened.loaded)
        together = opened.run([Keep(norms_points), Keep(raw_points)], "both")
        assert counter.calls == 3  # 12 images in batches of 5: one forward per batch for both measurements
        alone = opened.run([Keep(norms_points)], "norms") + opened.run([Keep(raw_points)], "raw")
    for shared, single in zip(together, alone):
        assert shared.keys() == single.keys()
        for name in shared:
            assert torch.equal(shared[name], single[name]), name
    assert together[0][OUTPUT].shape == (12, 17)  # 1 CLS + 4x4 patches: the final output's norms


def test_the_forward_stops_after_the_last_block_needed(model):
    ran = []
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
    with open_pass(model, torch.rand(4, 3, 32, 32), settings=_settings()) as opened:
        opened.run([Keep({block_output(0): None}, last=0), Keep({block_output(1): token_norms}, last=1)], "early")
        assert sorted(set(ran)) == [0, 1]
        ran.clear()
        opened.run([Keep({block_output(0): None}, last=0), Keep({OUTPUT: None})], "whole")
        assert sorted(set(ran)) == list(range(len(model.blocks)))
    # the pass left no hook of its own: only this test's one per block
    assert [len(block._forward_hooks) for block in model.blocks] == [1] * len(model.blocks)
    assert not model.model.patch_embed._forward_hooks


def test_two_reductions_of_one_point_each_get_their_own(model):
    images = torch.rand(6, 3, 32, 32)
    with open_pass(model, images, settings=_settings()) as opened:
        raw, norms = opened.run([Keep({block_output(2): None}), Keep({block_output(2): token_norms})], "both")
    assert raw[block_output(2)].shape == (6, 17, 32)  # 1 CLS + 4x4 patches, width 32
    assert torch.equal(norms[block_output(2)], token_norms(raw[block_output(2)]))


def test_the_norms_measurement_matches_the_norms_of_the_raw_blocks(model):
    images = torch.rand(7, 3, 32, 32)
    raw = {block_output(i): None for i in range(len(model.blocks))}
    with open_pass(model, images, settings=_settings(batch_size=3)) as opened:
        bars = torch.zeros(len(model.blocks) + 1, dtype=torch.float64)
        norms = NormsMeasurement(opened.loaded, bars, map_indices=range(7))
        _, tokens = opened.run([norms, Keep(raw)], "norms")
    for i in range(len(model.blocks)):
        expected = torch.linalg.vector_norm(tokens[block_output(i)].float(), dim=-1)[:, 1:]
        got = torch.stack([norms.maps[j][i].flatten() for j in range(7)]).float()
        assert torch.equal(got, expected.reshape(7, -1).float())


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("passes")
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"p{i:02d}.png")
    return folder


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_the_workers_stop_when_a_measurement_fails(model, photos, error):
    with pytest.raises(error):
        with open_pass(model, photos, settings=_settings(batch_size=2, num_workers=2)) as opened:
            opened.run([Keep({block_output(0): token_norms}, fail_at=2, error=error)], "failing")
    assert opened.source.loaders == {}
    assert not [p for p in multiprocessing.active_children() if p.is_alive()]


def test_unreadable_files_are_counted_once_per_image(model, photos, tmp_path):
    import shutil

    folder = tmp_path / "mixed"
    shutil.copytree(photos, folder)
    (folder / "broken.png").write_bytes(b"not a png")
    said = []
    with open_pass(model, folder, settings=_settings(warn=said.append)) as opened:
        first, = opened.run([Keep({OUTPUT: token_norms})], "first")
        opened.run([Keep({OUTPUT: token_norms})], "again", count_skipped=False)
        skipped = opened.all_skipped()
        opened.announce_skipped(skipped)
    assert len(first[OUTPUT]) == 12 and len(skipped) == 1
    assert len(said) == 1 and said[0].startswith("skipped ") and "broken.png" in said[0]
    records = opened.source.summary(12, skipped).skipped
    assert len(records) == 1 and records[0].path.endswith("broken.png") and records[0].reason in said[0]


def test_probe_takes_allow_nonfinite_for_weights_it_never_runs(tmp_path):
    """NaN only in the last block: the probe of block 0 never runs it, so with allow_nonfinite it measures; without,
    the model is refused by name; a probe of the NaN block itself is refused whatever the flag."""
    from artifactscan import probe
    from artifactscan.core.errors import NonFiniteError

    from .fault_tools import save_tiny

    def nan_in_last_block(model) -> None:
        model.blocks[-1].mlp.fc2.bias[0] = float("nan")

    ckpt = save_tiny(tmp_path / "nan-late.safetensors", nan_in_last_block)
    options = dict(device="cpu", draws=2, batch_size=16)
    with pytest.raises(NonFiniteError, match="non-finite weights"):
        probe(ckpt, "synthetic:40", blocks=0, **options)
    report = probe(ckpt, "synthetic:40", blocks=0, allow_nonfinite=True, **options)
    assert report.layer == 0 and report.num_patch_tokens == 40 * 16
    with pytest.raises(NonFiniteError, match="block 2 produced non-finite token values"):
        probe(ckpt, "synthetic:40", blocks=-1, allow_nonfinite=True, **options)


def test_compare_makes_one_pass_per_model_and_its_attention_rides_on_the_scan(monkeypatch):
    """compare reads the last block's attention on the prefix tokens on the scan's own forward (the capture layer
    reads attention without changing it): one pass over the images per model, same numbers as a pass of its own."""
    import artifactscan.analysis.passes as passes
    from artifactscan.analysis.attention import attention_mass
    from artifactscan.analysis.compare import compare
    from artifactscan.inputs.sources import image_batches, make_image_source
    from artifactscan.models.loading import load_model

    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return image_batches(*args, **kwargs)

    monkeypatch.setattr(passes, "image_batches", counted)
    report = compare(["demo", "demo-reg4"], "synthetic:8", threshold=100, device="cpu")
    assert len(calls) == 2
    reg4 = load_model("demo-reg4")
    batches = (x for x, _, _ in image_batches(make_image_source("synthetic:8", reg4), 32, 0, "cpu"))
    alone = attention_mass(reg4, batches, blocks=[-1])[0].prefix_mass
    row = report.rows[1].prefix_attention
    assert row["cls"] == pytest.approx(alone["cls"], rel=1e-5)
    assert row["registers"] == pytest.approx(sum(v for k, v in alone.items() if k.startswith("reg")), rel=1e-5)
