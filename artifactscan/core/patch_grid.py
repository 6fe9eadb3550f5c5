"""Geometry of the patch grid shared by the phantom (which plants outliers on redundant patches) and the probes
(which report how alike an outlier's neighbours are): one definition, so that both read the same numbers."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def neighbour_similarity(patch_tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Mean cosine similarity of each patch embedding with its (up to 4) grid neighbours: ``[B, N, C] -> [B, N]``.

    The terms are added in one fixed order (below, above, right, left): the shipped phantoms' planted positions
    were chosen with exactly these sums, so a change of order would move their ground truth. A 1x1 grid (no
    neighbour) gives 0.
    """
    B, N, C = patch_tokens.shape
    gh, gw = grid
    x = F.normalize(patch_tokens.float(), dim=-1).reshape(B, gh, gw, C)
    total = torch.zeros(B, gh, gw, device=x.device)
    count = torch.zeros(1, gh, gw, device=x.device)
    for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        ys, yd = (slice(0, gh - dy), slice(dy, gh)) if dy >= 0 else (slice(-dy, gh), slice(0, gh + dy))
        xs, xd = (slice(0, gw - dx), slice(dx, gw)) if dx >= 0 else (slice(-dx, gw), slice(0, gw + dx))
        total[:, ys, xs] += (x[:, ys, xs] * x[:, yd, xd]).sum(-1)
        count[:, ys, xs] += 1
    return (total / count.clamp_min(1)).reshape(B, N)
