"""Deciding which patch-token norms count as outliers.

Two rules:

* **fixed** — ``--threshold 150``: a token is an outlier when its norm exceeds the number, as in Darcet et al. (Fig. 3
  uses 150 for DINOv2 ViT-g). The right number depends on the model's scale, so it is only meaningful for models
  like the paper's.
* **auto** (default) — an adaptive bimodal rule on log-norms, per layer:

  1. Fit a two-component Gaussian mixture to the log10 norms (weighted EM on the histogram, started from Otsu's split).
  2. Accept the split only if it describes two separate populations, *all* of:
     - the upper component is a minority (weight <= ``max_outlier_fraction``, default 0.5);
     - it sits far above the bulk: upper median >= ``min_ratio`` x lower median (default 4x; artifacts are ~10x);
     - the components are separated: Ashman's D >= ``min_separation`` (default 3; D > 2 is the usual
       "clean separation" criterion);
     - the histogram has a real valley between them: the smoothed density at its lowest point between the two
       modes is <= ``max_valley`` (default 0.2) x the upper mode's peak density.
  3. The threshold is that valley (snapped to a histogram bin edge, so counts are exact). Otherwise the layer is
     called unimodal and gets **no outliers** — a long tail is not split into two.

A norm rule alone cannot tell an artifact from a content token with a large norm (saturated object patches do this in
small ViTs); ``artifactscan probe`` adds the paper's other signatures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .stats import BIN_WIDTH_LOG10, LOG10_MIN, NUM_BINS, quantile_from_counts

PAPER_THRESHOLD = 150.0
COARSEN = 4  # fine histogram bins per bin of the mixture fit


@dataclass
class AutoRule:
    """Parameters of the adaptive bimodal rule (see module docstring)."""

    min_ratio: float = 4.0
    min_separation: float = 3.0
    max_valley: float = 0.2
    max_outlier_fraction: float = 0.5
    min_tokens: int = 20


@dataclass
class ThresholdDecision:
    """The threshold chosen for one layer and why.

    ``value`` is ``None`` when the rule found no outliers (unimodal). ``edge_index`` is the histogram bin edge the
    value sits on (auto rule), so counts above it are exact.
    """

    method: str
    value: float | None
    reason: str
    edge_index: int | None = None
    details: dict[str, Any] = field(default_factory=dict)


def fixed_threshold(value: float) -> ThresholdDecision:
    return ThresholdDecision("fixed", float(value), f"fixed threshold: norm > {value:g}")


def _smooth(counts: torch.Tensor, sigma_bins: float) -> torch.Tensor:
    radius = int(3 * sigma_bins) + 1
    xs = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (xs / sigma_bins) ** 2)
    kernel /= kernel.sum()
    padded = torch.nn.functional.pad(counts.double()[None, None], (radius, radius))
    return torch.nn.functional.conv1d(padded, kernel[None, None])[0, 0]


def _otsu_split(x: np.ndarray, w: np.ndarray) -> int:
    """Index i maximising between-class variance when splitting bins [0, i) | [i, n)."""
    cw, cm = np.cumsum(w), np.cumsum(w * x)
    w0, m0 = cw[:-1], cm[:-1]
    w1 = cw[-1] - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = np.where((w0 > 0) & (w1 > 0), (m0 * cw[-1] - cm[-1] * w0) ** 2 / (w0 * w1), 0.0)
    return int(np.argmax(between)) + 1


def _fit_two_gaussians(x: np.ndarray, w: np.ndarray, iters: int = 200, tol: float = 1e-6):
    """Weighted EM for a 1-D two-component Gaussian mixture on histogram bins, started from Otsu's split.

    Runs in numpy on a few hundred coarse bins: a fit costs about a millisecond, so provisional thresholds can be
    refreshed while a scan streams. Stops when the mean log-likelihood improves by less than ``tol``.
    """
    split = _otsu_split(x, w)
    var_floor = (2 * BIN_WIDTH_LOG10) ** 2
    groups = [(x[:split], w[:split]), (x[split:], w[split:])]
    mu = np.array([np.average(gx, weights=gw) for gx, gw in groups])
    var = np.maximum([np.average((gx - m) ** 2, weights=gw) for (gx, gw), m in zip(groups, mu)], var_floor)
    pi = np.array([gw.sum() for _, gw in groups]) / w.sum()
    total, previous = w.sum(), -np.inf
    for _ in range(iters):
        logp = (-0.5 * (x[None] - mu[:, None]) ** 2 / var[:, None] - 0.5 * np.log(2 * np.pi * var[:, None])
                + np.log(np.maximum(pi[:, None], 1e-300)))
        top = logp.max(axis=0)
        lse = top + np.log(np.exp(logp - top).sum(axis=0))
        loglik = float((w * lse).sum() / total)
        resp = np.exp(logp - lse) * w[None]
        nk = np.maximum(resp.sum(axis=1), 1e-300)
        mu = (resp * x[None]).sum(axis=1) / nk
        var = np.maximum((resp * (x[None] - mu[:, None]) ** 2).sum(axis=1) / nk, var_floor)
        pi = nk / total
        if loglik - previous < tol:
            break
        previous = loglik
    order = np.argsort(mu)
    return mu[order], var[order], pi[order]


def auto_threshold(counts: torch.Tensor, rule: AutoRule | None = None) -> ThresholdDecision:
    """Apply the adaptive bimodal rule to one layer's log-spaced norm histogram (``stats.NUM_BINS`` counts)."""
    rule = rule or AutoRule()
    counts = counts.double()
    total = float(counts.sum())
    if total < rule.min_tokens:
        return ThresholdDecision("auto", None, f"too few tokens ({int(total)}) to test for bimodality")
    nonzero = torch.nonzero(counts).flatten()
    lo, hi = int(nonzero[0]), int(nonzero[-1]) + 1
    if hi - lo < 3:
        return ThresholdDecision("auto", None, "all norms fall in one narrow band: unimodal")
    # Exact shortcut, no fit needed: with the upper group a minority, the lower group's median is >= the overall
    # lower quartile, so an upper group min_ratio x above it needs a token >= min_ratio x that quartile.
    largest = 10 ** (LOG10_MIN + hi * BIN_WIDTH_LOG10)  # upper edge of the highest occupied bin
    lower_quartile = quantile_from_counts(counts, 0.25)
    if largest < rule.min_ratio * lower_quartile:
        return ThresholdDecision("auto", None, f"unimodal: no token reaches {rule.min_ratio:g}x the lower quartile "
                                               f"({lower_quartile:.4g})")
    w_fine = counts[lo:hi].numpy()
    x_fine = LOG10_MIN + (np.arange(lo, hi) + 0.5) * BIN_WIDTH_LOG10
    # The mixture is fitted on bins COARSEN times wider (2.3%): plenty for the shape, and much cheaper.
    pad = (-len(w_fine)) % COARSEN
    w_c = np.pad(w_fine, (0, pad)).reshape(-1, COARSEN).sum(axis=1)
    x_c = LOG10_MIN + (lo + (np.arange(len(w_c)) + 0.5) * COARSEN) * BIN_WIDTH_LOG10
    keep = w_c > 0
    mu, var, pi = _fit_two_gaussians(x_c[keep], w_c[keep])
    sd = np.sqrt(var)
    ratio = 10 ** float(mu[1] - mu[0])
    ashman_d = math.sqrt(2) * float(mu[1] - mu[0]) / math.sqrt(float(var.sum()))
    # Valley: lowest point of the smoothed (fine) histogram between the two modes.
    smooth = _smooth(torch.from_numpy(w_fine), sigma_bins=max(2.0, 0.01 / BIN_WIDTH_LOG10)).numpy()
    i_lo = int(np.clip(np.searchsorted(x_fine, mu[0]), 0, len(x_fine) - 1))
    i_hi = int(np.clip(np.searchsorted(x_fine, mu[1]), 0, len(x_fine) - 1))
    details: dict[str, Any] = {
        "lower_median": 10 ** float(mu[0]),
        "upper_median": 10 ** float(mu[1]),
        "upper_weight": float(pi[1]),
        "ratio": ratio,
        "ashman_d": ashman_d,
        "lower_log10_sd": float(sd[0]),
        "upper_log10_sd": float(sd[1]),
    }
    if i_hi - i_lo < 2:
        return ThresholdDecision("auto", None, "unimodal: the two fitted components overlap", details=details)
    between = smooth[i_lo:i_hi + 1]
    valley_height = float(between.min())
    valley_at = i_lo + int(np.argmin(between))
    upper_peak = float(smooth[valley_at:].max())
    valley_depth = valley_height / upper_peak if upper_peak > 0 else 1.0
    details["valley_depth"] = valley_depth

    failures = []
    if float(pi[1]) > rule.max_outlier_fraction:
        failures.append(f"upper group is {pi[1]:.0%} of tokens (> {rule.max_outlier_fraction:.0%}), not a minority")
    if ratio < rule.min_ratio:
        failures.append(f"upper group only {ratio:.1f}x the bulk (< {rule.min_ratio:g}x)")
    if ashman_d < rule.min_separation:
        failures.append(f"groups overlap (Ashman's D {ashman_d:.1f} < {rule.min_separation:g})")
    if valley_depth > rule.max_valley:
        failures.append(f"no valley between groups (depth {valley_depth:.2f} > {rule.max_valley:g})")
    if failures:
        return ThresholdDecision("auto", None, "unimodal: " + "; ".join(failures), details=details)

    # Middle of the lowest run of the valley: with a wide empty gap any point in it separates the groups equally well.
    minimal = np.flatnonzero(between <= valley_height * (1 + 1e-9) + 1e-12)
    valley_bin = lo + i_lo + int(minimal[len(minimal) // 2])
    edge_index = min(max(valley_bin, 1), NUM_BINS - 1)
    value = 10 ** (LOG10_MIN + edge_index * BIN_WIDTH_LOG10)
    reason = (f"bimodal: {pi[1]:.2%} of tokens form a group {ratio:.1f}x the bulk (Ashman's D {ashman_d:.1f}); "
              f"threshold at the valley, norm > {value:.4g}")
    return ThresholdDecision("auto", value, reason, edge_index=edge_index, details=details)


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
            raise ValueError(f"--threshold must be 'auto' or a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"--threshold must be 'auto' or a positive number, got {text!r}")
    return value
