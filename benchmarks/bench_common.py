"""What the model-pass benchmarks share: their command-line options, the model they time, and the timing loop.

Imported by the scripts beside it (``python benchmarks/bench_X.py`` puts this folder on ``sys.path``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so a wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def model_pass_parser(doc: str, images: int, batch_size: int) -> argparse.ArgumentParser:
    """--arch, --model, --img-size, --images, --batch-size, --repeats, --device, --json (a benchmark adds its own)."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--arch", default="vit_small_patch16_224")
    ap.add_argument("--model", default=None, help="load this instead of a random-init --arch")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--images", type=int, default=images)
    ap.add_argument("--batch-size", type=int, default=batch_size)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", action="store_true")
    return ap


def bench_model(args: argparse.Namespace) -> tuple[Any, torch.device]:
    """``--model`` loaded, or a random-init timm ``--arch`` at ``--img-size`` (seed 0), on ``--device``."""
    import timm

    from artifactscan.core.devices import resolve_device
    from artifactscan.models.loading import load_model, wrap_module

    dev = resolve_device(args.device)
    if args.model:
        loaded = load_model(args.model)
    else:
        torch.manual_seed(0)
        loaded = wrap_module(timm.create_model(args.arch, pretrained=False, img_size=args.img_size).eval())
    loaded.model.to(dev)
    return loaded, dev


def median_seconds(runs: dict[str, Callable[[], None]], repeats: int, rotate: bool = False) -> dict[str, float]:
    """One warm-up call of each run, then ``repeats`` rounds calling each once (interleaved; with ``rotate`` the
    order shifts by one each round, so no run always goes first); the median wall-clock seconds of each."""
    for fn in runs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for rep in range(repeats):
        shift = rep % len(names) if rotate else 0
        for name in names[shift:] + names[:shift]:
            t = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}



def print_result(result: dict[str, Any], as_json: bool, header: str, footer: str, base: str, label_width: int,
                 digits: int, base_word: str) -> None:
    """``result`` as JSON (``--json``), or for humans: ``header``, one line a run of ``result["seconds"]`` (its
    median and, for every run but ``base``, its ratio over ``base``), ``footer``."""
    if as_json:
        print(json.dumps(result, indent=2))
        return
    med = result["seconds"]
    print(header)
    for name, v in med.items():
        ratio = "" if name == base else f"   {v / med[base]:.{digits}f}x {base_word}"
        print(f"  {name:<{label_width}} {v:8.3f} s{ratio}")
    print(footer)
