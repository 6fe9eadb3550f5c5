"""Scanning several models on the same images and saying what differs (train-reg's verdict, ``compare``, emergence).

Besides the norm statistics of each model, a comparison reports what registers change even where no artifact exists:
the attention mass that patch queries put on prefix tokens, and the register tokens' norms. On the built-in
synthetic data the object masks are known, so it also says whether flagged tokens sit on background or on objects —
a norm rule alone flags object (content) tokens too.
"""

from __future__ import annotations

import pickle
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from artifactscan.analysis.attention import attention_mass
from artifactscan.models.checkpoint import read_meta
from artifactscan.core.defaults import BATCH_SIZE, DEVICE, THRESHOLD
from artifactscan.core.errors import InputError, ModelLoadError, NonFiniteError
from artifactscan.core.files import display_name, name_hex
from artifactscan.core.paths import path_kind
from artifactscan.models.loading import CHECKPOINT_SUFFIXES, LoadedModel, load_model
from artifactscan.models.native import unsafe_globals
from artifactscan.analysis.scan import ScanReport, scan
from artifactscan.inputs.sources import image_batches, make_image_source
from artifactscan.core.progress import resolve_device
from artifactscan.core.results import JsonResult
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
class CompareReport(JsonResult):
    images: str
    rows: list[ModelRow]
    verdict: str
    reports: dict[str, ScanReport] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    schema: str = "artifactscan.compare/2"

    @property
    def title(self) -> str:
        """``2 models on sample_images/`` (``1 model`` for one)."""
        return f"{count_models(len(self.rows))} on {self.images}"

    def to_dict(self) -> dict[str, Any]:
        """The rows and the verdict; each model's full scan stays in memory (``reports``), out of compare.json."""
        data = super().to_dict()
        data.pop("reports")
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
            ``trust_checkpoint``, ``img_size``, ``weights``) apply to every model.
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
        report = scan(loaded, images, threshold=threshold, device=str(dev), batch_size=batch_size,
                      progress=progress, **scan_kwargs)
        problem = report.nonfinite_problem()
        if problem:  # a comparison of invalid statistics would read as a finding
            raise NonFiniteError(f"{label}: {problem}; its statistics are not valid, so the comparison is refused "
                                 f"(artifactscan norms {label} --allow-nonfinite shows where they start)")
        mass = prefix_attention(loaded, images, dev, batch_size, **{k: v for k, v in scan_kwargs.items()
                                                                    if k in _DECODE_KEYS})
        rows.append(_row(label, loaded, report, mass, n_syn))
        reports[label] = report
    source = next(iter(reports.values())).images.source
    return CompareReport(images=source, rows=rows, verdict=register_verdict(rows), reports=reports)


_DECODE_KEYS = ("num_workers", "exact_decode", "gpu_decode")
_LOAD_KEYS = ("arch", "arch_kwargs", "trust_checkpoint", "img_size", "weights")


def prefix_attention(loaded: LoadedModel, images: Any, device: torch.device, batch_size: int,
                     num_workers: int | str = "auto", exact_decode: bool = False,
                     gpu_decode: bool = False) -> dict[str, float]:
    """Last block: mean attention mass of patch queries on CLS and (summed) on the registers."""
    if not loaded.num_prefix_tokens:
        return {}
    source = make_image_source(images, loaded, exact_decode=exact_decode, gpu_decode=gpu_decode)
    batches = (x for x, _, _ in image_batches(source, batch_size, num_workers, device) if x is not None)
    last = attention_mass(loaded, batches, blocks=[-1], device=device)[0]
    out = {"cls": last.prefix_mass.get("cls", 0.0)} if loaded.num_cls_tokens else {}
    if loaded.num_register_tokens:
        out["registers"] = sum(v for k, v in last.prefix_mass.items() if k.startswith("reg"))
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


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


# ----------------------------------------------------------------------------------------------- run folders
_STEP = re.compile(r"(\d+)")


@dataclass
class SkippedCheckpoint:
    """A checkpoint file of a run folder left out of the series, and why (``path_hex``: the exact name's bytes)."""

    path: str
    reason: str
    path_hex: str | None = None


NONFINITE_REASON = "non-finite: "  # how a skipped checkpoint's reason starts when its weights or norms held NaN/Inf


def _is_resume_state(path: Path) -> bool:
    return path.name == "last.pt"  # train-reg's resume state: optimizer + weights of the newest step, not a snapshot


def _read_run_checkpoint(path: Path) -> tuple[Any, str | None]:
    """(metadata, None) for a self-describing checkpoint; (None, why it cannot be used) for any other file."""
    kind = path_kind(path)
    if kind != "a file":  # a named pipe would block the read: it is named as what it is, and skipped
        return None, f"not a regular file: {kind}"
    try:
        meta = read_meta(path)
    except Exception as exc:  # damaged files raise many types: each is a reason, not a crash
        if path.stat().st_size == 0:
            return None, "unreadable: the file is empty (0 bytes)"
        found = unsafe_globals(path) if isinstance(exc, pickle.UnpicklingError) else ""
        if found:  # torch's paragraph about weights_only, in one short line
            return None, (f"a pickle that would run code when loaded{found} (scan it alone with --trust-checkpoint, "
                          "only if you trust it)")
        text = " ".join(str(exc).split())
        return None, "unreadable: " + (f"{type(exc).__name__}: {text}" if text else type(exc).__name__)
    if meta is None:
        return None, "no artifactscan metadata (not a self-describing checkpoint; scan it alone with --arch)"
    return meta, None


def find_checkpoints(run_dir: str | Path, skipped: list[SkippedCheckpoint] | None = None
                     ) -> dict[str, list[tuple[int | None, Path]]]:
    """Self-describing checkpoints under ``run_dir``, grouped by architecture and sorted by training step.

    Files with a checkpoint suffix that cannot be used (unreadable, truncated, no artifactscan metadata, malformed
    metadata) are appended to ``skipped`` with the reason, never dropped silently.
    """
    root = Path(run_dir)
    groups: dict[str, list[tuple[int | None, Path]]] = {}
    for path in sorted(p for p in root.rglob("*") if p.suffix in CHECKPOINT_SUFFIXES and not p.is_dir()
                       and not p.name.startswith(".") and not _is_resume_state(p)):
        meta, reason = _read_run_checkpoint(path)
        if meta is None:
            if skipped is not None:
                skipped.append(SkippedCheckpoint(display_name(path), reason or "", name_hex(path)))
            continue
        key = meta.arch + " " + ",".join(f"{k}={v}" for k, v in sorted(meta.arch_kwargs.items()))
        step = meta.step
        if step is None:
            digits = _STEP.findall(path.stem)
            step = int(digits[-1]) if digits else None
        groups.setdefault(key, []).append((step, path))
    if not groups:
        why = f" ({len(skipped)} skipped: {display_name(Path(skipped[0].path).name)}: {skipped[0].reason})" if skipped else ""
        raise InputError(f"{display_name(run_dir)} holds no self-describing checkpoints (.safetensors written by "
                         f"train-reg){why}")
    for key, items in groups.items():
        items.sort(key=lambda sp: (sp[0] is None, sp[0] or 0, sp[1].name.startswith("final")))
        # A run's final.safetensors repeats its last snapshot (checkpoints/step_N): one point per step and run.
        seen: set[tuple[int | None, Path]] = set()
        unique = []
        for step, path in items:
            run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
            ident = (step, run)
            if step is not None and ident in seen:
                continue
            seen.add(ident)
            unique.append((step, path))
        groups[key] = unique
    return groups


@dataclass
class EmergencePoint:
    """One checkpoint of a run: per-block outlier fraction and max/median ratio."""

    step: int | None
    checkpoint: str
    onset_layer: int | None
    outlier_fraction: list[float]
    max_over_median: list[float]
    inconclusive_layers: list[int] = field(default_factory=list)  # /3: rows where the rule could not decide


@dataclass
class EmergenceGroup:
    """Checkpoints of one architecture, in training order."""

    architecture: str
    registers: int
    points: list[EmergencePoint]


@dataclass
class EmergenceReport(JsonResult):
    """Norm statistics over training (the paper's Fig 4b) for every architecture found in a run folder."""

    run_dir: str
    images: str
    groups: list[EmergenceGroup]
    notes: list[str]
    skipped: list[SkippedCheckpoint] = field(default_factory=list)  # /2: checkpoint files left out, with the reason
    schema: str = "artifactscan.emergence/3"


def scan_run(run_dir: str | Path, images: Any = None, *, threshold: str | float = THRESHOLD, device: str = DEVICE,
             batch_size: int = BATCH_SIZE, progress: bool = False, warn: Callable[[str], None] | None = None,
             allow_nonfinite: bool = False, **scan_kwargs: Any) -> EmergenceReport:
    """Scan every checkpoint of a training run (e.g. a train-reg run folder) on the same images.

    Checkpoints of different architectures (e.g. the 0- and 4-register models of one train-reg run) are grouped
    apart, and the report says so. Checkpoint files that cannot be used are warned about (``warn``: one line each,
    file and reason) and listed in ``skipped``; a checkpoint that loads but fails to build is skipped the same way.
    """
    skipped: list[SkippedCheckpoint] = []
    nonfinite_notes: list[str] = []
    undecided_notes: list[str] = []  # checkpoints whose scan could not decide: never read as "no outliers"
    groups = find_checkpoints(run_dir, skipped)
    out_groups, source = [], ""
    for key, items in groups.items():
        points = []
        registers = 0
        for step, path in items:
            try:
                loaded = load_model(path, allow_nonfinite=allow_nonfinite)
            except NonFiniteError as exc:  # e.g. a training run that diverged: named, and the command fails
                skipped.append(SkippedCheckpoint(display_name(path), f"{NONFINITE_REASON}{exc}", name_hex(path)))
                continue
            except ModelLoadError as exc:
                skipped.append(SkippedCheckpoint(display_name(path), str(exc), name_hex(path)))
                continue
            registers = loaded.num_register_tokens
            report = scan(loaded, images, threshold=threshold, device=device, batch_size=batch_size,
                          progress=progress, num_maps=0, allow_nonfinite=allow_nonfinite, **scan_kwargs)
            problem = report.nonfinite_problem()
            if problem and not allow_nonfinite:
                skipped.append(SkippedCheckpoint(display_name(path), NONFINITE_REASON + problem, name_hex(path)))
                continue
            if problem:
                nonfinite_notes.append(f"{display_name(path)}: {problem} (kept: --allow-nonfinite)")
            source = report.images.source
            blocks = [lay for lay in report.layers if not lay.is_final_norm]
            points.append(EmergencePoint(step, display_name(path), report.onset_layer,
                                         [lay.outlier_fraction for lay in blocks],
                                         [lay.max_over_median for lay in blocks],
                                         [lay.index for lay in report.inconclusive_layers]))
            if report.inconclusive_layers:
                undecided_notes.append(f"{display_name(path)}: {report.inconclusive_problem()}")
        if points:
            out_groups.append(EmergenceGroup(key, registers, points))
    say = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
    for s in skipped:
        say(f"skipped checkpoint {s.path}: {s.reason}")
    if not out_groups:
        why = f"; first: {skipped[0].path}: {skipped[0].reason}" if skipped else ""
        raise InputError(f"none of the checkpoints in {display_name(run_dir)} could be scanned ({len(skipped)} "
                         f"skipped{why})")
    notes = []
    if len(out_groups) > 1:
        notes.append(f"{run_dir} holds checkpoints of {len(out_groups)} different architectures; each is its own "
                     "series: " + "; ".join(f"{g.registers} registers ({len(g.points)} checkpoints)"
                                           for g in out_groups))
    if skipped:
        notes.append(f"{len(skipped)} checkpoint file(s) skipped (listed under 'skipped' with the reason)")
    notes.extend(nonfinite_notes)
    notes.extend(undecided_notes)
    return EmergenceReport(display_name(run_dir), source, out_groups, notes, skipped)


@dataclass
class TrainRegVerdict(JsonResult):
    """train-reg's final comparison: the trained variants scanned side by side on held-out images."""

    run_dir: str
    images: str
    comparison: CompareReport
    validation_accuracy: dict[str, float]
    schema: str = "artifactscan.train_reg_verdict/1"

    @property
    def verdict(self) -> str:
        return self.comparison.verdict

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["comparison"] = self.comparison.to_dict()
        data["verdict"] = self.verdict
        return data


def held_out_images(config: Any) -> str:
    """Images no variant trained on: the built-in validation split, or the data set's held-out folder."""
    if config.data is None:
        return "synthetic:512"
    val = Path(config.data) / "val"
    return str(val) if val.is_dir() else str(config.data)


def verdict_for_run(result: Any, images: Any = None, *, device: str = DEVICE, batch_size: int = BATCH_SIZE,
                    progress: bool = False) -> TrainRegVerdict:
    """Scan every variant of a :class:`~artifactscan.training.TrainRegResult` and judge what registers did."""
    images = images if images is not None else held_out_images(result.config)
    models = {f"reg{v.registers}": v.checkpoint for v in result.variants}
    comparison = compare(models, images, device=device, batch_size=batch_size, progress=progress)
    if result.config.data is not None and images == str(result.config.data):
        comparison.notes.append(f"{images} has no val/ folder, so the verdict scanned the training images; pass "
                                "--scan-images for held-out ones (norm statistics do not need labels).")
    accuracy = {f"reg{v.registers}": v.val_acc for v in result.variants}
    return TrainRegVerdict(str(result.run_dir), comparison.images, comparison, accuracy)
