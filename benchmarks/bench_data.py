"""The data path of `artifactscan norms` on real-size photos vs the decode limit, measured side by side in one run.

1. Whole processes, start-up included, no figures: `artifactscan norms phantom FOLDER --json` vs the *decode limit*,
   a plain one-process loop (open, Pillow draft / reduce to >= 2x the model's resize, RGB, resize to the model's input
   with its interpolation, tensor) on the same files. Interleaved, median of --repeats, ratio printed (target <= 1.2x).
   Folders: --images generated 1600x1200 JPEGs (photo-like: sample_images/ upscaled, with sensor noise), and a PNG
   variant of the same pictures (PNG has no reduced decode: the limit decodes in full as well).
   The same on 16 of the files splits the time into a fixed start-up cost and a cost per image.
2. In one process: images/s of a ViT-S/16 at 224 px (random init: same compute as the pretrained one) for decoding
   alone (the limit loop at 224), the bare forward on ready tensors, and `scan()` on the folder.

    nice -n 10 python benchmarks/bench_data.py [--images 400] [--repeats 3] [--device auto|cpu|cuda] [--keep DIR]

With `--device cuda` the norms process runs on the GPU, and a `--gpu-decode` row is added (TorchCodec needed).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The decode limit, run as its own process: only what any loader must do, nothing artifactscan adds.
LIMIT_SCRIPT = r"""
import sys, time
from pathlib import Path
import numpy as np
import torch
from PIL import Image
folder, size, min_side, interp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[interp]
n = 0
for p in sorted(Path(folder).iterdir()):
    with Image.open(p) as im:
        w, h = im.size
        if im.format == "JPEG" and min(w, h) >= 2 * min_side:
            im.draft("RGB", (max(1, w * min_side // min(w, h)), max(1, h * min_side // min(w, h))))
        im = im.convert("RGB")
    f = min(im.size) // min_side
    if f > 1:
        im = im.reduce(f)
    x = torch.from_numpy(np.array(im.resize((size, size), resample))).permute(2, 0, 1).float().div_(255)
    n += 1
print(n)
"""


def make_folder(folder: Path, n: int, fmt: str = "jpeg") -> Path:
    """``n`` photo-like 1600x1200 files made from sample_images/ (:func:`write_photo_folder`)."""
    from artifactscan.inputs.synthetic import write_photo_folder

    photos = sorted(p for p in (ROOT / "sample_images").iterdir() if p.suffix.lower() in (".jpg", ".png"))
    return write_photo_folder(folder, n, photos, fmt=fmt)


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system, all its processes) of one whole process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def whole_process(folder: Path, repeats: int, device: str, extra: list[str] | None = None,
                  variants: dict[str, list[str]] | None = None) -> dict:
    """Interleaved whole-process timings of the limit loop and of `artifactscan norms` variants; medians."""
    from artifactscan import load_model
    from artifactscan.inputs.sources import decode_min_side

    loaded = load_model("phantom")
    size = loaded.input_size[0]
    cfg = loaded.data_config
    env = dict(os.environ)
    limit = [sys.executable, "-c", LIMIT_SCRIPT, str(folder), str(size), str(decode_min_side(cfg)),
             cfg.get("interpolation", "bicubic")]
    norms = [sys.executable, "-m", "artifactscan", "norms", "phantom", str(folder), "--json", "--device", device]
    variants = variants or {"norms": []}
    cmds = {"limit": limit, **{k: norms + v + (extra or []) for k, v in variants.items()}}
    times: dict[str, list[float]] = {k: [] for k in cmds}
    cpu: dict[str, list[float]] = {k: [] for k in cmds}
    for k, c in cmds.items():  # warm the page cache and the .pyc files once
        _timed(c, env)
    for _ in range(repeats):
        for k, c in cmds.items():
            wall, used = _timed(c, env)
            times[k].append(wall)
            cpu[k].append(used)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    return {"median_s": med, "all_s": times, "ratio": {k: med[k] / med["limit"] for k in med if k != "limit"},
            "median_cpu_s": med_cpu, "cpu_ratio": {k: med_cpu[k] / med_cpu["limit"] for k in med if k != "limit"}}


def vit_images_per_second(folder: Path, n: int, device: str, batch_size: int = 32) -> dict:
    """ViT-S/16 at 224 px: decode alone, bare forward on ready tensors, and scan() on the same files (images/s)."""
    import numpy as np
    import timm
    import torch
    from PIL import Image

    from artifactscan import scan
    from artifactscan.core.devices import resolve_device
    from artifactscan.inputs.images import load_rgb
    from artifactscan.inputs.sources import decode_min_side
    from artifactscan.models.loading import wrap_module

    dev = resolve_device(device)
    loaded = wrap_module(timm.create_model("vit_small_patch16_224", pretrained=False), name="vit_small_patch16_224")
    loaded.model.to(dev).eval()
    files = sorted(folder.iterdir())[:n]
    sub = Path(tempfile.mkdtemp(prefix="bench_vit_"))
    for f in files:
        os.symlink(f, sub / f.name)
    min_side = decode_min_side(loaded.data_config)
    t = time.perf_counter()
    for f in files:
        im = load_rgb(f, min_side).resize((224, 224), Image.BICUBIC)
        torch.from_numpy(np.array(im)).permute(2, 0, 1).float().div_(255)
    decode = len(files) / (time.perf_counter() - t)
    x = torch.randn(batch_size, 3, 224, 224, device=dev)
    with torch.inference_mode():
        loaded.model.forward_features(x[:2])
        t = time.perf_counter()
        for _ in range(max(1, len(files) // batch_size)):
            loaded.model.forward_features(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        forward = max(1, len(files) // batch_size) * batch_size / (time.perf_counter() - t)
    scan(loaded, sub, device=str(dev), batch_size=batch_size, num_maps=0)  # warm-up (workers, allocator)
    t = time.perf_counter()
    scan(loaded, sub, device=str(dev), batch_size=batch_size, num_maps=0)
    scanned = len(files) / (time.perf_counter() - t)
    shutil.rmtree(sub)
    return {"images": len(files), "device": str(dev), "decode_img_s": decode, "forward_img_s": forward,
            "scan_img_s": scanned}


def _print(r: dict) -> None:
    for k, v in r["median_s"].items():
        vs = f"   {r['ratio'][k]:.2f}x the limit (CPU time {r['cpu_ratio'][k]:.2f}x)" if k in r["ratio"] else ""
        print(f"{k:>24} {v:7.2f}s wall {r['median_cpu_s'][k]:7.2f}s CPU" + vs, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--vit-images", type=int, default=None, help="images for the ViT-S/16 row (default: 96 on CPU, "
                                                                "all on CUDA)")
    p.add_argument("--keep", type=Path, default=None, help="generate the folders here and keep them")
    p.add_argument("--skip-png", action="store_true")
    p.add_argument("--skip-vit", action="store_true")
    args = p.parse_args()
    from artifactscan.core.devices import resolve_device

    dev = resolve_device(args.device)
    base = args.keep or Path(tempfile.mkdtemp(prefix="bench_data_"))
    results: dict = {"device": str(dev), "cores": len(os.sched_getaffinity(0)), "images": args.images}
    try:
        jpeg = base / "jpeg"
        if not jpeg.is_dir() or len(list(jpeg.iterdir())) != args.images:
            make_folder(jpeg, args.images)
        variants = {"norms": [], "norms --workers 2": ["--workers", "2"], "norms --workers 0": ["--workers", "0"],
                    "norms --exact-decode": ["--exact-decode"]}
        if dev.type == "cuda":
            variants["norms --gpu-decode"] = ["--gpu-decode"]
        print(f"== whole process: artifactscan norms phantom vs the decode limit, {args.images} JPEGs 1600x1200, "
              f"{results['cores']} cores, median of {args.repeats} (target <= 1.2x)", flush=True)
        r = whole_process(jpeg, args.repeats, str(dev), variants=variants)
        results["jpeg"] = r
        _print(r)
        small = base / "jpeg16"
        small.mkdir(exist_ok=True)
        for f in sorted(jpeg.iterdir())[:16]:
            if not (small / f.name).exists():
                os.symlink(f, small / f.name)
        print("== the same on 16 of the files: the fixed start-up cost, and the cost per image beyond it", flush=True)
        s = whole_process(small, args.repeats, str(dev), variants={"norms": []})
        results["jpeg16"] = s
        _print(s)
        per_image = {k: (r["median_s"][k] - s["median_s"][k]) / (args.images - 16) for k in s["median_s"]}
        results["per_image_ratio"] = per_image["norms"] / per_image["limit"]
        print(f"  per image beyond start-up: limit {1e3 * per_image['limit']:.2f} ms, norms "
              f"{1e3 * per_image['norms']:.2f} ms: {results['per_image_ratio']:.2f}x; start-up: limit "
              f"{s['median_s']['limit']:.2f}s, norms {s['median_s']['norms']:.2f}s (16 images)", flush=True)
        if not args.skip_png:
            png = base / "png"
            if not png.is_dir() or len(list(png.iterdir())) != args.images:
                make_folder(png, args.images, fmt="png")
            print(f"== the same as PNG (no draft: full decode, then an integer reduce)", flush=True)
            r = whole_process(png, args.repeats, str(dev), variants={"norms": []})
            results["png"] = r
            _print(r)
        n_vit = args.vit_images or (args.images if dev.type == "cuda" else 96)
        if not args.skip_vit:
            print(f"== ViT-S/16 at 224 px, {n_vit} JPEGs, images/s", flush=True)
            v = vit_images_per_second(jpeg, n_vit, str(dev))
            results["vit_s16"] = v
            print(f"  decode alone {v['decode_img_s']:.0f}/s   bare forward {v['forward_img_s']:.0f}/s   "
                  f"scan {v['scan_img_s']:.0f}/s  ({v['device']})")
        print(json.dumps(results))
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
