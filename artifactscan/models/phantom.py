"""The calibration phantom: the trained demo ViT with the paper's artifact mechanism built in, so the answer is known.

Why: no pretrained ViT reaches this machine, and small ViTs trained here grow no artifacts. An instrument that is only
ever run on clean models can never show that it finds anything. Measurement science answers this with a *phantom*:
an object whose defects are known because they were put there.

What is built in (all at one block, the *onset*, and after it), following the mechanism Jiang et al. (2025) found in
real ViTs:

* At the input, every patch gets a **redundancy** score: the mean cosine similarity of its patch embedding with its 4
  neighbours. The ``k = max(1, floor(fraction * num_patches))`` most redundant patches of each image (at most 2 %:
  background, low-information patches) are the planted ones.
* In the onset block, a bank of ``units`` ReLU hidden units (``blocks[onset].artifact_units``; their post-activation
  is the output of the hook point ``blocks[onset].artifact_units.act``) fires with activation ``gain`` on exactly the
  planted patch tokens and is silent elsewhere (prefix tokens included).
* Their write **overwrites** the token: ``x <- gain * (u + beta * s)``, where ``u`` is a fixed unit direction and ``s``
  the image's global summary (the normalised CLS token at that block: the model's own attention-pooled summary; the
  mean patch token when there is no CLS). The token's own patch content is swamped (local information lost) and it
  carries global information instead; its norm is >= 10x the median from the onset on. The token stays in place, so
  later blocks attend to it.

Everything else is the genuinely trained demo baseline, so the normal tokens are real. The phantom's findings are
facts about this construction, never about real models.
"""

from __future__ import annotations

import math
from functools import partial
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models import register_model
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from artifactscan.core.errors import InputError
from artifactscan.models.registry import register_architecture

ARCH = "artifactscan_phantom_vit"
MAX_FRACTION = 0.02  # the shipped phantoms: the paper's ~2% of patch tokens
CALIBRATION_MAX_FRACTION = 0.08  # calibration builds (artifactscan calibrate) may plant up to 8% of patches
PHANTOM_KWARGS = ("phantom_onset", "phantom_fraction", "phantom_units", "phantom_gain", "phantom_beta")


class _PlantState:
    """Shared per-forward state (a plain object, not a Module, so no parameters are registered twice)."""

    def __init__(self) -> None:
        self.redundancy: torch.Tensor | None = None  # [B, N]
        self.planted: torch.Tensor | None = None  # [B, N] bool


def neighbour_similarity(patch_tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Mean cosine similarity of each patch embedding with its (up to 4) grid neighbours: ``[B, N] -> [B, N]``."""
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
    return (total / count).reshape(B, N)


def planted_count(num_patches: int, fraction: float) -> int:
    return max(1, int(math.floor(fraction * num_patches + 1e-9)))


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


def validate_settings(depth: int, onset: int, fraction: float, units: int, gain_over_median: float = 25.0) -> None:
    if not 0 <= onset < depth:
        raise InputError(f"--onset {onset} is outside the model: choose a block from 0 to {depth - 1}")
    if not 0 < fraction <= CALIBRATION_MAX_FRACTION:
        raise InputError(f"--fraction {fraction:g} is outside (0, {CALIBRATION_MAX_FRACTION:g}]: the paper's artifacts "
                         f"are about 2% of patch tokens; a phantom plants at most {CALIBRATION_MAX_FRACTION:.0%}")
    if units < 1:
        raise InputError(f"--units {units} must be at least 1")
    if not (math.isfinite(gain_over_median) and gain_over_median > 1):
        raise InputError(f"--gain {gain_over_median:g} must be above 1: planted tokens are written at gain x the "
                         "baseline's median patch norm, so a gain <= 1 plants nothing above the bulk")


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


# ----------------------------------------------------------------------------------------------- building it
@dataclass
class PhantomSpec:
    """How a phantom was built (stored in its checkpoint; ``artifactscan phantom --describe`` prints it)."""

    base: str
    onset: int
    fraction: float
    units: int
    gain: float
    beta: float
    gain_over_median: float
    planted_per_image: int
    num_patches: int
    calibration_median: float


def _median_patch_norms(loaded: Any, images: torch.Tensor) -> torch.Tensor:
    from artifactscan.models.capture import NormCapture

    with NormCapture(loaded) as cap:
        norms = cap.run(images)[:, :, loaded.num_prefix_tokens:]
    return norms.flatten(1).median(dim=1).values  # [rows]


def load_baseline(base: Any = "demo") -> Any:
    """Load and check a phantom's baseline (a self-describing ViT without registers, e.g. ``demo``)."""
    from artifactscan.models.loading import load_model

    loaded = load_model(base)
    if loaded.kind == "phantom" or loaded.arch != "vit_small_patch16_224" or loaded.meta is None:
        raise InputError(f"the phantom is built from the shipped demo baseline architecture (a self-describing "
                         f"vit_small_patch16_224 checkpoint such as 'demo'); {loaded.name} is "
                         f"{loaded.arch or type(loaded.model).__name__}")
    if loaded.num_register_tokens:
        raise InputError("build the phantom from a baseline without registers (e.g. 'demo', not 'demo-reg4')")
    return loaded


def baseline_medians(loaded: Any, calibration_images: int = 256) -> torch.Tensor:
    """Median patch norm per captured row of the clean baseline, on the built-in synthetic validation images."""
    from artifactscan.inputs.synthetic import SyntheticShapes

    h, w = loaded.input_size
    data = SyntheticShapes(calibration_images, seed=1234, img_size=h, split="val")
    mean = torch.tensor(loaded.data_config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(loaded.data_config["std"]).view(1, 3, 1, 1)
    images = (torch.stack([data[i][0] for i in range(len(data))]) - mean) / std
    return _median_patch_norms(loaded, images)


def build_phantom(base: Any = "demo", out: str | Path | None = None, *, onset: int = 2,
                  fraction: float = MAX_FRACTION, units: int = 4, gain_over_median: float = 25.0,
                  beta: float = 0.5, calibration_images: int = 256,
                  medians: torch.Tensor | None = None) -> tuple[PhantomViT, PhantomSpec, Path | None]:
    """Build the phantom from a trained baseline (deterministic: the same base gives the same file).

    ``gain`` is set to ``gain_over_median`` x the largest median patch norm of the base model's blocks from the onset
    on, measured on the built-in synthetic data, so planted tokens stand >= 10x above the bulk at every later block
    with the default 25. ``base`` may be an already loaded baseline and ``medians`` its :func:`baseline_medians`
    (calibration builds many phantoms from one base). ``fraction`` up to 2% for shipped phantoms, up to 8% for
    calibration builds.
    """
    from artifactscan.models.checkpoint import CheckpointMeta, save_checkpoint
    from artifactscan.models.loading import PHANTOM_NOTE

    loaded = load_baseline(base)
    depth = len(loaded.blocks)
    validate_settings(depth, onset, fraction, units, gain_over_median)
    arch_kwargs = dict(loaded.meta.arch_kwargs)
    arch_kwargs.update(phantom_onset=onset, phantom_fraction=fraction, phantom_units=units)
    phantom = PhantomViT(**arch_kwargs).eval()
    missing, unexpected = phantom.load_state_dict(loaded.model.state_dict(), strict=False)
    assert not unexpected and all("artifact_units" in k for k in missing), (missing, unexpected)

    if medians is None:
        medians = baseline_medians(loaded, calibration_images)  # the clean baseline's scale, per row
    reference = float(medians[onset:depth].max())
    # Three significant digits: the same base gives the same file whatever the thread count's rounding.
    gain = float(f"{gain_over_median * reference:.3g}")
    units_module = phantom.blocks[onset].artifact_units
    units_module.gain.fill_(gain)
    units_module.beta.fill_(beta)
    num_patches = loaded.grid_size[0] * loaded.grid_size[1]
    spec = PhantomSpec(base=base if isinstance(base, str) else loaded.name, onset=onset, fraction=fraction,
                       units=units, gain=gain, beta=beta, gain_over_median=gain_over_median, planted_per_image=planted_count(num_patches, fraction),
                       num_patches=num_patches, calibration_median=reference)
    path = None
    if out is not None:
        meta = CheckpointMeta(arch=ARCH, arch_kwargs=arch_kwargs, data_config=dict(loaded.data_config),
                              kind="phantom", description=PHANTOM_NOTE, extra={"phantom": asdict(spec)})
        state = {k: v.to(torch.float16) if v.is_floating_point() and k.count("artifact_units") == 0 else v
                 for k, v in phantom.state_dict().items()}
        path = save_checkpoint(out, state, meta)
    return phantom, spec, path


def phantom_spec(loaded: Any) -> PhantomSpec:
    """The build settings recorded in a loaded phantom's checkpoint."""
    if loaded.kind != "phantom" or loaded.meta is None or "phantom" not in loaded.meta.extra:
        raise InputError(f"{loaded.name} is not a calibration phantom")
    return PhantomSpec(**loaded.meta.extra["phantom"])


@torch.inference_mode()
def ground_truth(loaded: Any, images: torch.Tensor) -> torch.Tensor:
    """Which patch tokens the phantom plants for these (normalised) images: ``[B, gh, gw]`` bool."""
    model = loaded.model
    if not isinstance(model, PhantomViT):
        raise InputError(f"{loaded.name} is not a calibration phantom; ground truth exists only for the phantom")
    model.patch_embed(images)
    gh, gw = loaded.grid_size
    return model.planted_mask().reshape(-1, gh, gw).clone()


def describe_phantom(name: str | None = None) -> str:
    """Human description of a shipped phantom (default: the embedded default's): what was built in, where, and why."""
    from artifactscan.models.loading import PHANTOM_NOTE, default_model_name, load_model

    name = name or default_model_name()
    loaded = load_model(name)
    spec = phantom_spec(loaded)
    depth = len(loaded.blocks)
    share = spec.planted_per_image / spec.num_patches
    return "\n".join([
        PHANTOM_NOTE,
        "",
        f"Model: '{name}'. Base: the genuinely trained '{spec.base}' ViT ({depth} blocks, width "
        f"{loaded.model.embed_dim}, {spec.num_patches} patches of {loaded.patch_size[0]} px at "
        f"{loaded.input_size[0]} px, 1 CLS token): its normal tokens are real.",
        f"Built in at block {spec.onset} of {depth} (0-based; the onset layer, {spec.onset / depth:.0%} of the depth): "
        f"{spec.units} ReLU hidden units "
        f"(blocks.{spec.onset}.artifact_units) fire on the {spec.planted_per_image} most redundant patch token(s) of "
        f"each image ({share:.2%} of patch tokens; redundancy = mean cosine "
        "similarity of the patch embedding with its 4 neighbours) and overwrite them with "
        f"gain x (u + {spec.beta:g} x s): gain = {spec.gain:g} = {spec.gain_over_median:g}x the baseline's median "
        f"patch norm ({spec.calibration_median:.3g}), u a fixed direction, s the image's normalised CLS token (a "
        "global summary). Their own patch content is lost; they carry global information; they stay in place.",
        f"What a scan must find: outliers from block {spec.onset} on and none before, exactly the planted tokens, "
        f"{share:.2%} of patch tokens; probes: outliers worse on position and "
        "reconstruction, better on global classification, on redundant inputs.",
        "Why: no pretrained ViT reaches the machine this tool was built on, and small ViTs trained there grow no "
        "artifacts; an instrument that has only seen clean models cannot show it finds anything.",
        f"Rebuild: artifactscan phantom --build --from {spec.base} --onset {spec.onset} --fraction {spec.fraction:g} "
        f"--units {spec.units} --out artifactscan/weights/{name}.safetensors",
    ])


register_architecture(ARCH, artifactscan_phantom_vit)
