"""ArtifactMonitor: measures artifacts inside a training loop without changing the training, writes monitor.jsonl
that reads back (torn, resumed, distributed), and `artifactscan monitor DIR` renders it."""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from artifactscan.cli import app
from artifactscan.core.errors import NotAViTError
from artifactscan.models.loading import load_model
from artifactscan.monitor import ArtifactMonitor, ArtifactsAboveThreshold, MonitorSetupError, read_monitor

from .conftest import TINY, join_two_rank_group, tiny_vit

TINY_CONFIG = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
               "interpolation": "bilinear", "crop_pct": 1.0}


def _train(model: torch.nn.Module, steps: int, monitor: ArtifactMonitor | None) -> list[float]:
    """A plain loop: dropout on, SGD with momentum, a fresh random batch per step from the global RNG."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    model.train()
    for step in range(steps):
        x = torch.randn(4, 3, 32, 32)
        y = torch.randint(0, TINY["num_classes"], (4,))
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if monitor is not None:
            monitor.step(model, step)
    return losses


def test_plain_loop_with_dropout_gives_bit_identical_losses(tmp_path):
    runs = []
    for use_monitor in (False, True):
        torch.manual_seed(1)
        model = tiny_vit(seed=3, drop_rate=0.2, proj_drop_rate=0.2, attn_drop_rate=0.2, drop_path_rate=0.1)
        torch.manual_seed(7)
        monitor = ArtifactMonitor("synthetic:8", every=2, out=tmp_path / "m", data_config=TINY_CONFIG) \
            if use_monitor else None
        runs.append((_train(model, 7, monitor), model.state_dict()))
    (plain, plain_state), (monitored, monitored_state) = runs
    assert plain == monitored  # exact floats, not close
    for key, value in plain_state.items():
        assert torch.equal(value, monitored_state[key]), key
    assert [r["step"] for r in map(json.loads, (tmp_path / "m" / "monitor.jsonl").read_text().splitlines())] \
        == [0, 2, 4, 6]


def test_phantom_is_flagged_and_demo_is_not_with_the_statistics_of_norms(tmp_path):
    from artifactscan.analysis.scan import scan

    phantom, demo = load_model("phantom"), load_model("demo")
    flagged = ArtifactMonitor("synthetic:16", every=5, model=phantom).step(phantom.model, 10)
    clean = ArtifactMonitor("synthetic:16", every=5, model=demo).step(demo.model, 10)
    assert flagged.onset_layer == phantom.recorded_onset and flagged.last_block.outlier_fraction > 0
    assert clean.onset_layer is None and clean.last_block.outlier_fraction == 0
    # the same streaming statistics and threshold rule as `norms` on the same images: the same per-block numbers
    report = scan(phantom, "synthetic:16", device="cpu", num_workers=0)
    for row, lay in zip(flagged.layers, report.layers):
        assert (row.num_outliers, row.threshold, row.median, row.max) == (lay.num_outliers, lay.threshold,
                                                                         lay.median, lay.max)
    assert flagged.step == 10 and flagged.model.kind == "phantom" and flagged.conclusive


def test_modes_rng_gradients_hooks_and_flush_denormal_are_left_as_found():
    model = tiny_vit()
    model.train()
    model.blocks[1].eval()  # a mixed state must come back as it was, not as model.train()
    drawn = []
    model.blocks[0].register_forward_hook(lambda m, i, o: drawn.append(torch.rand(1)))  # draws from the CPU RNG
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    monitor = ArtifactMonitor(torch.rand(6, 3, 32, 32), every=1, data_config=TINY_CONFIG)
    torch.set_flush_denormal(True)
    try:
        rng = torch.get_rng_state()
        record = monitor.step(model, 0)
        assert torch.equal(torch.get_rng_state(), rng) and drawn  # the forward drew, and the state came back
        assert float(torch.tensor([1e-39]) * 1.0) == 0.0  # the user's flush-denormal setting is still on
    finally:
        torch.set_flush_denormal(False)
    assert record is not None
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters()) and torch.is_grad_enabled()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hooks


def test_every_kind_of_probe_set_is_prepared_once_and_capped(image_dir):
    model = tiny_vit()
    for images, measured in ((image_dir, 8), ("synthetic-objects:3", 3), (torch.rand(5, 3, 40, 40), 5)):
        record = ArtifactMonitor(images, every=1, data_config=TINY_CONFIG).step(model, 0)
        assert record.images.num_scanned == measured and record.model.grid_size == [4, 4], images
    warnings = []
    capped = ArtifactMonitor("synthetic:5", every=1, data_config=TINY_CONFIG, max_images=3, warn=warnings.append)
    assert capped.step(model, 0).images.num_scanned == 3
    assert warnings == ["the probe set holds 5 images; the monitor keeps the first 3 (max_images)"]
    assert ArtifactMonitor("synthetic:80", every=1, data_config=TINY_CONFIG, warn=warnings.append
                           ).step(model, 0).images.num_scanned == 64  # the default: at most 64 images


def test_a_compiled_model_is_unwrapped_not_run():
    model = tiny_vit()
    plain = ArtifactMonitor("synthetic:4", every=1, data_config=TINY_CONFIG).step(model, 0)
    compiled = torch.compile(model)  # lazy: compiling only happens if the wrapper itself is called
    through = ArtifactMonitor("synthetic:4", every=1, data_config=TINY_CONFIG).step(compiled, 0)
    assert [lay.max for lay in through.layers] == [lay.max for lay in plain.layers]
    assert through.model.name == "VisionTransformer" and through.fingerprint == plain.fingerprint


@pytest.mark.parametrize("kwargs, match", [
    (dict(images="synthetic:4", every=0), "every must be a positive"),
    (dict(images="synthetic:4", every=-3), "every must be a positive"),
    (dict(images=torch.zeros(0, 3, 32, 32), every=1), "probe set is empty"),
    (dict(images=torch.zeros(2, 32, 32), every=1), r"\[N, 3, H, W\]"),
    (dict(images="synthetic:4", every=1, fail_above=2.0), "fail_above"),
])
def test_bad_options_are_refused_at_construction(kwargs, match):
    with pytest.raises(MonitorSetupError, match=match):
        ArtifactMonitor(**kwargs)


def test_empty_folder_and_wrong_image_size_are_refused_at_construction(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="(?i)no image|empty"):
        ArtifactMonitor(tmp_path / "empty", every=1)
    wrong = dict(TINY_CONFIG, input_size=(3, 64, 64))
    with pytest.raises(MonitorSetupError, match="takes only 32x32"):
        ArtifactMonitor("synthetic:4", every=1, model=tiny_vit(), data_config=wrong)


def test_a_model_the_capture_layer_cannot_hook_is_refused_in_one_line():
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    with pytest.raises(NotAViTError, match="Sequential is not a model family.*known: .*timm-vit"):
        ArtifactMonitor("synthetic:4", every=1, model=cnn, data_config=TINY_CONFIG)
    monitor = ArtifactMonitor("synthetic:4", every=1000, data_config=TINY_CONFIG)
    with pytest.raises(NotAViTError, match="Sequential"):
        monitor.step(cnn, 1)  # the first call, not the first update (step 1000)


def test_sharded_parameters_are_refused_at_the_first_call():
    class FullyShardedDataParallel(torch.nn.Module):  # stands for torch's: the class name is what is recognised
        def __init__(self, module):
            super().__init__()
            self.module = module

    monitor = ArtifactMonitor("synthetic:4", every=10, data_config=TINY_CONFIG)
    with pytest.raises(MonitorSetupError, match="sharded .*FSDP"):
        monitor.step(FullyShardedDataParallel(tiny_vit()), 3)

    class DeepSpeedEngine(torch.nn.Module):  # stands for deepspeed's (not installed here): ZeRO-3 marks each
        def __init__(self, module):          # partitioned parameter with ds_id and ds_status
            super().__init__()
            self.module = module
            for p in module.parameters():
                p.ds_id, p.ds_status = 0, "NOT_AVAILABLE"

    with pytest.raises(MonitorSetupError, match=r"sharded \(DeepSpeed ZeRO-3\)"):
        ArtifactMonitor("synthetic:4", every=10, data_config=TINY_CONFIG).step(DeepSpeedEngine(tiny_vit()), 3)
    # a real FSDP / FSDP2 model on two gloo ranks: test_ddp_two_ranks_rank_zero_writes_and_fail_above_stops_both


def test_a_torn_last_line_reads_back_with_a_warning(tmp_path):
    monitor = ArtifactMonitor("synthetic:4", every=1, out=tmp_path, data_config=TINY_CONFIG)
    model = tiny_vit()
    for step in range(3):
        monitor.step(model, step)
    path = tmp_path / "monitor.jsonl"
    text = path.read_text()
    path.write_text(text + text.splitlines()[0][:57])  # killed while writing the fourth line
    warnings = []
    history = read_monitor(tmp_path, warn=warnings.append)
    assert history.steps == [0, 1, 2] and len(history.outlier_fraction[0]) == TINY["depth"]
    assert len(warnings) == 1 and "torn last line" in warnings[0]


def test_resume_drops_later_records_and_an_occupied_out_is_refused(tmp_path):
    model = tiny_vit()
    first = ArtifactMonitor("synthetic:4", every=2, out=tmp_path, data_config=TINY_CONFIG)
    for step in range(11):
        first.step(model, step)
    with pytest.raises(MonitorSetupError, match="earlier run's 6 update.*resume=True"):
        ArtifactMonitor("synthetic:4", every=2, out=tmp_path, model=model, data_config=TINY_CONFIG)
    other = tiny_vit(depth=2)
    with pytest.raises(MonitorSetupError, match="another model"):
        ArtifactMonitor("synthetic:4", every=2, out=tmp_path, model=other, data_config=TINY_CONFIG).step(other, 0)
    first.close()  # the first run is over: its lock on the folder goes
    warnings = []
    resumed = ArtifactMonitor("synthetic:4", every=2, out=tmp_path, data_config=TINY_CONFIG, resume=True,
                              warn=warnings.append)
    for step in range(6, 9):  # the checkpoint of step 5 resumed: steps 6, 8 and 10 of the first run go
        resumed.step(model, step)
    assert read_monitor(tmp_path).steps == [0, 2, 4, 6, 8]
    assert any("dropped 3 record" in w for w in warnings)


def test_another_models_file_is_continued_only_with_resume(tmp_path):
    model, other = tiny_vit(), tiny_vit(depth=2)
    with ArtifactMonitor("synthetic:4", every=1, out=tmp_path, data_config=TINY_CONFIG) as first:
        first.step(model, 0)
    with pytest.raises(MonitorSetupError, match=r"another model \(VisionTransformer\).*resume=True"):
        ArtifactMonitor("synthetic:4", every=1, out=tmp_path, model=other, data_config=TINY_CONFIG)
    warnings = []
    with ArtifactMonitor("synthetic:4", every=1, out=tmp_path, data_config=TINY_CONFIG, resume=True,
                         warn=warnings.append) as resumed:
        resumed.step(other, 1)
    assert any("written for another model" in w for w in warnings)
    assert [len(u.layers) for u in read_monitor(tmp_path).updates] == [TINY["depth"], 2]


def test_two_writers_cannot_share_a_folder_and_a_killed_run_reads_back_and_resumes(tmp_path):
    import subprocess

    model = tiny_vit()
    first = ArtifactMonitor("synthetic:4", every=1, out=tmp_path, data_config=TINY_CONFIG)
    first.step(model, 0)
    second = ArtifactMonitor("synthetic:4", every=1, out=tmp_path, data_config=TINY_CONFIG, resume=True)
    with pytest.raises(MonitorSetupError, match=f"another artifact monitor \\(pid {os.getpid()}\\)"):
        second.step(model, 1)
    assert read_monitor(tmp_path).steps == [0]  # a reader takes no lock: it reads while the writer holds it
    first.close()
    # a run in another process writing the folder, killed (SIGKILL: no cleanup runs) while it goes on measuring
    code = ("import sys; from tests.conftest import tiny_vit; from tests.test_monitor import TINY_CONFIG; "
            "from artifactscan.monitor import ArtifactMonitor\n"
            "monitor, model = ArtifactMonitor('synthetic:4', every=1, out=sys.argv[1], data_config=TINY_CONFIG, "
            "resume=True), tiny_vit()\n"
            "for step in range(1, 10**6):\n    monitor.step(model, step); print(step, flush=True)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1],
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        assert proc.stdout.readline().strip() == "1"  # its first update is on file: it holds the lock
        with pytest.raises(MonitorSetupError, match=f"pid {proc.pid}"):
            ArtifactMonitor("synthetic:4", every=1, out=tmp_path, data_config=TINY_CONFIG, resume=True).step(model, 1)
        assert proc.stdout.readline().strip() == "2"
    finally:
        proc.kill()
        proc.wait(timeout=60)
    killed = read_monitor(tmp_path, warn=lambda msg: None)  # a torn last line, if the kill tore one, is skipped
    assert killed.steps[:3] == [0, 1, 2] and killed.steps == list(range(len(killed.steps)))
    resumed = ArtifactMonitor("synthetic:4", every=1, out=tmp_path, data_config=TINY_CONFIG, resume=True)
    resumed.step(model, 2)  # the killed run's lock died with it: its resume is not blocked (records >= 2 go)
    resumed.close()
    assert read_monitor(tmp_path).steps == [0, 1, 2]


def test_out_may_name_the_file_itself(tmp_path):
    with ArtifactMonitor("synthetic:4", every=1, out=tmp_path / "run" / "monitor.jsonl",
                         data_config=TINY_CONFIG) as monitor:
        monitor.step(tiny_vit(), 0)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".monitor.lock", "monitor.jsonl"]
    assert read_monitor(tmp_path / "run").steps == [0]


def test_the_updates_kept_in_memory_do_not_grow_with_the_steps(tmp_path, monkeypatch):
    import artifactscan.analysis.monitor as monitor_module

    monkeypatch.setattr(monitor_module, "KEPT_RECORDS", 3)
    monitor = ArtifactMonitor("synthetic:4", every=1, out=tmp_path, data_config=TINY_CONFIG)
    model = tiny_vit()
    for step in range(6):
        monitor.step(model, step)
    monitor.close()
    assert [r.step for r in monitor.records] == [3, 4, 5]  # the latest ones; the file holds them all
    assert read_monitor(tmp_path).steps == list(range(6))


def test_fail_above_acts_on_conclusive_updates_and_on_non_finite_norms(tmp_path):
    phantom = load_model("phantom")
    seen = []
    monitor = ArtifactMonitor("synthetic:16", every=1, out=tmp_path, model=phantom, fail_above=0.001,
                              on_update=seen.append)
    with pytest.raises(ArtifactsAboveThreshold, match="above fail_above=0.001") as caught:
        monitor.step(phantom.model, 0)
    assert caught.value.exit_code == 3 and seen == [caught.value.record]
    assert read_monitor(tmp_path).steps == [0]  # the update that stopped the run is on file
    # too few tokens to decide: an inconclusive update never stops a run
    tiny_probe = ArtifactMonitor("synthetic:1", every=1, model=phantom, fail_above=0.001)
    record = tiny_probe.step(phantom.model, 0)
    assert not record.conclusive and record.last_block.inconclusive
    broken = tiny_vit()
    with torch.no_grad():
        broken.blocks[1].mlp.fc2.bias.fill_(float("nan"))
    quiet = ArtifactMonitor("synthetic:4", every=1, data_config=TINY_CONFIG).step(broken, 0)
    assert quiet.num_nonfinite > 0 and not quiet.conclusive  # recorded, not a crash
    with pytest.raises(ArtifactsAboveThreshold, match="NaN or Inf"):
        ArtifactMonitor("synthetic:4", every=1, data_config=TINY_CONFIG, fail_above=0.5).step(broken, 0)


def test_out_of_memory_skips_the_update_with_a_warning(monkeypatch):
    warnings = []
    monitor = ArtifactMonitor("synthetic:4", every=1, data_config=TINY_CONFIG, warn=warnings.append)

    def no_memory(module):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(monitor, "_measure", no_memory)
    assert monitor.step(tiny_vit(), 0) is None
    assert "out of memory at step 0, update skipped" in warnings[0]


def test_tensorboard_scalars_and_histograms_go_to_the_writer_given():
    class Writer:
        def __init__(self):
            self.scalars, self.histograms = {}, []

        def add_scalar(self, tag, value, step):
            self.scalars[tag] = (value, step)

        def add_histogram(self, tag, values, step):
            self.histograms.append(tag)

    writer = Writer()
    phantom = load_model("phantom")
    ArtifactMonitor("synthetic:8", every=3, model=phantom, tensorboard=writer).step(phantom.model, 3)
    assert writer.scalars["artifacts/onset"] == (2, 3)
    assert writer.scalars["artifacts/outlier_fraction/last"][0] > 0
    assert {f"artifacts/outlier_fraction/block_{i}" for i in range(6)} <= set(writer.scalars)
    assert writer.histograms == [f"artifacts/norms/block_{i}" for i in range(6)]


def test_tensorboard_true_without_the_package_says_which_extra(tmp_path, monkeypatch):
    # the test extra installs tensorboard: made unimportable here (None in sys.modules fails the import)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(MonitorSetupError, match=r"artifactscan\[monitor\]"):
        ArtifactMonitor("synthetic:4", every=1, out=tmp_path, tensorboard=True)


# ------------------------------------------------------------------------------------------------ DDP (gloo, CPU)
def _ddp_worker(rank: int, out: str) -> None:
    join_two_rank_group(rank, os.path.join(out, "rendezvous"))
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = DistributedDataParallel(tiny_vit(seed=0, drop_rate=0.1))
    monitor = ArtifactMonitor("synthetic:4", every=2, out=os.path.join(out, "mon"), data_config=TINY_CONFIG)
    returned = []
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(5):
        loss = model(torch.randn(2, 3, 32, 32)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        returned.append(monitor.step(model, step) is not None)
    phantom = load_model("phantom")
    stopping = ArtifactMonitor("synthetic:8", every=3, data_config=phantom.data_config, fail_above=0.001)
    stopped_at = None
    try:
        for step in range(1, 10):
            stopping.step(DistributedDataParallel(phantom.model) if step == 1 else phantom.model, step)
    except ArtifactsAboveThreshold as exc:
        stopped_at = (step, str(exc))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"returned": returned, "stopped_at": stopped_at, "sharded": _sharded_refusals()}, f)
    # DDP's reducers hold the group's communication state: gone, and both ranks done, before the group goes (a
    # reducer destroyed after it, at interpreter exit, aborted rank 1 once: "terminate called without an active
    # exception", SIGABRT).
    del model, opt
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def _sharded_refusals() -> list[str]:
    """What the first call to step() says, on this rank, to a model sharded by torch's FSDP and FSDP2 (real ones,
    on gloo): each rank refuses by itself, no collective, so no rank is left waiting."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    fsdp2 = tiny_vit()
    mesh = init_device_mesh("cpu", (2,))
    for block in fsdp2.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(fsdp2, mesh=mesh)
    refusals = []
    for model in (FullyShardedDataParallel(tiny_vit(), device_id=torch.device("cpu")), fsdp2):
        try:
            ArtifactMonitor("synthetic:4", every=10, data_config=TINY_CONFIG).step(model, 3)
            refusals.append("measured")
        except MonitorSetupError as exc:
            refusals.append(str(exc))
    return refusals


def test_ddp_two_ranks_rank_zero_writes_and_fail_above_stops_both(tmp_path):
    import torch.multiprocessing as tmp_mp

    tmp_mp.spawn(_ddp_worker, args=(str(tmp_path),), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["returned"] == [True, False, True, False, True] and r1["returned"] == [False] * 5
    assert read_monitor(tmp_path / "mon").steps == [0, 2, 4]  # one line per update: rank 0 alone wrote
    assert r0["stopped_at"][0] == r1["stopped_at"][0] == 3
    assert "fail_above" in r1["stopped_at"][1]
    for r in (r0, r1):  # FSDP and FSDP2 refused on every rank at the first call, in one line naming the sharding
        assert [m.split(":")[0] for m in r["sharded"]] == [
            "the model's parameters are sharded (FSDP (FullyShardedDataParallel))",
            "the model's parameters are sharded (FSDP2 (fully_shard))"]


# ------------------------------------------------------------------------------------------------ the command
def test_monitor_command_renders_a_folder_and_report_has_a_section(tmp_path):
    phantom = load_model("phantom")
    monitor = ArtifactMonitor("synthetic:8", every=10, out=tmp_path / "run", model=phantom)
    for step in range(0, 31, 10):
        monitor.step(phantom.model, step)
    runner = CliRunner()
    shown = runner.invoke(app, ["monitor", str(tmp_path / "run"), "--out", str(tmp_path / "fig")])
    assert shown.exit_code == 0, shown.output
    assert "Outliers appear at step 0 (from block 2 of 6)" in " ".join(shown.output.split())
    assert (tmp_path / "fig" / "monitor.png").stat().st_size > 1000
    as_json = runner.invoke(app, ["monitor", str(tmp_path / "run"), "--json"])
    data = json.loads(as_json.stdout)
    assert data["steps"] == [0, 10, 20, 30] and data["onset_step"] == 0 and data["onset_block"] == 2
    assert data["updates"][0]["layers"][2]["outlier_fraction"] > 0
    page = runner.invoke(app, ["report", str(tmp_path / "run"), "--out", str(tmp_path / "page")])
    assert page.exit_code == 0, page.output
    html = (tmp_path / "page" / "report.html").read_text()
    assert "Artifact monitor" in html and "onset step" in html
    missing = runner.invoke(app, ["monitor", str(tmp_path / "nowhere")])
    assert missing.exit_code == 1 and "does not exist" in missing.output and "Traceback" not in missing.output


def test_importing_the_monitor_imports_no_training_framework():
    import subprocess

    code = ("import sys, artifactscan.monitor; "
            "print([m for m in ('lightning', 'transformers', 'accelerate', 'tensorboard') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_live_hugging_face_model_is_measured_with_the_data_config_given():
    transformers = pytest.importorskip("transformers")
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                       intermediate_size=64, image_size=32, patch_size=8)
    model = transformers.Dinov2Model(config)
    with pytest.raises(MonitorSetupError, match="Dinov2Model has no timm data config.*data_config="):
        ArtifactMonitor("synthetic:4", every=1, model=model)
    record = ArtifactMonitor("synthetic:4", every=1, data_config=TINY_CONFIG).step(model, 0)
    assert len(record.layers) == 3 and record.model.num_prefix_tokens == 1 and record.model.grid_size == [4, 4]


def test_ctrl_c_ends_following_as_asked_not_as_an_interrupted_command(tmp_path):
    """`monitor --follow` stops on Ctrl-C by design (exit 0), although the CLI turns a swallowed interrupt into 130
    for every other command."""
    import os
    import signal
    import subprocess
    import sys
    import time

    phantom = load_model("phantom")
    monitor = ArtifactMonitor("synthetic:4", every=10, out=tmp_path / "run", model=phantom)
    monitor.step(phantom.model, 0)
    proc = subprocess.Popen([sys.executable, "-m", "artifactscan", "monitor", str(tmp_path / "run"), "--follow",
                             "--interval", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "120"})
    try:
        deadline = time.monotonic() + 60
        seen = ""
        while "step 0" not in seen and "Outliers" not in seen and time.monotonic() < deadline:
            seen += proc.stdout.readline()
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "interrupted" not in err and "Traceback" not in err
