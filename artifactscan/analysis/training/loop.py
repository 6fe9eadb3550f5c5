"""The training loop of one model: AdamW with warm-up + cosine, bf16 autocast on GPU, periodic eval and checkpoints,
exact resumption."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from artifactscan.models.checkpoint import META_KEY, save_checkpoint
from artifactscan.analysis.monitor import MAX_PROBE_IMAGES, ArtifactMonitor
from artifactscan.analysis.monitor_records import MONITOR_FILE
from artifactscan.core.errors import RunInterrupted, TrainingError, option
from artifactscan.analysis.training.config import TrainConfig, check_training_fits, resolve_config, validate_config
from artifactscan.analysis.training.model import build_model, lr_factor, param_groups
from artifactscan.analysis.training.data import EpochIndexed, StepBatchSampler, build_datasets
from artifactscan.analysis.training.distributed import (
    DistState,
    all_reduce_sum,
    barrier,
    init_distributed,
    resolve_train_device,
)
from artifactscan.analysis.training.checkpointing import (
    atomic_torch_save,
    check_same_config,
    checkpoint_meta,
    remove_stale_temporaries,
    write_json,
)


class StopSignal:
    """SIGTERM / SIGINT set a flag instead of killing the loop; the ranks agree on the step at which to stop.

    Installed only in the main thread (signal handlers can live nowhere else); the previous handlers come back on
    exit. The flag is read after every step in one process; under DDP it is all-reduced (MAX) at the steps where the
    loop synchronises anyway (``progress_every``), so every rank stops after the same step and rank 0 saves the
    resume state of exactly that step.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignal":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    self._previous[sig] = signal.signal(sig, self._handle)
                except (ValueError, OSError):
                    pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, step: int, every: int, d: DistState, device: torch.device) -> bool:
        if d.world == 1:
            return self.signum is not None
        if step % every:
            return False
        import torch.distributed as dist

        flag = torch.tensor([0 if self.signum is None else int(self.signum)], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag.item()) and self.signum is None:
            self.signum = int(flag.item())  # a sibling rank was signalled
        return bool(int(flag.item()))

    @property
    def name(self) -> str:
        import signal

        try:
            return signal.Signals(self.signum).name  # type: ignore[arg-type]
        except (ValueError, TypeError):
            return f"signal {self.signum}"


def _keep_metrics_up_to(path: Path, step: int) -> None:
    """Drop evaluation lines after ``step`` (written after the last save, before a kill): a resumed run rewrites them."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            if int(json.loads(line)["step"]) <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by the kill
    if len(kept) != len(lines):
        from artifactscan.core.files import atomic_write_text

        atomic_write_text(path, "".join(x + "\n" for x in kept))


@torch.no_grad()
def evaluate(model: nn.Module, dataset, config: TrainConfig, device: torch.device, mean: torch.Tensor,
             std: torch.Tensor, d: DistState | None = None, batch_size: int = 256) -> tuple[float, float]:
    """Mean cross-entropy and accuracy on ``dataset`` (sharded across DDP ranks, summed with all-reduce)."""
    d = d or DistState()
    was_training = model.training
    model.eval()
    loss_sum = correct = count = 0.0
    idx = list(range(d.rank, len(dataset), d.world))
    amp = device.type == "cuda" and config.amp
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, idx), batch_size=batch_size, shuffle=False,
        num_workers=config.num_workers, pin_memory=device.type == "cuda",
    )
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        x = (x - mean) / std
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
        count += len(y)
    loss_sum, correct, count = all_reduce_sum([loss_sum, correct, count], device, d)
    model.train(was_training)
    return loss_sum / max(count, 1), correct / max(count, 1)


def training_progress_bars():
    """The rich progress display of training runs on stderr: one bar per model, with its loss, accuracy and speed."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  acc {task.fields[acc]}  {task.fields[ips]} img/s"),
        TimeRemainingColumn(), console=Console(stderr=True),
    )


class _Reporter:
    """Rich progress bar on stderr (rank 0 only) + optional event callback (used by side-by-side workers)."""

    def __init__(self, enabled: bool, label: str, total: int, start: int,
                 on_event: Callable[[dict], None] | None):
        self.on_event, self.progress, self.task = on_event, None, None
        if enabled:
            self.progress = training_progress_bars()
            self.progress.start()
            self.task = self.progress.add_task(label, total=total, completed=start, loss="-", acc="-", ips="-")

    def step(self, step: int, loss: float, ips: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, loss=f"{loss:.3f}", ips=f"{ips:.0f}")
        if self.on_event:
            self.on_event({"type": "step", "step": step, "loss": loss, "img_per_s": ips})

    def eval(self, record: dict) -> None:
        if self.progress is not None:
            self.progress.update(self.task, acc=f"{record['val_acc']:.3f}")
            self.progress.console.print(
                f"step {record['step']}: loss {record['loss']:.3f}  val loss {record['val_loss']:.3f}  "
                f"val acc {record['val_acc']:.3f}  {record['img_per_s']:.0f} img/s"
            )
        if self.on_event:
            self.on_event({"type": "eval", **record})

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


@dataclass
class TrainResult:
    """What one training run produced. ``final_checkpoint`` is a self-describing ``.safetensors`` file."""

    run_dir: Path
    registers: int
    final_checkpoint: Path
    checkpoints: list[Path]  # intermediate snapshots (oldest first), for following norms over training
    steps: int
    val_acc: float
    val_loss: float
    wall_s: float  # whole run incl. evaluation and checkpointing (this process's share when resumed)
    train_s: float  # time spent in training steps only (all sessions of the run)
    img_per_s: float  # training throughput (global, all ranks)
    model: nn.Module | None = field(default=None, repr=False)  # the trained model (unwrapped), for in-process use

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "model"}
        d["run_dir"] = str(self.run_dir)
        d["final_checkpoint"] = str(self.final_checkpoint)
        d["checkpoints"] = [str(p) for p in self.checkpoints]
        return d


def train_model(
    config: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    on_event: Callable[[dict], None] | None = None,
    stop_at_step: int | None = None,
    label: str | None = None,
    return_model: bool = False,
) -> TrainResult:
    """Train one model (``config.registers`` register tokens) into ``run_dir``.

    Writes ``config.json``, ``metrics.jsonl`` (one line per evaluation), ``checkpoints/step_*.safetensors``
    (intermediate snapshots, thinned to ``keep_ckpts``), ``last.pt`` (resume state), ``final.safetensors`` and
    ``result.json``. Under torchrun every rank trains and only rank 0 writes.

    Args:
        resume: continue from ``run_dir/last.pt`` (same config required; the result equals an uninterrupted run).
        progress: show the rich progress bar on stderr.
        on_event: called with ``{"type": "step"|"eval", ...}`` dicts (for parent processes drawing the bar).
        stop_at_step: save the resume state and return after this step (simulates a killed run; tests use it).
        return_model: put the trained (unwrapped) model in the result.

    SIGTERM or SIGINT stops the run after the current step (the same step on every rank), saves the resume state
    of that step and raises :class:`RunInterrupted`; ``resume=True`` continues it bit-identically. Temporaries a
    killed run left behind are removed first; a folder with no resume state (killed before its first save) starts
    over instead of being refused.
    """
    config = resolve_config(config)
    validate_config(config)
    run_dir = Path(run_dir)
    t_start = time.perf_counter()
    device = resolve_train_device(config.device)
    check_training_fits(config, device)
    d, device = init_distributed(device)
    if config.num_threads:
        torch.set_num_threads(int(config.num_threads))
    if d.main:
        remove_stale_temporaries(run_dir)
    saved = _saved_resume_state(run_dir, config) if resume else _refuse_existing_run(run_dir)
    session = _start_session(config, run_dir, d, device, saved)
    reporter = _Reporter(progress and d.main, label or f"reg{session.config.registers}", session.total,
                         session.start_step, on_event)
    stop = StopSignal()
    try:
        with stop:
            stopped_at = _train_steps(session, reporter, stop, stop_at_step)
    except torch.cuda.OutOfMemoryError:
        smaller = max(1, config.batch_size // 2)
        raise TrainingError(
            f"CUDA ran out of memory at batch size {config.batch_size} per GPU ({config.arch}, "
            f"{config.img_size}px, {config.registers} registers); try {option('batch_size', smaller)}"
        ) from None
    finally:
        reporter.close()
        if session.monitor is not None:
            session.monitor.close()  # releases monitor.jsonl's lock: a resume in this process may continue it
    result = _finish(session, t_start=t_start, resumed=resume, return_model=return_model)
    barrier(d)
    if stopped_at is not None:
        raise RunInterrupted(f"{stop.name}: stopped {run_dir} after step {stopped_at} of {session.total} and saved "
                             f"its resume state; continue with: artifactscan train-reg --resume {run_dir}")
    return result


def _saved_resume_state(run_dir: Path, config: TrainConfig) -> dict:
    """The contents of ``run_dir/last.pt``, refused unless it was saved with the same config."""
    last_path = run_dir / "last.pt"
    if not last_path.is_file():
        what = "has no checkpoint yet (last.pt)" if (run_dir / "config.json").is_file() else "is not a run folder"
        raise TrainingError(f"cannot resume: {run_dir} {what}; start a fresh run instead of {option('resume')} (a "
                            "folder "
                            "with no checkpoint restarts)")
    blob = torch.load(last_path, map_location="cpu", weights_only=True)
    check_same_config(json.loads(blob["resume"]["config"]), config, run_dir)
    return blob


def _refuse_existing_run(run_dir: Path) -> None:
    """A fresh start never overwrites a run that saved something (every rank checks: no rank is left hanging)."""
    if (run_dir / "last.pt").exists() or (run_dir / "final.safetensors").exists():
        resume = option("resume", True, shell_value=run_dir)
        raise TrainingError(f"{run_dir} already holds a training run; pass {resume} or choose a new folder")


@dataclass
class _TrainingData:
    """The data sets of a run and how their images are normalised on the device."""

    train: Any
    val: Any
    data_config: dict  # the model's data config (mean, std, ...), written into every checkpoint
    description: str
    mean: torch.Tensor  # [1, 3, 1, 1] on the training device
    std: torch.Tensor


@dataclass
class _Counters:
    """What the loop accumulates; all of it is saved with the resume state, so a resumed run continues exactly."""

    step: int = 0
    loss_sum: float = 0.0  # training loss since the last evaluation (the part already moved off the device)
    loss_count: int = 0  # steps since the last evaluation
    train_time: float = 0.0  # seconds in training steps, over all sessions of the run
    eval_mark: float = 0.0  # train_time at the last evaluation
    snapshots: list[Path] = field(default_factory=list)  # intermediate checkpoints kept, oldest first

    @classmethod
    def restored(cls, state: dict, run_dir: Path) -> "_Counters":
        return cls(step=int(state["step"]), loss_sum=float(state["loss_sum"]), loss_count=int(state["loss_count"]),
                   train_time=float(state["train_time"]), eval_mark=float(state["eval_mark"]),
                   snapshots=[run_dir / p for p in state["snapshots"]])


@dataclass
class _Session:
    """One session of a run (a fresh start or a resume): what the steps, evaluations and saves share."""

    config: TrainConfig  # with num_classes counted from the data when it was unset
    run_dir: Path
    d: DistState
    device: torch.device
    data: _TrainingData
    total: int  # steps of the whole run
    raw: nn.Module  # the model itself: what is evaluated and saved
    model: nn.Module  # what the steps call: ``raw``, compiled and/or wrapped in DDP
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    counters: _Counters
    start_step: int  # where this session started
    val_loss: float = float("nan")
    val_acc: float = float("nan")
    ckpt_stride: int = 1  # snapshots kept are those at multiples of ckpt_every * ckpt_stride
    monitor: ArtifactMonitor | None = None  # the artifacts at each evaluation: run_dir/monitor.jsonl
    running_loss: torch.Tensor = field(init=False)  # summed on the device: no host sync per step (matters on GPU)
    params: list[nn.Parameter] = field(init=False)  # what gradient clipping sees

    def __post_init__(self) -> None:
        self.running_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        self.params = [p for p in self.raw.parameters() if p.requires_grad]

    def meta(self, step: int, **extra: Any):
        return checkpoint_meta(self.config, self.config.registers, self.data.data_config, step, **extra)

    def batches(self) -> torch.utils.data.DataLoader:
        """The training batches from this session's first step on; the same order on any resume."""
        c, d = self.config, self.d
        sampler = StepBatchSampler(len(self.data.train), c.batch_size, c.seed, self.start_step, self.total, d.rank,
                                   d.world)
        return torch.utils.data.DataLoader(
            EpochIndexed(self.data.train), batch_sampler=sampler, num_workers=c.num_workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
        )

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimiser step on a batch; returns its loss (still on the device)."""
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        x = (x - self.data.mean) / self.data.std
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda" and
                            self.config.amp):
            logits = self.model(x)
            loss = F.cross_entropy(logits.float(), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.clip_grad)
        self.opt.step()
        self.sched.step()
        self.counters.step += 1
        self.running_loss += loss.detach().double()
        self.counters.loss_count += 1
        return loss

    def evaluate(self) -> None:
        self.val_loss, self.val_acc = evaluate(self.raw, self.data.val, self.config, self.device, self.data.mean,
                                               self.data.std, self.d)

    def evaluate_and_record(self) -> dict:
        """Evaluate, append the line to ``metrics.jsonl`` (rank 0) and start the next training-loss average; the
        artifact monitor measures the same weights (``monitor.jsonl``, every rank taking part as it asks)."""
        c, world = self.counters, self.d.world
        self.evaluate()
        if self.monitor is not None:
            self.monitor.step(self.raw, c.step)
        c.loss_sum += self.running_loss.item()
        record = {
            "step": c.step,
            "loss": c.loss_sum / max(c.loss_count, 1),  # mean training loss since the previous evaluation
            "val_loss": self.val_loss,
            "val_acc": self.val_acc,
            "img_per_s": c.loss_count * self.config.batch_size * world / max(c.train_time - c.eval_mark, 1e-9),
            "lr": self.opt.param_groups[0]["lr"],
            "train_s": c.train_time,
            "registers": self.config.registers,
        }
        self.running_loss.zero_()
        c.loss_sum, c.loss_count, c.eval_mark = 0.0, 0, c.train_time
        if self.d.main:
            with (self.run_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
        return record

    def save_snapshot(self) -> None:
        """An intermediate checkpoint of this step; at most ``keep_ckpts`` stay, thinned evenly (the stride
        between the kept ones doubles), so they follow the whole run whatever its length."""
        step, every = self.counters.step, self.config.ckpt_every
        snap = self.run_dir / "checkpoints" / f"step_{step:07d}.safetensors"
        save_checkpoint(snap, self.raw.state_dict(), self.meta(step))
        snapshots = self.counters.snapshots + [snap]
        while len(snapshots) > max(1, self.config.keep_ckpts):
            self.ckpt_stride *= 2
            keep = [p for p in snapshots if (int(p.stem.split("_")[1]) // every) % self.ckpt_stride == 0]
            for p in set(snapshots) - set(keep):
                p.unlink(missing_ok=True)
            snapshots = keep
        self.counters.snapshots = snapshots

    def save_resume_state(self) -> None:
        """``last.pt`` (rank 0): weights, optimiser, scheduler, RNG and counters of this step."""
        if not self.d.main:
            return
        c, device, run_dir = self.counters, self.device, self.run_dir
        state = {
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "step": c.step,
            "config": json.dumps(self.config.to_dict(), sort_keys=True),
            "loss_sum": c.loss_sum + self.running_loss.item(),  # the part still on the device counts too
            "loss_count": c.loss_count,
            "train_time": c.train_time,
            "eval_mark": c.eval_mark,
            "snapshots": [p.name if p.parent == run_dir else str(p.relative_to(run_dir)) for p in c.snapshots],
        }
        meta = self.meta(c.step, extra={"resume_file": True})
        sd = {k: v.detach().cpu() for k, v in self.raw.state_dict().items()}
        atomic_torch_save({"state_dict": sd, META_KEY: json.loads(meta.to_json()), "resume": state},
                          run_dir / "last.pt")


def _start_session(config: TrainConfig, run_dir: Path, d: DistState, device: torch.device,
                   saved: dict | None) -> _Session:
    """Data, model, optimiser and counters, fresh or restored from ``saved``; writes the run's ``config.json``.

    The order of the steps that draw random numbers (data, model, then the loop's seed) is part of the results."""
    train_ds, val_ds, n_data_classes, data_config, data_desc = build_datasets(config, d.world)
    config = _with_class_count(config, n_data_classes)
    total = config.steps
    if total is None:
        total = max(1, math.ceil(config.epochs * len(train_ds) / (config.batch_size * d.world)))
    raw = build_model(config).to(device)
    opt = torch.optim.AdamW(param_groups(raw, config.weight_decay), lr=config.lr, betas=(0.9, 0.999),
                            **({"fused": True} if device.type == "cuda" else {}))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total, config.warmup_steps, config.min_lr_ratio)
    )
    if saved is not None:
        counters = _restore(saved, raw, opt, sched, device, run_dir)
    else:
        counters = _Counters()
        torch.manual_seed(config.seed + 1)  # any randomness in the loop (drop-path if added) is seeded too
    if d.main:
        _write_run_header(run_dir, config, total, data_desc, d.world, resumed_at=None if saved is None else
                          counters.step)
    model = torch.compile(raw) if config.compile else raw
    if d.world > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    mean = torch.tensor(data_config["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(data_config["std"], device=device).view(1, 3, 1, 1)
    data = _TrainingData(train_ds, val_ds, data_config, data_desc, mean, std)
    # The first validation images are the probe set; measured at each evaluation (every=1: called on its schedule).
    # A resumed session continues the file from its saved step (the records a killed session wrote after it go).
    # train-reg chooses its probe set itself: the first MAX_PROBE_IMAGES validation images (no "keeps the first"
    # warning, which is for a user's larger set).
    probe_set = torch.utils.data.Subset(val_ds, range(min(len(val_ds), MAX_PROBE_IMAGES)))
    monitor = ArtifactMonitor(probe_set, every=1, out=run_dir, data_config=data_config,
                              resume=counters.step if saved is not None else False)
    return _Session(config=config, run_dir=run_dir, d=d, device=device, data=data, total=total, raw=raw,
                    model=model, opt=opt, sched=sched, counters=counters, start_step=counters.step, monitor=monitor)


def _with_class_count(config: TrainConfig, n_data_classes: int) -> TrainConfig:
    """``num_classes`` counted from the data when unset; refused when the data has more classes than outputs."""
    if config.num_classes is None:
        return config.replace(num_classes=n_data_classes)
    if n_data_classes > config.num_classes:
        raise TrainingError(
            f"the data has {n_data_classes} classes but the model has {config.num_classes} outputs; "
            f"leave num_classes unset (counted from the class folders, as --preset imagenet does) or set it to "
            f"{n_data_classes}"
        )
    return config


def _restore(saved: dict, raw: nn.Module, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LambdaLR,
             device: torch.device, run_dir: Path) -> _Counters:
    """Weights, optimiser, scheduler and RNG as ``last.pt`` saved them; returns the saved counters."""
    st = saved["resume"]
    raw.load_state_dict(saved["state_dict"])
    opt.load_state_dict(st["optimizer"])
    sched.load_state_dict(st["scheduler"])
    torch.set_rng_state(st["rng_cpu"])
    if device.type == "cuda" and st.get("rng_cuda") is not None:
        torch.cuda.set_rng_state(st["rng_cuda"], device)
    return _Counters.restored(st, run_dir)


def _write_run_header(run_dir: Path, config: TrainConfig, total: int, data_desc: str, world: int,
                      resumed_at: int | None) -> None:
    """``config.json``, and ``metrics.jsonl`` cut to what the resume state covers (emptied on a fresh start)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if resumed_at is None:  # a fresh start: evaluation lines of an earlier attempt that never saved are stale
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        (run_dir / MONITOR_FILE).unlink(missing_ok=True)
    else:
        _keep_metrics_up_to(run_dir / "metrics.jsonl", resumed_at)
    write_json(run_dir / "config.json", {**config.to_dict(), "total_steps": total, "data": config.data,
                                          "data_description": data_desc, "world_size": world})


def _train_steps(s: _Session, reporter: _Reporter, stop: StopSignal, stop_at_step: int | None) -> int | None:
    """Train from the session's first step to the end of the run, evaluating and saving on schedule.

    Returns the step at which a signal stopped the run (its resume state saved), or None."""
    config, c = s.config, s.counters
    s.model.train()
    t_window, n_window = time.perf_counter(), 0  # throughput over the steps since the last progress report
    for x, y in s.batches():
        t0 = time.perf_counter()
        loss = s.train_step(x, y)
        c.train_time += time.perf_counter() - t0
        n_window += 1
        if c.step % config.progress_every == 0 or c.step == s.total:
            now = time.perf_counter()
            recent_ips = n_window * config.batch_size * s.d.world / max(now - t_window, 1e-9)
            t_window, n_window = now, 0
            reporter.step(c.step, loss.item(), recent_ips)

        is_last = c.step == s.total
        if c.step % config.eval_every == 0 or is_last:
            reporter.eval(s.evaluate_and_record())
        if (c.step % config.ckpt_every == 0 and not is_last) and s.d.main:
            s.save_snapshot()
        stop_now = not is_last and stop.agreed(c.step, config.progress_every, s.d, s.device)
        if c.step % config.ckpt_every == 0 or is_last or c.step == stop_at_step or stop_now:
            s.save_resume_state()
        if stop_now:
            return c.step
        if stop_at_step is not None and c.step >= stop_at_step and not is_last:
            break
    return None


def _finish(s: _Session, *, t_start: float, resumed: bool, return_model: bool) -> TrainResult:
    """The result; on rank 0 ``final.safetensors`` and ``result.json`` (a partial one while unfinished)."""
    c = s.counters
    final = s.run_dir / "final.safetensors"
    finished = c.step == s.total
    if finished and s.start_step == s.total:  # resumed a run that had already finished: just re-evaluate
        s.evaluate()
    ips = c.step * s.config.batch_size * s.d.world / c.train_time if c.train_time else 0.0  # all sessions
    wall = time.perf_counter() - t_start
    if finished and s.d.main:
        save_checkpoint(final, s.raw.state_dict(), s.meta(s.total))
    result = TrainResult(
        run_dir=s.run_dir, registers=s.config.registers, final_checkpoint=final, checkpoints=list(c.snapshots),
        steps=c.step, val_acc=s.val_acc, val_loss=s.val_loss, wall_s=wall, train_s=c.train_time, img_per_s=ips,
        model=s.raw if return_model else None,
    )
    result_path = s.run_dir / "result.json"
    if finished and s.d.main:
        if resumed and result_path.exists():  # a resumed run's wall time includes the earlier sessions
            try:
                result.wall_s += float(json.loads(result_path.read_text()).get("wall_s_partial", 0.0))
            except (ValueError, OSError):
                pass
        write_json(result_path, result.to_dict())
    elif s.d.main:
        write_json(result_path, {"finished": False, "steps": c.step, "wall_s_partial": wall})
    return result
