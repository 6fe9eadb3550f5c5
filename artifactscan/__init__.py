"""artifactscan: find, explain and fix the high-norm artifact tokens of Vision Transformers.

Public API (the CLI is a thin layer over these)::

    from artifactscan import scan, load_model
    report = scan("demo", "sample_images/")        # -> ScanReport dataclass
    print(report.headline); report.to_json()

The code is layered, each package importing only from those below it (docs/architecture.md):
``core`` -> ``inputs`` -> ``models`` -> ``analysis`` -> ``render`` -> ``cli``.

The names below are resolved on first use (PEP 562): ``import artifactscan`` costs torch's import and no more, so the
command line can decide how the expensive rest (timm, torchvision) is imported (core/startup.py).
"""

from __future__ import annotations

import importlib as _importlib
import sys as _sys
from typing import TYPE_CHECKING

from artifactscan.core import thresholds as _thresholds
from artifactscan.core.errors import ArtifactScanError
from artifactscan.core.lazy import lazy_attributes
from artifactscan.core.thresholds import AutoRule
from artifactscan.core.version import __version__

if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
    from artifactscan.analysis.compare import compare
    from artifactscan.analysis.fix import fix
    from artifactscan.analysis.probes import probe
    from artifactscan.analysis.scan import ScanReport, scan
    from artifactscan.models.loading import LoadedModel, builtin_models, load_model

# `artifactscan.thresholds` (documented) is the module at artifactscan/core/thresholds.py, under its old name too.
_sys.modules.setdefault(f"{__name__}.thresholds", _thresholds)
thresholds = _thresholds

_LAZY = {
    "LoadedModel": "artifactscan.models.loading",
    "builtin_models": "artifactscan.models.loading",
    "load_model": "artifactscan.models.loading",
    "ScanReport": "artifactscan.analysis.scan",
    "scan": "artifactscan.analysis.scan",
    "probe": "artifactscan.analysis.probes",
    "compare": "artifactscan.analysis.compare",
    "fix": "artifactscan.analysis.fix",
}

# The documented re-export modules `artifactscan.fix` / `artifactscan.compare` share their names with the functions.
# They are imported here (they resolve their own names lazily, so this is cheap) and the package attributes the import
# set are dropped: `from artifactscan import fix` is then always the function (via __getattr__), whatever the caller
# imported before, and `from artifactscan.fix import fix` finds the module in sys.modules.
for _module in ("compare", "fix"):
    _importlib.import_module(f"{__name__}.{_module}")
    globals().pop(_module, None)
del _module


__getattr__, __dir__ = lazy_attributes(__name__, globals(), _LAZY)

__all__ = ["ArtifactScanError", "AutoRule", "LoadedModel", "ScanReport", "builtin_models", "compare", "fix",
           "load_model", "probe", "scan", "__version__"]
