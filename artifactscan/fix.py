"""``artifactscan.fix``: the training-free repair, re-exported from :mod:`artifactscan.analysis.fix`.

Names are resolved on first use (the package imports this module early; see artifactscan/__init__.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from artifactscan.core.lazy import lazy_attributes

if TYPE_CHECKING:
    from artifactscan.analysis.fix import FixReport, find_register_neurons, fix
    from artifactscan.models.interventions import RegisterNeuron, TestTimeRegister, apply_test_time_register

_FIX, _TTR = "artifactscan.analysis.fix", "artifactscan.models.interventions"
_SOURCES = {"FixReport": _FIX, "find_register_neurons": _FIX, "fix": _FIX,
            "RegisterNeuron": _TTR, "TestTimeRegister": _TTR, "apply_test_time_register": _TTR}
__all__ = sorted(_SOURCES)
__getattr__, __dir__ = lazy_attributes(__name__, globals(), _SOURCES)
