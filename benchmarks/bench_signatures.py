"""Cost of `artifactscan signatures` over a `norms` scan of the same images (issue 24: target <= 3x).

A random-init ViT-S/16 at 224 px (timm's init, seed 0) is written once to a safetensors file; both commands load it
from there. Whole processes, interleaved (the order rotated each repeat), median wall and CPU seconds:

* norms: ``scan()`` of ``synthetic-objects:N`` (the `norms` command cannot name that set, so the child calls the
  library the command calls, and prints the result as JSON as ``norms --json`` does);
* signatures: ``artifactscan signatures CKPT synthetic-objects:N --json`` with its defaults (null seeds, and the
  shift views on their default subset where this version has them): whatever the command does.

``--profile`` also runs `signatures` once in this process with a timer around each of its stages (the scan, the
data pass, each null model's pass, the shift views where present), to say where the time goes.

    python benchmarks/bench_signatures.py [--images 256] [--repeats 3] [--device cpu] [--profile [--keep FILE]]
        [--profile-only] [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARCH = "vit_small_patch16_224"
# the scan of the very images signatures renders (synthetic-objects:N, in memory), printed as `norms --json` prints
NORMS_CHILD = """
import json, sys
from artifactscan import scan
from artifactscan.inputs.boxes import load_box_data
ckpt, data, arch, device = sys.argv[1:5]
images = load_box_data(data, img_size=224).scan_images()
print(json.dumps(scan(ckpt, images, arch=arch, device=device, num_workers=0).to_dict()))
"""
#: Where signatures' time is read, by stage: module-level functions of analysis.signatures, timed where present.
STAGES = ("scan", "_data_pass", "_flagged_pass", "_null_hits", "shift_consistency", "_shift_pass", "_views_pass")


def write_checkpoint(folder: Path) -> Path:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False)
    path = folder / f"{ARCH}.random-init.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def commands(ckpt: Path, data: str, device: str) -> dict[str, list[str]]:
    return {"norms": [sys.executable, "-c", NORMS_CHILD, str(ckpt), data, ARCH, device],
            "signatures": [sys.executable, "-m", "artifactscan", "signatures", str(ckpt), data, "--arch", ARCH,
                           "--device", device, "--workers", "0", "--json"]}


def whole_processes(cmds: dict[str, list[str]], repeats: int
                    ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall seconds and CPU seconds (user + system of the child) of each command, ``repeats`` rounds interleaved.
    The CPU time is the steadier of the two on a shared machine: other processes lengthen the wall time of
    whichever command they happen to overlap."""
    times: dict[str, list[float]] = {k: [] for k in cmds}
    cpu: dict[str, list[float]] = {k: [] for k in cmds}
    names = list(cmds)
    for rep in range(repeats):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t = time.perf_counter()
            subprocess.run(cmds[name], check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
            times[name].append(time.perf_counter() - t)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu[name].append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return times, cpu


def profile(ckpt: Path, data: str, device: str, keep: Path | None = None) -> dict[str, Any]:
    """One in-process `signatures` run with each stage's wall time (calls of the same stage summed, and counted);
    ``keep``: write its result there (signatures.json's content), so the timed run is a measurement too."""
    import artifactscan.analysis.signatures as sig

    spent: dict[str, list[float]] = {}

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent.setdefault(name, []).append(time.perf_counter() - t)
        return wrapper

    saved = {name: getattr(sig, name) for name in STAGES if hasattr(sig, name)}
    for name, fn in saved.items():
        setattr(sig, name, timed(name, fn))
    try:
        t = time.perf_counter()
        report = sig.signatures(str(ckpt), data, arch=ARCH, device=device, num_workers=0)
        total = time.perf_counter() - t
    finally:
        for name, fn in saved.items():
            setattr(sig, name, fn)
    if keep is not None:
        keep.write_text(json.dumps(report.to_dict(), indent=1))
    stages = {name: {"seconds": sum(v), "calls": len(v)} for name, v in spent.items()}
    rest = total - sum(s["seconds"] for s in stages.values())
    return {"total_s": total, "stages": stages, "other_s": rest}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--profile-only", action="store_true", help="the in-process profile alone, no whole processes")
    ap.add_argument("--keep", type=Path, default=None, help="with --profile: write the profiled run's result here")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    data = f"synthetic-objects:{args.images}"
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(Path(tmp))
        if args.profile_only:
            prof = profile(ckpt, data, args.device, args.keep)
            print(json.dumps(prof, indent=2))
            return prof
        times, cpu = whole_processes(commands(ckpt, data, args.device), args.repeats)
        prof = profile(ckpt, data, args.device, args.keep) if args.profile else None
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    result = {"model": f"{ARCH} (random init, seed 0)", "data": data, "device": args.device,
              "torch_threads": torch.get_num_threads(), "repeats": args.repeats, "all_s": times, "median_s": med,
              "ratio": med["signatures"] / med["norms"], "median_cpu_s": med_cpu,
              "cpu_ratio": med_cpu["signatures"] / med_cpu["norms"], "target": 3.0, "profile": prof}
    if args.json:
        print(json.dumps(result, indent=2))
        return result
    print(f"{result['model']}, {data}, {args.device}, {result['torch_threads']} threads, whole processes, "
          f"median of {args.repeats}")
    for k, v in med.items():
        print(f"  {k:<11} {v:8.1f} s wall {med_cpu[k]:8.1f} s CPU")
    print(f"  signatures / norms: {result['ratio']:.2f}x wall, {result['cpu_ratio']:.2f}x CPU (target <= "
          f"{result['target']:g}x)")
    if prof:
        print(f"profile (one in-process run, {prof['total_s']:.1f} s):")
        for name, s in prof["stages"].items():
            print(f"  {name:<18} {s['seconds']:8.1f} s  ({s['calls']} call(s))")
        print(f"  {'other':<18} {prof['other_s']:8.1f} s")
    return result


if __name__ == "__main__":
    main()
