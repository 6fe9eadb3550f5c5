"""``artifactscan.compare``: models side by side and norms over training, re-exported from
:mod:`artifactscan.analysis.compare`, :mod:`artifactscan.analysis.emergence` and
:mod:`artifactscan.analysis.training.verdict`.

Names are resolved on first use (the package imports this module early; see artifactscan/__init__.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from artifactscan.core.lazy import lazy_attributes

if TYPE_CHECKING:
    from artifactscan.analysis.compare import CompareReport, ModelRow, compare
    from artifactscan.analysis.emergence import EmergenceGroup, EmergencePoint, EmergenceReport, scan_run
    from artifactscan.analysis.training.verdict import TrainRegVerdict, verdict_for_run

__all__ = ["CompareReport", "EmergenceGroup", "EmergencePoint", "EmergenceReport", "ModelRow", "TrainRegVerdict",
           "compare", "scan_run", "verdict_for_run"]
_SOURCES = {**dict.fromkeys(("CompareReport", "ModelRow", "compare"), "artifactscan.analysis.compare"),
            **dict.fromkeys(("EmergenceGroup", "EmergencePoint", "EmergenceReport", "scan_run"),
                            "artifactscan.analysis.emergence"),
            **dict.fromkeys(("TrainRegVerdict", "verdict_for_run"), "artifactscan.analysis.training.verdict")}
__getattr__, __dir__ = lazy_attributes(__name__, globals(), _SOURCES)
