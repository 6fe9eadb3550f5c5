"""artifactscan: find, explain and fix the high-norm artifact tokens of Vision Transformers.

Public API (the CLI is a thin layer over these)::

    from artifactscan import scan, load_model
    report = scan("demo", "sample_images/")        # -> ScanReport dataclass
    print(report.headline); report.to_json()
"""

__version__ = "0.1.0"

from .errors import ArtifactScanError  # noqa: E402
from .loading import LoadedModel, builtin_models, load_model  # noqa: E402
from .scan import ScanReport, scan  # noqa: E402
from .thresholds import AutoRule  # noqa: E402

__all__ = ["ArtifactScanError", "AutoRule", "LoadedModel", "ScanReport", "builtin_models", "load_model", "scan",
           "__version__"]
