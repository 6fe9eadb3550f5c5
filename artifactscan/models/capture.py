"""Per-token L2 norms of the residual stream, block by block, without keeping features (on the capture layer).

Row ``i`` (0-based, like timm's ``forward_intermediates`` indices) is ``blocks.{i}.resid_post``: the residual stream
*before* the final LayerNorm, where the paper measures. The last row (``num_blocks``) is ``final_norm``, the model's
final normalised output, reported as its own row. Each block's ``[B, T, D]`` output is reduced to ``[B, T]`` norms
inside its hook, so only one block's features are alive at a time.
"""

from __future__ import annotations

import torch

from artifactscan.core.numerics import measurement_mode
from artifactscan.models.hooks import CaptureContext, block_point, family_of, unwrap_model


def row_names(num_blocks: int) -> list[str]:
    return [f"block {i}" for i in range(num_blocks)] + ["final norm"]


def norm_points(num_blocks: int) -> list[str]:
    """The hook names of the rows of :func:`row_names`, in the same order."""
    return [block_point(i, "resid_post") for i in range(num_blocks)] + ["final_norm"]


def token_norms(tokens: torch.Tensor) -> torch.Tensor:
    """``[B, T, D]`` -> ``[B, T]`` L2 norms, in float32 even under bf16 autocast (outliers are ~10x the bulk and
    must not saturate)."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
        raise RuntimeError(f"a block returned {type(tokens).__name__} of shape "
                           f"{getattr(tokens, 'shape', '?')}; expected tokens shaped [batch, tokens, channels]")
    return torch.linalg.vector_norm(tokens.detach().float(), dim=-1)


class NormCapture(CaptureContext):
    """Token norms of every block and of the final output, one forward at a time.

    Use as a context manager; the hooks are removed on exit even if the forward raises, so the model is left as
    it was found::

        with NormCapture(loaded) as cap:
            norms = cap.run(images)      # [num_blocks + 1, B, T]
    """

    def __init__(self, loaded: object):
        module = unwrap_model(loaded)
        self.names = norm_points(family_of(module).num_blocks(module))
        super().__init__(loaded, self.names, reduce=token_norms)

    @measurement_mode()
    def run(self, images: torch.Tensor) -> torch.Tensor:
        """One forward pass; returns norms shaped ``[num_blocks + 1, B, T]`` (last row: final normalised output)."""
        captured = self.forward_captured(images)
        return torch.stack([captured[n] for n in self.names])
