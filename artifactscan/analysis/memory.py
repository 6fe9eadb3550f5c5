"""Will one batch fit? An estimate of a ViT forward's activation memory, checked before any image is decoded.

A ViT at a large ``--img-size`` has quadratically many tokens: the phantom (patch 4) at 4096 px has a million tokens
per image, and a batch of 32 needs hundreds of GiB. Without a check the kernel kills the process after minutes with
no message; with it the run is refused at once, with the number and the memory available.
"""

from __future__ import annotations

import torch

from artifactscan.core.errors import ResourceError, option
from artifactscan.core.memory import GIB, available_bytes  # noqa: F401  (the checks' own names)


def activation_bytes(loaded, batch_size: int, explicit_attention: bool = False) -> tuple[int, int]:
    """``(bytes for the batch, bytes per image)``: a lower bound on the float32 memory one block's forward holds.

    Per token: the residual stream in and out, its LayerNorm, q/k/v, the attention output (8 x width) and the MLP's
    hidden layer before and after its activation (2 x hidden); per image also the input tensor (twice: decoded and
    normalised). ``explicit_attention`` (the attention command turns the fused kernel off) adds the ``heads x T x T``
    probabilities, twice (scores and softmax).
    """
    model = loaded.model
    h, w = loaded.input_size
    gh, gw = loaded.grid_size
    tokens = loaded.num_prefix_tokens + gh * gw
    width = int(getattr(model, "embed_dim", 0) or getattr(model, "num_features", 0) or 0)
    block = loaded.blocks[0] if loaded.blocks else None
    fc1 = getattr(getattr(block, "mlp", None), "fc1", None)
    hidden = int(getattr(fc1, "out_features", 0) or 4 * width)
    heads = int(getattr(getattr(block, "attn", None), "num_heads", 1) or 1)
    per_token = 8 * width + 2 * hidden
    per_image = 4 * (2 * 3 * h * w + tokens * per_token + (2 * heads * tokens * tokens if explicit_attention else 0))
    return batch_size * per_image, per_image


def check_fits(loaded, batch_size: int, device: torch.device, explicit_attention: bool = False,
               available: int | None = None) -> None:
    """Refuse (:class:`ResourceError`) a batch whose activations would not fit in the memory available."""
    need, per_image = activation_bytes(loaded, batch_size, explicit_attention)
    free = available if available is not None else available_bytes(device)
    if free is None or need <= free:
        return
    h, w = loaded.input_size
    where = "GPU memory" if device.type == "cuda" else "memory"
    if per_image <= free:
        fit = max(1, int(free // per_image))
        hint = f"use {option('batch_size', fit)} or smaller"
    else:
        hint = f"lower {option('img_size')} (or scan on a machine with more memory)"
    raise ResourceError(
        f"{h}x{w} inputs need about {need / GIB:.1f} GiB of activations for a batch of {batch_size} "
        f"({per_image / GIB:.2f} GiB per image, {loaded.num_prefix_tokens + loaded.grid_size[0] * loaded.grid_size[1]:,} "
        f"tokens) but {free / GIB:.1f} GiB of {where} is available; {hint}")
