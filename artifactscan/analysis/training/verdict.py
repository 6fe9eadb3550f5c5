"""train-reg's verdict: the trained variants of a run scanned side by side on held-out images (``compare``), with
their held-out accuracy. Written to the run folder as ``held_out_comparison.json`` (analysis/run_files.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from artifactscan.analysis.compare import CompareReport, compare
from artifactscan.core.defaults import BATCH_SIZE, DEVICE
from artifactscan.core.summaries import MultiModelResult


@dataclass
class TrainRegVerdict(MultiModelResult):
    """train-reg's final comparison: the trained variants scanned side by side on held-out images. The header is
    the comparison's (its models, its images, its verdict as the headline)."""

    # /2: the common header first (core/summaries.py): ``model``, ``headline`` and ``artifactscan_version`` are new,
    # ``images`` is a summary (/1: its description); ``verdict`` is still written for one version, and the
    # comparison inside is a compare/3.
    SCHEMA = "artifactscan.train_reg_verdict/2"
    OLDER_SCHEMAS = ("artifactscan.train_reg_verdict/1",)

    run_dir: str
    comparison: CompareReport
    validation_accuracy: dict[str, float]

    @property
    def verdict(self) -> str:
        """The headline, under its name before schema /2."""
        return self.headline

    @classmethod
    def upgrade(cls, data: dict[str, Any], schema: str) -> dict[str, Any]:
        comparison = CompareReport.upgrade(dict(data["comparison"]), data["comparison"].get("schema", ""))
        data["comparison"] = comparison
        data.update(model=comparison["model"], images=comparison["images"], headline=comparison["headline"])
        data.pop("verdict", None)
        return data

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["comparison"] = self.comparison.to_dict()
        data["verdict"] = self.headline  # the /1 key, kept for one version
        return data


def held_out_images(config: Any) -> str:
    """Images no variant trained on: the built-in validation split, or the data set's held-out folder."""
    if config.data is None:
        return "synthetic:512"
    val = Path(config.data) / "val"
    return str(val) if val.is_dir() else str(config.data)


def verdict_for_run(result: Any, images: Any = None, *, device: str = DEVICE, batch_size: int = BATCH_SIZE,
                    progress: bool = False) -> TrainRegVerdict:
    """Scan every variant of a :class:`~artifactscan.analysis.training.TrainRegResult` and judge what registers did."""
    images = images if images is not None else held_out_images(result.config)
    models = {f"reg{v.registers}": v.checkpoint for v in result.variants}
    comparison = compare(models, images, device=device, batch_size=batch_size, progress=progress)
    if result.config.data is not None and images == str(result.config.data):
        comparison.notes.append(f"{images} has no val/ folder, so the verdict scanned the training images; pass "
                                "--scan-images for held-out ones (norm statistics do not need labels).")
    accuracy = {f"reg{v.registers}": v.val_acc for v in result.variants}
    return TrainRegVerdict(str(result.run_dir), comparison, accuracy, model=comparison.model,
                           images=comparison.images, headline=comparison.headline)
