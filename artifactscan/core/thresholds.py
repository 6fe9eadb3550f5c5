"""Deciding which patch-token norms count as outliers.

Two rules:

* **fixed** — ``--threshold 150``: a token is an outlier when its norm exceeds the number, as in Darcet et al. (Fig. 3
  uses 150 for DINOv2 ViT-g). The right number depends on the model's scale, so it is only meaningful for models
  like the paper's.
* **auto** (default) — the *separated-group* rule, per layer, on the layer's log-norm histogram. It does not model
  the bulk's shape (one log-Gaussian, a low tail of flat patches, several content populations, chi-shaped norms of a
  random-init model all look alike to it); it looks directly for a minority group above the bulk:

  1. **Candidates.** Every empty gap in the histogram above the median splits the layer into a *bulk* (below) and a
     *group* (above). Each candidate is described by its share of tokens, its ratio (group median / bulk median),
     its gap (the group's smallest norm / the bulk's largest) and two significance tests.
  2. **Accept** a candidate only if *all* hold:
     - it is a group: >= ``min_group_tokens`` tokens (5) and at most ``max_outlier_fraction`` of the layer (50%);
     - it sits far above the bulk: ratio >= ``min_ratio`` (2.5x; the paper's artifacts are ~10x);
     - the gap is real: >= ``min_gap`` (1.5x) wide, and its emptiness is improbable for a density that decreases
       above the bulk's mode (a unimodal layer): a smooth density that reached the group's own density would have
       put tokens in the gap (*gap test*, chance <= ``max_gap_chance``);
     - the group cannot be the bulk's own tail: a generalized-Pareto tail fitted to the bulk's top tokens (by
       moments, never lighter than exponential, so heavy-tailed layers keep their extremes) expects far fewer
       tokens at or above the group than it holds (*tail test*, chance <= ``max_tail_chance`` after a Bonferroni
       correction for the number of candidates).
  3. Of the accepted candidates the most significant one wins; the threshold is the middle of its gap (on a
     histogram bin edge, so counts are exact). If none is accepted the layer gets **no outliers**, and the strongest
     rejected candidate is reported with the tests it failed (a *near miss*: "a 1.8x group of 0.4% of tokens,
     rejected: ratio 1.8x < 2.5x").
  4. **Inconclusive.** A layer where no candidate is accepted but one fails *only* the group size (fewer than
     ``min_group_tokens`` tokens, every other test passed) is not "no outliers": too few tokens were seen to decide.
     The decision says so (``inconclusive``), reports the strongest such candidate, and
     :func:`images_to_decide` says how many images would give the group ``min_group_tokens`` tokens at its rate.

  The constants were chosen on a generated battery of layers (``tests/threshold_battery.py``, docs/thresholds.md):
  every separated group found with precision and recall >= 0.95, unimodal and heavy-tailed layers left unsplit.

A norm rule alone cannot tell an artifact from a content token with a large norm (saturated object patches do this in
small ViTs); ``artifactscan probe`` adds the paper's other signatures.

Public entry points: :func:`auto_threshold` (a layer's histogram counts in) and :func:`threshold_norms` (a plain array
of norms in); both return a :class:`ThresholdDecision` whose ``value`` is ``None`` for "no outliers" or, with
``inconclusive`` set, for "could not decide".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import InputError, option
from .stats import BIN_WIDTH_LOG10, LOG10_MIN, NUM_BINS, bin_index

PAPER_THRESHOLD = 150.0
_LN10 = math.log(10.0)


@dataclass
class AutoRule:
    """Parameters of the separated-group rule (see the module docstring)."""

    min_ratio: float = 2.5  # group median / bulk median
    min_gap: float = 1.5  # group's smallest norm / bulk's largest
    min_group_tokens: int = 5
    max_outlier_fraction: float = 0.5
    max_gap_chance: float = 0.1  # gap test: chance that a non-increasing density leaves the gap empty
    max_tail_chance: float = 1e-3  # tail test: family-wise chance that the bulk's own tail reaches the group
    tail_fraction: float = 0.05  # share of the bulk's top tokens the tail is fitted to ...
    min_tail_tokens: int = 20  # ... and at least this many
    max_tail_shape: float = 0.45  # cap on the generalized-Pareto shape (moments need < 0.5)
    min_tokens: int = 20

    def describe(self) -> str:
        """The rule in one line, with its constants (printed in reports as ``threshold_rule``)."""
        return (f"auto: separated group per layer: >= {self.min_group_tokens} tokens and <= "
                f"{self.max_outlier_fraction:.0%} of the layer, median >= {self.min_ratio:g}x the bulk's, above an "
                f"empty gap >= {self.min_gap:g}x that a unimodal density would not leave (chance <= "
                f"{self.max_gap_chance:g}) and beyond the reach of the bulk's fitted tail (chance <= "
                f"{self.max_tail_chance:g}); otherwise no outliers")


@dataclass
class ThresholdDecision:
    """The threshold chosen for one layer and why.

    ``value`` is ``None`` when the rule flagged nothing: no outliers, or, when ``inconclusive`` is set, a candidate
    group that failed only the minimum group size (too few tokens to decide). ``edge_index`` is the histogram bin
    edge the value sits on (auto rule), so counts above it are exact. ``details`` describes the accepted group, or
    the strongest rejected candidate (``details["rejected"]`` lists the failed tests) when there is one; for an
    inconclusive layer that is the group that failed only on its size.
    """

    method: str
    value: float | None
    reason: str
    edge_index: int | None = None
    details: dict[str, Any] = field(default_factory=dict)
    inconclusive: bool = False


def fixed_threshold(value: float) -> ThresholdDecision:
    return ThresholdDecision("fixed", float(value), f"fixed threshold: norm > {value:g}")


def _log10_poisson_tail(m: np.ndarray, lam: np.ndarray, terms: int = 256) -> np.ndarray:
    """log10 P(Poisson(lam) >= m), elementwise, accurate far into the tail (where it matters here).

    For lam < m the tail is the first term lam^m e^-lam / m! times a series whose ratios lam / (m + t) are < 1.
    For lam >= m the probability is not small (>= ~0.4) and 0 (certainty) is returned: such a candidate is never
    significant.
    """
    m = m.astype(np.float64)
    lam = np.maximum(lam.astype(np.float64), 1e-300)
    lgamma = np.vectorize(math.lgamma, otypes=[np.float64])
    first = m * np.log(lam) - lam - lgamma(m + 1)
    ratios = lam[:, None] / (m[:, None] + np.arange(1, terms + 1)[None])
    series = 1.0 + np.cumprod(np.minimum(ratios, 1.0), axis=1).sum(axis=1)
    out = (first + np.log(series)) / _LN10
    return np.where(lam >= m, 0.0, np.minimum(out, 0.0))


def _candidates(counts: np.ndarray, rule: AutoRule) -> dict[str, np.ndarray] | None:
    """Every empty-gap split above the median, with its descriptors and tests (vectorised over candidates)."""
    w = BIN_WIDTH_LOG10
    total = counts.sum()
    before = np.concatenate([[0.0], np.cumsum(counts)])  # before[i] = tokens in bins < i
    occupied = np.flatnonzero(counts)
    median_bin = int(np.searchsorted(before[1:], 0.5 * total))
    # A split at bin j: j occupied, j - 1 empty (an empty gap below), j above the median bin.
    starts = occupied[1:][(np.diff(occupied) > 1) & (occupied[1:] > median_bin)]
    if len(starts) == 0:
        return None
    bulk_top = occupied[np.searchsorted(occupied, starts) - 1]
    n_group = total - before[starts]
    n_bulk = before[starts]
    gap_log10 = (starts - bulk_top - 1) * w  # empty bins only: a lower bound on the true gap

    # Medians (bin centres; exact to a bin) of bulk and group.
    bulk_med_bin = np.searchsorted(before[1:], 0.5 * n_bulk)
    group_med_bin = np.searchsorted(before[1:], before[starts] + 0.5 * n_group)
    ratio_log10 = (group_med_bin - bulk_med_bin) * w

    # Gap test. Above the bulk's mode a unimodal density does not increase, so the gap's density would be at least
    # the group's own: its lower 80% of tokens over the span they cover. The chance that such a density leaves the
    # whole gap empty is exp(-expected count in the gap).
    n80 = np.ceil(0.8 * n_group)
    last80 = np.searchsorted(before[1:], before[starts] + n80 - 0.5)  # bin holding the group's n80-th token
    span80 = (last80 + 1 - starts) * w
    in80 = before[last80 + 1] - before[starts]
    gap_expected = in80 * (gap_log10 + w) / span80  # + w: the gap is at least its empty bins plus part of a bin
    log10_gap_chance = -gap_expected / _LN10

    # Tail test. Fit a generalized Pareto tail (by moments) to the bulk's top k tokens; how many tokens would it
    # put at or above the group's lowest bin? The tail is never taken lighter than exponential.
    centres = LOG10_MIN + (np.arange(len(counts)) + 0.5) * w
    s1 = np.concatenate([[0.0], np.cumsum(counts * centres)])
    s2 = np.concatenate([[0.0], np.cumsum(counts * centres**2)])
    k = np.maximum(rule.min_tail_tokens, np.ceil(rule.tail_fraction * n_bulk))
    first = np.searchsorted(before, n_bulk - k, side="right") - 1  # window = bins [first, start)
    first = np.clip(first, 0, starts - 1)
    kk = n_bulk - before[first]
    u = LOG10_MIN + first * w
    mean_z = (s1[starts] - s1[first]) / np.maximum(kk, 1) - u
    ez2 = (s2[starts] - s2[first] - 2 * u * (s1[starts] - s1[first])) / np.maximum(kk, 1) + u**2
    var_z = np.maximum(ez2 - mean_z**2, 1e-12)
    shape = np.clip(0.5 * (1 - mean_z**2 / var_z), 0.0, rule.max_tail_shape)
    scale = np.maximum(mean_z * (1 - shape), 1e-12)
    reach = LOG10_MIN + starts * w - u
    with np.errstate(divide="ignore", over="ignore"):
        survival = np.where(shape > 1e-6, (1 + shape * reach / scale) ** (-1 / np.maximum(shape, 1e-6)),
                            np.exp(-reach / scale))
    tail_expected = kk * survival
    log10_tail_chance = _log10_poisson_tail(n_group, tail_expected)
    return dict(start=starts, bulk_top=bulk_top, n_group=n_group, share=n_group / total,
                ratio=10**ratio_log10, gap=10 ** (gap_log10 + w), gap_expected=gap_expected,
                log10_gap_chance=log10_gap_chance, tail_expected=tail_expected,
                log10_tail_chance=log10_tail_chance, tail_shape=shape)


# Medians are known to within one histogram bin each, so the ratio is compared with its bound two bins (1.2%) more
# generous: a group measured at 2.49x may truly be 2.5x. The gap is measured from the middle of the bulk's top bin to
# the middle of the group's lowest bin (its error is symmetric, +-1 bin) and compared as it is: a tolerance there
# would flag sparse unimodal tails whose widest gap is just under min_gap.
_RESOLUTION = 10 ** (2 * BIN_WIDTH_LOG10)


def _too_few(n_group: float, rule: AutoRule) -> str:
    return f"only {int(n_group)} token(s) (< {rule.min_group_tokens})"


def _failures(c: dict[str, np.ndarray], i: int, rule: AutoRule, n_candidates: int) -> list[str]:
    out = []
    if c["n_group"][i] < rule.min_group_tokens:
        out.append(_too_few(c["n_group"][i], rule))
    if c["share"][i] > rule.max_outlier_fraction:
        out.append(f"{c['share'][i]:.0%} of tokens is not a minority (> {rule.max_outlier_fraction:.0%})")
    if c["ratio"][i] * _RESOLUTION < rule.min_ratio:
        out.append(f"ratio {c['ratio'][i]:.1f}x < {rule.min_ratio:g}x")
    if c["gap"][i] < rule.min_gap:
        out.append(f"gap {c['gap'][i]:.2f}x < {rule.min_gap:g}x")
    elif c["log10_gap_chance"][i] > math.log10(rule.max_gap_chance):
        out.append(f"gap not emptier than the group (chance {10 ** c['log10_gap_chance'][i]:.2g} "
                   f"> {rule.max_gap_chance:g})")
    if c["log10_tail_chance"][i] > math.log10(rule.max_tail_chance / n_candidates):
        out.append(f"within reach of the bulk's tail (it expects {c['tail_expected'][i]:.2g} token(s) there)")
    return out


def _describe(c: dict[str, np.ndarray], i: int) -> dict[str, Any]:
    return {
        "group_tokens": int(c["n_group"][i]),
        "group_share": float(c["share"][i]),
        "ratio": float(c["ratio"][i]),
        "gap": float(c["gap"][i]),
        "log10_gap_chance": float(c["log10_gap_chance"][i]),
        "tail_expected_tokens": float(c["tail_expected"][i]),
        "log10_tail_chance": float(c["log10_tail_chance"][i]),
        "tail_shape": float(c["tail_shape"][i]),
    }


def _group_words(d: dict[str, Any]) -> str:
    return (f"a {d['ratio']:.1f}x group of {d['group_share']:.2%} of tokens ({d['group_tokens']}) "
            f"above a {d['gap']:.2f}x gap")


def auto_threshold(counts: torch.Tensor | np.ndarray, rule: AutoRule | None = None) -> ThresholdDecision:
    """Apply the separated-group rule to one layer's log-spaced norm histogram (``stats.NUM_BINS`` counts)."""
    rule = rule or AutoRule()
    counts = np.asarray(counts.detach().cpu() if isinstance(counts, torch.Tensor) else counts, dtype=np.float64)
    if counts.shape != (NUM_BINS,):
        raise ValueError(f"expected a histogram of {NUM_BINS} counts, got shape {tuple(counts.shape)}")
    total = float(counts.sum())
    if total < rule.min_tokens:
        return ThresholdDecision("auto", None, f"no outliers: too few tokens ({int(total)}) to look for a group")
    occupied = np.flatnonzero(counts)
    if occupied[-1] - occupied[0] < 2:
        return ThresholdDecision("auto", None, "no outliers: all norms fall in one narrow band")
    c = _candidates(counts, rule)
    if c is None:
        return ThresholdDecision("auto", None, "no outliers: no empty gap above the median (one connected population)")
    n = len(c["start"])
    fails = [_failures(c, i, rule, n) for i in range(n)]
    strength = c["log10_tail_chance"] + c["log10_gap_chance"]  # lower = stronger evidence of a separate group
    accepted = [i for i in range(n) if not fails[i]]
    # Candidates that pass every test but the group size: a separated group seen too few times to be decided.
    undecided = [i for i in range(n) if fails[i] == [_too_few(c["n_group"][i], rule)]]
    if not accepted and undecided:
        best = min(undecided, key=lambda i: strength[i])
        details = _describe(c, best)
        details["rejected"] = fails[best]
        details["min_group_tokens"] = rule.min_group_tokens  # what would decide it
        return ThresholdDecision("auto", None, f"inconclusive: {_group_words(details)} passes every test but the "
                                               f"group size ({fails[best][0]}); more images would decide",
                                 details=details, inconclusive=True)
    if not accepted:
        # The near miss worth showing: of the candidates with enough tokens, the one that failed the fewest tests,
        # then the strongest evidence (a clean 3x group above a 1.3x gap, not a 2x split inside the bulk).
        pool = [i for i in range(n) if c["n_group"][i] >= rule.min_group_tokens] or list(range(n))
        best = min(pool, key=lambda i: (len(fails[i]), strength[i], -c["ratio"][i]))
        details = _describe(c, best)
        details["rejected"] = fails[best]
        return ThresholdDecision("auto", None, f"no outliers: strongest candidate {_group_words(details)}, rejected: "
                                               + "; ".join(fails[best]), details=details)
    best = min(accepted, key=lambda i: strength[i])
    details = _describe(c, best)
    # Threshold in the middle of the empty gap (bins bulk_top+1 .. start-1 are empty): any edge there splits alike.
    edge_index = int((int(c["bulk_top"][best]) + 1 + int(c["start"][best])) // 2)
    edge_index = min(max(edge_index, 1), NUM_BINS - 1)
    value = 10 ** (LOG10_MIN + edge_index * BIN_WIDTH_LOG10)
    details["threshold"] = value
    reason = f"separated group: {_group_words(details)}; threshold in the gap, norm > {value:.4g}"
    return ThresholdDecision("auto", value, reason, edge_index=edge_index, details=details)


def images_to_decide(group_tokens: int, num_images: int, rule: AutoRule | None = None) -> int:
    """How many images would give an inconclusive layer's group ``min_group_tokens`` tokens, at the rate seen
    (``group_tokens`` over ``num_images``): the scan size at which the rule can decide."""
    rule = rule or AutoRule()
    if group_tokens <= 0 or num_images <= 0:
        raise ValueError(f"need a positive group and image count, got {group_tokens} token(s) in {num_images} image(s)")
    return math.ceil(rule.min_group_tokens * num_images / group_tokens)


def threshold_norms(norms: Any, rule: AutoRule | None = None) -> ThresholdDecision:
    """Apply the auto rule to a plain array of norms (numpy, torch or a list), from any source.

    The norms are binned exactly as a scan bins them, so the decision equals the scan's for the same tokens.
    Non-finite values are refused (they are a fault of the model or the data, not a norm).
    """
    values = torch.as_tensor(np.asarray(norms, dtype=np.float64).ravel())
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"norms hold {int((~torch.isfinite(values)).sum())} non-finite value(s)")
    counts = torch.zeros(NUM_BINS, dtype=torch.float64)
    if len(values):
        counts.scatter_add_(0, bin_index(values), torch.ones_like(values))
    return auto_threshold(counts, rule)


def parse_threshold(text: str | float | None) -> float | None:
    """``"auto"``/``None`` -> None (adaptive rule); a positive number -> that number. Raises ValueError otherwise."""
    if text is None:
        return None
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        if text.strip().lower() == "auto":
            return None
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{option('threshold')} must be 'auto' or a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{option('threshold')} must be 'auto' or a positive number, got {text!r}")
    return value


def threshold_option(text: str | float | None) -> float | None:
    """:func:`parse_threshold` for a command's ``--threshold``: a bad value is an :class:`InputError` (exit 1)."""
    try:
        return parse_threshold(text)
    except ValueError as exc:
        raise InputError(str(exc)) from None
