"""``ArtifactMonitorCallback`` for the Hugging Face ``Trainer``: watch artifact tokens emerge inside ``train()``.

    from artifactscan.monitor.hf import ArtifactMonitorCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[ArtifactMonitorCallback(images="val_subset/", every=500, data_config=cfg)])

A thin layer over :class:`artifactscan.monitor.ArtifactMonitor` (docs/monitor.md). It measures the ``model`` the
Trainer hands ``on_step_end`` (at ``state.global_step``, once per optimiser step). A callback gets no reference to
the Trainer and runs after the reporting integrations, so it logs through its own TensorBoard writer under the run's
output folder (``<output_dir>/artifacts/tensorboard``), or through ``trainer.log`` of a Trainer passed to
:meth:`ArtifactMonitorCallback.attach`. ``fail_above`` sets ``control.should_training_stop`` on every rank together.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

from artifactscan.analysis.monitor_setup import MonitorSetupError
from artifactscan.monitor.driving import DrivenCallback, MonitorDriver, require_framework, update_metrics

_callbacks = require_framework("transformers.trainer_callback", "artifactscan.monitor.hf")

__all__ = ["ArtifactMonitorCallback"]

# The callbacks of this process by their state name. The Trainer restores an ExportableState by calling the class
# with the arguments its state() saved (JSON in trainer_state.json): a probe tensor, on_update or a writer cannot
# travel that way, so the saved argument is the name, and the call returns the user's own instance.
_live: "weakref.WeakValueDictionary[str, ArtifactMonitorCallback]" = weakref.WeakValueDictionary()


class ArtifactMonitorCallback(DrivenCallback, _callbacks.TrainerCallback, _callbacks.ExportableState):
    """Measure the model being trained every ``every`` optimiser steps (``state.global_step``).

    Args:
        images, every, threshold, fail_above, on_update, data_config, max_images, batch_size, name: as
            :class:`artifactscan.monitor.ArtifactMonitor` (a live Hugging Face model needs ``data_config``).
        out: the folder of ``monitor.jsonl``; default ``<args.output_dir>/artifacts``.
        trainer: a Trainer whose ``log`` receives each update's scalars (its reporting integrations then see them).
        tensorboard: True, False or a SummaryWriter; default True without ``trainer`` (the callback's own writer
            under ``out/tensorboard``), False with it.
        module: the ViT inside the model (a submodule or its dotted name); default the model or its first
            submodule the capture layer hooks.
        resume: as the monitor's; a run resumed from a checkpoint continues the file without it.
    """

    def __new__(cls, *args: Any, state_name: str | None = None, **kwargs: Any) -> "ArtifactMonitorCallback":
        if state_name is None:
            return super().__new__(cls)
        if state_name not in _live:
            raise MonitorSetupError(f"the checkpoint holds the state of an artifact monitor ({state_name}) that "
                                    "this run's callbacks do not have: pass the same every= and out= as the run "
                                    "resumed")
        return _live[state_name]

    def __init__(self, images: Any = None, every: int = 500, out: str | Path | None = None, *,
                 trainer: Any = None, tensorboard: Any = None, module: Any = None, state_name: str | None = None,
                 **options: Any):
        if state_name is not None:  # the Trainer restoring this instance's state (__new__ returned it)
            return
        if images is None:
            raise MonitorSetupError("ArtifactMonitorCallback needs images= (the probe set)")
        self.trainer = trainer
        options["tensorboard"] = trainer is None if tensorboard is None else tensorboard
        self.driver = MonitorDriver(images, every, out, module, options)
        _live[self.driver.state_name] = self

    def attach(self, trainer: Any) -> "ArtifactMonitorCallback":
        """Log each update through ``trainer.log`` (a callback is not given the Trainer)."""
        self.trainer = trainer
        return self

    # ------------------------------------------------------------------------------------------ ExportableState
    def state(self) -> dict[str, Any]:
        return {"args": {"state_name": self.driver.state_name}, "attributes": {"restored_step": self.driver.last_step}}

    @property
    def restored_step(self) -> int | None:
        return self.driver.restored_step

    @restored_step.setter
    def restored_step(self, step: int | None) -> None:
        # -1: no step was handed to the monitor before the checkpoint; every record on file came after it
        self.driver.restored_step = -1 if step is None else int(step)

    # ------------------------------------------------------------------------------------------ hooks
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.driver.start(args.output_dir, state.global_step)
        self._measure(state, control, model)  # the weights training starts from (step 0, or the resumed step)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._measure(state, control, model)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.driver.close()

    def _measure(self, state: Any, control: Any, model: Any) -> None:
        record = self.driver.measure(model, state.global_step)
        if record is not None and self.trainer is not None:  # rank 0 alone gets the update
            self.trainer.log(update_metrics(record))
        if self.driver.stop_reason is not None:  # the decision every rank received from rank 0
            control.should_training_stop = True
