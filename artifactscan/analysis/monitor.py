"""``ArtifactMonitor``: watch high-norm artifact tokens emerge while a ViT trains, inside any training loop.

Every ``every`` steps one update measures a fixed probe set through the capture layer with the streaming statistics
and the threshold rule of ``artifactscan norms``, appends one line to ``out/monitor.jsonl``
(:mod:`artifactscan.analysis.monitor_records`) and returns it. An update never changes the training: see
:func:`artifactscan.analysis.monitor_setup.training_untouched` and docs/monitor.md.

Distributed (a process group initialised by the caller): the global rank 0 alone measures, on the module inside
the DDP / ``torch.compile`` wrappers, and writes; at the first call and at every update step all ranks take part in
one broadcast of a status code from rank 0 (continue, stop, rank 0 failed), so a stop or an error on rank 0 ends
every rank instead of leaving the others waiting in their next collective. Sharded parameters (FSDP, FSDP2,
DeepSpeed ZeRO-3) are refused at the first call: one rank cannot run the forward alone.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

import torch

from artifactscan.models.capture import token_norms
from artifactscan.analysis.monitor_records import (
    MonitorUpdate,
    append_record,
    keep_records_up_to,
    layer_rows,
    lock_monitor_folder,
    monitor_path,
    read_lines,
)
from artifactscan.analysis.monitor_setup import (
    MAX_PROBE_IMAGES,
    MonitorSetupError,
    check_input_size,
    check_probe_spec,
    fingerprint,
    model_summary,
    module_device,
    out_of_memory_errors,
    probe_images,
    resolve_data_config,
    rng_preserved,
    sharding_of,
    training_untouched,
    unwrap_engine,
)
from artifactscan.core.defaults import THRESHOLD
from artifactscan.core.errors import GateFailedError
from artifactscan.core.paths import display_name
from artifactscan.core.stats import NormStatistics
from artifactscan.core.thresholds import PAPER_THRESHOLD, AutoRule, auto_threshold, fixed_threshold, threshold_option
from artifactscan.models.hooks import block_point, capture, family_of, unwrap_model

__all__ = ["ArtifactMonitor", "ArtifactsAboveThreshold", "MonitorSetupError"]

#: Updates kept in memory (``ArtifactMonitor.records``): the most recent ones only, so that nothing grows with the
#: steps of a long run (each is a few kilobytes); ``monitor.jsonl`` holds them all.
KEPT_RECORDS = 100

# Status codes rank 0 broadcasts at the first call and at update steps.
_GO, _STOP, _FAILED = 0, 1, 2


class ArtifactsAboveThreshold(GateFailedError):
    """``fail_above`` was exceeded by a conclusive update (or the norms became non-finite): stop training."""

    def __init__(self, message: str, record: MonitorUpdate | None = None):
        super().__init__(message)
        self.record = record


class ArtifactMonitor:
    """Measure the artifact tokens of a ViT every ``every`` training steps.

    Args:
        images: the probe set: a folder or list of image files, ``synthetic:N``, ``synthetic-objects:N``, a Dataset
            or an ``[N, 3, H, W]`` tensor in [0, 1]. Decoded and preprocessed once, kept in memory (at most
            ``max_images``) on the model's device.
        every: measure when ``step % every == 0``.
        out: a folder for ``monitor.jsonl`` (and ``tensorboard/`` with ``tensorboard=True``); None: nothing written.
            Locked from the first call to :meth:`close` (another live monitor writing it is refused then).
        model: the model (an ``nn.Module``, one wrapped by DDP / ``torch.compile``, or a ``LoadedModel``); given
            here, the checks that need it run now, else at the first call to :meth:`step`.
        data_config: timm-style preprocessing (``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``):
            required for a live Hugging Face model, else the model's own.
        threshold: ``"auto"`` (the separated-group rule) or a number, as ``norms --threshold``.
        fail_above: raise :class:`ArtifactsAboveThreshold` when a conclusive update flags more than this fraction of
            the last block's patch tokens, or when the norms become non-finite (a diverging run).
        on_update: called with each :class:`MonitorUpdate` (rank 0).
        tensorboard: True (a SummaryWriter under ``out/tensorboard``) or a SummaryWriter of your own.
        resume: continue an earlier run's ``monitor.jsonl``: records of steps beyond the resumed step are dropped
            (True: the step of the first call is measured again, so records from it on go; an int: records after that
            step go). Without it, an ``out`` that already holds a ``monitor.jsonl`` is refused.
        warn: where one-line warnings go (default: stderr).
    """

    def __init__(self, images: Any, every: int = 500, out: str | Path | None = None, *, model: Any = None,
                 data_config: dict[str, Any] | None = None, threshold: str | float | None = THRESHOLD,
                 fail_above: float | None = None, on_update: Callable[[MonitorUpdate], Any] | None = None,
                 tensorboard: Any = False, resume: bool | int = False, max_images: int = MAX_PROBE_IMAGES,
                 batch_size: int = MAX_PROBE_IMAGES, rule: AutoRule | None = None, name: str | None = None,
                 warn: Callable[[str], None] | None = None):
        if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
            raise MonitorSetupError(f"every must be a positive number of steps, got {every!r}")
        for label, value in (("max_images", max_images), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise MonitorSetupError(f"{label} must be a positive number, got {value!r}")
        if fail_above is not None and not 0 <= float(fail_above) < 1:
            raise MonitorSetupError(f"fail_above is a fraction of patch tokens in [0, 1), got {fail_above!r}")
        if isinstance(resume, int) and not isinstance(resume, bool) and resume < 0:
            raise MonitorSetupError(f"resume must be True, False or the step resumed from, got {resume!r}")
        self.fixed = threshold_option(threshold)
        check_probe_spec(images)
        self.images, self.every, self.out = images, every, Path(out).expanduser() if out is not None else None
        self.data_config, self.fail_above, self.on_update = data_config, fail_above, on_update
        self.resume, self.max_images, self.batch_size = resume, max_images, batch_size
        self.rule, self.name = rule or AutoRule(), name
        self.warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
        self.writer = _writer_option(tensorboard, self.out)
        self.records: deque[MonitorUpdate] = deque(maxlen=KEPT_RECORDS)  # this process's latest updates
        self._model = model
        self._probe: torch.Tensor | None = None
        self._ready_for: int | None = None  # id() of the module the probe set and the checks were made for
        self._log_opened = False
        self._lock: Any = None  # the open lock file while this monitor writes out/ (rank 0)
        self._calls = 0
        if model is not None:
            module = self._check_model(model)
            if _rank() == 0:
                with rng_preserved():
                    self._prepare(model, module)

    # ------------------------------------------------------------------------------------------ the user's calls
    def step(self, model: Any = None, step: int | None = None) -> MonitorUpdate | None:
        """Call once per training step: measures when ``step % every == 0`` and returns that update, else None.

        ``model`` may be left out when it was given at construction; ``step`` counts the calls when left out. Under
        torch.distributed every rank calls it at the same steps; rank 0 returns the update, the others None."""
        if isinstance(model, int) and not isinstance(model, bool) and step is None:
            model, step = None, model
        model = model if model is not None else self._model
        if model is None:
            raise MonitorSetupError("no model: pass it to step(model, step) or to ArtifactMonitor(model=...)")
        step = self._calls if step is None else int(step)
        first = self._calls == 0
        self._calls += 1
        if first:
            with rng_preserved():  # preparing the probe set draws a DataLoader seed
                self._first_call(model, step)
        if step % self.every != 0:
            return None
        record, status, message = None, _GO, ""
        if _rank() == 0:
            try:
                record = self._update(model, step)
            except Exception as exc:
                self._share(_FAILED, f"rank 0's artifact monitor failed at step {step}: {str(exc).splitlines()[0]}")
                raise
            if record is not None:
                status, message = self._stop_decision(record)
        status, message = self._share(status, message)
        if status == _FAILED:
            raise MonitorSetupError(message)
        if status == _STOP:
            raise ArtifactsAboveThreshold(message, record)
        return record

    def close(self) -> None:
        """Flush and close the TensorBoard writer this monitor opened (the JSONL file is never left open) and
        release the lock on ``out`` (another run may then continue the folder)."""
        if isinstance(self.writer, _LazyWriter):  # a writer the caller gave stays theirs to close
            self.writer.close()
        if self._lock is not None:
            self._lock.close()  # closing the lock file releases the flock
            self._lock = None

    def __enter__(self) -> "ArtifactMonitor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ checks
    def _check_model(self, model: Any) -> torch.nn.Module:
        """The checks every rank makes alike, without a collective: sharding, then a model the capture layer can
        hook (one line naming the class and the families known)."""
        sharded = sharding_of(model)
        if sharded is not None:
            raise MonitorSetupError(f"the model's parameters are sharded ({sharded}): a forward on one rank alone "
                                    "would wait forever for the others' shards; the monitor measures whole models "
                                    "(plain, DDP or torch.compile)")
        module = unwrap_model(unwrap_engine(model))
        family_of(module)
        return module

    def _first_call(self, model: Any, step: int) -> None:
        module = self._check_model(model)
        status, message = _GO, ""
        if _rank() == 0:
            try:
                if self._ready_for != id(module):
                    self._prepare(model, module)
                self._open_log(step)
            except Exception as exc:
                self._share(_FAILED, f"rank 0's artifact monitor refused to start: {str(exc).splitlines()[0]}")
                raise
        status, message = self._share(status, message)
        if status == _FAILED:
            raise MonitorSetupError(message)

    def _prepare(self, model: Any, module: torch.nn.Module) -> None:
        """Rank 0: the data config, the probe set (decoded once), the facts of the header; the output folder
        checked against another model's file."""
        family = family_of(module)
        cfg = resolve_data_config(model, module, self.data_config)
        check_input_size(module, cfg)
        self._probe, self._images_summary, found = probe_images(self.images, cfg, self.max_images)
        if found > self.max_images:
            self.warn(f"the probe set holds {found} images; the monitor keeps the first {self.max_images} "
                      "(max_images)")
        self._family = family
        self._prefix = sum(family.prefix_tokens(module))
        self._names = [block_point(i, "resid_post") for i in range(family.num_blocks(module))]
        self._summary = model_summary(model, module, family, cfg, self.name)
        self._fingerprint = fingerprint(module)
        self._ready_for = id(module)
        self._check_out()

    def _check_out(self) -> None:
        if self.out is None:
            return
        path = monitor_path(self.out)
        if not path.is_file() or path.stat().st_size == 0:
            return
        records, _ = read_lines(path, lambda msg: None)
        last = records[-1] if records else {}
        other = last.get("fingerprint") not in (None, self._fingerprint)
        who = (last.get("model") or {}).get("name", "?")
        if other and self.resume is False:
            raise MonitorSetupError(f"{display_name(path)} holds the monitor records of another model ({who}); "
                                    "choose another out, or pass resume=True to continue it anyway")
        if self.resume is False:
            raise MonitorSetupError(f"{display_name(path)} holds an earlier run's {len(records)} update(s), up to "
                                    f"step {last.get('step', '?')}; pass resume=True to continue it (later records "
                                    "are dropped) or choose another out")
        if other:
            self.warn(f"{display_name(path)} was written for another model ({who}); continuing it as resume= asks")

    def _open_log(self, first_step: int) -> None:
        """Rank 0 at the first call: the folder made, a resumed file cut back to the resumed step."""
        if self.out is None or self._log_opened:
            return
        monitor_path(self.out).parent.mkdir(parents=True, exist_ok=True)  # out may name the file itself
        self._hold_lock()  # before the file is cut back: another live writer's records are not ours to drop
        path = monitor_path(self.out)
        if self.resume is not False and path.is_file():
            up_to = first_step - 1 if self.resume is True else int(self.resume)
            dropped = keep_records_up_to(path, up_to, self.warn)
            if dropped:
                self.warn(f"resumed at step {first_step}: dropped {dropped} record(s) of later steps from "
                          f"{display_name(path)}")
        self._log_opened = True

    def _hold_lock(self) -> None:
        """Rank 0: the folder's lock, held from the first call to :meth:`close` (taken again by an update after it)."""
        if self._lock is None:
            self._lock = lock_monitor_folder(monitor_path(self.out).parent)  # type: ignore[arg-type]

    # ------------------------------------------------------------------------------------------ one update
    def _update(self, model: Any, step: int) -> MonitorUpdate | None:
        module = unwrap_model(unwrap_engine(model))
        if self._ready_for != id(module):  # another module object than the one checked: check it too
            self._check_model(model)
            with rng_preserved():
                self._prepare(model, module)
        try:
            stats, norms = self._measure(module)
        except out_of_memory_errors() as exc:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.warn(f"artifact monitor: out of memory at step {step}, update skipped "
                      f"({str(exc).splitlines()[0][:120]}); pass a smaller batch_size= or max_images=")
            return None
        record = self._record(stats, step)  # after the guarded forward: nothing here draws random numbers
        if self.out is not None:
            self._hold_lock()
            append_record(monitor_path(self.out), record)
        self.records.append(record)
        if self.writer is not None:
            self._log_tensorboard(record, norms)
        if self.on_update is not None:
            self.on_update(record)
        return record

    def _measure(self, module: torch.nn.Module) -> tuple[NormStatistics, list[torch.Tensor] | None]:
        """The probe set through the capture layer, each block's token norms streamed into the statistics."""
        t0 = time.perf_counter()
        device, dtype = module_device(module)
        if self._probe.device != device or self._probe.dtype != dtype:  # type: ignore[union-attr]
            self._probe = self._probe.to(device, dtype)  # type: ignore[union-attr]
        L = len(self._names)
        fixed = (PAPER_THRESHOLD,) + ((self.fixed,) if self.fixed not in (None, PAPER_THRESHOLD) else ())
        stats = NormStatistics(L, self._summary_prefix_names(), fixed)
        kept: list[torch.Tensor] | None = [] if self.writer is not None else None
        with training_untouched(module), capture(module, self._names, reduce=token_norms, stop_early=True) as cap:
            for start in range(0, len(self._probe), self.batch_size):  # type: ignore[arg-type]
                cap.forward(self._probe[start:start + self.batch_size])  # type: ignore[index]
                norms = torch.stack([cap[n] for n in self._names])  # [L, B, T]
                if norms.shape[-1] <= self._prefix:
                    raise MonitorSetupError(f"the model produced {norms.shape[-1]} tokens, no more than its "
                                            f"{self._prefix} prefix tokens")
                stats.update(norms)
                if kept is not None:
                    kept.append(norms[:, :, self._prefix:].reshape(L, -1).float().cpu())
        self._seconds = time.perf_counter() - t0
        return stats, kept

    def _summary_prefix_names(self) -> list[str]:
        s = self._summary
        return ["cls"] * s.num_cls_tokens + [f"reg{i}" for i in range(s.num_register_tokens)]

    def _record(self, stats: NormStatistics, step: int) -> MonitorUpdate:
        decisions = [fixed_threshold(self.fixed) if self.fixed is not None
                     else auto_threshold(stats.patch_counts[r], self.rule) for r in range(stats.num_rows)]
        layers = layer_rows(stats, decisions, self.rule)
        onset = next((lay.index for lay in layers if lay.num_outliers > 0), None)
        nonfinite = sum(lay.num_nonfinite for lay in layers)
        record = MonitorUpdate(
            model=self._summary, images=self._images_summary, headline="", step=step, seconds=self._seconds,
            threshold_mode="fixed" if self.fixed is not None else "auto",
            threshold_rule=f"fixed: norm > {self.fixed:g}" if self.fixed is not None else self.rule.describe(),
            layers=layers, onset_layer=onset, conclusive=nonfinite == 0 and not layers[-1].inconclusive,
            num_nonfinite=nonfinite, fingerprint=self._fingerprint)
        record.headline = _update_headline(record)
        return record

    def _stop_decision(self, record: MonitorUpdate) -> tuple[int, str]:
        if self.fail_above is None:
            return _GO, ""
        last = record.last_block
        if record.num_nonfinite:
            return _STOP, (f"step {record.step}: {record.num_nonfinite} token norms are NaN or Inf (the run "
                           f"diverges); stopped by fail_above={self.fail_above:g}")
        if record.conclusive and last.outlier_fraction > self.fail_above:
            return _STOP, (f"step {record.step}: {last.outlier_fraction:.2%} of the last block's patch tokens are "
                           f"artifact outliers, above fail_above={self.fail_above:g} ({self.fail_above:.2%})")
        return _GO, ""

    # ------------------------------------------------------------------------------------------ outputs
    def _log_tensorboard(self, record: MonitorUpdate, norms: list[torch.Tensor] | None) -> None:
        w, step = self.writer, record.step
        for lay in record.layers:
            w.add_scalar(f"artifacts/outlier_fraction/block_{lay.index}", lay.outlier_fraction, step)
        w.add_scalar("artifacts/outlier_fraction/last", record.last_block.outlier_fraction, step)
        # -1: no block holds outliers (a scalar series cannot hold "none")
        w.add_scalar("artifacts/onset", -1 if record.onset_layer is None else record.onset_layer, step)
        if norms:
            per_block = torch.cat(norms, dim=1)
            for i in range(per_block.shape[0]):
                values = per_block[i][torch.isfinite(per_block[i])]
                if len(values):
                    w.add_histogram(f"artifacts/norms/block_{i}", values, step)
        if hasattr(w, "flush"):
            w.flush()

    # ------------------------------------------------------------------------------------------ ranks
    def _share(self, status: int, message: str) -> tuple[int, str]:
        """Rank 0's status (and its message when not "go") to every rank; nothing without a process group."""
        if _world() == 1:
            return status, message
        import torch.distributed as dist

        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
            else torch.device("cpu")
        flag = torch.tensor([status], dtype=torch.int64, device=device)
        dist.broadcast(flag, src=0)
        status = int(flag.item())
        if status != _GO:
            box = [message]
            dist.broadcast_object_list(box, src=0)
            message = str(box[0])
        return status, message


def _update_headline(record: MonitorUpdate) -> str:
    last = record.last_block
    if record.num_nonfinite:
        return f"step {record.step}: NON-FINITE token norms ({record.num_nonfinite})"
    where = "no outliers" if record.onset_layer is None else f"outliers from block {record.onset_layer}"
    return (f"step {record.step}: {where}; last block {last.outlier_fraction:.2%} flagged, max/median "
            f"{last.max_over_median:.1f}x" + ("" if record.conclusive else " (inconclusive)"))


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _writer_option(tensorboard: Any, out: Path | None) -> Any:
    """A SummaryWriter for ``tensorboard=``: the caller's own, a new one under ``out/tensorboard`` (True; created
    lazily on rank 0 by :func:`open_writer`), or None. The tensorboard package is checked now, at construction."""
    if tensorboard is False or tensorboard is None:
        return None
    if tensorboard is not True:
        if not callable(getattr(tensorboard, "add_scalar", None)):
            raise MonitorSetupError("tensorboard= takes True or a SummaryWriter (something with add_scalar)")
        return tensorboard
    if out is None:
        raise MonitorSetupError("tensorboard=True writes under out/tensorboard: pass out= (or a SummaryWriter)")
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise MonitorSetupError("tensorboard=True needs the tensorboard package: pip install 'artifactscan[monitor]' "
                                "(or pip install tensorboard)") from None
    return _LazyWriter(SummaryWriter, out / "tensorboard")


class _LazyWriter:
    """A SummaryWriter made at its first use: only the rank that writes creates the folder and the event file."""

    def __init__(self, factory: Callable[..., Any], log_dir: Path):
        self.factory, self.log_dir, self.writer = factory, log_dir, None

    def __getattr__(self, name: str) -> Any:
        if self.__dict__.get("writer") is None:
            self.__dict__["writer"] = self.factory(log_dir=str(self.log_dir))
        return getattr(self.__dict__["writer"], name)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
