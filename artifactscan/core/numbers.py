"""Numbers as the library's sentences write them (headlines, verdicts): one formatter per kind, shared by analysis/
and render/ (the terminal tables' compact forms are render/table.py's ``num``/``pct``/``ratio``)."""

from __future__ import annotations

import math


def percent(fraction: float | None, digits: int = 2, missing: str | None = None) -> str:
    """``0.0123`` -> ``"1.23%"``. With ``missing``, a ``None`` or non-finite value is written as that text."""
    if missing is not None and (fraction is None or not math.isfinite(fraction)):
        return missing
    return f"{100 * fraction:.{digits}f}%"


def times(x: float | None, missing: str = "n/a") -> str:
    """A ratio with three significant digits: ``12.34`` -> ``"12.3x"``; ``missing`` for ``None`` or non-finite."""
    if x is None or not math.isfinite(x):
        return missing
    return f"{x:.3g}x"
