"""Two-rank CPU (gloo) training runs with the monitor's callbacks, each started by tests/test_monitor_ddp.py in a
subprocess it can time out (a hang must fail a test, not stall the suite):

    python tests/monitor_ddp_runs.py lightning OUT       # Lightning launches the second rank itself (strategy="ddp")
    torchrun --standalone --nproc_per_node 2 tests/monitor_ddp_runs.py hf OUT

Both train a tiny ViT whose loss turns NaN at step 3 (a diverging run: the weights are NaN from step 4 on) with
``every=2`` and ``fail_above``: the monitor measures steps 0, 2 and 4 on rank 0, and the update of step 4 (NaN norms)
must stop both ranks there. Each rank writes ``OUT/rank{R}.json``: its global step at the end, why it stopped, and
the steps its own monitor measured.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

TINY_CONFIG = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
               "interpolation": "bilinear", "crop_pct": 1.0}
DIVERGES_AT = 3  # the step whose loss is NaN
MAX_STEPS = 10  # where training would end without the monitor's stop


def _tiny_vit() -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=3, num_heads=2, num_classes=5)


def _report(out: Path, rank: int, global_step: int, callback) -> None:
    (out / f"rank{rank}.json").write_text(json.dumps({
        "global_step": global_step, "stop_reason": callback.stop_reason,
        "measured": [r.step for r in callback.monitor.records]}))


def lightning_run(out: Path) -> None:
    import lightning.pytorch as pl

    from artifactscan.monitor.lightning import ArtifactMonitorCallback

    class Classifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.backbone = _tiny_vit()

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.cross_entropy(self.backbone(x), y)
            return loss * float("nan") if self.global_step == DIVERGES_AT else loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 5, (64,),
                                                                                                generator=g))
    callback = ArtifactMonitorCallback("synthetic:4", every=2, out=out / "mon", data_config=TINY_CONFIG,
                                       fail_above=0.5)
    trainer = pl.Trainer(max_steps=MAX_STEPS, accelerator="cpu", devices=2, strategy="ddp", default_root_dir=out,
                         callbacks=[callback], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(Classifier(), torch.utils.data.DataLoader(data, batch_size=4))
    _report(out, trainer.global_rank, trainer.global_step, callback)


def hf_run(out: Path) -> None:
    import transformers

    from artifactscan.monitor.hf import ArtifactMonitorCallback

    class DivergingTrainer(transformers.Trainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            return loss * float("nan") if self.state.global_step == DIVERGES_AT else loss

    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                    intermediate_size=64, image_size=32, patch_size=8, num_labels=5)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config)
    g = torch.Generator().manual_seed(0)
    data = [{"pixel_values": torch.randn(3, 32, 32, generator=g), "labels": i % 5} for i in range(64)]
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=MAX_STEPS, per_device_train_batch_size=4, save_strategy="no", report_to=[],
        use_cpu=True, dataloader_num_workers=0, logging_steps=100, disable_tqdm=True, ddp_backend="gloo")
    callback = ArtifactMonitorCallback("synthetic:4", every=2, data_config=TINY_CONFIG, fail_above=0.5)
    trainer = DivergingTrainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    _report(out, args.process_index, trainer.state.global_step, callback)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's artifactscan in every rank
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    {"lightning": lightning_run, "hf": hf_run}[sys.argv[1]](Path(sys.argv[2]))
