"""compare with one pass per model (its attention on the scan's forward) against the two passes it made before.

Side by side in one run, interleaved repeats: ``one pass`` is :func:`artifactscan.compare` as it is (the last block's
attention on the prefix tokens is a measurement on the scan's own forward); ``two passes`` is what 0.2 did, the same
scan followed by a second pass over the same images for the attention (``attention_mass``). Both give the same
numbers (tests/test_passes.py); the ratio is the time saved.

    python benchmarks/bench_passes.py --images 256 --batch-size 32 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from artifactscan.analysis.attention import attention_mass  # noqa: E402
from artifactscan.analysis.compare import compare  # noqa: E402
from artifactscan.analysis.scan import scan  # noqa: E402
from artifactscan.inputs.sources import image_batches, make_image_source  # noqa: E402
from artifactscan.models.loading import load_model  # noqa: E402


def one_pass(models: list[str], images: str, batch_size: int) -> None:
    compare(models, images, batch_size=batch_size, device="cpu", num_workers=0)


def two_passes(models: list[str], images: str, batch_size: int) -> None:
    for spec in models:
        loaded = load_model(spec)
        scan(loaded, images, batch_size=batch_size, device="cpu", num_workers=0, num_maps=0)
        source = make_image_source(images, loaded)
        batches = (x for x, _, _ in image_batches(source, batch_size, 0, "cpu") if x is not None)
        attention_mass(loaded, batches, blocks=[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["demo", "demo-reg4"])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    images = f"synthetic:{args.images}"
    times: dict[str, list[float]] = {"one pass": [], "two passes": []}
    one_pass(args.models, images, args.batch_size)  # warm-up: imports, the synthetic set, allocator
    for _ in range(args.repeats):
        for name, fn in (("one pass", one_pass), ("two passes", two_passes)):
            start = time.perf_counter()
            fn(args.models, images, args.batch_size)
            times[name].append(time.perf_counter() - start)
    one, two = (statistics.median(times[k]) for k in ("one pass", "two passes"))
    print(f"compare {' '.join(args.models)} on {images} (batch {args.batch_size}, median of {args.repeats}, CPU)")
    print(f"  one pass   {one:7.2f} s")
    print(f"  two passes {two:7.2f} s")
    print(f"  one / two  {one / two:7.3f}x")


if __name__ == "__main__":
    main()
