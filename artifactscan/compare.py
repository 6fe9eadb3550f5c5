"""``artifactscan.compare``: models side by side and norms over training, re-exported from
:mod:`artifactscan.analysis.compare`.

Names are resolved on first use (the package imports this module early; see artifactscan/__init__.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from artifactscan.core.lazy import lazy_attributes

if TYPE_CHECKING:
    from artifactscan.analysis.compare import (
        CompareReport,
        EmergenceGroup,
        EmergencePoint,
        EmergenceReport,
        ModelRow,
        TrainRegVerdict,
        compare,
        scan_run,
        verdict_for_run,
    )

__all__ = ["CompareReport", "EmergenceGroup", "EmergencePoint", "EmergenceReport", "ModelRow", "TrainRegVerdict",
           "compare", "scan_run", "verdict_for_run"]
__getattr__, __dir__ = lazy_attributes(__name__, globals(), dict.fromkeys(__all__, "artifactscan.analysis.compare"))
