"""What the Lightning and Hugging Face Trainer callbacks share: one :class:`ArtifactMonitor` driven by a framework's
step counter.

The callbacks are thin: they say *when* (the framework's global step, once per optimiser step), *on what* (the ViT
inside the module the framework hands them) and *how a stop is asked for* (``trainer.should_stop``,
``control.should_training_stop``). :class:`MonitorDriver` does the rest: the monitor built once its output folder is
known, each step measured at most once (with gradient accumulation a framework reports the same step several
times), the monitor file continued on resume, the shared stop decision turned from an exception into a flag.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from torch import nn

from artifactscan.analysis.monitor import ArtifactMonitor, ArtifactsAboveThreshold
from artifactscan.analysis.monitor_records import MonitorUpdate
from artifactscan.analysis.monitor_setup import MonitorSetupError
from artifactscan.models.hooks import vit_inside

__all__ = ["DrivenCallback", "FrameworkMissingError", "MonitorDriver", "require_framework", "update_metrics", "vit_inside"]


class FrameworkMissingError(MonitorSetupError, ImportError):
    """An adapter imported without its training framework (an ``ImportError`` too, for ``except ImportError``)."""


def require_framework(module: str, adapter: str) -> Any:
    """``module`` imported, or one line naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise FrameworkMissingError(f"{adapter} needs the {module.split('.')[0]} package: pip install "
                                    f"'artifactscan[monitor]'") from None


def update_metrics(record: MonitorUpdate) -> dict[str, float]:
    """The scalars of one update for a framework's loggers, named as the monitor's TensorBoard tags."""
    metrics = {f"artifacts/outlier_fraction/block_{lay.index}": float(lay.outlier_fraction) for lay in record.layers}
    metrics["artifacts/outlier_fraction/last"] = float(record.last_block.outlier_fraction)
    # -1: no block holds outliers (a scalar series cannot hold "none"), as in the monitor's own TensorBoard tags
    metrics["artifacts/onset"] = float(-1 if record.onset_layer is None else record.onset_layer)
    return metrics


class DrivenCallback:
    """What both framework callbacks expose of their :class:`MonitorDriver` (``self.driver``)."""

    driver: "MonitorDriver"

    @property
    def monitor(self):
        """The :class:`ArtifactMonitor` (its ``records`` hold this process's updates)."""
        return self.driver.monitor

    @property
    def stop_reason(self) -> str | None:
        """Why the callback stopped training (``fail_above``), else None."""
        return self.driver.stop_reason


class MonitorDriver:
    """One :class:`ArtifactMonitor` as a callback drives it. ``out=None``: the folder is the run's own, known only
    when training starts (:meth:`start`); the options are checked at construction all the same."""

    def __init__(self, images: Any, every: int, out: str | Path | None, module: str | nn.Module | None,
                 options: dict[str, Any]):
        self.images, self.every, self.out, self.module, self.options = images, every, out, module, options
        # Built now so that bad options fail at construction; rebuilt by start() when the folder comes from the run.
        held = {k: v for k, v in options.items() if k != "tensorboard"} if out is None else options
        self.monitor = ArtifactMonitor(images, every, out, **held)
        self.started = False
        self.last_step: int | None = None  # the last step handed to the monitor (measured or not)
        self.restored_step: int | None = None  # last_step as a checkpoint kept it (set before start on resume)
        self.stop_reason: str | None = None
        self._vit: tuple[int, nn.Module] | None = None

    @property
    def state_name(self) -> str:
        """Tells the instances of one run apart (two monitors with other folders or cadences)."""
        return f"every={self.every}, out={None if self.out is None else str(self.out)}"

    def start(self, run_folder: str | Path, resumed_at: int) -> None:
        """Training starts at step ``resumed_at`` (0 for a fresh run). A resumed run continues ``monitor.jsonl``: the
        records of steps after the last one measured before the checkpoint go (the killed run measured them after
        it), or, when the checkpoint kept no state of this callback, those from the resumed step on."""
        if self.started:
            return
        self.started = True
        if self.out is None:
            self.monitor = ArtifactMonitor(self.images, self.every, Path(run_folder) / "artifacts", **self.options)
        if self.restored_step is not None:
            self.last_step = self.restored_step
            self.monitor.resume = self.restored_step
        elif resumed_at > 0 and self.monitor.resume is False:
            self.monitor.resume = resumed_at - 1

    def measure(self, model: Any, step: int) -> MonitorUpdate | None:
        """Hand ``step`` to the monitor once (every rank calls this at the same steps; rank 0 gets the update). A
        stop asked for by ``fail_above`` (the decision every rank shares) sets :attr:`stop_reason`."""
        if self.last_step is not None and step <= self.last_step:
            return None
        self.last_step = step
        try:
            return self.monitor.step(self._the_vit(model), step)
        except ArtifactsAboveThreshold as exc:
            self.stop_reason = str(exc)
            print(f"artifactscan: stopping training: {exc}", file=sys.stderr)
            return exc.record

    def _the_vit(self, model: Any) -> nn.Module:
        if self._vit is None or self._vit[0] != id(model):  # searched once per model object, not every step
            self._vit = (id(model), vit_inside(model, self.module))
        return self._vit[1]

    def close(self) -> None:
        self.monitor.close()
