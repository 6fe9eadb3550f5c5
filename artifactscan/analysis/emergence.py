"""Norms over a training run: every self-describing checkpoint of a run folder scanned on the same images, grouped
by architecture and ordered by training step (the paper's Fig 4b; ``artifactscan norms RUN_DIR/``).

Checkpoint files that cannot be used are never dropped silently: each is listed in ``skipped`` with the reason.
"""

from __future__ import annotations

import pickle
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from artifactscan.analysis.scan import scan
from artifactscan.core.defaults import BATCH_SIZE, DEVICE, THRESHOLD
from artifactscan.core.errors import InputError, ModelLoadError, NonFiniteError
from artifactscan.core.files import display_name, name_hex
from artifactscan.core.paths import path_kind
from artifactscan.core.summaries import ImageSummary, ModelSummary, MultiModelResult
from artifactscan.models.checkpoint import read_meta
from artifactscan.models.loading import CHECKPOINT_SUFFIXES, load_model
from artifactscan.models.native import unsafe_globals

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
class EmergenceReport(MultiModelResult):
    """Norm statistics over training (the paper's Fig 4b) for every architecture found in a run folder. ``model``
    lists the summaries of the checkpoints scanned, in the groups' order."""

    # /4: the common header first (core/summaries.py): ``model`` (one summary per checkpoint scanned) and
    # ``headline`` are new, ``images`` is a summary (/3: its description).
    SCHEMA = "artifactscan.emergence/4"
    OLDER_SCHEMAS = tuple(f"artifactscan.emergence/{n}" for n in (1, 2, 3))

    run_dir: str
    groups: list[EmergenceGroup]
    notes: list[str]
    skipped: list[SkippedCheckpoint] = field(default_factory=list)  # /2: checkpoint files left out, with the reason

    @classmethod
    def upgrade(cls, data: dict[str, Any], schema: str) -> dict[str, Any]:
        data["model"] = [asdict(ModelSummary.named_only(p["checkpoint"], num_register_tokens=g.get("registers", 0)))
                         for g in data.get("groups", []) for p in g["points"]]
        data["images"] = asdict(ImageSummary.described_only(data["images"]))
        groups = [EmergenceGroup(g["architecture"], g["registers"], [EmergencePoint(**p) for p in g["points"]])
                  for g in data.get("groups", [])]
        data["headline"] = emergence_headline(groups, len(data.get("skipped", [])))
        return data


def emergence_headline(groups: list[EmergenceGroup], num_skipped: int = 0) -> str:
    """Per architecture, the first checkpoint with outliers (or none), in one sentence."""
    parts = []
    for g in groups:
        first = next((p for p in g.points if p.onset_layer is not None), None)
        when = (f"outliers from block {first.onset_layer} at {first.checkpoint}"
                + (f" (step {first.step})" if first.step is not None else "") if first
                else "no outliers at any checkpoint")
        undecided = sum(1 for p in g.points if p.inconclusive_layers)
        parts.append(f"{g.registers} registers, {len(g.points)} checkpoint(s): {when}"
                     + (f", {undecided} inconclusive" if undecided else ""))
    text = "; ".join(parts) + "."
    return text[0].upper() + text[1:] + (f" {num_skipped} checkpoint file(s) skipped." if num_skipped else "")


def scan_run(run_dir: str | Path, images: Any = None, *, threshold: str | float = THRESHOLD, device: str = DEVICE,
             batch_size: int = BATCH_SIZE, progress: bool = False, warn: Callable[[str], None] | None = None,
             allow_nonfinite: bool = False, precision: str = "auto", **scan_kwargs: Any) -> EmergenceReport:
    """Scan every checkpoint of a training run (e.g. a train-reg run folder) on the same images.

    Checkpoints of different architectures (e.g. the 0- and 4-register models of one train-reg run) are grouped
    apart, and the report says so. Checkpoint files that cannot be used are warned about (``warn``: one line each,
    file and reason) and listed in ``skipped``; a checkpoint that loads but fails to build is skipped the same way.
    """
    skipped: list[SkippedCheckpoint] = []
    nonfinite_notes: list[str] = []
    undecided_notes: list[str] = []  # checkpoints whose scan could not decide: never read as "no outliers"
    groups = find_checkpoints(run_dir, skipped)
    out_groups: list[EmergenceGroup] = []
    images_seen, scanned = None, []
    for key, items in groups.items():
        points = []
        registers = 0
        for step, path in items:
            try:
                loaded = load_model(path, allow_nonfinite=allow_nonfinite, precision=precision)
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
            images_seen = report.images
            scanned.append(report.model)
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
    return EmergenceReport(display_name(run_dir), out_groups, notes, skipped, model=scanned, images=images_seen,
                           headline=emergence_headline(out_groups, len(skipped)))
