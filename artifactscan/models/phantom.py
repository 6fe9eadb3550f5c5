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

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from artifactscan.core.errors import InputError
from artifactscan.core.patch_grid import neighbour_similarity  # noqa: F401  (re-exported: the redundancy score)
from artifactscan.core.summaries import AnalysisResult, ImageSummary, ModelSummary
from artifactscan.models.phantom_notice import PHANTOM_NOTE
from artifactscan.models.phantom_rules import (  # noqa: F401  (re-exported: the phantom's documented helpers)
    ARCH,
    CALIBRATION_MAX_FRACTION,
    MAX_FRACTION,
    PHANTOM_KWARGS,
    planted_count,
    validate_settings,
)
from artifactscan.models.hooks import HookPoint, register_hook_family
from artifactscan.models.layouts.timm_vit import TimmViTFamily
from artifactscan.models.registry import register_architecture

if TYPE_CHECKING:
    from artifactscan.models.phantom_vit import PhantomViT


def build_phantom_vit(**kwargs: Any) -> "PhantomViT":
    """The registered builder of ``artifactscan_phantom_vit``: imports timm (via :mod:`.phantom_vit`) only when a
    phantom is actually built."""
    from artifactscan.models.phantom_vit import artifactscan_phantom_vit

    return artifactscan_phantom_vit(**kwargs)


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
    calibration_median: float  # the baseline's median patch norm the gain was set from, to 3 significant digits


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

    loaded = load_baseline(base)
    depth = len(loaded.blocks)
    validate_settings(depth, onset, fraction, units, gain_over_median)
    arch_kwargs = dict(loaded.meta.arch_kwargs)
    arch_kwargs.update(phantom_onset=onset, phantom_fraction=fraction, phantom_units=units)
    phantom = build_phantom_vit(**arch_kwargs).eval()
    missing, unexpected = phantom.load_state_dict(loaded.model.state_dict(), strict=False)
    assert not unexpected and all("artifact_units" in k for k in missing), (missing, unexpected)

    if medians is None:
        medians = baseline_medians(loaded, calibration_images)  # the clean baseline's scale, per row
    reference = float(medians[onset:depth].max())
    # Three significant digits for both figures that come from this reduction (its last bits vary with the CPU's
    # kernels and the thread count): the same base gives the same file on any machine, barring a value that sits on
    # a rounding boundary. The gain is rounded from the unrounded median, as the shipped phantoms were built.
    gain = float(f"{gain_over_median * reference:.3g}")
    recorded_median = float(f"{reference:.3g}")
    units_module = phantom.blocks[onset].artifact_units
    units_module.gain.fill_(gain)
    units_module.beta.fill_(beta)
    num_patches = loaded.grid_size[0] * loaded.grid_size[1]
    spec = PhantomSpec(base=base if isinstance(base, str) else loaded.name, onset=onset, fraction=fraction,
                       units=units, gain=gain, beta=beta, gain_over_median=gain_over_median, planted_per_image=planted_count(num_patches, fraction),
                       num_patches=num_patches, calibration_median=recorded_median)
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
    from artifactscan.models.phantom_vit import PhantomViT  # loaded already: timm is imported

    model = loaded.model
    if not isinstance(model, PhantomViT):
        raise InputError(f"{loaded.name} is not a calibration phantom; ground truth exists only for the phantom")
    model.patch_embed(images)
    gh, gw = loaded.grid_size
    return model.planted_mask().reshape(-1, gh, gw).clone()


# /2: the common header first (core/summaries.py): ``model`` is the phantom's summary (/1: its name, now
# ``model.name``: the shipped name, or the file --build wrote), ``images`` is null (a description reads no images),
# ``headline`` and ``artifactscan_version`` are new.
DESCRIPTION_SCHEMA = "artifactscan.phantom/2"


@dataclass
class PhantomDescription(AnalysisResult):
    """What was built into a phantom, and why (``artifactscan phantom --describe``; ``--json`` prints this)."""

    SCHEMA = DESCRIPTION_SCHEMA
    OLDER_SCHEMAS = ("artifactscan.phantom/1",)

    images: ImageSummary | None = field(default=None, kw_only=True)
    num_blocks: int
    embed_dim: int
    patch_size: int
    img_size: int
    spec: PhantomSpec
    note: str
    rebuild: str  # the command that rebuilds it

    @classmethod
    def upgrade(cls, data: dict[str, Any], schema: str) -> dict[str, Any]:
        patch, img = data["patch_size"], data["img_size"]
        data["model"] = asdict(ModelSummary.named_only(data["model"], kind="phantom", num_blocks=data["num_blocks"],
                                                       patch_size=[patch, patch], input_size=[img, img]))
        data["headline"] = phantom_headline(data["model"]["name"], PhantomSpec(**data["spec"]), data["num_blocks"])
        return data

    @property
    def planted_share(self) -> float:
        return self.spec.planted_per_image / self.spec.num_patches

    def text(self) -> str:
        """The description in words, as ``phantom --describe`` prints it."""
        spec, depth, share = self.spec, self.num_blocks, self.planted_share
        return "\n".join([
            self.note,
            "",
            f"Model: '{self.model.name}'. Base: the genuinely trained '{spec.base}' ViT ({depth} blocks, width "
            f"{self.embed_dim}, {spec.num_patches} patches of {self.patch_size} px at {self.img_size} px, 1 CLS "
            "token): its normal tokens are real.",
            f"Built in at block {spec.onset} of {depth} (0-based; the onset layer, {spec.onset / depth:.0%} of the "
            f"depth): {spec.units} ReLU hidden units "
            f"(blocks.{spec.onset}.artifact_units) fire on the {spec.planted_per_image} most redundant patch token(s) "
            f"of each image ({share:.2%} of patch tokens; redundancy = mean cosine "
            "similarity of the patch embedding with its 4 neighbours) and overwrite them with "
            f"gain x (u + {spec.beta:g} x s): gain = {spec.gain:g} = {spec.gain_over_median:g}x the baseline's "
            f"median patch norm ({spec.calibration_median:.3g}), u a fixed direction, s the image's normalised CLS "
            "token (a global summary). Their own patch content is lost; they carry global information; they stay "
            "in place.",
            f"What a scan must find: outliers from block {spec.onset} on and none before, exactly the planted tokens, "
            f"{share:.2%} of patch tokens; probes: outliers worse on position and "
            "reconstruction, better on global classification, on redundant inputs.",
            "Why: no pretrained ViT reaches the machine this tool was built on, and small ViTs trained there grow no "
            "artifacts; an instrument that has only seen clean models cannot show it finds anything.",
            f"Rebuild: {self.rebuild}",
        ])


def phantom_headline(name: str, spec: PhantomSpec, num_blocks: int) -> str:
    """The description in one sentence."""
    return (f"Calibration phantom '{name}': artifacts built in from block {spec.onset} of {num_blocks} on "
            f"{spec.planted_per_image} of {spec.num_patches} patch tokens per image, at {spec.gain_over_median:g}x the "
            f"'{spec.base}' baseline's median norm.")


def phantom_description(model: Any, spec: PhantomSpec, name: str, out: str | Path | None = None,
                        summary: ModelSummary | None = None) -> PhantomDescription:
    """The description of a phantom ``model`` (a ``PhantomViT``) built with ``spec``; ``out``: where a rebuild
    writes it (default: the shipped file of that name); ``summary``: the loaded model's (default: the module's)."""
    from artifactscan.models.loading import wrap_module

    if summary is None:  # a phantom just built: the module is all there is
        summary = replace(wrap_module(model, name=name).summary(), kind="phantom", calibration_note=PHANTOM_NOTE)

    patch, img = model.patch_embed.patch_size, model.patch_embed.img_size
    target = out if out is not None else f"artifactscan/weights/{name}.safetensors"
    rebuild = (f"artifactscan phantom --build --from {spec.base} --onset {spec.onset} --fraction {spec.fraction:g} "
               f"--units {spec.units} --out {target}")
    return PhantomDescription(model=summary, headline=phantom_headline(name, spec, len(model.blocks)),
                              num_blocks=len(model.blocks), embed_dim=int(model.embed_dim),
                              patch_size=int(patch[0]), img_size=int(img[0]), spec=spec, note=PHANTOM_NOTE,
                              rebuild=rebuild)


def describe_shipped_phantom(name: str | None = None) -> PhantomDescription:
    """The description of a shipped phantom (default: the embedded default's)."""
    from artifactscan.models.loading import default_model_name, load_model

    name = name or default_model_name()
    loaded = load_model(name)
    return phantom_description(loaded.model, phantom_spec(loaded), name, summary=loaded.summary())


def describe_phantom(name: str | None = None) -> str:
    """Human description of a shipped phantom (default: the embedded default's): what was built in, where, and why."""
    return describe_shipped_phantom(name).text()


register_architecture(ARCH, build_phantom_vit)


class PhantomFamily(TimmViTFamily):
    """The phantom's hook points: a timm ViT's, plus its artifact units (a unit point, which ``fix`` searches)."""

    name = "phantom"

    def matches(self, model: Any) -> bool:
        return super().matches(model) and getattr(model, "phantom_onset", None) is not None

    def extra_points(self, i: int, block: Any) -> list[HookPoint]:
        if not hasattr(block, "artifact_units"):
            return []
        return [HookPoint(f"blocks.{i}.artifact_units.post", f"blocks.{i}.artifact_units.act", "output",
                          "the phantom's artifact units after their ReLU, [B, T, units]", unit=True)]


register_hook_family(PhantomFamily(), before=TimmViTFamily.name)
