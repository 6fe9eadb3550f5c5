"""Scanning several models on the same images and saying what registers change (``compare``).

Besides the norm statistics of each model, a comparison reports what registers change even where no artifact exists:
the attention mass that patch queries put on prefix tokens, and the register tokens' norms. On the built-in
synthetic data the object masks are known, so it also says whether flagged tokens sit on background or on objects —
a norm rule alone flags object (content) tokens too.

Norms over a training run's checkpoints are :mod:`artifactscan.analysis.emergence`; train-reg's verdict, which
compares a run's variants, is :mod:`artifactscan.analysis.training.verdict`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from artifactscan.core.numbers import percent as _pct
from artifactscan.core.errors import InputError, NonFiniteError
from artifactscan.core.files import display_name
from artifactscan.models.hooks import block_point
from artifactscan.models.loading import LoadedModel, load_model
from artifactscan.core.defaults import BATCH_SIZE, DEVICE, THRESHOLD
from artifactscan.analysis.scan import ScanReport, scan
from artifactscan.core.devices import resolve_device
from artifactscan.core.summaries import ImageSummary, ModelSummary, MultiModelResult
from artifactscan.inputs.sources import parse_synthetic
from artifactscan.inputs.synthetic import SyntheticShapes


@dataclass
class ModelRow:
    """One model's summary in a comparison (last block unless said otherwise)."""

    label: str
    name: str
    arch: str | None
    registers: int
    step: int | None
    onset_layer: int | None
    outlier_fraction: float
    max_over_median: float
    image_fraction_with_outliers: float
    peak_outlier_fraction: float
    prefix_attention: dict[str, float]
    register_norm_mean: float | None
    median_patch_norm: float
    flagged_on_background: float | None = None
    flagged_on_objects: int | None = None
    inconclusive_layers: list[int] = field(default_factory=list)  # /2: rows where the threshold rule could not decide


@dataclass
class CompareReport(MultiModelResult):
    """Several models scanned on the same images: one row each, and the verdict on what registers changed
    (``headline``). ``model`` lists the models' summaries in the rows' order; ``images`` is the first model's."""

    # /3: the common header first (core/summaries.py): ``model`` (one summary per row) is new, ``images`` is a
    # summary (/2: its description), ``headline`` is the verdict, still written as ``verdict`` too for one version.
    SCHEMA = "artifactscan.compare/3"
    OLDER_SCHEMAS = ("artifactscan.compare/1", "artifactscan.compare/2")

    rows: list[ModelRow]
    reports: dict[str, ScanReport] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        """The headline, under its name before schema /3."""
        return self.headline

    @property
    def title(self) -> str:
        """``2 models on sample_images/`` (``1 model`` for one)."""
        return f"{count_models(len(self.rows))} on {self.images.source if self.images else 'no images'}"

    def to_dict(self) -> dict[str, Any]:
        """The rows and the verdict; each model's full scan stays in memory (``reports``), out of compare.json."""
        data = super().to_dict()
        data.pop("reports")
        data["verdict"] = self.headline  # the /2 key, kept for one version
        return data

    @classmethod
    def upgrade(cls, data: dict[str, Any], schema: str) -> dict[str, Any]:
        rows = data.get("rows", [])
        data["model"] = [asdict(ModelSummary.named_only(r["name"], arch=r.get("arch"),
                                                        num_register_tokens=r.get("registers", 0))) for r in rows]
        data["images"] = asdict(ImageSummary.described_only(data["images"]))
        data["headline"] = data.pop("verdict")
        return data


def count_models(n: int) -> str:
    return f"{n} model" if n == 1 else f"{n} models"


def _same_model_key(spec: Any) -> Any:
    """What makes two specs the same model: the file itself for paths (``./a.pt`` is ``a.pt``), else the spec."""
    if isinstance(spec, LoadedModel):
        return ("loaded", id(spec))
    text = str(spec)
    try:
        return Path(text).resolve() if Path(text).exists() else text
    except (OSError, ValueError):
        return text


def _synthetic_count(images: Any) -> int | None:
    if isinstance(images, str) and images.startswith("synthetic"):
        return parse_synthetic(images)
    return None


def _object_location(report: ScanReport, loaded: LoadedModel, n_synthetic: int) -> tuple[float | None, int]:
    """Fraction of last-block flagged tokens that sit on pure-background patches of the synthetic images."""
    last = report.last_block.index
    records = [o for o in report.outliers if o.layer == last]
    if not records:
        return None, 0
    data = SyntheticShapes(n_synthetic, seed=0, img_size=loaded.input_size[0], split="val")
    on_objects = 0
    gh, gw = loaded.grid_size
    masks: dict[int, torch.Tensor] = {}
    for o in records:
        if o.image_index not in masks:
            masks[o.image_index] = data.patch_object_mask(o.image_index, loaded.patch_size[0]).reshape(gh, gw)
        on_objects += bool(masks[o.image_index][o.row, o.col])
    return 1 - on_objects / len(records), on_objects


def _row(label: str, loaded: LoadedModel, report: ScanReport, attention: dict[str, float],
         n_synthetic: int | None) -> ModelRow:
    last = report.last_block
    regs = [p.mean for p in last.prefix if p.name.startswith("reg")]
    background, on_objects = (_object_location(report, loaded, n_synthetic) if n_synthetic else (None, None))
    return ModelRow(
        label=label, name=loaded.name, arch=loaded.arch, registers=loaded.num_register_tokens,
        step=loaded.meta.step if loaded.meta else None, onset_layer=report.onset_layer,
        outlier_fraction=last.outlier_fraction, max_over_median=last.max_over_median,
        image_fraction_with_outliers=last.image_fraction_with_outliers,
        peak_outlier_fraction=max(lay.outlier_fraction for lay in report.layers if not lay.is_final_norm),
        prefix_attention=attention, register_norm_mean=sum(regs) / len(regs) if regs else None,
        median_patch_norm=last.median, flagged_on_background=background, flagged_on_objects=on_objects,
        inconclusive_layers=[lay.index for lay in report.inconclusive_layers])


def compare(models: dict[str, Any] | Sequence[Any], images: Any = None, *, threshold: str | float = THRESHOLD,
            device: str = DEVICE, batch_size: int = BATCH_SIZE, progress: bool = False,
            **scan_kwargs: Any) -> CompareReport:
    """Scan every model on the same images; one row each and a verdict on what registers changed.

    Args:
        models: ``{label: model spec}`` or a list of specs (labels = names); specs as for :func:`load_model`.
        images: as for :func:`artifactscan.scan`; ``synthetic:N`` adds the background/object split of flagged tokens.
        scan_kwargs: as for :func:`artifactscan.scan`; the load options among them (``arch``, ``arch_kwargs``,
            ``trust_checkpoint``, ``img_size``, ``weights``, ``precision``) apply to every model.
    """
    load_options = {k: scan_kwargs.pop(k) for k in _LOAD_KEYS if k in scan_kwargs}
    if not isinstance(models, dict):
        specs = list(models)
        seen: dict[Any, Any] = {}
        for m in specs:
            key = _same_model_key(m)
            if key in seen:  # a dict by label would keep one of them and report "1 models"
                raise InputError(f"compare got the model {display_name(str(seen[key]))} twice"
                                 + (f" (the second time as {display_name(str(m))})" if str(seen[key]) != str(m)
                                    else "")
                                 + ": a model compared with itself shows nothing; pass each model once")
            seen[key] = m
        models = {str(m if not isinstance(m, LoadedModel) else m.name): m for m in specs}
        if len(models) < len(specs):
            raise InputError("compare got two models with the same name; pass them as {label: model} to tell them "
                             "apart")
    if len(models) < 1:
        raise InputError("compare needs at least one model")
    dev = resolve_device(device)
    n_syn = _synthetic_count(images)
    rows, reports = [], {}
    for label, spec in models.items():
        loaded = load_model(spec, **load_options)
        attention = PrefixAttention(loaded)  # rides on the scan's forward: one pass over the images per model
        report = scan(loaded, images, threshold=threshold, device=str(dev), batch_size=batch_size,
                      progress=progress, also=[attention] if attention.needed else [], **scan_kwargs)
        problem = report.nonfinite_problem()
        if problem:  # a comparison of invalid statistics would read as a finding
            raise NonFiniteError(f"{label}: {problem}; its statistics are not valid, so the comparison is refused "
                                 f"(artifactscan norms {label} --allow-nonfinite shows where they start)")
        rows.append(_row(label, loaded, report, attention.finish(), n_syn))
        reports[label] = report
    return CompareReport(model=[r.model for r in reports.values()], images=next(iter(reports.values())).images,
                         headline=register_verdict(rows), rows=rows, reports=reports)


_LOAD_KEYS = ("arch", "arch_kwargs", "trust_checkpoint", "img_size", "weights", "precision")


class PrefixAttention:
    """A measurement (``analysis.passes``): the last block's mean attention mass of patch queries on CLS and (summed)
    on the registers. The probabilities are reduced to ``[B, prefix]`` inside the hook."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.point = block_point(len(loaded.blocks) - 1, "attn.pattern")
        self.sums = torch.zeros(loaded.num_prefix_tokens, dtype=torch.float64)
        self.images = 0

    @property
    def needed(self) -> bool:
        return self.loaded.num_prefix_tokens > 0

    def _on_prefix(self, probs: torch.Tensor) -> torch.Tensor:
        P = self.loaded.num_prefix_tokens
        return probs.float().mean(dim=1)[:, P:, :P].mean(dim=1)  # heads averaged, then patch queries: [B, P]

    def hook_names(self) -> dict[str, Any]:
        return {self.point: self._on_prefix}

    def stop_after(self) -> None:
        return None

    def on_batch(self, batch: Any) -> None:
        mass = batch.captured[self.point]
        self.sums += mass.sum(dim=0).double().cpu()
        self.images += mass.shape[0]

    def finish(self) -> dict[str, float]:
        if not self.images:
            return {}
        mass = dict(zip(self.loaded.prefix_names, (self.sums / self.images).tolist()))
        out = {"cls": mass.get("cls", 0.0)} if self.loaded.num_cls_tokens else {}
        if self.loaded.num_register_tokens:
            out["registers"] = sum(v for k, v in mass.items() if k.startswith("reg"))
        return out


def register_verdict(rows: list[ModelRow]) -> str:
    """An honest sentence on whether registers fixed artifacts; says when the experiment cannot tell."""
    base = next((r for r in rows if r.registers == 0), None)
    with_regs = [r for r in rows if r.registers > 0]
    undecided = [r for r in rows if r.inconclusive_layers]
    # "Could not decide" is never "no outliers": said for every model whose scan was inconclusive somewhere.
    undecided_words = ("INCONCLUSIVE for " + ", ".join(
        f"{r.label} (block(s) {', '.join(map(str, r.inconclusive_layers))})" for r in undecided)
        + ": a separated group with fewer tokens than the threshold rule needs; scan more images to decide."
        if undecided else "")
    if base is None or not with_regs:
        flagged = [r for r in rows if r.onset_layer is not None]
        return " ".join([f"{len(flagged)} of {count_models(len(rows))} "
                         + ("has" if len(rows) == 1 else "have") + " high-norm outliers: "
                         + ", ".join(f"{r.label} {_pct(r.outlier_fraction)}" for r in rows) + "."]
                        + ([undecided_words] if undecided_words else []))
    parts = []
    if base.onset_layer is None and base.inconclusive_layers:
        parts.append(f"CANNOT CONFIRM THE FIX: the baseline ({base.label}) is inconclusive (no tokens flagged, but too "
                     "few tokens to decide), so whether registers removed anything is not known.")
    elif base.onset_layer is None:
        parts.append(
            f"CANNOT CONFIRM THE FIX: the baseline ({base.label}) grew no high-norm outlier tokens "
            f"(last block max/median {base.max_over_median:.1f}x, unimodal), so there was nothing for registers to "
            "remove. At this scale (small model, short training) artifacts do not emerge; the paper sees them in "
            "large models trained long (e.g. DINOv2 ViT-L+, DeiT-III).")
    else:
        for r in with_regs:
            drop = 1 - r.outlier_fraction / base.outlier_fraction if base.outlier_fraction else 0.0
            word = "removed" if drop >= 0.9 else ("reduced" if drop >= 0.5 else "did not remove")
            if r.inconclusive_layers and drop >= 0.5:  # fewer flagged, but the rule could not decide: not a fix
                word = "may not have removed (inconclusive)"
            parts.append(f"{r.registers} register(s) {word} the outliers: last block {_pct(base.outlier_fraction)} "
                         f"-> {_pct(r.outlier_fraction)} of patch tokens, max/median {base.max_over_median:.1f}x -> "
                         f"{r.max_over_median:.1f}x.")
        if base.flagged_on_background is not None and base.flagged_on_background < 0.5:
            parts.append(f"But {1 - base.flagged_on_background:.0%} of the baseline's flagged tokens sit on objects: "
                         "they look like content, not artifacts.")
    changes = []
    for r in with_regs:
        att = r.prefix_attention
        base_att = base.prefix_attention.get("cls", 0.0)
        changes.append(f"{r.label}: patch queries put {_pct(att.get('registers', 0.0))} of their last-block "
                       f"attention on the registers (CLS {_pct(att.get('cls', 0.0))}; baseline CLS {_pct(base_att)}); "
                       f"register norm {r.register_norm_mean:.3g} vs patch median {r.median_patch_norm:.3g}")
    if changes:
        parts.append("What registers change: " + "; ".join(changes) + ".")
    if undecided_words:
        parts.append(undecided_words)
    return " ".join(parts)
