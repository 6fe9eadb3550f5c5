"""The arithmetic of ``artifactscan signatures``: streaming accumulators and the nulls each signature is read against.

Pure functions and small accumulators on tensors, with no model loading and no image passes, so each can be tested
against an independent reference. :mod:`artifactscan.analysis.signatures` runs the pass and assembles the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: The quantile at which nulls are read: a signature is present only outside the null's 99% range.
NULL_QUANTILE = 0.99
#: The position share must be at least this many times its shuffled-grid null to count as present.
POSITION_FACTOR = 3.0
#: The z of a two-sided 99% normal interval (hit ratios' binomial spread around the random-init null).
Z99 = 2.5758


# ----------------------------------------------------------------------------------------------- position share
class PositionShare:
    """The share of patch-token variance explained by grid position alone, streamed over images.

    ``share = between / total``: ``between`` is the mean over grid positions of ``|mu_p - mu|^2`` (``mu_p`` the mean
    feature at position ``p`` over the images, ``mu`` the mean of all patch tokens), ``total`` the mean of
    ``|x - mu|^2`` over every patch token. With ``n`` images, ``mu_p`` carries sampling noise of variance
    ``total / n``, so the share is biased upward by about ``1/n`` even when position explains nothing; the same
    tokens with their positions shuffled within each image (``shuffled_share``) measure that bias on the data itself.
    Sums are float64: a share of 0.003 is a difference of large sums.
    """

    def __init__(self, num_positions: int, dim: int, seed: int = 0):
        self.sum_at = torch.zeros(num_positions, dim, dtype=torch.float64)
        self.sum_shuffled = torch.zeros(num_positions, dim, dtype=torch.float64)
        self.sum_sq = 0.0
        self.count = 0  # images
        self.generator = torch.Generator().manual_seed(seed)

    def update(self, patches: torch.Tensor) -> None:
        """Add ``[B, N, D]`` patch tokens (prefix tokens already removed)."""
        x = patches.detach().to(torch.float64)
        B, N, _ = x.shape
        self.sum_at += x.sum(dim=0).cpu()
        order = torch.argsort(torch.rand(B, N, generator=self.generator), dim=1).to(x.device)
        self.sum_shuffled += x.gather(1, order[..., None].expand_as(x)).sum(dim=0).cpu()
        self.sum_sq += float((x * x).sum())
        self.count += B

    def _share(self, sums: torch.Tensor) -> float:
        n, N = self.count, sums.shape[0]
        mu_p = sums / n
        mu = mu_p.mean(dim=0)
        total = self.sum_sq / (n * N) - float((mu * mu).sum())
        between = float(((mu_p - mu) ** 2).sum(dim=1).mean())
        return between / total if total > 0 else math.nan

    @property
    def share(self) -> float:
        return self._share(self.sum_at)

    @property
    def shuffled_share(self) -> float:
        return self._share(self.sum_shuffled)

    def position_map(self, grid: tuple[int, int]) -> list[list[float]]:
        """``|mu_p - mu|`` on the patch grid: the image-independent part of each position's feature (the mean of
        all tokens taken out, since it is shared by every position and says nothing about position)."""
        mu_p = self.sum_at / max(self.count, 1)
        return (mu_p - mu_p.mean(dim=0)).norm(dim=1).reshape(grid).tolist()


# ----------------------------------------------------------------------------------------------- the defect direction
def activation_slope(act: torch.nn.Module, samples: int = 200_001) -> float:
    """The least-squares slope ``a`` of ``act(z) ~ a z + b`` for ``z ~ N(0, 1)`` (the MLP's pre-activations taken
    as standard normal): ``a = Cov(z, act(z)) / Var(z)``, on a fixed grid of normal quantiles (deterministic)."""
    p = (torch.arange(samples, dtype=torch.float64) + 0.5) / samples
    z = math.sqrt(2) * torch.erfinv(2 * p - 1)
    with torch.no_grad():
        y = act(z.float()).double()
    return float(((z - z.mean()) * (y - y.mean())).mean() / z.var(unbiased=False))


def _layer_scale(module: torch.nn.Module, dim: int) -> torch.Tensor:
    gamma = getattr(module, "gamma", None)
    if gamma is None:
        gamma = getattr(module, "scale_factor", None)
    return torch.ones(dim, dtype=torch.float64) if gamma is None else gamma.detach().double().reshape(-1)


def linear_block(block: torch.nn.Module) -> torch.Tensor:
    """A pre-norm ViT block as one ``[D, D]`` linear map acting on column vectors, from its weights alone.

    ``x -> x + attn(LN1 x)`` is linearised as ``I + diag(ls1) W_proj W_v diag(g1) C`` (attention of tokens that
    all look alike averages their values, so only the value path remains), and ``x -> x + mlp(LN2 x)`` as
    ``I + diag(ls2) W_fc2 a W_fc1 diag(g2) C`` with ``a`` the activation's slope (:func:`activation_slope`). ``C``
    centres (LayerNorm's mean removal); LayerNorm's ``1/sigma`` is left out, as SINDER does: it is a per-token
    scalar set by the data, and keeping it would make the map depend on an input instead of the weights alone.
    Biases are left out: they shift every token alike and have no direction to amplify."""
    attn, mlp = block.attn, block.mlp
    D = attn.proj.weight.shape[0]
    centre = torch.eye(D, dtype=torch.float64) - 1.0 / D
    W_v = attn.qkv.weight.detach().double()[2 * D:3 * D]
    g1 = block.norm1.weight.detach().double()
    A = _layer_scale(block.ls1, D)[:, None] * (attn.proj.weight.detach().double() @ W_v) * g1[None, :] @ centre
    g2 = block.norm2.weight.detach().double()
    a = activation_slope(mlp.act)
    M = (_layer_scale(block.ls2, D)[:, None] * (mlp.fc2.weight.detach().double() * a @ mlp.fc1.weight.detach().double())
         * g2[None, :]) @ centre
    eye = torch.eye(D, dtype=torch.float64)
    return (eye + M) @ (eye + A)


#: The children of a timm pre-norm ``Block`` that :func:`linear_block` accounts for.
KNOWN_BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


def linearisation_problem(blocks: list[torch.nn.Module]) -> str | None:
    """Why :func:`linear_block` cannot read these blocks (None when it can): it knows timm's pre-norm ``Block``
    with fused ``qkv``, an elementwise activation between ``fc1`` and ``fc2``, LayerNorm and optional layer scale."""
    for i, b in enumerate(blocks):
        have = {name: getattr(b, name, None) for name in ("norm1", "attn", "norm2", "mlp", "ls1", "ls2")}
        missing = [n for n, v in have.items() if v is None]
        if missing:
            return f"block {i} ({type(b).__name__}) is not a plain pre-norm block (no {', '.join(missing)})"
        if not all(hasattr(b.mlp, n) for n in ("fc1", "act", "fc2")) or getattr(b.mlp, "fc1_g", None) is not None:
            return f"block {i}'s MLP ({type(b.mlp).__name__}) is gated or not fc1-act-fc2; not linearised yet"
        if not (hasattr(b.attn, "qkv") and hasattr(b.attn, "proj")):
            return f"block {i}'s attention ({type(b.attn).__name__}) has no fused qkv; not linearised yet"
        extra = [n for n, _ in b.named_children() if n not in KNOWN_BLOCK_PARTS]
        if extra:  # e.g. the phantom's artifact units: a path the linear map would silently leave out
            return f"block {i} has modules the linearisation does not model ({', '.join(extra)})"
        if not isinstance(b.norm1, torch.nn.LayerNorm) or not isinstance(b.norm2, torch.nn.LayerNorm):
            return f"block {i} normalises with {type(b.norm1).__name__}, not LayerNorm; not linearised yet"
    return None


@dataclass
class DefectDirection:
    """The leading left singular vector of the linearised blocks ``0 .. block`` and its singular value, with the
    singular value of a Gaussian matrix of the same shape and Frobenius norm (the null: how far one direction
    dominates beyond what any matrix of that size and energy shows)."""

    block: int
    direction: torch.Tensor
    singular_value: float
    random_singular_value: float

    @property
    def dominance(self) -> float:
        return self.singular_value / self.random_singular_value


def defect_directions(blocks: list[torch.nn.Module], seed: int = 0) -> list[DefectDirection]:
    """One :class:`DefectDirection` per block, from the cumulative product of :func:`linear_block`."""
    out = []
    product = None
    gen = torch.Generator().manual_seed(seed)
    for i, block in enumerate(blocks):
        lin = linear_block(block)
        product = lin if product is None else lin @ product
        # The leading left singular pair from the symmetric eigenproblem of A A^T (its top eigenvector, the root of
        # its top eigenvalue): only the first pair is read, and eigh costs a fraction of a full SVD (12 SVDs of
        # 384x384 were most of a ViT-S's fixed cost); the same holds for the random matrix's largest singular value.
        values, vectors = torch.linalg.eigh(product @ product.T)
        noise = torch.randn(product.shape, generator=gen, dtype=torch.float64)
        noise *= product.norm() / noise.norm()
        random_sv = float(torch.linalg.eigvalsh(noise @ noise.T)[-1].clamp_min(0).sqrt())
        out.append(DefectDirection(i, vectors[:, -1].float(), float(values[-1].clamp_min(0).sqrt()), random_sv))
    return out


def random_cos_quantile(dim: int, q: float = NULL_QUANTILE, samples: int = 20_000, seed: int = 0) -> float:
    """The ``q`` quantile of ``|cos|`` between a fixed vector and a uniformly random direction in ``dim`` dims
    (seeded Monte Carlo; about ``2.58 / sqrt(dim)`` at 99% for large ``dim``)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, dim, generator=gen, dtype=torch.float64)
    cos = x[:, 0].abs() / x.norm(dim=1)
    return float(torch.quantile(cos, q))


def abs_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    den = float(a.norm() * b.norm())
    return abs(float(a @ b)) / den if den > 0 else math.nan


# ----------------------------------------------------------------------------------------------- lazy aggregation
def patch_centres_in_boxes(boxes: list[list[float]], grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """``[gh * gw]`` booleans: whether each patch's centre lies inside one of ``boxes`` (``[x0, y0, x1, y1]``
    pixels of a ``size = (H, W)`` image, half-open), row-major like the tokens."""
    gh, gw = grid
    H, W = size
    ys = (torch.arange(gh, dtype=torch.float64) + 0.5) * (H / gh)
    xs = (torch.arange(gw, dtype=torch.float64) + 0.5) * (W / gw)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    inside = torch.zeros(gh, gw, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes:
        inside |= (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
    return inside.flatten()


def hit_null_interval(null_ratios: list[float], num_images: int) -> tuple[float, float]:
    """The 99% range of a hit ratio under the random-init null: from the lowest to the highest seed's ratio,
    widened by ``Z99`` binomial standard errors at the seeds' mean rate (the seeds give the spread between random
    models, the binomial term the spread of ``num_images`` draws). ``num_images``: the images each seed was measured
    on; fewer than the model's widen the range (the null is then known less well), never narrow it."""
    p = sum(null_ratios) / len(null_ratios)
    se = math.sqrt(max(p * (1 - p), 1.0 / num_images) / num_images)  # never a zero-width range at p = 0 or 1
    return max(0.0, min(null_ratios) - Z99 * se), min(1.0, max(null_ratios) + Z99 * se)
