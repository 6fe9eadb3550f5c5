"""The calibration phantom's rules, without timm: its settings and their limits (the redundancy score that picks the
planted patches is :func:`artifactscan.core.patch_grid.neighbour_similarity`, which the probes read too). Shared by the phantom's architecture (:mod:`.phantom_vit`, which needs timm) and its builder
(:mod:`.phantom`, which must import without timm so that ``import artifactscan`` stays cheap: core/lazy.py)."""

from __future__ import annotations

import math

from artifactscan.core.errors import InputError, option

ARCH = "artifactscan_phantom_vit"
MAX_FRACTION = 0.02  # the shipped phantoms: the paper's ~2% of patch tokens
CALIBRATION_MAX_FRACTION = 0.08  # calibration builds (artifactscan calibrate) may plant up to 8% of patches
PHANTOM_KWARGS = ("phantom_onset", "phantom_fraction", "phantom_units", "phantom_gain", "phantom_beta")


def planted_count(num_patches: int, fraction: float) -> int:
    return max(1, int(math.floor(fraction * num_patches + 1e-9)))


def validate_settings(depth: int, onset: int, fraction: float, units: int, gain_over_median: float = 25.0, *,
                      fraction_option: str = "fraction", gain_option: str = "gain_over_median") -> None:
    """Refuse settings no phantom can be built with; the messages name the caller's options (:func:`option`:
    ``build_phantom`` has ``fraction`` / ``gain_over_median``, ``calibrate`` the lists ``fractions`` / ``gains``)."""
    if not 0 <= onset < depth:
        raise InputError(f"{option('onset', onset)} is outside the model: choose a block from 0 to {depth - 1}")
    if not 0 < fraction <= CALIBRATION_MAX_FRACTION:
        raise InputError(f"{option(fraction_option, f'{fraction:g}')} is outside (0, {CALIBRATION_MAX_FRACTION:g}]: "
                         "the paper's artifacts are about 2% of patch tokens; a phantom plants at most "
                         f"{CALIBRATION_MAX_FRACTION:.0%}")
    if units < 1:
        raise InputError(f"{option('units', units)} must be at least 1")
    if not (math.isfinite(gain_over_median) and gain_over_median > 1):
        raise InputError(f"{option(gain_option, f'{gain_over_median:g}')} must be above 1: planted tokens are "
                         "written at gain x the baseline's median patch norm, so a gain <= 1 plants nothing above the bulk")
