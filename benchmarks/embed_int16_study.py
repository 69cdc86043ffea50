"""MiniLM's Linears on AVX2: ember's int16 vpmaddwd kernel against float32 (issue 14).

    python benchmarks/embed_int16_study.py --isa avx2            # every library capped to AVX2
    python benchmarks/embed_int16_study.py --isa avx2 --rows 736 1280 --rounds 8

GFLOP/s of MiniLM's four Linear shapes (fused q/k/v, o, up, down) at `--rows` rows (736: a batch of
32 ~23-token sentences), 1 thread, CPU time, the variants interleaved in every round and the best
round kept (--threads N: N threads, wall time): torch float32 F.linear (MKL, capped by --isa), oneDNN-prepacked float32 (ember's float32
encoder path, bias fused), and ember.kernels.int16_linear (12-bit weight codes, activations quantised
per call to 14 bits per row, bias fused; the quantisation is included, and estimated alone as a share
of the int16 call). Also the relative error of each against a float64 F.linear. Numbers measured on a
shared machine are distorted by contention; the speed-ups are same-run ratios.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_embeddings import AVX2_CAPS  # noqa: E402

SHAPES = {"qkv": (1152, 384), "o": (384, 384), "up": (1536, 384), "down": (384, 1536)}  # (out, in)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--isa", choices=["native", "avx2"], default="avx2")
    ap.add_argument("--rows", type=int, nargs="+", default=[736])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (above 1: wall time, not CPU time)")
    a = ap.parse_args()
    if a.isa == "avx2":
        os.environ.update(AVX2_CAPS)
    sys.path.insert(0, str(ROOT / "src"))
    import torch
    import torch.nn.functional as F

    from ember import kernels

    torch.set_num_threads(a.threads)
    clock = time.process_time if a.threads == 1 else time.perf_counter
    if not kernels.available():
        print(f"native kernels unavailable: {kernels.build_info().get('reason')}")
        return 1
    print(f"kernel ISA {kernels.isa()}, torch {torch.__version__}, {a.threads} thread(s), "
          f"{'CPU' if a.threads == 1 else 'wall'} time")
    g = torch.Generator().manual_seed(0)
    for rows in a.rows:
        tot: dict[str, float] = {}
        print(f"rows {rows}: GFLOP/s, best of {a.rounds} (relative error to float64)")
        for name, (n, k) in SHAPES.items():
            x = torch.randn(rows, k, generator=g)
            x[:, :4] *= 10  # a few outlier channels, as LayerNorm outputs have
            w, b = torch.randn(n, k, generator=g) * 0.05, torch.randn(n, generator=g)
            ref = F.linear(x.double(), w.double(), b.double())
            fl = 2.0 * rows * n * k
            pk = torch.ops.mkldnn._reorder_linear_weight(w, rows)
            w16 = kernels.int16_pack(w)
            fns = {"f32 F.linear": lambda: F.linear(x, w, b),
                   "f32 oneDNN": lambda: torch.ops.mkldnn._linear_pointwise(x, pk, b, "none", [], ""),
                   "int16": lambda: kernels.int16_linear(x, w16, b)}
            errs = {vn: ((f().double() - ref).norm() / ref.norm()).item() for vn, f in fns.items()}
            # the per-call activation quantisation (and call overhead): the kernel on one 16-column
            # panel of the weight, less that panel's share of the whole GEMM
            w1 = kernels.int16_pack(w[:16])
            fns["one panel"] = lambda: kernels.int16_linear(x, w1, b[:16])
            best = {vn: float("inf") for vn in fns}
            reps = max(1, int(4e8 / fl))
            for _ in range(a.rounds):
                for vn, f in fns.items():
                    f()
                    t = clock()
                    for _ in range(reps):
                        f()
                    best[vn] = min(best[vn], (clock() - t) / reps)
            print(f"  {name:<5} [{n}x{k}]  " + "  ".join(f"{vn} {fl / best[vn] / 1e9:.0f} ({errs[vn]:.1e})" for vn in errs)
                  + f"  quantising x ~{100 * (best['one panel'] / best['int16'] - 16 / n):.1f}% of int16")
            for vn in errs:
                tot[vn] = tot.get(vn, 0.0) + best[vn]
        base = tot["f32 F.linear"]
        print("  the four shapes together, speed-up over f32 F.linear: "
              + ", ".join(f"{vn} {base / v:.2f}x" for vn, v in tot.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
