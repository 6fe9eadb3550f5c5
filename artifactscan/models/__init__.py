"""Layer 3, models: the checkpoint format, loading, the registry of what the loader can build, the shipped models.

The built-in registrants are imported here, so they have registered with :mod:`artifactscan.models.registry` before
any module of this package is used, whatever the caller imported first.
"""

from artifactscan.models.layouts import hf_vision, timm_vit  # noqa: F401  (they register their hook families)
from artifactscan.models.layouts import naflex  # noqa: F401  (NaFlex hook families: SigLIP2, timm NaFlexVit)
from artifactscan.models.layouts import table  # noqa: F401  (every family's layouts, architectures, known sizes)
from artifactscan.models import demo, hf, phantom, interventions  # noqa: F401  (they register themselves)
