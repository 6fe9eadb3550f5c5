"""Small real results of every command, computed once per test process (the shipped demo/phantom models on the
built-in synthetic sets and the sample photos): what the table and figure tests render."""

from __future__ import annotations

from functools import lru_cache

from .conftest import SAMPLE_IMAGES


@lru_cache(maxsize=None)
def deep_scan():
    """The default model (24 blocks, outliers from block 9) on 8 synthetic images."""
    from artifactscan import scan

    return scan("phantom-deep", "synthetic:8")


@lru_cache(maxsize=None)
def photo_scan():
    """The 6-block phantom on the sample photos, with three per-image norm maps."""
    from artifactscan import scan

    return scan("phantom", SAMPLE_IMAGES, num_maps=3)


@lru_cache(maxsize=None)
def register_scan():
    """A model with 4 registers: five prefix tokens in every row."""
    from artifactscan import scan

    return scan("demo-reg4", "synthetic:8")


@lru_cache(maxsize=None)
def emergence():
    """``norms RUN_DIR`` over three checkpoints of a 24-block model; the per-block values are the phantom's real
    ones (the first checkpoint before its outliers appeared)."""
    from artifactscan.analysis.emergence import EmergenceGroup, EmergencePoint, EmergenceReport, emergence_headline

    scan = deep_scan()
    blocks = [lay for lay in scan.layers if not lay.is_final_norm]
    points = [EmergencePoint(step, f"step_{step:07d}.safetensors", None if step == 100 else scan.onset_layer,
                             [0.0 if step == 100 else lay.outlier_fraction for lay in blocks],
                             [lay.max_over_median / (3 if step == 100 else 1) for lay in blocks])
              for step in (100, 200, 300)]
    groups = [EmergenceGroup(scan.model.arch or scan.model.name, 0, points)]
    return EmergenceReport("runs/demo-pair", groups, notes=[], model=[scan.model] * len(points), images=scan.images,
                           headline=emergence_headline(groups))


@lru_cache(maxsize=None)
def comparison():
    """Three models, two register counts (so the register-ablation figure is written too)."""
    from artifactscan import compare

    return compare(["demo", "demo-reg4", "phantom"], "synthetic:16")


@lru_cache(maxsize=None)
def probe_result():
    from artifactscan import probe

    return probe("phantom", "synthetic:120", blocks=4)


@lru_cache(maxsize=None)
def attention_result(model: str = "phantom"):
    """Every attention figure: per-image maps (with a --query-patch map) and per-head maps."""
    from artifactscan.analysis.attention_maps import attention_report

    return attention_report(model, SAMPLE_IMAGES, maps=2, heads="all", query_patch=(3, 3))


@lru_cache(maxsize=None)
def fix_result():
    from artifactscan import fix

    return fix("phantom", "synthetic:16")


@lru_cache(maxsize=None)
def discover_result():
    """Two models and the phantom's fix compared (``--compare fix``)."""
    from artifactscan.analysis.discover import discover

    return discover(["demo", "phantom"], "synthetic-objects:16", compare=["fix"], maps=3)


@lru_cache(maxsize=None)
def calibration():
    from artifactscan.analysis.calibrate import calibrate

    return calibrate("demo", gains=[1.5, 10.0], fractions=[1 / 64], num_images=16)
