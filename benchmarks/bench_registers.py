"""What do register tokens cost per training step? (and, on CUDA, what does train-reg's loop cost vs bare timm?)

Why: registers add tokens (64 → 68 patch+register tokens on the demo model), so every attention and MLP gets a bit
more work; the paper reports it as negligible and train-reg's side-by-side pair is only a fair comparison if the
register model is not much slower. The two models are timed *in the same process on the same batch*, alternating
step by step (interleaved repeats, median), so machine noise hits both equally.

    python benchmarks/bench_registers.py                 # demo model, batch 64, 1 thread (the demo setting)
    python benchmarks/bench_registers.py --threads 2 --repeats 30 --registers 8

Targets: step-time ratio (N registers / 0 registers) ≤ 1.05×; on CUDA, train-reg loop ≥ 0.9× bare-timm img/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from artifactscan.inputs.synthetic import SyntheticShapes  # noqa: E402
from artifactscan.analysis.training import build_model, get_preset, train_model  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _make_step(model, device, amp: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, **({"fused": True} if device.type == "cuda" else {}))

    def step(x, y):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opt.step()

    return step


def bench_register_cost(registers: int, batch: int, repeats: int, warmup: int, device: torch.device,
                        img_size: int = 32, dim: int = 128) -> dict:
    # The cost of registers is their share of the tokens: 4 of 65 at the demo's 32 px (64 patches), 4 of 197 at
    # 56 px (196 patches, the token count of ViT-S/16 at 224 px, where the paper measures < 2% FLOPs).
    # --dim 384 --img-size 56 has ViT-S/16-at-224's width and token count (6 blocks instead of 12).
    cfg = get_preset("demo", img_size=img_size, embed_dim=dim, num_heads=max(4, dim // 64))
    amp = device.type == "cuda"
    ds = SyntheticShapes(batch, seed=0, img_size=cfg.img_size)
    x, y, _ = ds.batch(range(batch))
    x, y = ((x - 0.5) / 0.5).to(device), y.to(device)
    steps = {0: _make_step(build_model(cfg, 0).to(device).train(), device, amp),
             registers: _make_step(build_model(cfg, registers).to(device).train(), device, amp)}
    for _ in range(warmup):
        for s in steps.values():
            s(x, y)
    times: dict[int, list[float]] = {k: [] for k in steps}
    for r in range(repeats):
        order = list(steps) if r % 2 == 0 else list(steps)[::-1]  # alternate who goes first
        for k in order:
            _sync(device)
            t = time.perf_counter()
            steps[k](x, y)
            _sync(device)
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "batch": batch,
        "median_step_s": {str(k): v for k, v in med.items()},
        "img_per_s": {str(k): batch / v for k, v in med.items()},
        "ratio": med[registers] / med[0],
    }


def bench_loop_overhead(batch: int, steps: int, device: torch.device, workers: int) -> dict:
    """train-reg's loop (data pipeline, schedule, clipping, bookkeeping) vs a bare timm loop on a resident batch."""
    cfg = get_preset("demo", steps=steps, batch_size=batch, eval_every=10**9, ckpt_every=10**9, warmup_steps=10,
                     device=str(device), num_workers=workers, val_size=256, train_size=batch * steps)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        res = train_model(cfg, Path(tmp) / "run", progress=False)
        wall = time.perf_counter() - t
    ds = SyntheticShapes(batch, seed=0, img_size=cfg.img_size)
    x, y, _ = ds.batch(range(batch))
    x, y = ((x - 0.5) / 0.5).to(device), y.to(device)
    step = _make_step(build_model(cfg, 0).to(device).train(), device, device.type == "cuda")
    for _ in range(10):
        step(x, y)
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    _sync(device)
    bare = steps * batch / (time.perf_counter() - t)
    return {"train_reg_img_per_s": res.img_per_s, "train_reg_wall_img_per_s": steps * batch / wall,
            "bare_timm_img_per_s": bare, "ratio": res.img_per_s / bare}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--registers", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (the demo pair trains with 1 each)")
    p.add_argument("--device", default="auto")
    p.add_argument("--loop-steps", type=int, default=300, help="CUDA only: steps for the loop-overhead benchmark")
    p.add_argument("--workers", type=int, default=4, help="CUDA only: DataLoader workers for train-reg's loop")
    p.add_argument("--img-size", type=int, default=32,
                   help="input size of the demo architecture (4 px patches): 32 = 64 patches, 56 = 196 patches")
    p.add_argument("--dim", type=int, default=128, help="embedding width (384 = ViT-S)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device("cuda" if (a.device == "auto" and torch.cuda.is_available()) else
                          ("cpu" if a.device == "auto" else a.device))
    out = {"device": str(device), "threads": a.threads, "torch": torch.__version__,
           "registers": bench_register_cost(a.registers, a.batch, a.repeats, a.warmup, device, a.img_size,
                                                    a.dim)}
    r = out["registers"]
    n = (a.img_size // 4) ** 2
    print(f"device {device}, batch {a.batch}, {a.threads} thread(s), {a.repeats} interleaved repeats (median); "
          f"width {a.dim}, {a.img_size} px = {n} patches: {a.registers} registers add {a.registers / (n + 1):.1%} tokens")
    print(f"  0 registers: {r['median_step_s']['0'] * 1e3:8.1f} ms/step  ({r['img_per_s']['0']:.0f} img/s)")
    print(f"  {a.registers} registers: {r['median_step_s'][str(a.registers)] * 1e3:8.1f} ms/step  "
          f"({r['img_per_s'][str(a.registers)]:.0f} img/s)")
    print(f"  ratio {r['ratio']:.3f}×  (target ≤ 1.05×: {'OK' if r['ratio'] <= 1.05 else 'MISSED'})")
    if device.type == "cuda":
        lo = bench_loop_overhead(a.batch, a.loop_steps, device, a.workers)
        out["loop"] = lo
        print(f"  train-reg loop {lo['train_reg_img_per_s']:.0f} img/s vs bare timm {lo['bare_timm_img_per_s']:.0f} "
              f"img/s: {lo['ratio']:.3f}× (target ≥ 0.9×: {'OK' if lo['ratio'] >= 0.9 else 'MISSED'})")
    if a.json:
        print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
