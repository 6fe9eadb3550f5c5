"""What does the artifact monitor cost inside a training loop?

Why: ArtifactMonitor runs inside someone's training (docs/monitor.md), so an update must cost about what measuring the
probe set costs at all, and at a demanding cadence it must not slow the training down noticeably. Two measurements,
each interleaved in one process (median of repeats, the order alternating), so that machine noise hits both sides:

1. one update (``monitor.step`` at a measured step: the guarded forward through the capture layer, the streamed
   statistics, the threshold rule, the line appended to monitor.jsonl) against a bare ``torch.no_grad()`` forward
   of the same probe set through the same model in eval mode;
2. windows of ``--every`` training steps of the demo training configuration (train-reg's demo ViT, batch 64, AdamW,
   gradient clipping) with the monitor called at every step (it measures once a window) against the same windows
   without it.

    python benchmarks/bench_monitor.py                          # demo model, 64 probe images, every=20, 1 thread
    python benchmarks/bench_monitor.py --repeats 10 --windows 6 --threads 2 --json

Targets: update / bare forward <= 1.2x; training wall time with the monitor <= 1.05x without (every=20, 64 images):
the time of the monitor's calls over the time of the training steps timed around them in the same windows (a shared
machine's load moves whole-window times by more than that; the end-to-end window ratio is printed beside it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from artifactscan.analysis.training import build_model, get_preset  # noqa: E402
from artifactscan.core.devices import resolve_device  # noqa: E402
from artifactscan.inputs.synthetic import SyntheticShapes  # noqa: E402
from artifactscan.monitor import ArtifactMonitor  # noqa: E402

UPDATE_TARGET, TRAINING_TARGET = 1.2, 1.05


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def _interleaved(runs: dict, repeats: int, device: torch.device) -> dict[str, float]:
    """One warm-up call each, then ``repeats`` rounds, the order reversed every other round; median seconds."""
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(repeats):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            times[name].append(_timed(runs[name], device))
    return {name: statistics.median(v) for name, v in times.items()}


def bench_update(model, probe: torch.Tensor, data_config: dict, out: Path, repeats: int,
                 device: torch.device) -> dict:
    """One update against a bare no-grad forward of the same (normalised) probe images."""
    monitor = ArtifactMonitor(probe, every=1, out=out, data_config=data_config)
    mean = torch.tensor(data_config["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(data_config["std"], device=device).view(1, 3, 1, 1)
    x = ((probe.to(device) - mean) / std)
    steps = iter(range(10**9))

    def bare() -> None:
        model.eval()
        with torch.no_grad():
            model(x)
        model.train()

    def update() -> None:
        monitor.step(model, next(steps))

    seconds = _interleaved({"bare forward": bare, "monitor update": update}, repeats, device)
    return {"seconds": seconds, "ratio": seconds["monitor update"] / seconds["bare forward"],
            "target": UPDATE_TARGET}


def bench_training(model, probe: torch.Tensor, data_config: dict, out: Path, every: int, windows: int,
                   device: torch.device) -> dict:
    """Windows of ``every`` demo training steps with the monitor (one update a window) and without."""
    batch = 64
    ds = SyntheticShapes(batch, seed=1, img_size=data_config["input_size"][-1])
    x, y, _ = ds.batch(range(batch))
    x, y = ((x - 0.5) / 0.5).to(device), y.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    monitor = ArtifactMonitor(probe, every=every, out=out, data_config=data_config)
    step_counter = iter(range(10**9))

    def train_step() -> None:
        loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opt.step()

    def plain() -> None:
        for _ in range(every):
            train_step()

    shares: list[float] = []

    def monitored() -> None:  # the steps are numbered on: the window's first step is a multiple of every
        in_steps = in_monitor = 0.0
        for _ in range(every):
            in_steps += _timed(train_step, device)
            in_monitor += _timed(lambda: monitor.step(model, next(step_counter)), device)
        shares.append(in_monitor / in_steps)

    model.train()
    seconds = _interleaved({"training": plain, "training + monitor": monitored}, windows, device)
    # Two readings of the added wall time: whole windows with and without (end to end, but a busy machine moves it
    # by more than the monitor costs), and the monitor's own calls against the training steps around them inside
    # the same windows (what it adds, timed a step apart, so a change of load hits both)
    return {"seconds": seconds, "every": every, "updates": len(monitor.records),
            "window_ratio": seconds["training + monitor"] / seconds["training"],
            "ratio": 1 + statistics.median(shares[1:] or shares), "target": TRAINING_TARGET}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64, help="probe images")
    p.add_argument("--every", type=int, default=20)
    p.add_argument("--repeats", type=int, default=20, help="rounds of the update benchmark")
    p.add_argument("--windows", type=int, default=8, help="rounds of the training benchmark (each 2 x every steps)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (the demo trains with 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cfg = get_preset("demo")
    model = build_model(cfg, 0).to(device)
    data_config = dict(input_size=(3, cfg.img_size, cfg.img_size), mean=(0.5,) * 3, std=(0.5,) * 3,
                       interpolation="bilinear", crop_pct=1.0)
    probe, _, _ = SyntheticShapes(args.images, seed=0, img_size=cfg.img_size).batch(range(args.images))
    with tempfile.TemporaryDirectory() as tmp:
        update = bench_update(model, probe, data_config, Path(tmp) / "update", args.repeats, device)
        training = bench_training(model, probe, data_config, Path(tmp) / "training", args.every, args.windows,
                                  device)
    result = {"device": str(device), "threads": args.threads, "images": args.images, "update": update,
              "training": training}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"monitor cost on {device} ({args.threads} thread(s)), demo ViT, {args.images} probe images")
    for name, part in (("one update", update), (f"training, every={args.every}", training)):
        times = ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in part["seconds"].items())
        verdict = "meets" if part["ratio"] <= part["target"] else "MISSES"
        print(f"  {name:<20} {part['ratio']:.3f}x ({verdict} <= {part['target']}x)   {times}")
    print(f"  (training windows end to end: {training['window_ratio']:.3f}x; the line above is the monitor's calls "
          "over the training steps timed around them)")


if __name__ == "__main__":
    main()
