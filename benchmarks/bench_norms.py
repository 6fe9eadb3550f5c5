"""Capture overhead and memory of `artifactscan norms`, measured side by side in one run.

1. Time: `scan()` over N preprocessed images vs a bare `model.forward_features` loop over the same tensors,
   same device and batch size (target: <= 1.05x). Interleaved repeats, median.
2. Memory: peak RSS of a scan over N images vs 10 N images, each in a fresh process (target: <= 1.1x).

    python benchmarks/bench_norms.py [--model demo] [--images 256] [--batch-size 64] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch


def _forward_only(loaded, batches, device):
    with torch.inference_mode():
        for x in batches:
            loaded.model.forward_features(x.to(device))
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_overhead(model, n: int, batch_size: int, device: str, repeats: int) -> dict:
    from artifactscan import load_model, scan
    from artifactscan.core.devices import resolve_device

    dev = resolve_device(device)
    loaded = load_model(model)  # a name, or an already LoadedModel
    loaded.model.to(dev)
    h, w = loaded.input_size
    torch.manual_seed(0)
    images = torch.rand(n, 3, h, w)
    mean = torch.tensor(loaded.data_config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(loaded.data_config["std"]).view(1, 3, 1, 1)
    batches = list(((images - mean) / std).split(batch_size))
    scan(loaded, images[:batch_size], batch_size=batch_size, device=str(dev))  # warm-up both paths
    _forward_only(loaded, batches, dev)
    bare, full = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        _forward_only(loaded, batches, dev)
        bare.append(time.perf_counter() - t)
        t = time.perf_counter()
        scan(loaded, images, batch_size=batch_size, device=str(dev), num_maps=0)
        full.append(time.perf_counter() - t)
    b, f = statistics.median(bare), statistics.median(full)
    return {"model": loaded.name, "images": n, "batch_size": batch_size, "device": str(dev),
            "bare_forward_s": b, "norms_scan_s": f, "ratio": f / b}


def _rss_child(model: str, n: int, batch_size: int) -> None:
    import resource

    from artifactscan import scan

    scan(model, f"synthetic:{n}", batch_size=batch_size, device="cpu", num_maps=0)
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def peak_rss(model: str, n: int, batch_size: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--_rss-child", model, str(n), str(batch_size)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss_mb"]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_rss-child":
        _rss_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", help="model(s) to time (default: demo and a ViT-S/16 at 224 px)")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--memory-images", type=int, default=200)
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    models = args.model or ["demo", "vit_small_patch16_224"]
    print("== capture overhead: norms scan vs bare forward_features (target <= 1.05x)")
    for model in models:
        if model.startswith("vit_"):
            import timm

            from artifactscan.models.loading import wrap_module

            # Random init: same compute per token as the pretrained model, which cannot be downloaded here.
            m = wrap_module(timm.create_model(model, pretrained=False), name=model)
            r = time_overhead(m, max(32, args.images // 4), min(args.batch_size, 32), args.device, args.repeats)
        else:
            r = time_overhead(model, args.images, args.batch_size, args.device, args.repeats)
        print(f"{r['model']:>24} {r['device']:>5} N={r['images']:<5} B={r['batch_size']:<4} "
              f"bare {r['bare_forward_s']:.3f}s  norms {r['norms_scan_s']:.3f}s  ratio {r['ratio']:.3f}x")
    print("== peak RSS: N vs 10N images (target <= 1.1x)")
    n = args.memory_images
    small, large = peak_rss("demo", n, args.batch_size), peak_rss("demo", 10 * n, args.batch_size)
    print(f"{'demo':>24} N={n}: {small:.0f} MB   10N={10 * n}: {large:.0f} MB   ratio {large / small:.3f}x")


if __name__ == "__main__":
    main()
