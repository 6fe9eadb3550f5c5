"""``artifactscan.compare``: models side by side and norms over training, re-exported from
:mod:`artifactscan.analysis.compare`."""

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
