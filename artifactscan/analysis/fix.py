"""Training-free repair with a test-time register (Jiang et al. 2025, "Vision Transformers Don't Need Trained Registers").

1. **Find the register neurons.** Scan the model; where outlier tokens exist, record every MLP hidden unit's
   post-activation (the unit hook points of blocks ``0 .. max_layer``, ``blocks.{i}.mlp.post`` and any unit points
   the model's family declares; ``max_layer`` defaults to the onset layer) and rank the units by their mean absolute activation at outlier positions. The top ``k`` are the
   register neurons.
2. **Install the register.** At inference one extra zero-initialised token is inserted after the prefix tokens
   (before block 0, no position embedding, like a trained register); up to the block of the first register neuron
   no token attends to it, so image tokens compute exactly what they did there; in every register neuron the activation is
   moved off the image tokens: set to zero on all other tokens and, on the register, to the maximum the neuron
   reached over the image's tokens. This is done per neuron and per image (the reference code edits batch element 0
   only and uses one value per layer).

The neuron list is saved with the weights in a self-describing checkpoint (``meta.extra["test_time_register"]``), so
every command loads the fixed model by path with the repair applied.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from artifactscan.core.blocks import parse_blocks_up_to, renamed_keyword
from artifactscan.core.defaults import BATCH_SIZE, DEVICE, THRESHOLD, TOP_K, WORKERS
from artifactscan.core.numerics import measurement_mode
from artifactscan.core.errors import InputError, NonFiniteError, NotAViTError, option
from artifactscan.models.hooks import block_of, capture, unit_points
from artifactscan.models.loading import LoadedModel
from artifactscan.core.summaries import AnalysisResult, ImageSummary, ModelSummary
from artifactscan.models.interventions import (
    EXTRA_KEY,
    RegisterNeuron,
    TestTimeRegister,
    apply_test_time_register,
    check_supported,
)
from artifactscan.inputs.sources import image_batches, make_image_source
from artifactscan.models.checkpoint import CheckpointMeta, save_checkpoint
from artifactscan.analysis.passes import OUTPUT, Batch, PassSettings, open_pass
from artifactscan.models.materialize import state_dict_in
from artifactscan.analysis.scan import measure_norms
from artifactscan.core.thresholds import AutoRule, threshold_option


@measurement_mode()
def find_register_neurons(loaded: LoadedModel, images: Any, report: Any, *, top_k: int = 4,
                          max_layer: int | None = None, device: torch.device | str = "cpu",
                          batch_size: int = 32, **decode: Any) -> TestTimeRegister:
    """Rank MLP hidden units by mean |activation| at the outlier positions of ``report`` (a scan of ``images``).

    ``decode``: ``num_workers`` / ``exact_decode`` / ``gpu_decode``, as for :func:`artifactscan.scan`."""
    num_blocks = len(loaded.blocks)
    if report.onset_layer is None:
        raise InputError("nothing to fix: the scan found no outlier tokens")
    max_layer = report.onset_layer if max_layer is None else max_layer
    if not 0 <= max_layer < num_blocks:
        raise InputError(f"block {max_layer} is outside the model: choose a block from 0 to {num_blocks - 1}")
    if top_k < 1:
        raise InputError(f"{option('top_k')} must be at least 1, got {top_k}")
    sites = unit_points(loaded, range(max_layer + 1))
    if not sites:
        raise NotAViTError("this model declares no MLP unit hook points in its blocks; cannot locate register "
                           "neurons")
    P = loaded.num_prefix_tokens
    gh, gw = loaded.grid_size
    outlier_pos: dict[int, set[int]] = {}
    for o in report.outliers:  # positions flagged at any block from the onset on (tokens stay in place)
        if o.layer < num_blocks:
            outlier_pos.setdefault(o.image_index, set()).add(o.row * gw + o.col)

    sums: dict[str, list[torch.Tensor]] = {}
    batch_mask: list[torch.Tensor] = []  # the current batch's outlier mask, read by the reducer inside the hook

    def accumulate(name: str, act: torch.Tensor) -> None:
        mask = batch_mask[0]
        patches = act[:, P:].abs().float()  # [B, N, H]
        out_sum = (patches * mask[..., None]).sum(dim=(0, 1))
        norm_sum = (patches * (~mask)[..., None]).sum(dim=(0, 1))
        acc = sums.setdefault(name, [torch.zeros_like(out_sum), torch.zeros_like(norm_sum)])
        acc[0] += out_sum
        acc[1] += norm_sum

    counts = [0.0, 0.0]
    source = make_image_source(images, loaded, exact_decode=decode.get("exact_decode", False),
                               gpu_decode=decode.get("gpu_decode", False))
    with capture(loaded, {name: (lambda act, name=name: accumulate(name, act)) for name in sites}) as cap:
        for x, indices, _ in image_batches(source, batch_size, decode.get("num_workers", "auto"), device):
            if x is None:
                continue
            mask = torch.zeros(len(indices), gh * gw, dtype=torch.bool)
            for j, i in enumerate(indices.tolist()):
                for p in outlier_pos.get(i, ()):
                    mask[j, p] = True
            batch_mask[:] = [mask.to(device)]
            cap.forward(x.to(device))
            counts[0] += int(mask.sum())
            counts[1] += int((~mask).sum())
    n_out, n_norm = counts
    if n_out == 0:
        raise InputError("nothing to fix: no outlier positions among the images")
    units = sum(out_sum.numel() for out_sum, _ in sums.values())
    if top_k > units:  # every unit would be moved: not a repair but a different model
        raise InputError(f"{option('top_k', top_k)} is more than the {units:,} MLP hidden units of blocks 0 to "
                         f"{max_layer}, where register neurons are searched; choose a few (default 4; at most {units:,})")
    candidates = []
    for name, (out_sum, norm_sum) in sums.items():
        block = block_of(name)
        scores = out_sum / n_out
        normal = norm_sum / max(n_norm, 1.0)
        for idx in torch.argsort(scores, descending=True)[:top_k].tolist():
            candidates.append(RegisterNeuron(block, name, idx, float(scores[idx]), float(normal[idx])))
    candidates.sort(key=lambda n: -n.outlier_activation)
    return TestTimeRegister(candidates[:top_k], num_blocks, int(loaded.model.embed_dim), max_layer, loaded.name)


# ----------------------------------------------------------------------------------------------- the fix command
@dataclass
class FixReport(AnalysisResult):
    """Before/after of a test-time register repair. ``model`` is the model before the register was installed."""

    # /2: the common header first (core/summaries.py): ``model`` and ``images`` are summaries (/1: their names),
    # ``headline`` is the verdict, still written as ``verdict`` too for one version.
    SCHEMA = "artifactscan.fix/2"
    OLDER_SCHEMAS = ("artifactscan.fix/1",)

    neurons: list[RegisterNeuron]
    max_layer: int
    before_outlier_fraction: float
    after_outlier_fraction: float
    before_max_over_median: float
    after_max_over_median: float
    outliers_removed: float
    prediction_agreement: float | None
    feature_cosine_mean: float
    feature_cosine_min: float
    saved_to: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        """The headline, under its name before schema /2."""
        return self.headline

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "verdict": self.headline}  # the /1 key, kept for one version

    @classmethod
    def upgrade(cls, data: dict[str, Any], schema: str) -> dict[str, Any]:
        data["model"] = asdict(ModelSummary.named_only(data["model"]))
        data["images"] = asdict(ImageSummary.described_only(data["images"]))
        data["headline"] = data.pop("verdict")
        return data


class _PooledOutputs:
    """A measurement: the pooled features and the logits of every image (the head on the final tokens), to tell
    how much the register changed what the model computes."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.feats: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []

    def hook_names(self) -> dict[str, Any]:
        return {OUTPUT: None}

    def stop_after(self) -> None:
        return None

    def on_batch(self, batch: Batch) -> None:
        with measurement_mode():
            tokens = batch.captured[OUTPUT]
            self.feats.append(self.loaded.model.forward_head(tokens, pre_logits=True).float().cpu())
            self.logits.append(self.loaded.model.forward_head(tokens).float().cpu())

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat(self.feats), torch.cat(self.logits)


#: Below this mean cosine between the pooled features before and after, the register has changed what the model
#: computes, not only removed its artifacts: the verdict says DAMAGED whatever share of outliers went away.
DAMAGED_BELOW_COSINE = 0.9
#: Below this (and above the damage line) the outputs moved enough to say so in the verdict.
CHANGED_BELOW_COSINE = 0.99


def fix_verdict(removed: float, before_fraction: float, after_fraction: float, cos_mean: float, cos_min: float,
                agreement: float | None, num_neurons: int) -> str:
    """The fix's headline: what share of the outliers went away, judged together with how much the model's own
    outputs moved (a register that removes every outlier by changing the model is not a repair)."""
    cosines = (f"cosine {cos_mean:.4f} (min {cos_min:.4f}) with the original's"
               + (f", top-1 agreement {agreement:.1%}" if agreement is not None else ""))
    removal = (f"removed {removed:.0%} of the outlier tokens (last block {before_fraction:.2%} -> "
               f"{after_fraction:.2%})")
    if cos_mean < DAMAGED_BELOW_COSINE:
        return (f"DAMAGED: the test-time register ({num_neurons} neurons) changed the model's outputs: its pooled "
                f"features have {cosines}. A mean cosine below {DAMAGED_BELOW_COSINE:g} is not a repair, although it "
                f"{removal}; move fewer neurons (--top-k, default 4).")
    if cos_mean < CHANGED_BELOW_COSINE:
        return (f"The test-time register {removal}, but the model's outputs moved: its pooled features have "
                f"{cosines} (a mean below {CHANGED_BELOW_COSINE:g}); check the fixed model on your task, or move "
                "fewer neurons (--top-k).")
    return f"The test-time register {removal}; the model's pooled features keep {cosines}."


def fix(model: Any = None, images: Any = None, *, top_k: int = TOP_K, blocks: str | int | None = None,
        threshold: str | float = THRESHOLD, save_model: str | Path | None = None, device: str = DEVICE,
        batch_size: int = BATCH_SIZE, num_workers: int | str = WORKERS, exact_decode: bool = False,
        gpu_decode: bool = False, arch: str | None = None, arch_kwargs: dict[str, Any] | None = None,
        trust_checkpoint: bool = False, img_size: int | None = None, weights: str | None = None,
        precision: str = "auto", max_layer: int | None = None, out: str | Path | None = None) -> FixReport:
    """Find the register neurons on ``images``, install a test-time register, and report before vs after.

    ``blocks``: the blocks searched for register neurons, always from block 0: ``"0:N"`` (``":N"``) searches
    blocks 0 to N (default: up to the onset layer). ``save_model``: write the fixed model there (a ``.safetensors``
    or ``.pt`` file). ``max_layer=N`` and ``out=`` are their old names (deprecated). ``num_workers`` /
    ``exact_decode`` / ``gpu_decode``: how image files are decoded, and ``arch`` ... ``weights`` how the model is
    loaded, as for :func:`artifactscan.scan`.
    """
    decode = dict(num_workers=num_workers, exact_decode=exact_decode, gpu_decode=gpu_decode)
    blocks = renamed_keyword(blocks, None if max_layer is None else f"0:{max_layer}", "blocks", "max_layer")
    save_model = renamed_keyword(save_model, out, "save_model", "out")
    if top_k < 1:
        raise InputError(f"{option('top_k')} must be at least 1, got {top_k}")
    fixed = threshold_option(threshold)
    settings = PassSettings(device=device, batch_size=batch_size, **decode)
    load = dict(arch=arch, arch_kwargs=arch_kwargs, trust_checkpoint=trust_checkpoint, img_size=img_size,
                weights=weights, precision=precision)

    def fixable(loaded: LoadedModel) -> int:  # said before anything about the images; the last block searched
        check_supported(loaded)
        last = parse_blocks_up_to(blocks, len(loaded.blocks), loaded.layer_range_hint())
        if loaded.meta is not None and EXTRA_KEY in loaded.meta.extra:
            raise InputError(f"{loaded.name} already carries a test-time register; fix the original model instead")
        return last

    # Three passes: the norms and outputs before (one forward), the neuron search, the norms and outputs after.
    with open_pass(model, images, settings=settings, load=load, after_load=fixable) as opened:
        loaded, dev, max_layer = opened.loaded, opened.device, fixable(opened.loaded)
        outputs = _PooledOutputs(loaded)
        before = measure_norms(opened, fixed, AutoRule(), 0, also=[outputs])
        problem = before.nonfinite_problem()
        if problem:
            raise NonFiniteError(f"{loaded.name}: {problem}; nothing to fix from a pass whose norms are not finite "
                                 "(artifactscan norms --allow-nonfinite shows where they start)")
        if before.onset_layer is None:
            return FixReport([], -1, 0.0, 0.0, before.last_block.max_over_median,
                             before.last_block.max_over_median, 0.0, None, 1.0, 1.0, model=before.model,
                             images=before.images, headline="nothing to fix: the scan found no outlier tokens"
                             + (f" (but it is {before.inconclusive_problem()})" if before.inconclusive_layers else ""),
                             notes=list(loaded.notes))
        register = find_register_neurons(loaded, images, before, top_k=top_k, max_layer=max_layer, device=dev,
                                         batch_size=batch_size, **decode)
        feats0, logits0 = outputs.finish()
        apply_test_time_register(loaded, register)
        outputs = _PooledOutputs(loaded)
        after = measure_norms(opened, fixed, AutoRule(), 0, also=[outputs])
        feats1, logits1 = outputs.finish()
    cos = torch.nn.functional.cosine_similarity(feats0, feats1, dim=-1)
    agreement = (float((logits0.argmax(-1) == logits1.argmax(-1)).float().mean())
                 if logits0.shape[-1] > 1 and logits0.shape[-1] != feats0.shape[-1] else None)
    outliers_before = sum(lay.num_outliers for lay in before.layers if not lay.is_final_norm)
    outliers_after = sum(lay.num_outliers for lay in after.layers if not lay.is_final_norm)
    removed = 1 - outliers_after / outliers_before if outliers_before else 0.0
    saved = None
    if save_model is not None:
        if loaded.meta is None:
            raise InputError(f"{option('save_model')} needs a model loaded from a self-describing checkpoint or built-in "
                             "name; the neuron list is printed in the JSON report instead")
        extra = dict(loaded.meta.extra)
        extra[EXTRA_KEY] = register.to_dict()
        meta = CheckpointMeta(**{**asdict(loaded.meta), "extra": extra,
                                 "description": (loaded.meta.description + " + test-time register").strip()})
        # in the checkpoint's own dtype, whatever --precision held it in: the file is the original plus a register
        saved = str(save_checkpoint(save_model, state_dict_in(loaded.model, loaded.checkpoint_dtype), meta))
    verdict = fix_verdict(removed, before.last_block.outlier_fraction, after.last_block.outlier_fraction,
                          float(cos.mean()), float(cos.min()), agreement, len(register.neurons))
    return FixReport(register.neurons, register.max_layer,
                     before.last_block.outlier_fraction, after.last_block.outlier_fraction,
                     before.last_block.max_over_median, after.last_block.max_over_median, removed, agreement,
                     float(cos.mean()), float(cos.min()), saved, list(loaded.notes),
                     model=before.model, images=before.images, headline=verdict)
