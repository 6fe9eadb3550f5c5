"""The instrument's detection limit, measured: phantoms over a grid of strengths and shares, scanned with the rule.

``artifactscan calibrate`` builds one calibration phantom per cell of a grid (planting gain x share of patches),
scans each on built-in synthetic images with the current threshold rule (one captured forward pass per phantom; each
block's patch norms binned and thresholded exactly as ``artifactscan norms`` does), and compares what was flagged
with what was planted. Each cell reports what a user would *read* in a scan — the measured ratio of the planted tokens' median norm
to the bulk's median (at the weakest block from the onset on), not the gain parameter — with precision, recall and
the onset error. The result states where the instrument goes blind ("below 2.5x the bulk ...").

Everything here is a fact about the phantom's construction (one mechanism, one baseline); it bounds what the rule can
see, not what real models contain.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch

from artifactscan.core.errors import InputError, NonFiniteError, option
from artifactscan.core.summaries import ImageSummary, ModelSummary, MultiModelResult
from artifactscan.core.stats import bin_index
from artifactscan.core.thresholds import AutoRule, threshold_norms
from artifactscan.inputs.synthetic import SyntheticShapes
from artifactscan.models.capture import NormCapture
from artifactscan.models.loading import wrap_module
from artifactscan.models.phantom import (baseline_medians, build_phantom, ground_truth, load_baseline, planted_count,
                                         validate_settings)

# /2: the common header first (core/summaries.py): ``model`` (the phantoms' summaries, one per cell) and
# ``artifactscan_version`` are new, ``images`` is a summary (/1: ``synthetic:N``; ``num_images`` is kept).
SCHEMA = "artifactscan.calibration/2"
OLDER_SCHEMAS = ("artifactscan.calibration/1",)
DEFAULT_GAINS = (1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 10.0)
DEFAULT_FRACTIONS = (1 / 64, 4 / 64)  # 1 and 4 of the demo's 64 patches: 1.56% (the shipped phantom's) and 6.25%


@dataclass
class CalibrationCell:
    """One phantom of the grid and what the scan made of it (metrics over the blocks; the final norm row is not a
    block). ``ratio`` is the weakest block's planted-median / bulk-median from the onset on."""

    gain: float
    fraction: float
    planted_per_image: int
    planted_share: float  # planted_per_image / patches per image: what the layer actually holds
    ratio: float
    ratio_at_onset: float
    precision: float
    recall: float
    detected_onset: int | None
    onset_error: int | None
    blocks_detected: int
    blocks_planted: int
    block_ratios: list[float] = field(default_factory=list)  # per block from the onset on
    block_recalls: list[float] = field(default_factory=list)

    @property
    def found(self) -> bool:
        return self.recall >= 0.95 and self.precision >= 0.95 and self.onset_error == 0


@dataclass
class CalibrationReport(MultiModelResult):
    """A detection-limit study (``artifactscan calibrate``); serialises to ``calibration.json``. ``model`` lists
    the phantoms built, in the cells' order."""

    SCHEMA = SCHEMA
    OLDER_SCHEMAS = OLDER_SCHEMAS

    base: str
    onset: int
    num_blocks: int
    num_images: int
    threshold_rule: str
    cells: list[CalibrationCell]
    blind_below: float | None
    found_from: float | None
    notes: list[str] = field(default_factory=list)

    @classmethod
    def upgrade(cls, data: dict[str, Any], schema: str) -> dict[str, Any]:
        data["model"] = [asdict(ModelSummary.named_only(f"phantom(gain {c['gain']:g}, fraction {c['fraction']:.2%})",
                                                        num_blocks=data["num_blocks"])) for c in data["cells"]]
        data["images"] = asdict(ImageSummary.described_only(data["images"], data["num_images"]))
        return data


def parse_grid(text: str | Sequence[float], name: str) -> list[float]:
    """``"1.5,2,3"`` -> ``[1.5, 2.0, 3.0]``; a clear error for anything else."""
    if not isinstance(text, str):
        return [float(v) for v in text]
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"{option(name)} must be a comma-separated list of numbers, got {text!r}") from None
    if not values:
        raise InputError(f"{option(name)} is empty")
    return values


def _cell_metrics(norms: torch.Tensor, truth: torch.Tensor, flagged: torch.Tensor, onset: int,
                  num_blocks: int) -> dict[str, Any]:
    """norms ``[blocks, B, N]`` (patch tokens), truth ``[B, N]`` planted, flagged ``[blocks, B, N]`` by the scan."""
    planted = torch.zeros_like(flagged)
    planted[onset:] = truth  # the phantom plants from its onset block on, nowhere before
    ratios = []
    for b in range(onset, num_blocks):
        ratios.append(float(norms[b][truth].median() / norms[b][~truth].median()))
    tp = int((flagged & planted).sum())
    n_flag, n_true = int(flagged.sum()), int(planted.sum())
    detected = [b for b in range(num_blocks) if bool(flagged[b].any())]
    first = detected[0] if detected else None
    recalls = [float((flagged[b] & truth).sum()) / max(int(truth.sum()), 1) for b in range(onset, num_blocks)]
    return dict(ratio=min(ratios), ratio_at_onset=ratios[0], block_ratios=ratios, block_recalls=recalls,
                precision=tp / n_flag if n_flag else math.nan,  # nothing flagged: precision undefined (null)
                recall=tp / n_true if n_true else 1.0, detected_onset=first,
                onset_error=None if first is None else first - onset,
                blocks_detected=sum(1 for b in range(onset, num_blocks) if bool(flagged[b].any())),
                blocks_planted=num_blocks - onset)


def _limits(cells: list[CalibrationCell]) -> tuple[float | None, float | None]:
    """Per block (a layer is what a user reads): (the largest ratio of a planted block whose group was missed, the
    smallest ratio from which every planted block's group was found with recall >= 0.95)."""
    pairs = [(r, rec >= 0.95) for c in cells for r, rec in zip(c.block_ratios, c.block_recalls)]
    missed = [r for r, ok in pairs if not ok]
    found_from = min((r for r, ok in pairs if ok and all(o for q, o in pairs if q >= r)), default=None)
    return (max(missed) if missed else None), found_from


def calibrate(
    base: Any = "demo",
    *,
    gains: Sequence[float] = DEFAULT_GAINS,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    onset: int = 2,
    num_images: int = 128,
    units: int = 4,
    rule: Any = None,
    progress: Callable[[int, int], None] | None = None,
) -> CalibrationReport:
    """Measure the auto rule's detection limit on phantoms built from ``base`` (see the module docstring).

    Args:
        base: the clean baseline the phantoms are built from (default ``demo``).
        gains: planting strengths, each x the baseline's largest median patch norm from the onset on (> 1).
        fractions: shares of patch tokens planted per image (at most 8%).
        onset: block where the artifacts appear.
        num_images: built-in synthetic validation images each phantom is scanned on.
        progress: called with (cells done, cells in all) after each cell.
    """
    gains, fractions = list(gains), list(fractions)
    if num_images < 1:
        raise InputError(f"{option('num_images')} must be at least 1, got {num_images}")
    loaded = load_baseline(base)
    depth = len(loaded.blocks)
    for g in gains:  # the whole grid is checked before anything is built
        for f in fractions:
            validate_settings(depth, onset, f, units, g, fraction_option="fractions", gain_option="gains")
    rule = rule or AutoRule()
    medians = baseline_medians(loaded)
    h, _ = loaded.input_size
    data = SyntheticShapes(num_images, seed=4321, img_size=h, split="val")
    mean = torch.tensor(loaded.data_config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(loaded.data_config["std"]).view(1, 3, 1, 1)
    normalised = (torch.stack([data[i][0] for i in range(len(data))]) - mean) / std
    gh, gw = loaded.grid_size
    cells: list[CalibrationCell] = []
    phantoms: list[ModelSummary] = []
    total = len(gains) * len(fractions)
    for g in gains:
        for f in fractions:
            phantom, spec, _ = build_phantom(loaded, None, onset=onset, fraction=f, units=units, gain_over_median=g,
                                             medians=medians)
            model = wrap_module(phantom, name=f"phantom(gain {g:g}, fraction {f:.2%})",
                                data_config=dict(loaded.data_config))
            with NormCapture(model) as cap:
                norms = cap.run(normalised)[:depth, :, model.num_prefix_tokens:].double()
            if not bool(torch.isfinite(norms).all()):  # a user's setting, not a bug: say which and why
                raise NonFiniteError(f"{option('gains', f'{g:g}')}: the planted tokens' norms overflow (float32: "
                                     "inf/NaN), so no threshold can be measured; use gains of at most a few hundred (the rule's "
                                     "limits lie below 10)")
            flagged = torch.zeros(depth, num_images, gh * gw, dtype=torch.bool)
            for b in range(depth):
                decision = threshold_norms(norms[b], rule)
                if decision.value is not None:  # the scan's own test: a token's bin at or above the edge
                    flagged[b] = bin_index(norms[b]) >= decision.edge_index
            truth = ground_truth(model, normalised).reshape(num_images, -1)
            metrics = _cell_metrics(norms, truth, flagged, onset, depth)
            k = planted_count(gh * gw, f)
            cells.append(CalibrationCell(gain=g, fraction=f, planted_per_image=k, planted_share=k / (gh * gw),
                                         **metrics))
            phantoms.append(model.summary())
            if progress:
                progress(len(cells), total)
    blind_below, found_from = _limits(cells)
    result = CalibrationReport(model=phantoms, images=ImageSummary(f"synthetic:{num_images}", num_images, num_images,
                                                                   []), headline="",
                               base=loaded.name, onset=onset, num_blocks=depth, num_images=num_images, threshold_rule=rule.describe(), cells=cells,
                               blind_below=blind_below, found_from=found_from,
                               notes=["Phantoms: one planting mechanism on one clean baseline. The limits bound what "
                                      "the rule can see; they say nothing about what real models contain."])
    result.headline = calibration_headline(result)
    return result


def calibration_headline(report: CalibrationReport) -> str:
    found = sum(c.found for c in report.cells)
    text = (f"{found} of {len(report.cells)} phantoms found exactly (precision and recall >= 0.95, onset exact). ")
    if report.found_from is not None:
        text += f"Per block, every planted group >= {report.found_from:.2f}x the bulk median was found. "
    if report.blind_below is not None:
        text += (f"Groups up to {report.blind_below:.2f}x were missed in some blocks: below that this instrument is "
                 "blind (the rule needs >= 2.5x and an empty gap >= 1.5x above the bulk's largest norm).")
    else:
        text += "No planted group in the grid was missed."
    return text
