"""The probe's protocol constants (:data:`PROTOCOL`) and its result types (``artifactscan.probe/2``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from artifactscan.core.summaries import AnalysisResult

# /3: the common header first (core/summaries.py), with ``headline`` (the verdict's summary sentence) new; /2 files
# are read with the headline taken from verdict.summary.
SCHEMA = "artifactscan.probe/3"
OLDER_SCHEMAS = ("artifactscan.probe/1", "artifactscan.probe/2")

#: Fewer held-out outlier (or normal) tokens than this and a local-probe row says "too few (n=...)".
MIN_LOCAL_TOKENS = 50
#: Fewer images than this with the token type and a global-probe row says "too few (n=...)".
MIN_GLOBAL_IMAGES = 50
#: Images of the built-in labelled synthetic set used when no DATA is given.
DEFAULT_PROBE_IMAGES = 2000
#: The image split needs at least this many images (2 to fit, 1 to choose the ridge penalty, 1 to test).
MIN_IMAGES = 4
#: Fraction of images held out for testing (by image, never by token).
TEST_FRACTION = 0.25
#: Random draws of the global probe (token choice + image split), reported as mean +- std.
GLOBAL_DRAWS = 5
#: Cap on the tokens of one class used to fit (train) and test (test) the local probes.
MAX_TRAIN_TOKENS = 20_000
MAX_TEST_TOKENS = 5_000
#: Reservoir capacity per (split, log-norm band), and per image per band (spreads the sample over images).
BAND_CAPACITY = {"train": 6_144, "test": 2_048}
TOKENS_PER_IMAGE = 16
#: Width of a reservoir band in histogram bins (80 bins = 0.2 decades of norm).
BAND_BINS = 80
#: Images kept (uniform reservoir) for the global probe, and candidate tokens stored per image.
MAX_GLOBAL_IMAGES = 5_000
RANDOM_TOKENS_PER_IMAGE = 4
TOP_TOKENS_PER_IMAGE = 8
#: Ridge penalties, as multiples of the mean eigenvalue of X^T X (chosen on held-out training images).
RIDGE_GRID = (1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # x the mean eigenvalue of X^T X
#: Verdict margins (see PROTOCOL).
# Outliers are 'redundant' when their median neighbour similarity is above this share of the normal tokens'
# similarities: a rank, so it does not depend on how similar a model's patch embeddings are overall (a model whose
# normal patches already sit at cosine 0.97 leaves no room for an absolute margin).
REDUNDANCY_PERCENTILE = 0.75
POSITION_RATIO = 0.75
POSITION_MIN_DROP = 0.05
RECONSTRUCTION_RATIO = 1.5
RECONSTRUCTION_MIN_RISE = 0.05
SIM_BINS = 200

PROTOCOL = f"""\
Probed layer: the residual-stream output of block k (0-based like timm; -1 = last block), before the final norm;
the model runs only up to block k. Tokens: patch tokens are split into normal and outlier by the same rule as
`artifactscan norms` at that layer (--threshold auto: the separated-group rule on the exact log-norm histogram, outlier
iff its histogram bin >= the threshold's bin edge; a number: outlier iff norm > number). Images are split by image
into train ({1 - TEST_FRACTION:.0%}) and held-out test ({TEST_FRACTION:.0%}); within train, 20% of images choose the
ridge penalty from a small grid. Tokens are sampled uniformly per class (stratified reservoirs over log-norm bands,
at most {TOKENS_PER_IMAGE} per image per band, re-sampled in proportion to the exact counts; at most
{MAX_TRAIN_TOKENS} train / {MAX_TEST_TOKENS} test tokens per class). Features are standardised on the train tokens.
All probes are closed-form ridge (multi-output regression; classification = one-vs-rest ridge on one-hot targets,
argmax).
1. Position (Fig 5b): classifier from a patch token to its grid index. Reported on held-out images: top-1 accuracy,
   chance (most frequent train position), mean Euclidean distance in patch units between predicted and true cell.
2. Reconstruction (Fig 5b): regression from a patch token to the pixels of its own patch (patchified like the
   patch embedding, channel-major, in the model's normalised input space). Reported: mean squared error per pixel
   value (L2), and the fraction of variance unexplained (FVU = error / variance of the targets).
   Probes 1-2 are fitted per token class (a probe trained on outliers reads outliers), so the outlier row is compared
   with 'normal (n-matched)': the same probe trained on as many normal tokens as there are outlier tokens.
3. Global (Table 1): per image one random normal patch token, one random outlier token (images without outliers
   left out of that row; with more than {TOP_TOKENS_PER_IMAGE} outliers the draw is among its {TOP_TOKENS_PER_IMAGE} largest), the CLS token
   when the model has one, the mean of the register tokens when it has some. One linear classifier per token type
   on the image labels (ImageFolder sub-folders, or the synthetic set's labels); top-1 on held-out images, mean +- std
   over {GLOBAL_DRAWS} draws (each redraws the tokens and the image split).
4. Neighbour similarity (Fig 5a): cosine similarity of each patch's input embedding (patch-embedding output, before
   the position embedding) with its 4-neighbours (mean over the neighbours inside the grid); exact histograms over
   all tokens, normal vs outlier, and their medians.
5. Verdict: outliers are 'redundant' if their median neighbour similarity is above at least
   {REDUNDANCY_PERCENTILE:.0%} of the normal tokens' similarities (a rank, independent of the model's similarity scale); they 'lost local information' if position top-1 <= {POSITION_RATIO} x the n-matched normal one
   (and >= {POSITION_MIN_DROP:.2f} lower) or reconstruction FVU >= {RECONSTRUCTION_RATIO} x the normal one (and >= {RECONSTRUCTION_MIN_RISE:.2f} higher).
   redundant AND lost -> 'artifact-like'; local information kept on both probes -> 'content-like' (a high norm alone
   is not an artifact); fewer than the minimum held-out outlier tokens (default {MIN_LOCAL_TOKENS}) or mixed signals ->
   'inconclusive'; no outliers -> 'clean' (a valid finding: probes still run on normal tokens and CLS).
Rows with fewer than the minimum tokens (local: {MIN_LOCAL_TOKENS} held-out tokens; global: {MIN_GLOBAL_IMAGES} images)
say 'too few (n=...)' instead of a number."""


@dataclass
class TokenTypeRow:
    """One row of the table (``normal``, ``normal (n-matched)``, ``outlier``, ``cls``, ``registers``).

    Local metrics are ``None`` where they do not apply (prefix tokens) or where there were too few tokens; the
    ``*_status`` fields then say why (``"ok"``, ``"too few (n=12)"``, ``"n/a"``, ``"skipped: ..."``).
    """

    name: str
    tokens_total: int | None = None
    local_train_tokens: int = 0
    local_test_tokens: int = 0
    local_status: str = "n/a"
    position_top1: float | None = None
    position_chance: float | None = None
    position_distance: float | None = None
    reconstruction_l2: float | None = None
    reconstruction_fvu: float | None = None
    neighbour_tokens: int = 0
    neighbour_similarity_median: float | None = None
    global_images: int = 0
    global_status: str = "n/a"
    global_top1: float | None = None
    global_top1_std: float | None = None
    global_chance: float | None = None


@dataclass
class NeighbourHistogram:
    """Exact histograms of the 4-neighbour cosine similarity of input patch embeddings, over ``[-1, 1]``."""

    edges: list[float]
    normal: list[int]
    outlier: list[int]
    normal_median: float | None
    outlier_median: float | None
    available: bool = True

    def normal_share_below(self, value: float) -> float | None:
        """Share of normal tokens whose similarity is below ``value`` (linear within a bin), or None without any."""
        total = sum(self.normal)
        if total == 0:
            return None
        below = 0.0
        for lo, hi, count in zip(self.edges[:-1], self.edges[1:], self.normal):
            if value >= hi:
                below += count
            elif value > lo:
                below += count * (value - lo) / (hi - lo)
        return below / total


@dataclass
class Verdict:
    """``label`` is ``artifact-like`` / ``content-like`` / ``inconclusive`` / ``clean``; ``reasons`` say why."""

    label: str
    summary: str
    reasons: list[str]
    numbers: dict[str, float | None] = field(default_factory=dict)


@dataclass
class LabelInfo:
    source: str
    num_classes: int
    class_names: list[str]
    global_probe: bool
    message: str


@dataclass
class ProbeReport(AnalysisResult):
    """Everything ``artifactscan probe`` found (serialises with :func:`artifactscan.report.to_jsonable`)."""

    SCHEMA = SCHEMA
    OLDER_SCHEMAS = OLDER_SCHEMAS

    layer: int
    layer_requested: int
    num_blocks: int
    layer_description: str
    threshold_mode: str
    threshold: float | None
    threshold_reason: str
    num_patch_tokens: int
    num_outliers: int
    outlier_fraction: float
    images_with_outliers: int
    rows: list[TokenTypeRow]
    neighbours: NeighbourHistogram
    labels: LabelInfo
    verdict: Verdict
    settings: dict[str, Any]
    protocol: str
    notes: list[str]

    @classmethod
    def upgrade(cls, data: dict[str, Any], schema: str) -> dict[str, Any]:
        data.setdefault("headline", (data.get("verdict") or {}).get("summary", ""))
        return data

    def row(self, name: str) -> TokenTypeRow | None:
        return next((r for r in self.rows if r.name == name), None)


def load_probe_report(path: str | Path) -> ProbeReport:
    import json

    return ProbeReport.from_dict(json.loads(Path(path).read_text()))
