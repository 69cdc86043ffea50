"""Where a CUDA-graph decode step spends its time: a kernel table from the profiler.

    python benchmarks/profile_decode.py --config llama-1b --compile default --batch 1
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ember.engine import Engine  # noqa: E402
from ember.engine.presets import random_model  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="llama-1b")
    ap.add_argument("--compile", default="", help="'' (none), default, max-autotune-no-cudagraphs")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--rows", type=int, default=30)
    args = ap.parse_args()
    dev = torch.device("cuda")
    _, model = random_model(args.config, torch.bfloat16, dev)
    eng = Engine(model, None, [], max_batch=args.batch, max_len=args.max_len, cuda_graphs=True,
                 compile=args.compile or False)
    dec = eng.decoder
    ids = torch.randint(0, 1000, (args.batch, 1), device=dev)
    pos = torch.full((args.batch, 1), 100, device=dev)
    t = time.perf_counter()
    dec(ids, pos)
    torch.cuda.synchronize()
    print(f"first call (compile + capture): {time.perf_counter() - t:.1f}s")
    for _ in range(20):
        dec(ids, pos)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(args.steps):
        dec(ids, pos)
    torch.cuda.synchronize()
    step = (time.perf_counter() - t) / args.steps
    wb = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"step {step * 1e3:.3f} ms  ({args.batch / step:.0f} tok/s, {wb / step / 1e9:.0f} GB/s of weights)")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            dec(ids, pos)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        dt = getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0)
        if dt > 0 and e.key not in ("cudaGraphLaunch",):
            rows.append((dt / args.steps, e.count // args.steps, e.key))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows if not r[2].startswith(("aten::", "cuda")))
    print(f"kernel time per step: {total:.1f} us over {sum(r[1] for r in rows)} launches")
    for us, n, name in rows[: args.rows]:
        print(f"{us:9.1f} us {n:4d}x  {name[:110]}")


if __name__ == "__main__":
    main()
