"""artifactscan: find, explain and fix the high-norm artifact tokens of Vision Transformers.

Public API (the CLI is a thin layer over these)::

    from artifactscan import scan, load_model
    report = scan("demo", "sample_images/")        # -> ScanReport dataclass
    print(report.headline); report.to_json()

The code is layered, each package importing only from those below it (docs/architecture.md):
``core`` -> ``inputs`` -> ``models`` -> ``analysis`` -> ``render`` -> ``cli``.
"""

import sys as _sys

from artifactscan.core import thresholds as _thresholds  # noqa: E402
from artifactscan.core.version import __version__  # noqa: E402
from artifactscan.core.errors import ArtifactScanError  # noqa: E402
from artifactscan.core.thresholds import AutoRule  # noqa: E402
from artifactscan.models.loading import LoadedModel, builtin_models, load_model  # noqa: E402
from artifactscan.analysis.scan import ScanReport, scan  # noqa: E402
from artifactscan.analysis.probes import probe  # noqa: E402

# `artifactscan.thresholds` (documented) is the module now at artifactscan/core/thresholds.py, under its old name too.
_sys.modules.setdefault(f"{__name__}.thresholds", _thresholds)
thresholds = _thresholds

# The documented re-export modules `artifactscan.fix` / `artifactscan.compare` share their names with the functions.
# Loading them here, once, means a later `import artifactscan.fix` finds them loaded and does not rebind the package
# attribute: `from artifactscan import fix` stays the function, whatever was imported before.
import artifactscan.compare as _compare_module  # noqa: E402,F401
import artifactscan.fix as _fix_module  # noqa: E402,F401
from artifactscan.analysis.compare import compare  # noqa: E402,F811
from artifactscan.analysis.fix import fix  # noqa: E402,F811

__all__ = ["ArtifactScanError", "AutoRule", "LoadedModel", "ScanReport", "builtin_models", "compare", "fix",
           "load_model", "probe", "scan", "__version__"]
