"""Shift consistency (the denoising idea of PH-Reg, NeurIPS 2025) for ``artifactscan signatures``.

A patch's feature should follow its content. Show the model the same image shifted by whole patches (and mirrored),
map each view's features back to the grid cell that holds the same pixels, and average them: a feature that is
about the content agrees with that average; an artifact tied to a grid position, or to where the model chose to
park global information, does not. Per patch the residual is ``1 - cos(feature, average over the views)``.

- **Views** are patch-aligned: the image is shifted by ``k * patch`` pixels (cropped on one side, padded with zeros
  of the normalised input, i.e. the mean colour, on the other), optionally after a horizontal flip of the grid's
  pixels, which maps column ``c`` to ``gw - 1 - c``. A cell whose pixels left the image in a view has no counterpart
  there and is left out of that view's average; a cell with no counterpart in any view has no residual. The
  unchanged image is not one of the views (the average is over the others only, so a residual is never diluted by
  the feature itself). Shifts reach at most a quarter of the grid side (at least one patch), so each view keeps
  most of the image: :func:`candidate_views` lists what a grid allows, smallest shifts first.
- **Cost**: the views run on a subset of the images (the first ``shift_images`` the data pass decodes), each image
  with its views in one forward of ``views + 1`` images, the residuals reduced inside the hooks.
- **Null**: the flagged tokens' median residual against the median of as many unflagged tokens of the same block
  and images drawn at random (with replacement, seeded): the flagged tokens are shift-inconsistent only when their
  median is above that null's 99% quantile.

Known answer (tests): with no position embedding and no token mixing a ViT's features are shift-equivariant by
construction, so shifts alone give residual 0; a planted position embedding makes them clearly positive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from artifactscan.core.errors import InputError, option
from artifactscan.core.numerics import measurement_mode
from artifactscan.models.hooks import block_point, capture

#: Views per image when none are asked for.
SHIFT_VIEWS = 6
#: Images the views run on when not told (the first ones decoded).
SHIFT_IMAGES = 64
#: The stated level: a residual above 0.5 (cosine with its own view average below 0.5, i.e. more than 60 degrees
#: apart) is a feature that mostly does not follow its content.
SHIFT_LEVEL = 0.5
#: Random draws of unflagged tokens for the null of the flagged median, and the quantile it is read at.
NULL_DRAWS = 1000
NULL_QUANTILE = 0.99
#: The most memory (512 MiB) the unshifted images' patch tokens at every block may take, in float32, to be kept
#: from the scan's first forward; above it the shift pass forwards those images again with their views (the same
#: residuals, one more image per forward of ``views + 1``).
REUSE_BYTES = 512 * 2**20


# ----------------------------------------------------------------------------------------------- views
@dataclass(frozen=True)
class ShiftView:
    """One view: a horizontal flip (first, when ``flip``), then a shift by ``dy`` rows and ``dx`` columns of patches
    (positive: down and right)."""

    dy: int
    dx: int
    flip: bool = False

    def describe(self) -> str:
        parts = ["flip"] if self.flip else []
        if self.dy:
            parts.append(f"{'down' if self.dy > 0 else 'up'} {abs(self.dy)}")
        if self.dx:
            parts.append(f"{'right' if self.dx > 0 else 'left'} {abs(self.dx)}")
        return " + ".join(parts)


def max_shift(side: int) -> int:
    """The largest shift, in patches, along a grid side of ``side`` cells: a quarter of it, at least one patch,
    never the whole side (a view shifted by the whole side has no cell in common with the image)."""
    return min(side - 1, max(1, side // 4))


def candidate_views(grid: tuple[int, int], flips: bool = True) -> list[ShiftView]:
    """Every view a grid allows, in the order they are used: smallest shift first (by the larger of the two moves,
    then their sum), unflipped before flipped, then by ``dy``, ``dx``. The identity is not a view."""
    sy, sx = max_shift(grid[0]), max_shift(grid[1])
    views = [ShiftView(dy, dx, flip) for dy in range(-sy, sy + 1) for dx in range(-sx, sx + 1)
             for flip in ((False, True) if flips else (False,)) if (dy, dx, flip) != (0, 0, False)]
    return sorted(views, key=lambda v: (max(abs(v.dy), abs(v.dx)), abs(v.dy) + abs(v.dx), v.flip, v.dy, v.dx))


def view_plan(grid: tuple[int, int], views: int, flips: bool = True) -> list[ShiftView]:
    """The first ``views`` of :func:`candidate_views`; refuses 0 or more than the grid allows, in one line."""
    if views < 1:
        raise InputError(f"{option('views', views)}: at least 1 view is needed (the residual compares a patch's "
                         f"feature with its average over the other views)")
    allowed = candidate_views(grid, flips)
    if views > len(allowed):
        gh, gw = grid
        raise InputError(f"{option('views', views)} is more than the {len(allowed)} patch-aligned views a {gh}x{gw} "
                         f"grid allows (shifts of up to {max_shift(gh)} x {max_shift(gw)} patches"
                         + (", each with and without a horizontal flip)" if flips else ")"))
    return allowed[:views]


def apply_view(images: torch.Tensor, view: ShiftView, patch: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """``[B, C, H, W]`` images as ``view`` shows them: the grid's pixels flipped left-right, then shifted by whole
    patches with zeros filling what comes in (pixels past the grid, if any, stay where they are)."""
    ph, pw = patch
    gw_px = grid[1] * pw
    x = images
    if view.flip:
        x = images.clone()
        x[..., :gw_px] = images[..., :gw_px].flip(-1)
    sy, sx = view.dy * ph, view.dx * pw
    H, W = x.shape[-2:]
    out = torch.zeros_like(x)
    out[..., max(sy, 0):H + min(sy, 0), max(sx, 0):W + min(sx, 0)] = \
        x[..., max(-sy, 0):H - max(sy, 0), max(-sx, 0):W - max(sx, 0)]
    return out


def cell_map(view: ShiftView, grid: tuple[int, int]) -> torch.Tensor:
    """``[gh * gw]``: for each cell of the image (row-major), the cell of ``view`` that holds its pixels, or -1
    where they left the image."""
    gh, gw = grid
    rows = torch.arange(gh)[:, None].expand(gh, gw)
    cols = torch.arange(gw)[None, :].expand(gh, gw)
    rows_v = rows + view.dy
    cols_v = (gw - 1 - cols if view.flip else cols) + view.dx
    inside = (rows_v >= 0) & (rows_v < gh) & (cols_v >= 0) & (cols_v < gw)
    return torch.where(inside, rows_v * gw + cols_v, -1).flatten()


def shift_residuals(original: torch.Tensor, viewed: list[torch.Tensor], maps: list[torch.Tensor]) -> torch.Tensor:
    """``[n, N]`` residuals ``1 - cos(original, average of its counterparts in the views)`` from ``original``
    ``[n, N, D]`` patch features and each view's ``[n, N, D]`` with its :func:`cell_map`; NaN where no view has a
    counterpart."""
    total = torch.zeros_like(original)
    count = torch.zeros(original.shape[1], device=original.device)
    for feats, where in zip(viewed, maps):
        where = where.to(original.device)
        present = where >= 0
        total[:, present] += feats[:, where[present]]
        count[present] += 1
    average = total / count.clamp(min=1)[None, :, None]
    residual = 1 - torch.nn.functional.cosine_similarity(original, average, dim=-1)
    residual[:, count == 0] = math.nan
    return residual


def reuse_decision(num_images: int, num_blocks: int, num_patches: int, dim: int) -> tuple[bool, str]:
    """Whether the unshifted images' patch tokens at every block (``num_images x num_blocks x num_patches x dim``
    float32) fit :data:`REUSE_BYTES`, and the note that says which way the shift pass went."""
    size = num_images * num_blocks * num_patches * dim * 4
    mb, bound = size / 2**20, REUSE_BYTES / 2**20
    if size <= REUSE_BYTES:
        return True, (f"shift views: the unshifted images' block outputs ({mb:.0f} MiB) were kept from the scan's "
                      f"first forward (bound {bound:.0f} MiB); only the views were forwarded")
    return False, (f"shift views: the unshifted images' block outputs ({mb:.0f} MiB) exceed the {bound:.0f} MiB "
                   "bound, so they were forwarded again with their views")


# ----------------------------------------------------------------------------------------------- summaries
@dataclass
class ShiftSummary:
    """Shift consistency at one block over the images the views ran on: the median residual of unflagged
    (``normal``) and flagged patches, the share of each above ``SHIFT_LEVEL``, and the null of the flagged median
    (the 99% quantile of the median of as many unflagged patches drawn at random). None where there is nothing to
    count (no flagged patches among these images)."""

    num_normal: int
    num_flagged: int
    median_normal: float | None
    median_flagged: float | None
    share_above_normal: float | None
    share_above_flagged: float | None
    flagged_null_99: float | None

    @property
    def inconsistent(self) -> bool:
        """The decision rule: flagged patches' median residual above its null's 99% quantile."""
        return (self.median_flagged is not None and self.flagged_null_99 is not None and
                self.median_flagged > self.flagged_null_99)


def median_null_quantile(normal: torch.Tensor, k: int, q: float = NULL_QUANTILE, draws: int = NULL_DRAWS,
                         seed: int = 0) -> float:
    """The ``q`` quantile of the (lower) median of ``k`` values drawn with replacement from ``normal``, over
    ``draws`` seeded draws (done in chunks so ``draws x k`` never sits in memory at once)."""
    gen = torch.Generator().manual_seed(seed)
    values = normal.double().cpu()
    chunk = max(1, 2_000_000 // max(k, 1))
    medians = []
    for start in range(0, draws, chunk):
        picks = torch.randint(len(values), (min(chunk, draws - start), k), generator=gen)
        medians.append(values[picks].median(dim=1).values)
    return float(torch.quantile(torch.cat(medians), q))


def summarise(residuals: torch.Tensor, flagged: torch.Tensor, seed: int = 0) -> ShiftSummary:
    """One block's :class:`ShiftSummary` from its residuals and flagged masks (any shape, NaN = no residual)."""
    known = ~torch.isnan(residuals)
    normal, hot = residuals[known & ~flagged].double(), residuals[known & flagged].double()

    def median(v: torch.Tensor) -> float | None:
        return float(v.median()) if len(v) else None

    def above(v: torch.Tensor) -> float | None:
        return float((v > SHIFT_LEVEL).double().mean()) if len(v) else None

    null = median_null_quantile(normal, len(hot), seed=seed) if len(hot) and len(normal) else None
    return ShiftSummary(len(normal), len(hot), median(normal), median(hot), above(normal), above(hot), null)


# ----------------------------------------------------------------------------------------------- the pass
class ShiftAccumulator:
    """Collects per-block residuals and flagged masks, reduced inside the ``resid_post`` hooks of a forward of one
    chunk of images followed by each of its views, or of its views alone when the chunk's unshifted patch tokens
    are given (kept from an earlier forward of the same images)."""

    def __init__(self, plan: list[ShiftView], grid: tuple[int, int], num_prefix: int):
        self.maps = [cell_map(v, grid) for v in plan]
        self.num_views, self.P = len(plan), num_prefix
        self.residuals: dict[int, list[torch.Tensor]] = {}
        self.flagged: dict[int, list[torch.Tensor]] = {}
        self.chunk_flags: dict[int, torch.Tensor] = {}
        self.chunk_originals: dict[int, torch.Tensor] | None = None

    def set_chunk(self, indices: list[int], flagged: dict[int, dict[int, set[int]]], num_blocks: int,
                  num_cells: int, originals: dict[int, torch.Tensor] | None = None) -> None:
        self.chunk_originals = originals
        for b in range(num_blocks):
            mask = torch.zeros(len(indices), num_cells, dtype=torch.bool)
            for j, i in enumerate(indices):
                mask[j, list(flagged.get(b, {}).get(i, ()))] = True
            self.chunk_flags[b] = mask

    def add(self, block: int, tokens: torch.Tensor) -> None:
        patches = tokens.detach().float()[:, self.P:]
        if self.chunk_originals is not None:
            views = patches.reshape(self.num_views, -1, *patches.shape[1:])
            original, viewed = self.chunk_originals[block].to(patches.device), list(views)
        else:
            views = patches.reshape(self.num_views + 1, -1, *patches.shape[1:])
            original, viewed = views[0], list(views[1:])
        residual = shift_residuals(original, viewed, self.maps)
        self.residuals.setdefault(block, []).append(residual.cpu())
        self.flagged.setdefault(block, []).append(self.chunk_flags[block])

    def summaries(self, num_blocks: int) -> list[ShiftSummary]:
        return [summarise(torch.cat(self.residuals[b]), torch.cat(self.flagged[b]), seed=b) for b in range(num_blocks)]


@measurement_mode()
def shift_consistency(loaded: Any, batches: list[tuple[torch.Tensor, list[int]]],
                      flagged: dict[int, dict[int, set[int]]], plan: list[ShiftView],
                      batch_size: int, originals: dict[int, torch.Tensor] | None = None
                      ) -> list[ShiftSummary] | None:
    """Per block, the :class:`ShiftSummary` of ``loaded`` on the images of ``batches`` (``(images, indices)`` as the
    data pass kept them, on the device), with the views of ``plan``; ``flagged``: block -> image index -> flagged
    patch positions (row-major). None when there are no images. ``originals``: block -> ``[n, N, D]`` patch tokens
    of the same images, in the same order, from an earlier forward; given, only the views are forwarded (each
    forward holds ``views`` copies of as many images as fit in ``batch_size``), else the images too
    (``views + 1``)."""
    grid = tuple(loaded.grid_size)
    images = [(x[j:j + 1], i) for x, indices in batches for j, i in enumerate(indices)]
    if not images:
        return None
    num_blocks = len(loaded.blocks)
    acc = ShiftAccumulator(plan, grid, loaded.num_prefix_tokens)
    per_forward = max(1, batch_size // (len(plan) + (originals is None)))
    requests = {block_point(b, "resid_post"): (lambda y, b=b: acc.add(b, y)) for b in range(num_blocks)}
    with capture(loaded, requests) as cap:
        for start in range(0, len(images), per_forward):
            chunk = images[start:start + per_forward]
            x = torch.cat([im for im, _ in chunk])
            kept = None if originals is None else {b: originals[b][start:start + len(chunk)] for b in originals}
            acc.set_chunk([i for _, i in chunk], flagged, num_blocks, grid[0] * grid[1], kept)
            views = [apply_view(x, v, loaded.patch_size, grid) for v in plan]
            cap.forward(torch.cat(views if kept is not None else [x] + views))
    return acc.summaries(num_blocks)


def shift_call(summaries: list[ShiftSummary | None], num_images: int) -> tuple[bool | None, str, str]:
    """The verdict on shift consistency: ``(present, rule, evidence)`` (present None: no flagged patch among the
    images the views ran on, so nothing to compare)."""
    rule = (f"the flagged patches' median shift residual is above the {NULL_QUANTILE:.0%} quantile of the median of "
            f"as many unflagged patches of the same block drawn at random ({NULL_DRAWS} draws)")
    rows = [(b, s) for b, s in enumerate(summaries) if s is not None and s.median_flagged is not None]
    if not rows:
        return None, rule, f"no flagged patches among the {num_images} images the views ran on"
    hits = [b for b, s in rows if s.inconsistent]
    b, s = max(rows, key=lambda r: r[1].median_flagged - r[1].median_normal)
    # significant digits, not decimals: residuals of a residual stream with a large shared component are ~1e-3
    return bool(hits), rule, (f"largest gap at block {b}: flagged median {s.median_flagged:.3g} vs unflagged "
                              f"{s.median_normal:.3g} (null 99% {s.flagged_null_99:.3g}); above the null at blocks "
                              f"{hits or 'none'}")
