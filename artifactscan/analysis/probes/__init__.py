"""``probe()``: do the flagged high-norm tokens behave like the paper's artifacts, or like content?

:mod:`.types` holds the protocol constants and result types, :mod:`.sampling` the early exit and the streaming token
sample, :mod:`.ridge` the closed-form probes' fitting, :mod:`.verdict` the decision and :mod:`.probes` ``probe()``
itself. Rendering and files are in :mod:`artifactscan.render`.
"""

from artifactscan.analysis.probes.probes import probe
from artifactscan.analysis.probes.ridge import RidgeFit, fit_ridge
from artifactscan.analysis.probes.sampling import LayerTap, neighbour_similarity, patchify, resolve_layer
from artifactscan.analysis.probes.types import (
    DEFAULT_PROBE_IMAGES,
    GLOBAL_DRAWS,
    MIN_GLOBAL_IMAGES,
    MIN_LOCAL_TOKENS,
    PROTOCOL,
    SCHEMA,
    TEST_FRACTION,
    LabelInfo,
    NeighbourHistogram,
    ProbeReport,
    TokenTypeRow,
    Verdict,
    load_probe_report,
)

__all__ = ["DEFAULT_PROBE_IMAGES", "GLOBAL_DRAWS", "LabelInfo", "LayerTap", "MIN_GLOBAL_IMAGES", "MIN_LOCAL_TOKENS",
           "NeighbourHistogram", "PROTOCOL", "ProbeReport", "RidgeFit", "SCHEMA", "TEST_FRACTION", "TokenTypeRow",
           "Verdict", "fit_ridge", "load_probe_report", "neighbour_similarity", "patchify", "probe", "resolve_layer"]
