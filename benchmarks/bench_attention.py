"""Cost of `artifactscan attention`: the attention pass with fused attention off only for the captured blocks.

Side by side in one process, same images, device and batch size, interleaved repeats, median:

* plain: a bare ``model.forward_features`` loop over pre-normalised tensors (every block fused);
* ``--blocks k``: the attention pass of :func:`attention_report` capturing one block (the norms scan is done once
  beforehand and passed in, so only the attention pass is timed);
* all layers: the same capturing every block;
* full: ``attention_report`` end to end (norms scan + attention pass), all layers.

    python benchmarks/bench_attention.py [--arch vit_small_patch16_224] [--img-size 224] [--images 64]
        [--batch-size 32] [--blocks -1] [--repeats 3] [--device auto] [--json]

Random-init weights (the pass's cost does not depend on the weights); ``--model NAME`` loads anything
``artifactscan.load_model`` accepts instead.
"""

from __future__ import annotations

import torch

from bench_common import bench_model, median_seconds, model_pass_parser, print_result, sync


def main(argv: list[str] | None = None) -> dict:
    ap = model_pass_parser(__doc__, images=64, batch_size=32)
    ap.add_argument("--blocks", "--layer", dest="layer", type=int, default=-1,
                    help="the single block of the --blocks k run")
    args = ap.parse_args(argv)

    from artifactscan.analysis.attention_maps import attention_report
    from artifactscan.analysis.scan import scan

    loaded, dev = bench_model(args)
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
        sync(dev)

    def attn(blocks) -> None:
        attention_report(loaded, images, blocks=blocks, device=str(dev), batch_size=args.batch_size, maps=0,
                         scan_report=report)
        sync(dev)

    def full() -> None:
        attention_report(loaded, images, blocks="all", device=str(dev), batch_size=args.batch_size, maps=0,
                         threshold="auto")
        sync(dev)

    runs = {"plain_forward": plain, "layers_k": lambda: attn([args.layer]), "all_layers": lambda: attn("all"),
            "full_report": full}
    med = median_seconds(runs, args.repeats)
    assert [bool(b.attn.fused_attn) for b in loaded.blocks] == fused_before, "fused_attn flags not restored"
    result = {
        "model": loaded.name if args.model else args.arch, "input": [h, w], "images": args.images,
        "batch_size": args.batch_size, "device": str(dev), "torch_threads": torch.get_num_threads(),
        "blocks": len(loaded.blocks), "layer_k": args.layer % len(loaded.blocks), "repeats": args.repeats,
        "seconds": med,
        "ratios_vs_plain": {k: med[k] / med["plain_forward"] for k in ("layers_k", "all_layers", "full_report")},
        "all_layers_over_layers_k": med["all_layers"] / med["layers_k"],
    }
    print_result(result, args.json,
                 f"{result['model']} {h}x{w}, {args.images} images, batch {args.batch_size}, {dev}, "
                 f"{result['torch_threads']} threads, median of {args.repeats}",
                 f"  all layers / --blocks {result['layer_k']}: {result['all_layers_over_layers_k']:.2f}x",
                 "plain_forward", 14, 2, "plain")
    return result


if __name__ == "__main__":
    main()
