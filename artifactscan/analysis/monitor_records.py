"""What :class:`artifactscan.monitor.ArtifactMonitor` writes, and reading it back: ``monitor.jsonl``.

One line per update, each a whole :class:`MonitorUpdate` (the common header, the step, one :class:`MonitorLayer`
per block with the fields named as in a scan's ``report.json``). Lines are appended, flushed and ``fsync``'d one at a
time, so a run killed at any moment leaves a file whose complete lines all read back; :func:`read_monitor` skips a
torn last line with a warning. Readers never lock the file: they can render it while the run is still writing.
The writer holds an exclusive ``fcntl.flock`` on ``.monitor.lock`` beside it (:func:`lock_monitor_folder`), so two
runs never append to one file at once; the OS releases it when the process dies, so a killed run's folder never
blocks its resume.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
from dataclasses import MISSING, Field, dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import IO, Any, Callable, ClassVar

from artifactscan.analysis.monitor_setup import MonitorSetupError
from artifactscan.analysis.scan import LayerReport, decision_counts, layer_report
from artifactscan.core.errors import InputError
from artifactscan.core.files import atomic_write_text
from artifactscan.core.numbers import percent
from artifactscan.core.paths import display_name, read_regular_text, what_it_is
from artifactscan.core.stats import NormStatistics, PrefixTokenStats  # noqa: F401  (MonitorLayer's annotations)
from artifactscan.core.summaries import AnalysisResult, ImageSummary, ModelSummary
from artifactscan.core.thresholds import AutoRule, ThresholdDecision

MONITOR_FILE = "monitor.jsonl"
LOCK_FILE = ".monitor.lock"  # hidden, as core.files' lock: listings of a run folder leave it out
SCHEMA = "artifactscan.monitor/1"
HISTORY_SCHEMA = "artifactscan.monitor_history/1"


#: The fields of a scan's per-layer row (``report.json``'s ``layers[]``) a monitor line leaves out: the histogram would
#: make every line tens of kilobytes (TensorBoard gets the norms instead), and a monitor line holds blocks only.
LEFT_OUT = ("is_final_norm", "histogram")


def _same_field(f: Field) -> Any:
    return field(default=f.default) if f.default is not MISSING else (
        field(default_factory=f.default_factory) if f.default_factory is not MISSING else MISSING)


#: One block's statistics at one update: the fields of :class:`artifactscan.analysis.scan.LayerReport` (same names,
#: same meaning, built by the same function) but ``LEFT_OUT``; derived from it, so the two cannot drift apart.
MonitorLayer = make_dataclass("MonitorLayer", [(f.name, f.type) if _same_field(f) is MISSING else
                                              (f.name, f.type, _same_field(f))
                                              for f in fields(LayerReport) if f.name not in LEFT_OUT])
MonitorLayer.__module__ = __name__  # its annotations are resolved in this module's namespace (from_dict)
MonitorLayer.__doc__ = "One block's statistics at one update: a scan's per-layer row without its histogram."


@dataclass(kw_only=True)
class MonitorUpdate(AnalysisResult):
    """One line of ``monitor.jsonl``: the probe set measured at training step ``step``."""

    SCHEMA: ClassVar[str] = SCHEMA

    step: int
    seconds: float  # the update's wall time, forward and statistics
    threshold_mode: str
    threshold_rule: str
    layers: list[MonitorLayer]
    onset_layer: int | None
    # The last block's decision can be acted on: no non-finite norm, and the threshold rule decided (an inconclusive
    # auto threshold, a probe set too small to tell, never stops a run through fail_above).
    conclusive: bool
    num_nonfinite: int
    fingerprint: str  # the architecture (class, parameter names and shapes): tells another model's file apart
    notes: list[str] = field(default_factory=list)

    @property
    def last_block(self) -> MonitorLayer:
        return self.layers[-1]


def layer_rows(stats: NormStatistics, decisions: list[ThresholdDecision], rule: AutoRule) -> list[MonitorLayer]:
    """Per-block rows from streamed statistics and each block's threshold decision, counted and built exactly as
    ``scan`` builds its rows (:func:`artifactscan.analysis.scan.layer_report`)."""
    rows = []
    for r, d in enumerate(decisions):
        n_out, n_img_out = decision_counts(stats, r, d)
        row = layer_report(stats, r, d, f"block {r}", False, n_out, n_img_out, rule)
        rows.append(MonitorLayer(**{f.name: getattr(row, f.name) for f in fields(MonitorLayer)}))
    return rows


# ----------------------------------------------------------------------------------------------- writing
def monitor_path(out: str | os.PathLike[str]) -> Path:
    """``out/monitor.jsonl`` (``out`` may name the file itself)."""
    out = Path(out).expanduser()
    return out if out.name == MONITOR_FILE else out / MONITOR_FILE


def lock_monitor_folder(out: Path) -> IO[str] | None:
    """The writer's exclusive lock on ``out`` (an existing folder): the open lock file, holding an ``fcntl.flock``
    until it is closed, garbage-collected or its process dies (a killed run's lock never outlives it). Raises
    :class:`MonitorLockedError` naming the holder's pid when another writer holds it. None where there is no
    ``fcntl`` (Windows): the folder goes unlocked there."""
    try:
        import fcntl
    except ImportError:
        return None
    path = out / LOCK_FILE
    try:
        handle = open(path, "a+", encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot lock monitor folder {display_name(out)}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = ""
        with contextlib.suppress(OSError, ValueError):
            handle.seek(0)
            holder = handle.read(32).strip()
        handle.close()
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise MonitorLockedError(f"{display_name(out)} is being written by another artifact monitor"
                                     + (f" (pid {holder})" if holder else "") + "; two runs cannot append to one "
                                     "monitor.jsonl: close() the other monitor, wait for its run, or choose "
                                     "another out") from None
        raise InputError(f"cannot lock monitor folder {display_name(out)}: {exc.strerror or exc}") from None
    with contextlib.suppress(OSError):  # the pid only names the holder in the refusal above: best effort
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
    return handle


class MonitorLockedError(MonitorSetupError):
    """Another :class:`~artifactscan.analysis.monitor.ArtifactMonitor` (a live process) is writing the folder."""


def append_record(path: Path, update: MonitorUpdate) -> None:
    """Append one line, flushed and fsync'd: a run killed after this returns keeps the line."""
    line = json.dumps(update.to_dict(), separators=(",", ":")) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def keep_records_up_to(path: Path, step: int | None, warn: Callable[[str], None]) -> int:
    """Rewrite ``path`` (atomically: a reader keeps the old file it opened) with only the records of steps
    ``<= step`` (``None``: every complete record); a torn last line goes too. Returns how many records were dropped."""
    records, _ = read_lines(path, warn)
    kept = [r for r in records if step is None or int(r.get("step", -1)) <= step]
    text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in kept)
    atomic_write_text(path, text)
    return len(records) - len(kept)


# ----------------------------------------------------------------------------------------------- reading
def read_lines(path: Path, warn: Callable[[str], None]) -> tuple[list[dict[str, Any]], int]:
    """The complete records of a ``monitor.jsonl`` as dicts, and how many lines were skipped (each said once)."""
    text = read_regular_text(path)
    lines = text.split("\n")
    records, skipped = [], 0
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        torn = i == len(lines) - 1  # no newline after it: the writer was stopped in the middle of the line
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError:
            skipped += 1
            warn(f"{display_name(path)}: " + ("skipped its torn last line (the run was stopped while writing it)"
                                              if torn else f"skipped line {i + 1}: not a complete JSON record"))
            continue
        records.append(record)
    return records, skipped


@dataclass(kw_only=True)
class MonitorHistory(AnalysisResult):
    """A ``monitor.jsonl`` read back: every update, the outlier fraction per block against step, and the onset.

    ``onset_step`` is the first update at which any block holds outliers, ``onset_block`` that update's first such
    block; ``None`` when no update flagged anything."""

    SCHEMA: ClassVar[str] = HISTORY_SCHEMA

    path: str
    num_blocks: int
    steps: list[int]
    outlier_fraction: list[list[float]]  # [update][block]
    onset_step: int | None
    onset_block: int | None
    updates: list[MonitorUpdate]
    warnings: list[str] = field(default_factory=list)

    @property
    def last(self) -> MonitorUpdate | None:
        return self.updates[-1] if self.updates else None


def _history_headline(h: MonitorHistory) -> str:
    if not h.updates:
        return "No update recorded yet."
    last = h.updates[-1]
    parts = []
    if last.num_nonfinite:
        parts.append(f"NON-FINITE VALUES at step {last.step}: {last.num_nonfinite} token norms are NaN or Inf.")
    if last.model.kind == "phantom":
        parts.append("[CALIBRATION PHANTOM - artifacts built in by construction, not a finding about real models]")
    if h.onset_step is None:
        parts.append(f"No high-norm outlier tokens in {len(h.updates)} update(s) up to step {last.step}.")
    else:
        parts.append(f"Outliers appear at step {h.onset_step} (from block {h.onset_block} of {h.num_blocks}).")
    parts.append(f"Step {last.step}: {percent(last.last_block.outlier_fraction)} of the last block's patch tokens "
                 f"flagged, max/median {last.last_block.max_over_median:.1f}x ({last.threshold_mode} threshold"
                 + ("" if last.conclusive else ", inconclusive") + ").")
    return " ".join(parts)


def history_of(updates: list[MonitorUpdate], path: Path, warnings: list[str]) -> MonitorHistory:
    onset = next((u for u in updates if u.onset_layer is not None), None)
    last = updates[-1] if updates else None
    model = last.model if last else ModelSummary.named_only("unknown")
    images = last.images if last and last.images else ImageSummary.described_only("unknown")
    history = MonitorHistory(model=model, images=images, headline="", path=str(path),
                             num_blocks=len(last.layers) if last else 0, steps=[u.step for u in updates],
                             outlier_fraction=[[lay.outlier_fraction for lay in u.layers] for u in updates],
                             onset_step=onset.step if onset else None, onset_block=onset.onset_layer if onset else None,
                             updates=updates, warnings=warnings)
    history.headline = _history_headline(history)
    return history


def read_monitor(path: str | os.PathLike[str], warn: Callable[[str], None] | None = None) -> MonitorHistory:
    """Read a monitor folder (or its ``monitor.jsonl``) back, also while a run is still appending to it.

    Takes no lock. A torn last line (the run killed while writing it) or a record of a schema this version does not
    read is skipped with a warning (``warn``, default: stderr), never an error.
    """
    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
    file = monitor_path(path)
    if not file.is_file():
        where = Path(path).expanduser()
        if where.is_dir():
            raise InputError(f"{display_name(where)} holds no {MONITOR_FILE}; pass the `out` folder an "
                             "ArtifactMonitor writes")
        raise InputError(f"monitor folder {display_name(where)} {what_it_is(where, 'a folder')}")
    warnings: list[str] = []

    def note(msg: str) -> None:
        warnings.append(msg)
        warn(msg)

    try:
        raw, _ = read_lines(file, note)
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {display_name(file)}: {getattr(exc, 'strerror', None) or exc}") from None
    updates = []
    for i, record in enumerate(raw):
        try:
            updates.append(MonitorUpdate.from_dict(record))
        except (InputError, TypeError, KeyError, ValueError) as exc:
            note(f"{display_name(file)}: skipped record {i + 1}: {str(exc).splitlines()[0]}")
    return history_of(updates, file, warnings)
