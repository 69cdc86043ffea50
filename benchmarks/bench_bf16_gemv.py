"""The bf16 decode GEMV's weight streaming in GB/s: every projection of SmolLM2-135M (30 layers' q/k/v
960x576, o 576x576, gate/up 3072x576, down 576x1536, and the 49152x576 tied head: 269 MB, well past
any cache) through `ember.kernels.bf16_linear` on each ISA path this machine runs, with the weights
in ordinary allocations (4 KiB pages where THP is `madvise`) and in one transparent-huge-page region
(`ember.backends.native.huge_page_copies`, what `ember.load` gives the decode weights), against
torch's bf16 F.linear on the same weights (transformers' decode matmuls) and torch's read bandwidth
(a float32 sum of as many bytes). Interleaved rounds, best of --rounds; one x row (bf16: a bf16
model's activations).

    python benchmarks/bench_bf16_gemv.py               # this CPU's ISAs
    python benchmarks/bench_bf16_gemv.py --isa avx2    # torch, oneDNN, MKL and ember capped to AVX2
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # one layer's projections [N, K]
LAYERS, VOCAB, HIDDEN = 30, 49152, 576


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--isa", choices=["native", "avx2"], default="native")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=8)
    a = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from bench_bf16_decode import AVX2_ENV

    if a.isa == "avx2" and os.environ.get("EMBER_CPU_ISA") != "avx2":
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_ENV})

    import torch
    import torch.nn.functional as F

    from ember import kernels
    from ember.backends.native import huge_page_copies

    torch.set_num_threads(a.threads)
    if not kernels.available():
        raise SystemExit("ember's native kernels are unavailable here")
    g = torch.Generator().manual_seed(0)
    plain = [(torch.randn(n, k, generator=g) * k ** -0.5).bfloat16() for _ in range(LAYERS) for n, k in SHAPES]
    plain.append((torch.randn(VOCAB, HIDDEN, generator=g) * 0.05).bfloat16())
    huge = []  # the copies, in order (none where huge pages are not to be had)
    huge_page_copies(list(plain), lambda old, new: huge.append(new))
    total = sum(w.numel() * w.element_size() for w in plain)
    xs = {k: torch.randn(1, k, generator=g).bfloat16() for k in {k for _, k in SHAPES}}
    try:
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        thp = "n/a"
    print(f"{total / 1e6:.0f} MB of bf16 weights; {a.threads} threads; ISA cap {a.isa}; THP {thp}; "
          f"huge-page region: {'yes' if huge else 'no (not to be had here)'}", flush=True)

    def ember_pass(ws, isa):
        def run():
            with kernels.use_isa(isa):
                for w in ws:
                    kernels.bf16_linear(xs[w.shape[1]], w)
        return run

    def torch_pass(ws):
        def run():
            for w in ws:
                F.linear(xs[w.shape[1]], w)
        return run

    flat = torch.ones(total // 4)
    contenders = {}
    # the ISAs up to the one in use (EMBER_CPU_ISA caps it); generic, the scalar fallback, is far slower
    paths = [i for i in kernels.ISAS[1:kernels.ISAS.index(kernels.isa()) + 1]]
    for isa in paths:
        label = "avx512_bf16" if isa == "avx512_vnni" else isa  # with AVX512-BF16 and a bf16 x: vdpbf16ps
        contenders[f"ember {label}, 4 KiB pages"] = ember_pass(plain, isa)
        if huge:
            contenders[f"ember {label}, huge pages"] = ember_pass(huge, isa)
    contenders["torch F.linear bf16, 4 KiB pages"] = torch_pass(plain)
    if huge:
        contenders["torch F.linear bf16, huge pages"] = torch_pass(huge)
    contenders["torch sum (read bandwidth)"] = flat.sum
    for run in contenders.values():
        run()  # warm: page in, build oneDNN's kernels
    best = dict.fromkeys(contenders, float("inf"))
    for _ in range(a.rounds):
        for name, run in contenders.items():
            t = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - t)
    read = total / best["torch sum (read bandwidth)"]
    for name, s in best.items():
        print(f"{name:36s} {s * 1e3:7.2f} ms  {total / s / 1e9:5.1f} GB/s  {total / s / read:4.2f}x read bandwidth")
    return 0


if __name__ == "__main__":
    sys.exit(main())
