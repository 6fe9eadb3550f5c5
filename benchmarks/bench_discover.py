"""Cost of `artifactscan discover` over the forward pass that produces the features LOST reads.

Side by side in one process, same images (the built-in synthetic-objects set, pre-rendered at the model's input
size and kept in memory), device and batch size, interleaved repeats (the order rotated each repeat), median:

* features: the forward pass up to the chosen block with its keys taken (:class:`FeatureCapture`), over the same
  batches :func:`discovery_run` iterates (normalisation included);
* features + LOST: the same, plus :func:`lost_batched` on every batch (the similarity graphs, seeds, expansion and
  boxes on the device);
* discover end to end: :func:`discovery_run` (the above plus residual norms, the outlier threshold, CorLoc, the two
  baselines and the per-image records).

The ratios over "features" are printed; the target is <= 1.15x end to end.

    python benchmarks/bench_discover.py [--arch vit_small_patch16_224] [--img-size 224] [--images 256]
        [--batch-size 64] [--block -1] [--repeats 3] [--device auto] [--json]

Random-init weights (the cost does not depend on them); ``--model NAME`` loads anything ``load_model`` accepts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="vit_small_patch16_224")
    ap.add_argument("--model", default=None, help="load this instead of a random-init --arch")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--block", type=int, default=-1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import timm

    from artifactscan.analysis.discover import discovery_run, resolve_block
    from artifactscan.analysis.lost import FeatureCapture, default_k, lost_batched
    from artifactscan.core.progress import resolve_device
    from artifactscan.inputs.boxes import BoxedData, BoxedItem
    from artifactscan.inputs.sources import image_batches
    from artifactscan.inputs.synthetic_objects import SyntheticObjects
    from artifactscan.models.loading import load_model, wrap_module

    dev = resolve_device(args.device)
    if args.model:
        loaded = load_model(args.model)
    else:
        torch.manual_seed(0)
        loaded = wrap_module(timm.create_model(args.arch, pretrained=False, img_size=args.img_size).eval())
    loaded.model.to(dev)
    h, w = loaded.input_size
    ds = SyntheticObjects(args.images, img_size=h)
    pixels = torch.from_numpy(np.stack([ds.render(i)[0] for i in range(args.images)]))
    if w != h:
        pixels = torch.nn.functional.interpolate(pixels, size=(h, w), mode="bilinear", align_corners=False)
    items = [BoxedItem(f"objects[{i}]", None, w, h, [[float(v) for v in b] for b in ds.boxes(i)])
             for i in range(args.images)]
    data = BoxedData("synthetic-objects", "in-memory synthetic-objects", items, synthetic=pixels)
    block = resolve_block(args.block, len(loaded.blocks))
    gh, gw = loaded.grid_size
    k = default_k(gh * gw)
    P = loaded.num_prefix_tokens
    source = data.image_source(loaded)

    def features(with_lost: bool) -> None:
        with torch.inference_mode(), FeatureCapture(loaded, block, "keys") as cap:
            for x, _, _ in image_batches(source, args.batch_size, 0):
                feats, _ = cap.run(x.to(dev, non_blocking=True))
                if with_lost:
                    lost_batched(feats[:, P:], (gh, gw), k)
        _sync(dev)

    def end_to_end() -> None:
        discovery_run(loaded, data, label="bench", block=block, device=dev, batch_size=args.batch_size, keep=0)
        _sync(dev)

    runs = {"features": lambda: features(False), "features_lost": lambda: features(True),
            "discover_end_to_end": end_to_end}
    for fn in runs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for rep in range(args.repeats):
        for name in names[rep % len(names):] + names[:rep % len(names)]:  # rotate: no run always goes first
            fn = runs[name]
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(v) for name, v in times.items()}
    result = {
        "model": loaded.name if args.model else args.arch, "input": [h, w], "grid": [gh, gw], "k": k,
        "images": args.images, "batch_size": args.batch_size, "device": str(dev),
        "torch_threads": torch.get_num_threads(), "block": block, "repeats": args.repeats, "seconds": med,
        "ratios_vs_features": {name: med[name] / med["features"] for name in ("features_lost", "discover_end_to_end")},
        "target_end_to_end": 1.15,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['model']} {h}x{w} ({gh}x{gw} patches, k={k}), block {block}, {args.images} images, batch "
              f"{args.batch_size}, {dev}, {result['torch_threads']} threads, median of {args.repeats}")
        for name, v in med.items():
            ratio = "" if name == "features" else f"   {v / med['features']:.3f}x features"
            print(f"  {name:<20} {v:8.3f} s{ratio}")
        print(f"  end to end / features: {result['ratios_vs_features']['discover_end_to_end']:.3f}x "
              f"(target <= {result['target_end_to_end']}x)")
    return result


if __name__ == "__main__":
    main()
