"""Benchmark ember.kernels.ggml_linear against torch's stock CPU paths, at the shapes of
Qwen2.5-Coder-1.5B (Q4_K_M: Q4_K projections, Q6_K ffn_down / LM head).

M=1 (decode): GB/s of weight bytes streamed, next to a plain memory copy and a plain read measured
in the same run. Weights cycle through a pool larger than the last-level cache, so every call
streams from DRAM as in a real decode step. M=512 (prefill): effective GFLOP/s (2*M*N*K / time).

    PYTHONPATH=src python benchmarks/bench_kernels.py                      # native ISA
    EMBER_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 \\
        PYTHONPATH=src python benchmarks/bench_kernels.py                  # an AVX2-only machine
Options: --threads 2 --pool-mb 1024 --m 1,512 --quick --model --json out.json
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

from ember import kernels
from ember.io import ggml
from ember.kernels.testing import random_blocks

H, I = 1536, 8960
# (name, N, K, ggml type, how many per model)
SHAPES = [
    ("q/o 1536x1536 Q4_K", H, H, ggml.Q4_K, 56),
    ("k/v 256x1536 Q4_K", 256, H, ggml.Q4_K, 56),
    ("gate/up 8960x1536 Q4_K", I, H, ggml.Q4_K, 56),
    ("down 1536x8960 Q6_K", H, I, ggml.Q6_K, 28),
    ("down 1536x8960 Q4_K", H, I, ggml.Q4_K, 0),
    ("lm_head 151936x1536 Q6_K", 151936, H, ggml.Q6_K, 1),
    ("gate/up 8960x1536 Q4_1", I, H, ggml.Q4_1, 0),
    ("gate/up 8960x1536 Q8_0", I, H, ggml.Q8_0, 0),
    ("gate/up 8960x1536 Q4_0", I, H, ggml.Q4_0, 0),
    ("gate/up 8960x1536 Q5_0", I, H, ggml.Q5_0, 0),
    ("gate/up 8960x1536 Q5_K", I, H, ggml.Q5_K, 0),
]


def timeit(fn, n_calls: int, min_s: float) -> float:
    """Seconds per call: the best of repeated rounds of n_calls calls."""
    fn(0)
    best = math.inf
    t_end = time.perf_counter() + min_s
    while True:
        t = time.perf_counter()
        for i in range(n_calls):
            fn(i)
        best = min(best, (time.perf_counter() - t) / n_calls)
        if time.perf_counter() > t_end:
            return best


def pool(t: torch.Tensor, pool_bytes: int) -> list[torch.Tensor]:
    """Copies of t (distinct memory) adding up to at least pool_bytes."""
    n = max(2, math.ceil(pool_bytes / (t.numel() * t.element_size())))
    return [t.clone() for _ in range(n)]


def bandwidth(pool_bytes: int) -> dict:
    src = torch.ones(pool_bytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    t = timeit(lambda i: dst.copy_(src), 3, 1.0)
    copy = 2 * src.numel() * 4 / t / 1e9  # read + write
    t = timeit(lambda i: src.sum(), 3, 1.0)
    read = src.numel() * 4 / t / 1e9
    return {"copy_GBps(read+write)": round(copy, 2), "read_GBps(sum)": round(read, 2)}


def model_pass(args, report) -> None:
    """A whole Qwen2.5-Coder-1.5B Q4_K_M forward's matmuls (28 layers of q,k,v,o,gate,up,down and
    the LM head, each with its own weights: ~1 GB streamed) at M=1 and M=512."""
    g = torch.Generator().manual_seed(1)
    # Q4_K_M: attn_v and ffn_down are Q6_K in about half the layers, the rest Q4_K
    layers = []
    for li in range(28):
        six = li % 2 == 0
        layers += [(H, H, ggml.Q4_K), (256, H, ggml.Q4_K), (256, H, ggml.Q6_K if six else ggml.Q4_K),
                   (H, H, ggml.Q4_K), (I, H, ggml.Q4_K), (I, H, ggml.Q4_K), (H, I, ggml.Q6_K if six else ggml.Q4_K)]
    layers.append((151936, H, ggml.Q6_K))
    ws = [(random_blocks(t, n, k, g), t, n, k) for n, k, t in layers]
    total = sum(w.numel() for w, *_ in ws)
    xs = {k: torch.randn(512, k, generator=g) for k in (H, I)}
    for m in (1, 512):
        def run(_i):
            for w, t, n, k in ws:
                kernels.ggml_linear(xs[k][:m], w, t, n)
        sec = timeit(run, 1, 3.0 if m == 1 else 0.0)
        row = {"shape": "whole model (196 matmuls + lm_head)", "M": m, "weight_MB": round(total / 2**20),
               "ms": round(sec * 1e3, 1)}
        if m == 1:
            row["GBps"] = round(total / sec / 1e9, 2)
            row["tok_per_s_matmuls_only"] = round(1 / sec, 2)
        else:
            row["GFLOPs"] = round(sum(2 * m * n * k for _w, _t, n, k in ws) / sec / 1e9, 1)
            row["prefill_tok_per_s_matmuls_only"] = round(m / sec, 1)
        report["rows"].append(row)
        print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pool-mb", type=int, default=1024)
    ap.add_argument("--m", default="1,512")
    ap.add_argument("--min-s", type=float, default=1.0)
    ap.add_argument("--quick", action="store_true", help="only the Qwen Q4_K_M shapes")
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--model", action="store_true", help="also time a whole model's matmuls")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    assert kernels.available(), kernels.build_info()
    pool_bytes = args.pool_mb << 20
    report = {"isa": kernels.isa(), "cpu_isa": kernels.cpu_isa(), "threads": args.threads,
              "torch": torch.__version__, "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "build": kernels.build_info(), **bandwidth(pool_bytes), "rows": []}
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}))
    shapes = [s for s in SHAPES if s[4] or not args.quick]
    g = torch.Generator().manual_seed(0)
    for m in [int(v) for v in args.m.split(",")]:
        for name, N, K, t, _count in shapes:
            w = random_blocks(t, N, K, g)
            row = {"shape": name, "M": m}
            xs = torch.randn(m, K, dtype=torch.bfloat16, generator=g)
            x32 = xs.float()
            flop = 2 * m * N * K
            if m == 1:
                ws = pool(w, pool_bytes)
                sec = timeit(lambda i: kernels.ggml_linear(x32, ws[i % len(ws)], t, N), len(ws), args.min_s)
                row["ember_GBps"] = round(w.numel() / sec / 1e9, 2)
                row["ember_us"] = round(sec * 1e6, 1)
                del ws
            else:
                sec = timeit(lambda i: kernels.ggml_linear(x32, w, t, N), 2, args.min_s)
                row["ember_GFLOPs"] = round(flop / sec / 1e9, 1)
                row["ember_ms"] = round(sec * 1e3, 2)
            if not args.no_baselines and t in (ggml.Q4_K, ggml.Q6_K):
                wb = torch.randn(N, K, dtype=torch.bfloat16, generator=g)
                wi = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                    torch.randint(0, 16, (N, K), dtype=torch.int32, generator=g), 1)
                sz = torch.randn(K // 32, N, 2, dtype=torch.bfloat16, generator=g)
                if m == 1:
                    wbs = pool(wb, pool_bytes)
                    sec = timeit(lambda i: F.linear(xs, wbs[i % len(wbs)]), len(wbs), args.min_s)
                    row["torch_bf16_GBps"] = round(wb.numel() * 2 / sec / 1e9, 2)
                    sec = timeit(lambda i: kernels.bf16_linear(xs, wbs[i % len(wbs)]), len(wbs), args.min_s)
                    row["ember_bf16_GBps"] = round(wb.numel() * 2 / sec / 1e9, 2)
                    del wbs
                    wis = pool(wi, pool_bytes)
                    sec = timeit(lambda i: torch.ops.aten._weight_int4pack_mm_for_cpu(xs, wis[i % len(wis)], 32, sz),
                                 len(wis), args.min_s)
                    # int4 codes + bf16 scale and zero per 32: 4.5 bits a weight, as Q4_K's
                    row["torch_int4_GBps"] = round((wi.numel() + sz.numel() * 2) / sec / 1e9, 2)
                    del wis
                else:
                    sec = timeit(lambda i: F.linear(xs, wb), 2, args.min_s)
                    row["torch_bf16_GFLOPs"] = round(flop / sec / 1e9, 1)
                    sec = timeit(lambda i: torch.ops.aten._weight_int4pack_mm_for_cpu(xs, wi, 32, sz), 2, args.min_s)
                    row["torch_int4_GFLOPs"] = round(flop / sec / 1e9, 1)
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
    if args.model:
        model_pass(args, report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
