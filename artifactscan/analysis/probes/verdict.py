"""From the probe table to a verdict: artifact-like, content-like, clean or inconclusive, with its reasons."""

from __future__ import annotations


from artifactscan.analysis.probes.types import (
    POSITION_MIN_DROP,
    POSITION_RATIO,
    RECONSTRUCTION_MIN_RISE,
    RECONSTRUCTION_RATIO,
    REDUNDANCY_PERCENTILE,
    NeighbourHistogram,
    TokenTypeRow,
    Verdict,
)


def decide_verdict(rows: dict[str, TokenTypeRow], n_out: int, min_tokens: int, layer: int,
                   neighbours: NeighbourHistogram | None = None, undecided: str | None = None) -> Verdict:
    """``undecided``: the threshold rule's reason when it could not decide at this layer (then never "clean")."""
    out, norm = rows.get("outlier"), rows.get("normal (n-matched)") or rows.get("normal")
    normal_full = rows.get("normal")
    nums: dict[str, float | None] = {}
    if n_out == 0 and undecided:
        return Verdict("inconclusive", f"No outlier tokens flagged at block {layer}, but the threshold rule could not "
                       "decide there: too few tokens in a separated group; scan more images.", [undecided], nums)
    if n_out == 0:
        return Verdict("clean", f"No outlier tokens at block {layer}: by the threshold rule the model looks clean at "
                       "this layer (probes still ran on normal tokens and prefix tokens).", [], nums)
    assert out is not None and norm is not None and normal_full is not None
    nums.update(outlier_position_top1=out.position_top1, normal_position_top1=norm.position_top1,
                outlier_reconstruction_fvu=out.reconstruction_fvu, normal_reconstruction_fvu=norm.reconstruction_fvu,
                outlier_neighbour_similarity=out.neighbour_similarity_median,
                normal_neighbour_similarity=normal_full.neighbour_similarity_median,
                outlier_global_top1=out.global_top1, normal_global_top1=normal_full.global_top1)
    if out.local_status != "ok" or norm.local_status != "ok":
        return Verdict("inconclusive", f"Too few outlier tokens at block {layer} to probe them "
                       f"({out.local_status}; the minimum is {min_tokens} held-out tokens).",
                       [f"outlier row: {out.local_status}"], nums)
    reasons = []
    so, sn = out.neighbour_similarity_median, normal_full.neighbour_similarity_median
    rank = neighbours.normal_share_below(so) if neighbours is not None and so is not None else None
    nums["outlier_similarity_rank"] = rank
    redundant = rank is not None and sn is not None and rank >= REDUNDANCY_PERCENTILE
    if so is None or sn is None or rank is None:
        reasons.append("neighbour similarity unavailable (no separable patch embedding)")
    else:
        reasons.append(f"neighbour similarity of input patches: outlier median {so:.3f} is above {rank:.0%} of normal "
                       f"tokens (normal median {sn:.3f}; redundant from {REDUNDANCY_PERCENTILE:.0%}) -> "
                       + ("more redundant" if redundant else "not more redundant"))
    po, pn = out.position_top1 or 0.0, norm.position_top1 or 0.0
    pos_worse = po <= POSITION_RATIO * pn and pn - po >= POSITION_MIN_DROP
    reasons.append(f"position top-1: outlier {po:.1%} (chance {out.position_chance:.1%}) vs normal n-matched {pn:.1%} -> "
                   + ("worse" if pos_worse else "kept"))
    fo, fn = out.reconstruction_fvu or 0.0, norm.reconstruction_fvu or 0.0
    rec_worse = fo >= RECONSTRUCTION_RATIO * fn and fo - fn >= RECONSTRUCTION_MIN_RISE
    reasons.append(f"reconstruction FVU: outlier {fo:.3f} vs normal n-matched {fn:.3f} -> "
                   + ("worse" if rec_worse else "kept"))
    if out.global_top1 is not None and normal_full.global_top1 is not None:
        reasons.append(f"global top-1 (supporting, not decisive): outlier {out.global_top1:.1%} vs normal "
                       f"{normal_full.global_top1:.1%}")
    lost = pos_worse or rec_worse
    if redundant and lost:
        label = "artifact-like"
        summary = (f"Flagged tokens at block {layer} look like the paper's artifacts: they sit on redundant patches "
                   f"and lost local information ({'position' if pos_worse else ''}"
                   f"{' and ' if pos_worse and rec_worse else ''}{'pixels' if rec_worse else ''}).")
    elif not lost:
        label = "content-like"
        summary = (f"Flagged tokens at block {layer} keep their local information (position and pixels as readable "
                   "as from normal tokens): they look like content tokens with a large norm, not artifacts.")
    else:
        label = "inconclusive"
        summary = (f"Mixed signals at block {layer}: the flagged tokens lost local information but do not sit on "
                   "more redundant patches than normal tokens.")
    return Verdict(label, summary, reasons, nums)
