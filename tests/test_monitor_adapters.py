"""The monitor's Lightning and Hugging Face Trainer callbacks, run inside a real Trainer.fit / Trainer.train on tiny
CPU models: an update per optimiser step at the cadence, the loggers fed, the shared stop honoured, and a run
resumed from a checkpoint continuing the same monitor.jsonl."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from artifactscan.monitor import read_monitor

from .conftest import TINY, tiny_vit

TINY_CONFIG = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
               "interpolation": "bilinear", "crop_pct": 1.0}


# ------------------------------------------------------------------------------------------------ Lightning
def _lightning_run(root: Path, max_steps: int, callback, ckpt_path: str | None = None, **trainer_options):
    pl = pytest.importorskip("lightning.pytorch")

    class Classifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.backbone = tiny_vit(seed=0, drop_rate=0.1)  # the ViT inside: found by the callback

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.backbone(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 3, 32, 32, generator=g),
                                          torch.randint(0, TINY["num_classes"], (64,), generator=g))
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2, save_top_k=-1,
                                               filename="{step}")
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, default_root_dir=root,
                         callbacks=[callback, checkpoints], logger=pl.loggers.CSVLogger(root, name="logs"),
                         enable_progress_bar=False, enable_model_summary=False, **trainer_options)
    trainer.fit(Classifier(), torch.utils.data.DataLoader(data, batch_size=4), ckpt_path=ckpt_path)
    return trainer


def test_lightning_fit_measures_each_optimiser_step_once_and_logs_through_the_loggers(tmp_path):
    from artifactscan.monitor.lightning import ArtifactMonitorCallback

    callback = ArtifactMonitorCallback("synthetic:4", every=2, data_config=TINY_CONFIG)
    # two batches per optimiser step: each global step comes round twice and is measured once
    trainer = _lightning_run(tmp_path, 5, callback, accumulate_grad_batches=2)
    assert trainer.global_step == 5
    history = read_monitor(tmp_path / "artifacts")  # out defaults to the run's root folder
    assert history.steps == [0, 2, 4] and len(history.outlier_fraction[0]) == TINY["depth"]
    with open(trainer.logger.log_dir + "/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("artifacts/outlier_fraction/last")]
    assert [int(r["step"]) for r in rows] == [0, 2, 4]
    assert {f"artifacts/outlier_fraction/block_{i}" for i in range(TINY["depth"])} <= set(rows[0])


def test_lightning_resume_continues_the_monitor_file_from_the_checkpoint(tmp_path):
    from artifactscan.monitor.lightning import ArtifactMonitorCallback

    first = ArtifactMonitorCallback("synthetic:4", every=2, out=tmp_path / "mon", data_config=TINY_CONFIG)
    _lightning_run(tmp_path, 6, first)  # checkpoints at steps 2, 4, 6; the monitor measured 0, 2, 4, 6
    ckpt = tmp_path / "ckpt" / "step=4.ckpt"
    saved = torch.load(ckpt, weights_only=False)["callbacks"]
    assert saved[first.state_key] == {"last_step": 4}  # its own key: another instance would keep its own state
    # the run killed after step 6, resumed from the step-4 checkpoint: step 6 is measured again, not twice on file
    resumed = ArtifactMonitorCallback("synthetic:4", every=2, out=tmp_path / "mon", data_config=TINY_CONFIG)
    _lightning_run(tmp_path, 8, resumed, ckpt_path=str(ckpt))
    assert read_monitor(tmp_path / "mon").steps == [0, 2, 4, 6, 8]
    assert [r.step for r in resumed.monitor.records] == [6, 8]


def test_lightning_callbacks_keep_their_state_under_keys_of_their_own(tmp_path):
    pytest.importorskip("lightning.pytorch")
    from artifactscan.monitor.lightning import ArtifactMonitorCallback

    keys = {ArtifactMonitorCallback("synthetic:4", every=every, out=out, data_config=TINY_CONFIG).state_key
            for every, out in ((2, tmp_path / "a"), (2, tmp_path / "b"), (5, tmp_path / "a"), (5, None))}
    assert len(keys) == 4 and all(key.startswith("ArtifactMonitorCallback") for key in keys)


def test_lightning_fail_above_stops_training_gracefully(tmp_path):
    from artifactscan.monitor.lightning import ArtifactMonitorCallback

    # a fixed threshold far below every token norm: every patch token is an outlier, conclusively
    callback = ArtifactMonitorCallback("synthetic:4", every=3, data_config=TINY_CONFIG, threshold=1e-3,
                                       fail_above=0.5, module="backbone")
    trainer = _lightning_run(tmp_path, 20, callback)
    assert trainer.global_step == 0  # the update at the start of training stopped it before the first step
    assert "above fail_above=0.5" in callback.stop_reason
    assert read_monitor(tmp_path / "artifacts").steps == [0]


# ------------------------------------------------------------------------------------------------ HF Trainer
def _hf_run(out: Path, max_steps: int, callback, resume: str | None = None, attach: bool = False):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                    intermediate_size=64, image_size=32, patch_size=8, num_labels=5)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config)
    g = torch.Generator().manual_seed(0)
    data = [{"pixel_values": torch.randn(3, 32, 32, generator=g), "labels": i % 5} for i in range(32)]
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, save_steps=2, report_to=[],
        use_cpu=True, dataloader_num_workers=0, logging_steps=100, restore_callback_states_from_checkpoint=True,
        disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    if attach:
        callback.attach(trainer)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_hf_trainer_measures_logs_to_its_own_writer_and_resume_continues_the_file(tmp_path):
    pytest.importorskip("tensorboard")
    from artifactscan.monitor.hf import ArtifactMonitorCallback

    callback = ArtifactMonitorCallback("synthetic:4", every=2, data_config=TINY_CONFIG)
    _hf_run(tmp_path, 6, callback)
    assert read_monitor(tmp_path / "artifacts").steps == [0, 2, 4, 6]  # under the run's output folder
    assert list((tmp_path / "artifacts" / "tensorboard").glob("events.out.tfevents.*"))
    # the run resumed from its step-4 checkpoint (killed after step 6): the file goes on, step 6 measured again
    resumed = ArtifactMonitorCallback("synthetic:4", every=2, data_config=TINY_CONFIG)
    trainer = _hf_run(tmp_path, 8, resumed, resume=str(tmp_path / "checkpoint-4"))
    assert resumed in trainer.callback_handler.callbacks  # restored in place, not replaced by a copy
    assert resumed.restored_step == 4
    assert read_monitor(tmp_path / "artifacts").steps == [0, 2, 4, 6, 8]
    assert [r.step for r in resumed.monitor.records] == [6, 8]


def test_hf_trainer_logs_through_a_trainer_and_stops_through_control(tmp_path):
    from artifactscan.monitor.hf import ArtifactMonitorCallback

    callback = ArtifactMonitorCallback("synthetic:4", every=2, data_config=TINY_CONFIG, threshold=1e-3,
                                       fail_above=0.5, tensorboard=False)
    trainer = _hf_run(tmp_path, 10, callback, attach=True)
    assert trainer.state.global_step == 1  # the step-0 update stopped it at the end of the first step
    assert "above fail_above=0.5" in callback.stop_reason
    logged = [entry for entry in trainer.state.log_history if "artifacts/onset" in entry]
    assert [entry["step"] for entry in logged] == [0]
    assert logged[0]["artifacts/outlier_fraction/last"] == 1.0 and logged[0]["artifacts/onset"] == 0


# ------------------------------------------------------------------------------------------------ without them
@pytest.mark.parametrize("adapter, package", [("lightning", "lightning"), ("hf", "transformers")])
def test_an_adapter_without_its_framework_says_which_extra_to_install(adapter, package):
    code = (f"import sys; sys.modules['{package}'] = None\n"  # the package made unimportable
            f"import artifactscan.monitor.{adapter}")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert f"needs the {package} package: pip install 'artifactscan[monitor]'" in last
