"""Cost of `artifactscan attention`: the attention pass with fused attention off only for the captured blocks.

Side by side in one process, same images, device and batch size, interleaved repeats, median:

* plain: a bare ``model.forward_features`` loop over pre-normalised tensors (every block fused);
* ``--layers k``: the attention pass of :func:`attention_report` capturing one block (the norms scan is done once
  beforehand and passed in, so only the attention pass is timed);
* all layers: the same capturing every block;
* full: ``attention_report`` end to end (norms scan + attention pass), all layers.

    python benchmarks/bench_attention.py [--arch vit_small_patch16_224] [--img-size 224] [--images 64]
        [--batch-size 32] [--layer -1] [--repeats 3] [--device auto] [--json]

Random-init weights (the pass's cost does not depend on the weights); ``--model NAME`` loads anything
``artifactscan.load_model`` accepts instead.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

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
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--layer", type=int, default=-1, help="the single block of the --layers k run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import timm

    from artifactscan.analysis.attention_maps import attention_report
    from artifactscan.models.loading import load_model, wrap_module
    from artifactscan.core.progress import resolve_device
    from artifactscan.analysis.scan import scan

    dev = resolve_device(args.device)
    if args.model:
        loaded = load_model(args.model)
    else:
        torch.manual_seed(0)
        loaded = wrap_module(timm.create_model(args.arch, pretrained=False, img_size=args.img_size).eval())
    loaded.model.to(dev)
    h, w = loaded.input_size
    images = torch.rand(args.images, 3, h, w, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor(loaded.data_config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(loaded.data_config["std"]).view(1, 3, 1, 1)
    batches = list(((images - mean) / std).split(args.batch_size))
    fused_before = [bool(b.attn.fused_attn) for b in loaded.blocks]
    report = scan(loaded, images, threshold="auto", device=str(dev), batch_size=args.batch_size, num_maps=0)

    def plain() -> None:
        with torch.inference_mode():
            for x in batches:
                loaded.model.forward_features(x.to(dev))
        _sync(dev)

    def attn(layers) -> None:
        attention_report(loaded, images, layers=layers, device=str(dev), batch_size=args.batch_size, maps=0,
                         scan_report=report)
        _sync(dev)

    def full() -> None:
        attention_report(loaded, images, layers=None, device=str(dev), batch_size=args.batch_size, maps=0,
                         threshold="auto")
        _sync(dev)

    runs = {"plain_forward": plain, "layers_k": lambda: attn([args.layer]), "all_layers": lambda: attn(None),
            "full_report": full}
    for fn in runs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    assert [bool(b.attn.fused_attn) for b in loaded.blocks] == fused_before, "fused_attn flags not restored"
    result = {
        "model": loaded.name if args.model else args.arch, "input": [h, w], "images": args.images,
        "batch_size": args.batch_size, "device": str(dev), "torch_threads": torch.get_num_threads(),
        "blocks": len(loaded.blocks), "layer_k": args.layer % len(loaded.blocks), "repeats": args.repeats,
        "seconds": med,
        "ratios_vs_plain": {k: med[k] / med["plain_forward"] for k in ("layers_k", "all_layers", "full_report")},
        "all_layers_over_layers_k": med["all_layers"] / med["layers_k"],
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['model']} {h}x{w}, {args.images} images, batch {args.batch_size}, {dev}, "
              f"{result['torch_threads']} threads, median of {args.repeats}")
        for k, v in med.items():
            ratio = "" if k == "plain_forward" else f"   {v / med['plain_forward']:.2f}x plain"
            print(f"  {k:<14} {v:8.3f} s{ratio}")
        print(f"  all layers / --layers {result['layer_k']}: {result['all_layers_over_layers_k']:.2f}x")
    return result


if __name__ == "__main__":
    main()
