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
        [--batch-size 64] [--blocks -1] [--repeats 3] [--device auto] [--json]

Random-init weights (the cost does not depend on them); ``--model NAME`` loads anything ``load_model`` accepts.
"""

from __future__ import annotations

import numpy as np
import torch

from bench_common import bench_model, median_seconds, model_pass_parser, print_result, sync


def main(argv: list[str] | None = None) -> dict:
    ap = model_pass_parser(__doc__, images=256, batch_size=64)
    ap.add_argument("--blocks", "--block", default="-1", help="The block LOST reads (one index; -1 = the last).")
    args = ap.parse_args(argv)

    from artifactscan.analysis.discover import discovery_run
    from artifactscan.core.blocks import parse_block
    from artifactscan.analysis.lost import FeatureCapture, default_k, lost_batched
    from artifactscan.inputs.boxes import BoxedData, BoxedItem
    from artifactscan.inputs.sources import image_batches
    from artifactscan.inputs.synthetic_objects import SyntheticObjects

    loaded, dev = bench_model(args)
    h, w = loaded.input_size
    ds = SyntheticObjects(args.images, img_size=h)
    pixels = torch.from_numpy(np.stack([ds.render(i)[0] for i in range(args.images)]))
    if w != h:
        pixels = torch.nn.functional.interpolate(pixels, size=(h, w), mode="bilinear", align_corners=False)
    items = [BoxedItem(f"objects[{i}]", None, w, h, [[float(v) for v in b] for b in ds.boxes(i)])
             for i in range(args.images)]
    data = BoxedData("synthetic-objects", "in-memory synthetic-objects", items, synthetic=pixels)
    block = parse_block(args.blocks, len(loaded.blocks))
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
        sync(dev)

    def end_to_end() -> None:
        discovery_run(loaded, data, label="bench", block=block, device=dev, batch_size=args.batch_size, keep=0)
        sync(dev)

    runs = {"features": lambda: features(False), "features_lost": lambda: features(True),
            "discover_end_to_end": end_to_end}
    med = median_seconds(runs, args.repeats, rotate=True)  # rotate: no run always goes first
    result = {
        "model": loaded.name if args.model else args.arch, "input": [h, w], "grid": [gh, gw], "k": k,
        "images": args.images, "batch_size": args.batch_size, "device": str(dev),
        "torch_threads": torch.get_num_threads(), "block": block, "repeats": args.repeats, "seconds": med,
        "ratios_vs_features": {name: med[name] / med["features"] for name in ("features_lost", "discover_end_to_end")},
        "target_end_to_end": 1.15,
    }
    print_result(result, args.json,
                 f"{result['model']} {h}x{w} ({gh}x{gw} patches, k={k}), block {block}, {args.images} images, batch "
                 f"{args.batch_size}, {dev}, {result['torch_threads']} threads, median of {args.repeats}",
                 f"  end to end / features: {result['ratios_vs_features']['discover_end_to_end']:.3f}x "
                 f"(target <= {result['target_end_to_end']}x)",
                 "features", 20, 3, "features")
    return result


if __name__ == "__main__":
    main()
