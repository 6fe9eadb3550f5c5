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
from artifactscan.core.errors import RunInterrupted, TrainingError
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


class _Reporter:
    """Rich progress bar on stderr (rank 0 only) + optional event callback (used by side-by-side workers)."""

    def __init__(self, enabled: bool, label: str, total: int, start: int,
                 on_event: Callable[[dict], None] | None):
        self.on_event, self.progress, self.task = on_event, None, None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  acc {task.fields[acc]}  {task.fields[ips]} img/s"),
                TimeRemainingColumn(), console=Console(stderr=True),
            )
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
    last_path = run_dir / "last.pt"
    if d.main:
        remove_stale_temporaries(run_dir)

    saved_resume: dict | None = None
    if resume:
        if not last_path.is_file():
            what = "has no checkpoint yet (last.pt)" if (run_dir / "config.json").is_file() else "is not a run folder"
            raise TrainingError(f"cannot resume: {run_dir} {what}; start a fresh run instead of --resume (a folder "
                                "with no checkpoint restarts)")
        blob = torch.load(last_path, map_location="cpu", weights_only=True)
        saved_cfg = json.loads(blob["resume"]["config"])
        check_same_config(saved_cfg, config, run_dir)
        saved_resume = blob
    elif last_path.exists() or (run_dir / "final.safetensors").exists():  # every rank checks: no rank left hanging
        raise TrainingError(f"{run_dir} already holds a training run; pass --resume {run_dir} or choose a new folder")

    train_ds, val_ds, n_data_classes, data_config, data_desc = build_datasets(config, d.world)
    if config.num_classes is None:
        config = config.replace(num_classes=n_data_classes)
    elif n_data_classes > config.num_classes:
        raise TrainingError(
            f"the data has {n_data_classes} classes but the model has {config.num_classes} outputs; "
            f"leave num_classes unset (counted from the class folders, as --preset imagenet does) or set it to "
            f"{n_data_classes}"
        )
    total = config.steps
    if total is None:
        total = max(1, math.ceil(config.epochs * len(train_ds) / (config.batch_size * d.world)))

    model = build_model(config).to(device)
    raw = model
    opt = torch.optim.AdamW(param_groups(raw, config.weight_decay), lr=config.lr, betas=(0.9, 0.999),
                            **({"fused": True} if device.type == "cuda" else {}))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total, config.warmup_steps, config.min_lr_ratio)
    )
    start_step, loss_sum, loss_count, train_time, eval_mark, snapshots = 0, 0.0, 0, 0.0, 0.0, []
    if saved_resume is not None:
        st = saved_resume["resume"]
        raw.load_state_dict(saved_resume["state_dict"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        torch.set_rng_state(st["rng_cpu"])
        if device.type == "cuda" and st.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(st["rng_cuda"], device)
        start_step = int(st["step"])
        loss_sum, loss_count, train_time = float(st["loss_sum"]), int(st["loss_count"]), float(st["train_time"])
        eval_mark = float(st["eval_mark"])
        snapshots = [run_dir / p for p in st["snapshots"]]
    else:
        torch.manual_seed(config.seed + 1)  # any randomness in the loop (drop-path if added) is seeded too

    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if saved_resume is None:  # a fresh start: evaluation lines of an earlier attempt that never saved are stale
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        else:
            _keep_metrics_up_to(run_dir / "metrics.jsonl", start_step)
        write_json(run_dir / "config.json", {**config.to_dict(), "total_steps": total, "data": config.data,
                                              "data_description": data_desc, "world_size": d.world})
    if config.compile:
        model = torch.compile(model)
    if d.world > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    sampler = StepBatchSampler(len(train_ds), config.batch_size, config.seed, start_step, total, d.rank, d.world)
    loader = torch.utils.data.DataLoader(
        EpochIndexed(train_ds), batch_sampler=sampler, num_workers=config.num_workers,
        pin_memory=device.type == "cuda", persistent_workers=False,
    )
    mean = torch.tensor(data_config["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(data_config["std"], device=device).view(1, 3, 1, 1)
    amp = device.type == "cuda" and config.amp
    params = [p for p in raw.parameters() if p.requires_grad]
    reporter = _Reporter(progress and d.main, label or f"reg{config.registers}", total, start_step, on_event)
    metrics_path = run_dir / "metrics.jsonl"
    val_loss = val_acc = float("nan")
    step = start_step
    ckpt_stride = 1
    recent_ips = 0.0
    running_loss = torch.zeros((), dtype=torch.float64, device=device)

    def save_resume_state(at_step: int) -> None:
        if not d.main:
            return
        pending_loss = loss_sum + running_loss.item()
        state = {
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "step": at_step,
            "config": json.dumps(config.to_dict(), sort_keys=True),
            "loss_sum": pending_loss,
            "loss_count": loss_count,
            "train_time": train_time,
            "eval_mark": eval_mark,
            "snapshots": [p.name if p.parent == run_dir else str(p.relative_to(run_dir)) for p in snapshots],
        }
        meta = checkpoint_meta(config, config.registers, data_config, at_step, extra={"resume_file": True})
        sd = {k: v.detach().cpu() for k, v in raw.state_dict().items()}
        atomic_torch_save({"state_dict": sd, META_KEY: json.loads(meta.to_json()), "resume": state}, last_path)

    stop = StopSignal()
    stopped_at: int | None = None
    try:
        stop.__enter__()
        model.train()
        t_window, n_window = time.perf_counter(), 0
        for batch in loader:
            t0 = time.perf_counter()
            x, y = batch
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            x = (x - mean) / std
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(x)
                loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.clip_grad:
                torch.nn.utils.clip_grad_norm_(params, config.clip_grad)
            opt.step()
            sched.step()
            step += 1
            running_loss += loss.detach().double()  # no host sync per step (matters on GPU)
            loss_count += 1
            train_time += time.perf_counter() - t0
            n_window += 1
            if step % config.progress_every == 0 or step == total:
                now = time.perf_counter()
                recent_ips = n_window * config.batch_size * d.world / max(now - t_window, 1e-9)
                t_window, n_window = now, 0
                reporter.step(step, loss.item(), recent_ips)

            is_last = step == total
            if step % config.eval_every == 0 or is_last:
                val_loss, val_acc = evaluate(raw, val_ds, config, device, mean, std, d)
                loss_sum += running_loss.item()
                record = {
                    "step": step,
                    "loss": loss_sum / max(loss_count, 1),  # mean training loss since the previous evaluation
                    "val_loss": val_loss,
                    "val_acc": val_acc,
                    "img_per_s": loss_count * config.batch_size * d.world / max(train_time - eval_mark, 1e-9),
                    "lr": opt.param_groups[0]["lr"],
                    "train_s": train_time,
                    "registers": config.registers,
                }
                running_loss.zero_()
                loss_sum, loss_count, eval_mark = 0.0, 0, train_time
                if d.main:
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                reporter.eval(record)
            if (step % config.ckpt_every == 0 and not is_last) and d.main:
                snap = run_dir / "checkpoints" / f"step_{step:07d}.safetensors"
                save_checkpoint(snap, raw.state_dict(), checkpoint_meta(config, config.registers, data_config, step))
                snapshots.append(snap)
                while len(snapshots) > max(1, config.keep_ckpts):  # thin evenly: double the stride
                    ckpt_stride *= 2
                    keep = [p for p in snapshots
                            if (int(p.stem.split("_")[1]) // config.ckpt_every) % ckpt_stride == 0]
                    for p in set(snapshots) - set(keep):
                        p.unlink(missing_ok=True)
                    snapshots = keep
            stop_now = not is_last and stop.agreed(step, config.progress_every, d, device)
            if step % config.ckpt_every == 0 or is_last or step == stop_at_step or stop_now:
                save_resume_state(step)
            if stop_now:
                stopped_at = step
                break
            if stop_at_step is not None and step >= stop_at_step and not is_last:
                break
    except torch.cuda.OutOfMemoryError:
        smaller = max(1, config.batch_size // 2)
        raise TrainingError(
            f"CUDA ran out of memory at batch size {config.batch_size} per GPU ({config.arch}, "
            f"{config.img_size}px, {config.registers} registers); try --batch-size {smaller}"
        ) from None
    finally:
        stop.__exit__()
        reporter.close()

    final = run_dir / "final.safetensors"
    finished = step == total
    if finished and start_step == total:  # resumed a run that had already finished: just re-evaluate
        val_loss, val_acc = evaluate(raw, val_ds, config, device, mean, std, d)
    ips = step * config.batch_size * d.world / train_time if train_time else 0.0  # over all sessions of the run
    wall = time.perf_counter() - t_start
    if finished and d.main:
        save_checkpoint(final, raw.state_dict(), checkpoint_meta(config, config.registers, data_config, total))
    result = TrainResult(
        run_dir=run_dir, registers=config.registers, final_checkpoint=final, checkpoints=list(snapshots),
        steps=step, val_acc=val_acc, val_loss=val_loss, wall_s=wall, train_s=train_time, img_per_s=ips,
        model=raw if return_model else None,
    )
    if finished and d.main:
        prev = run_dir / "result.json"
        if resume and prev.exists():  # a resumed run's wall time includes the earlier sessions
            try:
                result.wall_s += float(json.loads(prev.read_text()).get("wall_s_partial", 0.0))
            except (ValueError, OSError):
                pass
        write_json(run_dir / "result.json", result.to_dict())
    elif d.main:
        write_json(run_dir / "result.json", {"finished": False, "steps": step, "wall_s_partial": wall})
    barrier(d)
    if stopped_at is not None:
        raise RunInterrupted(f"{stop.name}: stopped {run_dir} after step {stopped_at} of {total} and saved its resume "
                             f"state; continue with: artifactscan train-reg --resume {run_dir}")
    return result
