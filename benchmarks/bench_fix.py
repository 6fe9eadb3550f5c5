"""Throughput of a model repaired with a test-time register vs the original, measured side by side in one run.

Target (issue): the fixed model runs at >= 0.95x the original's throughput. The repair adds one token, masks it out
as a key up to the first register-neuron block, and moves k neuron activations per image.

    python benchmarks/bench_fix.py [--model phantom] [--images 512] [--batch-size 64] [--device auto] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    from artifactscan import load_model, scan
    from artifactscan.models.interventions import apply_test_time_register
    from artifactscan.analysis.fix import find_register_neurons
    from artifactscan.core.devices import resolve_device

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="phantom")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    dev = resolve_device(args.device)

    original = load_model(args.model)
    fixed = load_model(args.model)
    original.model.to(dev)
    fixed.model.to(dev)
    report = scan(fixed, "synthetic:128", device=str(dev))
    register = find_register_neurons(fixed, "synthetic:128", report, device=dev)
    apply_test_time_register(fixed, register)
    h, w = original.input_size
    torch.manual_seed(0)
    batches = list(torch.randn(args.images, 3, h, w).split(args.batch_size))

    def run(loaded) -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            for x in batches:
                loaded.model(x.to(dev))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    run(original), run(fixed)  # warm-up
    t_orig, t_fixed = [], []
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
        t_orig.append(run(original))
        t_fixed.append(run(fixed))
    a, b = statistics.median(t_orig), statistics.median(t_fixed)
    ratio = (args.images / b) / (args.images / a)
    print(f"model {original.name} on {dev}, {args.images} images, batch {args.batch_size}, "
          f"{len(register.neurons)} register neurons, median of {args.repeats}")
    print(f"original {args.images / a:8.1f} img/s   fixed {args.images / b:8.1f} img/s   "
          f"throughput ratio {ratio:.3f}x (target >= 0.95x) -> {'PASS' if ratio >= 0.95 else 'FAIL'}")


if __name__ == "__main__":
    main()
