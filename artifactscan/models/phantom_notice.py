"""What every output of a calibration-phantom result says about it: that its artifacts were built in by
construction, so its findings check artifactscan and say nothing about real models.

One module for the wording, at every length an output needs it (the model's note, the headline's tag, a figure
title's tag, the HTML report's banner, the terminal panel's title), so that no output words it its own way.
"""

from __future__ import annotations

from typing import Any

#: The phantom's note (the first of a loaded phantom's notes; its checkpoint description; a report's
#: ``model.calibration_note``).
PHANTOM_NOTE = (
    "CALIBRATION PHANTOM: its artifact tokens were built in by construction (README: 'The calibration phantom'); "
    "its findings say nothing about real models."
)

#: Leads the headline of a result on the phantom (scan, discover).
PHANTOM_HEADLINE_TAG = "[CALIBRATION PHANTOM - artifacts built in by construction, not a finding about real models]"

#: Appended to the title of every figure of a calibration-phantom report.
PHANTOM_TAG = "calibration phantom (artifacts built in)"

#: The title of the terminal's panel that shows :data:`PHANTOM_NOTE`, and the HTML report's badge.
PHANTOM_TITLE = "calibration phantom"

#: The HTML report's banner; ``which`` says how many of its results are on the phantom.
PHANTOM_BANNER = (
    "Calibration phantom. {which} from the calibration phantom: a small ViT whose high-norm artifact tokens were "
    "built in by construction, so the right answer is known. Its findings check that artifactscan works; they are "
    "not findings about real models."
)

#: What ``artifactscan report`` prints when its page includes phantom results.
PHANTOM_REPORT_NOTE = ("includes calibration-phantom results (artifacts built in by construction); the page says so "
                       "at the top.")


def is_phantom(result: Any) -> bool:
    """Whether a result (anything with a ``model`` summary) is about the calibration phantom."""
    return getattr(getattr(result, "model", None), "kind", None) == "phantom"
