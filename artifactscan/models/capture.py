"""Recording per-token L2 norms of the residual stream, block by block, without keeping features.

Row ``i`` (0-based, like timm's ``forward_intermediates`` indices) is the output of ``model.blocks[i]``: the residual
stream *before* the final LayerNorm, where the paper measures. The last row (``num_blocks``) is the model's final
normalised output (``forward_features``), reported as its own row.
"""

from __future__ import annotations

import torch
from torch import nn

from artifactscan.core.numerics import measurement_mode
from artifactscan.models.loading import LoadedModel


def row_names(num_blocks: int) -> list[str]:
    return [f"block {i}" for i in range(num_blocks)] + ["final norm"]


def _token_norms(output: object) -> torch.Tensor:
    tokens = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
        raise RuntimeError(f"a block returned {type(tokens).__name__} of shape "
                           f"{getattr(tokens, 'shape', '?')}; expected tokens shaped [batch, tokens, channels]")
    # Norms in float32 even under bf16 autocast: the outliers are ~10x the bulk and must not saturate.
    return torch.linalg.vector_norm(tokens.detach().float(), dim=-1)


class NormCapture:
    """Forward hooks on every block that keep only the ``[B, T]`` token norms of the latest forward.

    Use as a context manager; the hooks are removed on exit even if the forward raises, so the model is left as
    it was found::

        with NormCapture(loaded) as cap:
            norms = cap.run(images)      # [num_blocks + 1, B, T]
    """

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.blocks: list[nn.Module] = loaded.blocks
        self._norms: list[torch.Tensor | None] = [None] * len(self.blocks)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> "NormCapture":
        for i, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_hook(self._make_hook(i)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._norms = [None] * len(self.blocks)

    def _make_hook(self, index: int):
        def hook(module: nn.Module, inputs: object, output: object) -> None:
            self._norms[index] = _token_norms(output)
        return hook

    @measurement_mode()
    def run(self, images: torch.Tensor) -> torch.Tensor:
        """One forward pass; returns norms shaped ``[num_blocks + 1, B, T]`` (last row: final normalised output)."""
        if not self._handles:
            raise RuntimeError("NormCapture.run() must be called inside `with NormCapture(...)`")
        final = self.loaded.model.forward_features(images)
        rows = self._norms + [_token_norms(final)]
        if any(r is None for r in rows):
            raise RuntimeError("some blocks did not run during forward_features; cannot capture every layer")
        out = torch.stack(rows)  # type: ignore[arg-type]
        self._norms = [None] * len(self.blocks)
        return out
