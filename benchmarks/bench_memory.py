"""Peak memory of a scan against the size of the checkpoint it reads: can a giant ViT be scanned on an ordinary machine?

For each architecture, a random-init **bf16** timm-layout safetensors file is written once (tensor by tensor from a
meta-device build: the fp32 model is never held), then each precision is measured in a fresh process: the library's
``scan`` of 2 synthetic images at 112 px with ``num_workers=0`` (no decoding processes: one process holds everything),
and that process's peak resident memory (``ru_maxrss``) is compared with the file size.

Targets (issue 22): ``bf16`` peak <= file + 1.5 GB; ``fp32`` of the bf16 file <= file + fp32 weights + 1.5 GB.

    python benchmarks/bench_memory.py [--arch vit_large_patch16_224 vit_giant_patch14_dinov2]
        [--precision bf16 fp32] [--dir /tmp/bench_memory] [--json]

The files are kept in ``--dir`` and reused by a later run (delete them to rebuild).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path

GB = 1e9
MARGIN = 1.5 * GB
IMG_SIZE = 112


def write_bf16_file(arch: str, path: Path) -> int:
    """A bf16 state dict of ``arch`` with random weights, written tensor by tensor (only one tensor is ever held: a
    DINOv3-7B file is 13.4 GB, and ``safetensors.save_file`` would hold all of it plus a bytes copy); its number of
    floating elements. The file is a plain safetensors file: header, then the tensors in header order."""
    import timm
    import torch

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in timm.create_model(arch, pretrained=False, num_classes=0).state_dict().items()}
    header, offset = {}, 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data on 8 bytes
    gen = torch.Generator().manual_seed(0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in shapes.items():
            if name.endswith(".bias") or name.endswith("gamma") or ".gamma_" in name:
                t = torch.full(shape, 1e-5 if "gamma" in name else 0.0, dtype=torch.bfloat16)
            elif name.startswith("norm.") or ".norm" in name:
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:  # drawn in fp32 one tensor at a time, kept in bf16
                t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
            f.write(t.contiguous().view(torch.uint8).numpy().data)
    return sum(math.prod(s) for s in shapes.values())


def measure(path: str, arch: str, precision: str) -> None:
    """In this (fresh) process: scan, then print the peak RSS as JSON."""
    start = time.perf_counter()
    from artifactscan import scan

    report = scan(path, "synthetic:2", arch=arch, img_size=IMG_SIZE, precision=precision, num_workers=0,
                  num_maps=0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kilobytes
    print(json.dumps({"peak_rss": peak, "seconds": time.perf_counter() - start, "blocks": len(report.layers) - 1,
                      "notes": [n for n in report.notes if "precision" in n]}))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=["vit_large_patch16_224", "vit_giant_patch14_dinov2"])
    ap.add_argument("--precision", nargs="+", default=["bf16", "fp32"])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/bench_memory"))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--measure", nargs=3, metavar=("FILE", "ARCH", "PRECISION"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure:
        measure(*args.measure)
        return {}
    args.dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for arch in args.arch:
        path = args.dir / f"{arch}.bf16.safetensors"
        if not path.is_file():
            write_bf16_file(arch, path)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            elements = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        size = path.stat().st_size
        for precision in args.precision:
            proc = subprocess.run([sys.executable, __file__, "--measure", str(path), arch, precision],
                                  capture_output=True, text=True, check=True)
            got = json.loads(proc.stdout.strip().splitlines()[-1])
            budget = size + MARGIN + (elements * 4 if precision == "fp32" else 0)
            rows.append({"arch": arch, "precision": precision, "file_bytes": size, "params": elements,
                         "peak_rss": got["peak_rss"], "budget": budget, "within": got["peak_rss"] <= budget,
                         "peak_over_file": got["peak_rss"] / size, "seconds": got["seconds"]})
    result = {"images": 2, "img_size": IMG_SIZE, "workers": 0, "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"peak RSS of a scan (2 images at {IMG_SIZE} px, --workers 0) against a bf16 safetensors file")
        for r in rows:
            print(f"  {r['arch']:<28} {r['precision']:<5} file {r['file_bytes'] / GB:5.2f} GB  peak "
                  f"{r['peak_rss'] / GB:5.2f} GB ({r['peak_over_file']:.2f}x)  budget {r['budget'] / GB:5.2f} GB  "
                  f"{'ok' if r['within'] else 'OVER'}  {r['seconds']:.0f} s")
    return result


if __name__ == "__main__":
    main()
