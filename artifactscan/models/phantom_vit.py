"""The calibration phantom's architecture: a timm VisionTransformer whose onset block carries the artifact units.

What is built in, and why, is described in :mod:`artifactscan.models.phantom`; this module holds the timm subclasses
(importing it imports timm) and registers ``artifactscan_phantom_vit`` with timm's model registry.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models import register_model
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from artifactscan.core.patch_grid import neighbour_similarity
from artifactscan.models.phantom_rules import MAX_FRACTION, planted_count, validate_settings


class _PlantState:
    """Shared per-forward state (a plain object, not a Module, so no parameters are registered twice)."""

    def __init__(self) -> None:
        self.redundancy: torch.Tensor | None = None  # [B, N]
        self.planted: torch.Tensor | None = None  # [B, N] bool


class RedundancyPatchEmbed(PatchEmbed):
    """timm's PatchEmbed (same parameters) that also records which patches are the most redundant."""

    def __init__(self, *args: Any, plant_state: _PlantState, fraction: float, **kwargs: Any):
        super().__init__(*args, **kwargs)  # same parameters as timm's PatchEmbed: the base weights load as they are
        self._state = plant_state
        self.fraction = fraction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)  # [B, N, C] (flattened, before position embedding); NHWC when dynamic size
        grid = (x.shape[-2] // self.patch_size[0], x.shape[-1] // self.patch_size[1])
        redundancy = neighbour_similarity(out.reshape(out.shape[0], -1, out.shape[-1]), grid)
        k = planted_count(redundancy.shape[1], self.fraction)
        top = redundancy.topk(k, dim=1).indices
        planted = torch.zeros_like(redundancy, dtype=torch.bool).scatter_(1, top, True)
        self._state.redundancy, self._state.planted = redundancy, planted
        return out


class ArtifactUnits(nn.Module):
    """The built-in artifact mechanism: ``units`` ReLU hidden units that fire on the planted tokens and overwrite them.

    Buffers (saved in the checkpoint): ``direction`` (the fixed unit vector ``u``), ``gain`` and ``beta``.
    """

    def __init__(self, dim: int, units: int, num_prefix_tokens: int, has_cls: bool, plant_state: _PlantState):
        super().__init__()
        self.units = units
        self.num_prefix_tokens = num_prefix_tokens
        self.has_cls = has_cls
        self._state = plant_state
        self.register_buffer("direction", F.normalize(torch.ones(dim), dim=0))
        self.register_buffer("gain", torch.tensor(1.0))
        self.register_buffer("beta", torch.tensor(0.5))
        self.act = nn.Identity()  # hook point: post-activation of the units, [B, T, units]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        planted = self._state.planted
        if planted is None:
            raise RuntimeError("the phantom's patch embedding did not run before its artifact units")
        B, T, C = x.shape
        P = T - planted.shape[1]  # prefix tokens, including any register appended at test time (artifactscan fix)
        gate = torch.zeros(B, T, dtype=x.dtype, device=x.device)
        gate[:, P:] = planted.to(x.dtype)
        pre = (2 * gate - 1)[..., None] * self.gain  # +gain on planted patch tokens, -gain elsewhere
        activation = self.act(F.relu(pre).expand(B, T, self.units))
        summary = x[:, 0] if self.has_cls else x[:, P:].mean(dim=1)  # timm puts CLS first when there is one
        summary = F.normalize(summary.float(), dim=-1).to(x.dtype)[:, None]  # [B, 1, C]
        target = self.gain * (self.direction + self.beta * summary)
        firing = activation.mean(dim=-1, keepdim=True) / self.gain  # 1 on planted tokens, 0 elsewhere
        return x + firing * (target - x)


class PhantomBlock(nn.Module):
    """The trained timm ``Block`` (same children, same state-dict keys) followed by the artifact units."""

    def __init__(self, block: Block, artifact_units: ArtifactUnits):
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)
        self.artifact_units = artifact_units

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        # Block.forward only touches the children copied above, so it runs unchanged on this module.
        return self.artifact_units(Block.forward(self, x, attn_mask=attn_mask))  # type: ignore[arg-type]


class PhantomViT(VisionTransformer):
    """A timm VisionTransformer whose ``phantom_onset`` block carries the built-in artifact units."""

    def __init__(self, phantom_onset: int = 2, phantom_fraction: float = MAX_FRACTION, phantom_units: int = 4,
                 **kwargs: Any):
        state = _PlantState()  # created before Module.__init__, so it is passed in rather than set on self
        super().__init__(embed_layer=partial(RedundancyPatchEmbed, plant_state=state, fraction=phantom_fraction),
                         **kwargs)
        validate_settings(len(self.blocks), phantom_onset, phantom_fraction, phantom_units)
        self.phantom_onset, self.phantom_fraction, self.phantom_units = phantom_onset, phantom_fraction, phantom_units
        self.plant_state = state
        units = ArtifactUnits(self.embed_dim, phantom_units, self.num_prefix_tokens, self.cls_token is not None, state)
        self.blocks[phantom_onset] = PhantomBlock(self.blocks[phantom_onset], units)

    def planted_mask(self) -> torch.Tensor:
        """Ground truth of the last forward: which patch tokens were planted, ``[B, N]`` bool."""
        if self.plant_state.planted is None:
            raise RuntimeError("run a forward pass first")
        return self.plant_state.planted


@register_model
def artifactscan_phantom_vit(pretrained: bool = False, **kwargs: Any) -> PhantomViT:
    """The calibration phantom's architecture (timm-compatible; build it with ``timm.create_model``)."""
    if pretrained:
        raise ValueError("artifactscan_phantom_vit has no hub weights; load the shipped checkpoint: "
                         "artifactscan.load_model('phantom')")
    kwargs.pop("pretrained_cfg", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    kwargs.pop("cache_dir", None)
    return PhantomViT(**kwargs)
