"""``train_reg``: the same model trained with 0, 4, ... registers, side by side in child processes or one after the
other, resumable as a whole."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from artifactscan.models.checkpoint import read_meta
from artifactscan.core.errors import ArtifactScanError, RunInterrupted, TrainingError, option, uses_cli_spelling
from artifactscan.core.files import signals_deferred
from artifactscan.analysis.training.config import (
    RUNTIME_FIELDS,
    TrainConfig,
    check_training_fits,
    get_preset,
    parse_registers,
    resolve_config,
    validate_config,
)
from artifactscan.analysis.training.model import build_model
from artifactscan.analysis.training.data import build_datasets
from artifactscan.analysis.training.distributed import resolve_train_device
from artifactscan.analysis.training.checkpointing import (
    config_conflicts,
    refuse_conflicts,
    remove_stale_temporaries,
    write_json,
)
from artifactscan.analysis.training.loop import TrainResult, evaluate, train_model, training_progress_bars
from artifactscan.analysis.run_files import OLD_NAMES, VARIANTS_FILE


Job = tuple[int, Path, bool]  # a variant to train: (registers, run folder, resume from its last.pt)


@dataclass
class RegVariant:
    """One model of a ``train_reg`` comparison."""

    registers: int
    checkpoint: Path  # final weights (self-describing .safetensors, or the given baseline checkpoint)
    run_dir: Path | None  # None for a baseline given with --baseline
    val_acc: float
    trained: bool  # False when the baseline came from --baseline
    steps: int | None = None
    wall_s: float | None = None
    img_per_s: float | None = None
    checkpoints: list[Path] = field(default_factory=list)  # intermediate snapshots

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["checkpoint"] = str(self.checkpoint)
        d["run_dir"] = str(self.run_dir) if self.run_dir else None
        d["checkpoints"] = [str(p) for p in self.checkpoints]
        return d


@dataclass
class TrainRegResult:
    """The hook for the verdict step: scan ``variant.checkpoint`` of every variant with the norms core.

    ``variants`` is sorted by register count; ``baseline`` is the 0-register model.
    """

    run_dir: Path
    config: TrainConfig
    variants: list[RegVariant]
    variants_path: Path  # variants.json: what was trained; the comparison of the variants is the verdict's file

    @property
    def comparison_path(self) -> Path:
        """The same content under its 0.2 name, comparison.json (still written for one version)."""
        return self.variants_path.with_name(OLD_NAMES[VARIANTS_FILE])

    @property
    def baseline(self) -> RegVariant:
        return self.variant(0)

    def variant(self, registers: int) -> RegVariant:
        for v in self.variants:
            if v.registers == registers:
                return v
        raise KeyError(f"no variant with {registers} registers")

    def checkpoints(self) -> dict[int, Path]:
        return {v.registers: v.checkpoint for v in self.variants}

    def to_dict(self) -> dict[str, Any]:
        base = next((v for v in self.variants if v.registers == 0), None)
        ratios = {}
        if base is not None and base.img_per_s:
            ratios = {str(v.registers): base.img_per_s / v.img_per_s for v in self.variants if v.img_per_s}
        return {
            "run_dir": str(self.run_dir),
            "config": self.config.to_dict(),
            "variants": [v.to_dict() for v in self.variants],
            "step_time_ratio_vs_reg0": ratios,
        }


def evaluate_checkpoint(path: str | Path, config: TrainConfig, device: str = "cpu") -> tuple[float, float]:
    """Held-out ``(loss, accuracy)`` of a self-describing checkpoint on ``config``'s validation data."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_meta(path)
    if meta is None:
        raise TrainingError(f"{path} is not a self-describing artifactscan checkpoint; train it with train-reg")
    dev = resolve_train_device(device)
    cfg = config.replace(registers=int(meta.arch_kwargs.get("reg_tokens", 0)))
    _, val_ds, _, data_config, _ = build_datasets(cfg)
    model = build_model(cfg).to(dev)
    if path.suffix == ".safetensors":
        sd = load_file(str(path))
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    mean = torch.tensor(data_config["mean"], device=dev).view(1, 3, 1, 1)
    std = torch.tensor(data_config["std"], device=dev).view(1, 3, 1, 1)
    return evaluate(model, val_ds, cfg, dev, mean, std)


def check_baseline(path: Path, config: TrainConfig) -> None:
    if not path.is_file():
        raise TrainingError(f"baseline checkpoint {path} does not exist; pass the final.safetensors of a 0-register run")
    meta = read_meta(path)
    if meta is None:
        raise TrainingError(f"{path} is not a self-describing artifactscan checkpoint; use one written by train-reg")
    want = config.model_kwargs(0)
    got = dict(meta.arch_kwargs)
    diffs = [k for k in want if got.get(k) != want[k]]
    if meta.arch != config.arch or diffs:
        shown = ", ".join(f"{k}={got.get(k)!r} (want {want[k]!r})" for k in diffs[:3]) or f"arch {meta.arch}"
        raise TrainingError(f"baseline {path} does not match the requested model: {shown}; use matching options")


def worker_main(config_path: str, run_dir: str, resume: bool) -> int:
    """Entry point of a side-by-side child process: train one variant, stream JSON events on stdout."""
    config = TrainConfig.from_dict(json.loads(Path(config_path).read_text()))

    def emit(ev: dict) -> None:
        sys.stdout.write(json.dumps(ev) + "\n")
        sys.stdout.flush()

    try:
        res = train_model(config, run_dir, resume=resume, progress=False, on_event=emit)
    except RunInterrupted as exc:
        emit({"type": "interrupted", "message": str(exc)})
        return 130
    except ArtifactScanError as exc:
        emit({"type": "error", "kind": type(exc).__name__, "message": str(exc)})
        return 2
    except Exception as exc:  # a bug: one line through the parent (which exits 2), not a child's traceback
        emit({"type": "error", "kind": "internal", "message": f"{type(exc).__name__}: {exc}"})
        return 2
    emit({"type": "done", "result": res.to_dict()})
    return 0


def variant_from_result(reg: int, r: dict) -> RegVariant:
    return RegVariant(
        registers=reg, checkpoint=Path(r["final_checkpoint"]), run_dir=Path(r["run_dir"]), val_acc=r["val_acc"],
        trained=True, steps=r["steps"], wall_s=r["wall_s"], img_per_s=r["img_per_s"],
        checkpoints=[Path(p) for p in r["checkpoints"]],
    )


def train_reg(
    config: TrainConfig,
    out_dir: str | Path,
    registers: str | int | Sequence[int] = 4,
    *,
    baseline_checkpoint: str | Path | None = None,
    parallel: bool | None = None,
    resume: bool = False,
    progress: bool = True,
) -> TrainRegResult:
    """Train the controlled comparison: the same ViT with 0 and with N register tokens (or an ablation list).

    ``registers=4`` trains ``[0, 4]``; ``"0,1,2,4,8"`` trains all five. With ``baseline_checkpoint`` (a
    0-register ``final.safetensors`` of the same architecture) the 0-register model is not retrained. Every variant
    uses the same seed, initial shared weights and batch order. Layout::

        out_dir/config.json, out_dir/train_reg.json, out_dir/reg{N}/..., out_dir/variants.json

    (``variants.json`` is also written as ``comparison.json``, its name before 0.3, for one version.)

    Args:
        parallel: run variants as side-by-side single-threaded processes. ``None`` = yes on CPU with ≥ 2 cores
            outside torchrun; ignored on CUDA (variants share the GPU sequentially).
        resume: continue the variants of an interrupted ``train_reg`` folder (finished ones are reused).
    Returns:
        :class:`TrainRegResult` listing each variant's final checkpoint — scan them for the verdict.
    Raises:
        RunInterrupted (SIGINT / SIGTERM) naming the steps saved and the command that continues the run, or saying
        that nothing was saved yet.
    """
    out = Path(out_dir)
    try:
        return _train_variants(config, out, registers, baseline_checkpoint=baseline_checkpoint, parallel=parallel,
                               resume=resume, progress=progress)
    except KeyboardInterrupt:  # before a training loop took the signal over: start-up, reading data, building
        raise RunInterrupted(interrupted_message(out)) from None


def _train_variants(config: TrainConfig, out: Path, registers: str | int | Sequence[int], *,
                    baseline_checkpoint: str | Path | None, parallel: bool | None, resume: bool,
                    progress: bool) -> TrainRegResult:
    """:func:`train_reg` itself."""
    config = resolve_config(config)
    regs = parse_registers(registers)
    if baseline_checkpoint is None and 0 not in regs:
        regs = [0] + regs
    if baseline_checkpoint is not None:
        baseline_checkpoint = Path(baseline_checkpoint)
        check_baseline(baseline_checkpoint, config)
        regs = [r for r in regs if r != 0]
        if not regs:
            raise TrainingError(f"with {option('baseline_checkpoint')} only register models are trained; pass e.g. "
                                f"{option('registers', 4)}")
    validate_config(config)
    device = resolve_train_device(config.device)  # fail before creating any folder
    check_training_fits(config, device)
    if config.data is not None:
        build_datasets(config)  # a bad data folder fails here, before any worker process starts
    world = int(os.environ.get("WORLD_SIZE", "1"))
    main = int(os.environ.get("RANK", "0")) == 0
    if main:
        remove_stale_temporaries(out)
    if not resume and main and (out / "train_reg.json").exists() and has_checkpoint(out):
        raise TrainingError(f"{out} already holds a train-reg run; pass {option('resume', True, shell_value=out)} or "
                            "choose a new folder")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", config.to_dict())
        write_json(out / "train_reg.json", {
            "registers": regs, "baseline_checkpoint": str(baseline_checkpoint) if baseline_checkpoint else None,
        })

    jobs, done = _variants_to_train(out, regs, resume)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if parallel is None:
        parallel = device.type == "cpu" and world == 1 and cores >= 2 and len(jobs) > 1
    if parallel and (device.type != "cpu" or world > 1):
        parallel = False

    if jobs and parallel:
        done.update(run_parallel(config, jobs, cores, progress))  # an interruption there names the run folder
    else:
        done.update(_train_one_after_another(config, jobs, out, progress))

    if baseline_checkpoint is not None:
        _, acc = evaluate_checkpoint(baseline_checkpoint, config, device=str(device)) if main else (0.0, float("nan"))
        done[0] = RegVariant(registers=0, checkpoint=baseline_checkpoint, run_dir=None, val_acc=acc, trained=False)
    result = TrainRegResult(run_dir=out, config=config, variants=[done[r] for r in sorted(done)],
                            variants_path=out / VARIANTS_FILE)
    if main:
        write_json(result.variants_path, result.to_dict())
        write_json(result.comparison_path, result.to_dict())  # the 0.2 name, for readers not yet updated
    return result


def _variants_to_train(out: Path, regs: list[int], resume: bool) -> tuple[list[Job], dict[int, RegVariant]]:
    """The variants still to train, and those a resumed run already finished (reused as they are)."""
    jobs: list[Job] = []
    done: dict[int, RegVariant] = {}
    for reg in regs:
        vdir = out / f"reg{reg}"
        if resume and (vdir / "final.safetensors").is_file() and (vdir / "result.json").is_file():
            r = json.loads((vdir / "result.json").read_text())
            if "final_checkpoint" in r:
                done[reg] = variant_from_result(reg, r)
                continue
        jobs.append((reg, vdir, resume and (vdir / "last.pt").is_file()))
    return jobs, done


def _train_one_after_another(config: TrainConfig, jobs: list[Job], out: Path,
                             progress: bool) -> dict[int, RegVariant]:
    """The variants trained in this process in turn (on a GPU, under torchrun, or when asked)."""
    done: dict[int, RegVariant] = {}
    for reg, vdir, res in jobs:
        try:
            r = train_model(config.replace(registers=reg), vdir, resume=res, progress=progress, label=f"reg{reg}")
        except RunInterrupted as exc:  # the run is continued as a whole, not this variant's folder alone
            signal_name = str(exc).split(": stopped ", 1)[0]
            raise RunInterrupted(f"{signal_name}: stopped {stopped_part(str(exc))} and saved its resume state; "
                                 f"continue with: artifactscan train-reg --resume {out}") from None
        done[reg] = variant_from_result(reg, r.to_dict())
    return done


def stopped_part(message: str) -> str:
    """``SIGINT: stopped runs/a/reg0 after step 5 of 400 and saved ...`` -> ``runs/a/reg0 after step 5 of 400``."""
    return message.split(": stopped ", 1)[-1].split(" and saved")[0]


def interrupted_message(run_dir: Path) -> str:
    """Where a run stopped outside the variants' training loops (start-up, reading the data, building, the last
    bookkeeping) stands, read from its folder, and the command that goes on from there."""
    finished, saved = [], []
    for d in sorted(run_dir.glob("reg*"), key=lambda d: (len(d.name), d.name)):
        if (d / "final.safetensors").is_file():
            finished.append(d.name)
        elif (d / "last.pt").is_file():
            saved.append(d.name)
    if not finished and not saved:
        return (f"stopped {run_dir} before its first training step was saved: there is nothing to resume; run the "
                "same command again to start over (a run folder with no checkpoint restarts)")
    parts = ([f"{', '.join(finished)} finished"] if finished else []) + (
        [f"{', '.join(saved)} saved a resume state earlier"] if saved else [])
    return f"stopped {run_dir} ({'; '.join(parts)}); continue with: artifactscan train-reg --resume {run_dir}"


def has_checkpoint(run_dir: Path) -> bool:
    """Whether any variant of a train-reg folder saved something to resume or keep (else it simply restarts)."""
    return any((d / "last.pt").is_file() or (d / "final.safetensors").is_file() for d in run_dir.glob("reg*"))


def _stop_children(running: dict, timeout: float = 600.0) -> None:
    """SIGTERM every child and wait for each to save its resume state and exit (never leave one mid-save)."""
    import subprocess

    for _, p in running.values():
        if p.poll() is None:
            p.terminate()
    for _, p in running.values():
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@contextlib.contextmanager
def sigint_held() -> Iterator[None]:
    """A Ctrl-C (or SIGTERM) meanwhile is acted on at the end, as it would have been: for starting a child and
    registering it, so that a stop never leaves a child nobody stops (it would train on, its output gone).

    The child started inside inherits SIGINT blocked across ``exec`` and keeps it while it imports torch (where a
    Ctrl-C would end in a traceback and no saved step), until :func:`release_inherited_sigint`; the parent alone
    takes that Ctrl-C and stops the children with SIGTERM. Blocking, unlike ignoring SIGINT for the moment of the
    fork, loses no signal: an ignored one is discarded, and the run would train on to the end. The block covers this
    thread only; a signal that another thread takes waits in :func:`signals_deferred`."""
    import signal

    with signals_deferred():
        if not hasattr(signal, "pthread_sigmask"):  # Windows: no process groups to signal either
            yield
            return
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # a pending Ctrl-C reaches signals_deferred here


def release_inherited_sigint() -> None:
    """In a side-by-side child, once imported: drop a Ctrl-C that arrived while SIGINT was held (the parent stops
    the children) and ignore SIGINT until the training loop takes it (loop.StopSignal) to save the step."""
    import signal

    if hasattr(signal, "pthread_sigmask"):
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # discards a pending one
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def run_parallel(config: TrainConfig, jobs: list[Job], cores: int, progress: bool) -> dict[int, RegVariant]:
    """Run the variants as side-by-side child processes (``python -m artifactscan.analysis.training --_worker``).

    Children are plain subprocesses (not multiprocessing) so this works from any entry point (scripts, stdin,
    notebooks); each streams JSON events on stdout, which feed one progress bar per variant here.
    """
    run = _SideBySide(config, jobs, cores, progress)
    try:
        run.start_waiting()
        while run.running:
            run.handle(run.events.get())
    except KeyboardInterrupt:  # the parent was stopped (SIGINT, or SIGTERM through the CLI): children save first
        if not run.collect_stops():
            raise
    finally:
        run.close()
    run.outcome.raise_unless_complete(Path(jobs[0][1]).parent)
    return run.outcome.results


@dataclass
class _SideBySideOutcome:
    """What the children of a side-by-side run reported."""

    results: dict[int, RegVariant] = field(default_factory=dict)  # by register count, for each finished variant
    errors: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)  # the "interrupted" message of each child a signal stopped
    internal: bool = False  # a child failed on a bug, not on the user's input

    def raise_unless_complete(self, run: Path) -> None:
        """A stop is :class:`RunInterrupted` naming what each child saved; an error is the first child's error."""
        if self.stopped:
            steps = "; ".join(stopped_part(m) for m in self.stopped)
            raise RunInterrupted(f"stopped the side-by-side training ({steps}); each saved its resume state; "
                                 f"continue with: artifactscan train-reg --resume {run}")
        if self.errors:
            if self.internal:
                raise RuntimeError(f"a training worker failed: {self.errors[0]}")
            raise TrainingError(self.errors[0])


class _SideBySide:
    """The child processes of one side-by-side run: at most one per core, each read by a thread that puts its
    events on one queue, and (with ``progress``) one progress bar per variant."""

    def __init__(self, config: TrainConfig, jobs: list[Job], cores: int, progress: bool) -> None:
        import queue

        self.config = config
        self.waiting = list(jobs)  # the variants not started yet
        self.n_proc = min(len(jobs), cores)
        self.threads = config.num_threads or max(1, cores // self.n_proc)
        self.events: queue.Queue = queue.Queue()
        self.running: dict[str, tuple[int, Any]] = {}  # label -> (registers, subprocess.Popen)
        self.pumps: list[Any] = []  # the threads reading the children's stdout
        self.outcome = _SideBySideOutcome()
        self.bars = training_progress_bars() if progress else None
        self.tasks: dict[str, Any] = {}  # label -> its progress bar
        if self.bars is not None:
            self.bars.start()

    def start_waiting(self) -> None:
        while self.waiting and len(self.running) < self.n_proc:
            self.launch(*self.waiting.pop(0))

    def launch(self, reg: int, vdir: Path, res: bool) -> None:
        import subprocess
        import threading

        label = f"reg{reg}"
        vdir.mkdir(parents=True, exist_ok=True)
        cfg_path = vdir / "worker-config.json"
        write_json(cfg_path, self.config.replace(registers=reg, num_threads=self.threads).to_dict())
        cmd = [sys.executable, "-m", "artifactscan.analysis.training", "--_worker", str(cfg_path), "--out", str(vdir)]
        if res:
            cmd.append("--_resume")
        if uses_cli_spelling():  # the child's messages name the options as the parent's caller spelled them
            cmd.append("--_cli-spelling")
        pkg_parent = str(Path(__file__).resolve().parent.parent)  # so the child imports this same artifactscan
        pypath = os.pathsep.join(p for p in (pkg_parent, os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "WORLD_SIZE": "1", "RANK": "0",
               "PYTHONPATH": pypath}
        with sigint_held():  # a Ctrl-C now is acted on once the child is known and read, so that it is stopped too
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
            self.running[label] = (reg, proc)
            self.pumps.append(threading.Thread(target=self._pump, args=(label, proc), daemon=True))
            self.pumps[-1].start()
        if self.bars is not None:
            self.tasks[label] = self.bars.add_task(label, total=self.config.steps or None, loss="-", acc="-", ips="-")

    def _pump(self, label: str, proc) -> None:
        for line in proc.stdout:
            try:
                self.events.put({"label": label, **json.loads(line)})
            except ValueError:
                pass
        self.events.put({"label": label, "type": "exit", "rc": proc.wait()})

    def handle(self, ev: dict) -> None:
        """One event of a child: progress, its result, an error, a stop, or its exit."""
        label, kind, outcome = ev["label"], ev["type"], self.outcome
        if kind in ("step", "eval"):
            self._show(label, ev)
        elif kind == "done":
            reg = self.running[label][0]
            outcome.results[reg] = variant_from_result(reg, ev["result"])
        elif kind == "error":
            outcome.errors.append(ev["message"])
            outcome.internal = outcome.internal or ev.get("kind") == "internal"
        elif kind == "interrupted":
            outcome.stopped.append(ev["message"])
        elif kind == "exit":
            self._on_exit(label, ev["rc"])

    def _show(self, label: str, ev: dict) -> None:
        if self.bars is None:
            return
        if ev["type"] == "step":
            self.bars.update(self.tasks[label], completed=ev["step"], loss=f"{ev['loss']:.3f}",
                             ips=f"{ev['img_per_s']:.0f}")
        else:
            self.bars.update(self.tasks[label], acc=f"{ev['val_acc']:.3f}")
            self.bars.console.print(f"{label} step {ev['step']}: loss {ev['loss']:.3f}  val acc {ev['val_acc']:.3f}"
                                    f"  {ev['img_per_s']:.0f} img/s")

    def _on_exit(self, label: str, rc: int) -> None:
        """A child ended: start the next variant, or stop the others when the comparison cannot complete."""
        reg, _ = self.running.pop(label)
        outcome = self.outcome
        if outcome.stopped:  # a child was signalled (Ctrl-C reaches the whole process group): stop them all
            self.waiting.clear()
            _stop_children(self.running)
            return
        if reg not in outcome.results and not outcome.errors:
            outcome.errors.append(f"training the {reg}-register model crashed (exit code {rc}); "
                                  f"see the messages above, then {option('resume')} the run folder")
        if outcome.errors:  # stop the others: the comparison is incomplete anyway
            for _, p in self.running.values():
                p.terminate()
        elif self.waiting:
            self.launch(*self.waiting.pop(0))

    def collect_stops(self) -> bool:
        """After the parent was interrupted: stop the children, let each save, and gather their "interrupted"
        events. Whether any child stopped with a saved step."""
        _stop_children(self.running)
        for t in self.pumps:
            t.join(timeout=60)  # their last lines carry each child's "interrupted" event
        while not self.events.empty():
            ev = self.events.get()
            if ev["type"] == "interrupted":
                self.outcome.stopped.append(ev["message"])
        return bool(self.outcome.stopped)

    def close(self) -> None:
        _stop_children(self.running)
        if self.bars is not None:
            self.bars.stop()


def resume(
    run_dir: str | Path,
    expected: TrainConfig | dict | None = None,
    *,
    registers: str | int | Sequence[int] | None = None,
    baseline_checkpoint: str | Path | None = None,
    preset: str | None = None,
    progress: bool = True,
    parallel: bool | None = None,
    **runtime: Any,
) -> TrainResult | TrainRegResult:
    """Continue a killed run to the same result an uninterrupted one would have reached.

    ``run_dir`` is either a ``train_reg`` folder (with ``train_reg.json``) or a single-model folder (with
    ``last.pt``). ``expected`` holds options the user passed again (a dict of changed fields, or a full config);
    ``registers``, ``baseline_checkpoint`` and ``preset`` are the other options of ``train-reg`` that define a run:
    if any of them differs from the saved run the resume is refused, naming each option with both values
    (:func:`resume_conflicts`). ``runtime`` may change where it runs (``device``, ``num_threads``, ``num_workers``,
    ``compile``).
    """
    run_dir = Path(run_dir)
    bad = set(runtime) - RUNTIME_FIELDS
    if bad:
        raise TrainingError(f"only {sorted(RUNTIME_FIELDS)} can change on {option('resume')}, not {sorted(bad)}")
    options = dict(expected=expected, registers=registers, baseline_checkpoint=baseline_checkpoint, preset=preset)
    if (run_dir / "train_reg.json").is_file():
        config = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
        spec = json.loads((run_dir / "train_reg.json").read_text())
        refuse_conflicts(resume_conflicts(config, spec, **options), run_dir)
        if not has_checkpoint(run_dir):
            raise TrainingError(f"cannot resume: {run_dir} has no checkpoint yet; start it again with the same "
                                f"command without {option('resume')} ({option('out_dir', run_dir)}): a folder with no checkpoint restarts")
        regs = spec["registers"]
        return train_reg(config.replace(**runtime), run_dir, regs, baseline_checkpoint=spec["baseline_checkpoint"],
                         parallel=parallel, resume=True, progress=progress)
    if (run_dir / "last.pt").is_file():
        blob = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
        config = TrainConfig.from_dict(json.loads(blob["resume"]["config"]))
        single = {"registers": [config.registers], "baseline_checkpoint": None, "single_model": True}
        refuse_conflicts(resume_conflicts(config, single, **options), run_dir)
        return train_model(config.replace(**runtime), run_dir, resume=True, progress=progress)
    if (run_dir / "config.json").is_file():
        raise TrainingError(f"cannot resume: {run_dir} has no checkpoint yet (last.pt); start a fresh run instead")
    raise TrainingError(f"cannot resume: {run_dir} is not an artifactscan run folder (no config.json/last.pt)")


def _registers_text(regs: Sequence[int]) -> str:
    return ",".join(str(r) for r in sorted(regs))


def resume_conflicts(config: TrainConfig, spec: dict, *, expected: TrainConfig | dict | None = None,
                     registers: str | int | Sequence[int] | None = None,
                     baseline_checkpoint: str | Path | None = None, preset: str | None = None) -> list[str]:
    """Every option passed again to ``train-reg --resume`` that differs from the run being resumed, as
    ``--steps: the run has 400, given 9`` (empty when they all agree). The one place these are compared: the config's
    fields (``expected``), the preset they would come from, the register counts and the baseline checkpoint
    (``spec``: the run's ``train_reg.json``; ``single_model``: a folder of one model, whose count is compared as
    given)."""
    saved = config.to_dict()
    conflicts = config_conflicts(saved, expected)
    if preset is not None:
        given = expected.identity() if isinstance(expected, TrainConfig) else dict(expected or {})
        from_preset = {k: v for k, v in get_preset(preset, **given).identity().items() if k not in given}
        conflicts += [f"{option('preset', preset)}: {c}" for c in config_conflicts(saved, from_preset)]
    saved_base = spec.get("baseline_checkpoint")
    if baseline_checkpoint is not None:
        same = saved_base is not None and Path(saved_base).resolve() == Path(baseline_checkpoint).resolve()
        if not same:
            conflicts.append(f"{option('baseline_checkpoint')}: the run has "
                             f"{saved_base or 'none (it trains its own 0-register model)'}, "
                             f"given {baseline_checkpoint}")
    if registers is not None:
        regs = parse_registers(registers)
        if not spec.get("single_model"):  # train_reg adds the 0-register baseline unless --baseline gives it
            regs = [r for r in regs if r != 0] if saved_base is not None else sorted(set(regs) | {0})
        if sorted(regs) != sorted(spec["registers"]):
            given_text = _registers_text(parse_registers(registers))
            trains = f" (it would train {_registers_text(regs)})" if _registers_text(regs) != given_text else ""
            conflicts.append(f"{option('registers')}: the run has {_registers_text(spec['registers'])}, given "
                             f"{given_text}{trains}")
    return conflicts
