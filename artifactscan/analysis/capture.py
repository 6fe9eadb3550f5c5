"""Per-block token norms of the residual stream, for the measurements of this layer.

The hooks live one layer down, in :mod:`artifactscan.models.capture`, because building the calibration phantom
(a model) already needs them; measurements import them from here.
"""

from artifactscan.models.capture import NormCapture, row_names

__all__ = ["NormCapture", "row_names"]
