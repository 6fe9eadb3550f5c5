"""LOST (Siméoni et al., BMVC 2021): one object box per image from the patch features of one ViT block.

The algorithm, on the patch tokens only (the model's CLS, registers and any test-time register are cut off by its
own prefix count, never by assuming token 0):

1. ``A = F F^T``: the raw dot products of the patch features ``F`` (``[N, D]``; keys by default), as LOST does.
2. Degree of patch ``i``: the number of other patches ``j`` with ``A[i, j] > 0``. The **seed** is the patch with
   the fewest positive correlations (ties: the lowest patch index, row-major).
3. **Expansion**: the ``k`` lowest-degree patches (same order) that correlate positively with the seed;
   ``M = sum of their rows of A``.
4. **Box**: the 4-connected component of ``M > 0`` on the patch grid that holds the seed, as a box of whole
   patches. When ``M`` is not positive at the seed (LOST's code raises there) the box is the seed's patch, and the
   image is counted in ``seed_outside_mask``.

:func:`lost_batched` does this for a whole batch at once on the model's device (one ``[B, N, N]`` similarity
tensor, a flood fill for the components); :func:`lost_reference` is the straightforward per-image version (NumPy and
``scipy.ndimage.label``), kept for tests: the two give the same boxes.

:class:`FeatureCapture` takes the features from one block during the forward pass, through the capture layer:
keys, queries or values as the block's attention kernel receives them (``blocks.{i}.attn.k/q/v``: heads
concatenated, as LOST reads them; after qk-norm and RoPE in the families that have them), or the block's output
tokens; plus the residual stream that feeds them (the block's input for q/k/v, its output for tokens), whose norms
say which tokens are outliers. The pass stops at that block: later blocks are not run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from artifactscan.models.hooks import CaptureContext, block_point, resolve_names
from artifactscan.models.loading import LoadedModel

FEATURES = ("keys", "queries", "values", "tokens")
LOST_K = 100
# LOST's k = 100 was set on VOC07 at full resolution with ViT-S/16: a 500x375 image is a 31x23 = 713-patch grid.
LOST_REFERENCE_PATCHES = 713


def default_k(num_patches: int) -> int:
    """LOST's k = 100 scaled to this grid: ``round(100 * N / 713)``, at least 1 and at most N."""
    return int(min(num_patches, max(1, round(LOST_K * num_patches / LOST_REFERENCE_PATCHES))))


@dataclass
class LostBoxes:
    """Per image of a batch: seed patch index, box ``[x0, y0, x1, y1]`` in patches (half-open), and whether the
    expansion map was not positive at the seed (box = the seed's patch)."""

    seed: torch.Tensor  # [B] long
    box: torch.Tensor  # [B, 4] long
    seed_outside_mask: torch.Tensor  # [B] bool


# ----------------------------------------------------------------------------------------------- batched
def _dilate(r: torch.Tensor) -> torch.Tensor:
    """4-neighbour dilation of ``[B, H, W]`` bool masks."""
    out = r.clone()
    out[:, 1:, :] |= r[:, :-1, :]
    out[:, :-1, :] |= r[:, 1:, :]
    out[:, :, 1:] |= r[:, :, :-1]
    out[:, :, :-1] |= r[:, :, 1:]
    return out


def _first_last(any_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First index and last index + 1 of True along dim 1 of ``[B, L]`` (every row has a True)."""
    L = any_mask.shape[1]
    m = any_mask.to(torch.int8)
    first = m.argmax(dim=1)
    last = L - m.flip(1).argmax(dim=1)
    return first, last


@torch.no_grad()
def lost_batched(feats: torch.Tensor, grid: tuple[int, int], k: int) -> LostBoxes:
    """LOST on ``feats`` ``[B, N, D]`` (patch features of B images, row-major grid ``gh x gw``)."""
    B, N, _ = feats.shape
    gh, gw = grid
    if N != gh * gw:
        raise ValueError(f"{N} patch features for a {gh}x{gw} grid")
    k = max(1, min(int(k), N))
    f = feats.float()
    A = torch.bmm(f, f.transpose(1, 2))  # [B, N, N]
    off_diag = ~torch.eye(N, dtype=torch.bool, device=A.device)
    degree = ((A > 0) & off_diag).sum(dim=2)  # [B, N]
    order = torch.sort(degree, dim=1, stable=True).indices  # fewest first; ties: lowest index
    seed = order[:, 0]
    rows = torch.arange(B, device=A.device)
    potentials = order[:, :k]  # [B, k]
    similar = A[rows, seed].gather(1, potentials) > 0  # [B, k]
    picked = A.gather(1, potentials[:, :, None].expand(B, k, N))  # [B, k, N]: the potentials' rows
    M = (picked.double() * similar[:, :, None]).sum(dim=1)  # [B, N]
    positive = (M > 0).view(B, gh, gw)
    reach = torch.zeros(B, N, dtype=torch.bool, device=A.device)
    reach[rows, seed] = True
    reach = reach.view(B, gh, gw)
    outside = ~positive.view(B, N)[rows, seed]
    allowed = torch.where(outside[:, None, None], reach, positive)
    # Flood fill from the seed; check for convergence every few steps (each check synchronises with the device).
    while True:
        before = reach
        for _ in range(4):
            reach = _dilate(reach) & allowed
        if torch.equal(reach, before):
            break
    y0, y1 = _first_last(reach.any(dim=2))
    x0, x1 = _first_last(reach.any(dim=1))
    return LostBoxes(seed, torch.stack([x0, y0, x1, y1], dim=1), outside)


# ----------------------------------------------------------------------------------------------- reference
def lost_reference(feats: torch.Tensor | np.ndarray, grid: tuple[int, int], k: int) -> tuple[int, list[int], bool]:
    """The per-image reference: ``(seed, [x0, y0, x1, y1] in patches, seed_outside_mask)`` for ``feats [N, D]``,
    written as LOST's code reads (dot products, degree, stable sort, expansion, ``scipy.ndimage.label``)."""
    import scipy.ndimage

    f = torch.as_tensor(feats).float()
    gh, gw = grid
    N = f.shape[0]
    k = max(1, min(int(k), N))
    A = (f @ f.T).numpy()
    B = A.copy()
    np.fill_diagonal(B, 0)
    B[B < 0] = 0
    degree = (B > 0).sum(axis=1)
    order = np.argsort(degree, kind="stable")
    seed = int(order[0])
    potentials = order[:k]
    similars = potentials[A[seed, potentials] > 0]
    M = A[similars].astype(np.float64).sum(axis=0)
    labels, _ = scipy.ndimage.label(M.reshape(gh, gw) > 0)
    sr, sc = divmod(seed, gw)
    cc = labels[sr, sc]
    if cc == 0:
        return seed, [sc, sr, sc + 1, sr + 1], True
    ys, xs = np.nonzero(labels == cc)
    return seed, [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1], False


# ----------------------------------------------------------------------------------------------- capture
#: The hook points each kind of features is read from: (features, the residual stream that feeds them).
FEATURE_POINTS = {"keys": ("attn.k", "resid_pre"), "queries": ("attn.q", "resid_pre"),
                  "values": ("attn.v", "resid_pre"), "tokens": ("resid_post", "resid_post")}


def feature_points(loaded: LoadedModel, block: int, features: str = "keys") -> list[str]:
    """The hook names LOST reads for ``features`` at ``block``; refuses (NotAViTError/InputError, one line) when
    this model cannot expose them, before any pass."""
    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}")
    names = list(dict.fromkeys(block_point(block, what) for what in FEATURE_POINTS[features]))
    resolve_names(loaded, names)
    return names


class FeatureCapture(CaptureContext):
    """Context manager: per forward, the features (``[B, T, D]``) and the residual stream feeding them (``[B, T, D]``)
    of one block; the forward pass stops right after. Use :meth:`run`."""

    def __init__(self, loaded: LoadedModel, block: int, features: str = "keys"):
        self.block, self.kind = block, features
        self.names = feature_points(loaded, block, features)
        super().__init__(loaded, self.names, stop_early=True)

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward ``x`` up to the block; ``(features, residual)``, both ``[B, T, D]``."""
        captured = self.forward_captured(x)
        features, residual = (block_point(self.block, what) for what in FEATURE_POINTS[self.kind])
        return captured[features], captured[residual]
