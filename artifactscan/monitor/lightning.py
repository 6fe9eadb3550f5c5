"""``ArtifactMonitorCallback`` for Lightning: watch artifact tokens emerge inside ``Trainer.fit``.

    from artifactscan.monitor.lightning import ArtifactMonitorCallback
    trainer = lightning.Trainer(callbacks=[ArtifactMonitorCallback(images="val_subset/", every=500)])

A thin layer over :class:`artifactscan.monitor.ArtifactMonitor` (docs/monitor.md): it measures at
``trainer.global_step`` once per optimiser step, logs each update through the trainer's loggers, stops training
through ``trainer.should_stop`` when ``fail_above`` asks (every rank together), and keeps its place in the
Lightning checkpoint so that a resumed run continues the same ``monitor.jsonl``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from artifactscan.monitor.driving import DrivenCallback, MonitorDriver, require_framework, update_metrics

_pl = require_framework("lightning.pytorch", "artifactscan.monitor.lightning")

__all__ = ["ArtifactMonitorCallback"]


class ArtifactMonitorCallback(DrivenCallback, _pl.Callback):
    """Measure the ViT being trained every ``every`` optimiser steps (``trainer.global_step``).

    Args:
        images, every, threshold, fail_above, on_update, tensorboard, data_config, max_images, batch_size, name:
            as :class:`artifactscan.monitor.ArtifactMonitor`.
        out: the folder of ``monitor.jsonl``; default ``<trainer.default_root_dir>/artifacts``.
        module: the ViT inside the LightningModule (a submodule or its dotted name); default: the LightningModule
            itself when the capture layer hooks it, else its first submodule it hooks.
        resume: as the monitor's; a run resumed from a checkpoint continues the file without it.
    """

    def __init__(self, images: Any, every: int = 500, out: str | Path | None = None, *, module: Any = None,
                 **options: Any):
        super().__init__()
        self.driver = MonitorDriver(images, every, out, module, options)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.driver.state_name)

    # ------------------------------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.driver.start(trainer.default_root_dir, trainer.global_step)
        self._measure(trainer, pl_module)  # the weights training starts from (step 0, or the resumed step)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        # With gradient accumulation several batches end at one global step: the driver measures it once.
        self._measure(trainer, pl_module)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.driver.close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.driver.close()  # the folder's lock released now: a resume in this process need not wait for the GC

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.driver.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # -1: no step was handed to the monitor before the checkpoint; every record on file came after it
        last = state_dict.get("last_step")
        self.driver.restored_step = -1 if last is None else int(last)

    # ------------------------------------------------------------------------------------------ one step
    def _measure(self, trainer: Any, pl_module: Any) -> None:
        record = self.driver.measure(pl_module, trainer.global_step)
        if record is not None:  # rank 0 alone gets the update
            # Through the loggers at the global step: pl_module.log would drop the values of steps that do not line
            # up with log_every_n_steps.
            metrics = update_metrics(record)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=record.step)
        if self.driver.stop_reason is not None:  # the decision every rank received from rank 0
            trainer.should_stop = True
