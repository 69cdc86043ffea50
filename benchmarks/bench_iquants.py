"""Dequantisation speed of the i-quants, TQ1_0/TQ2_0 and MXFP4: ember (ember.io.iquants, vectorised
torch) against gguf.quants (the `gguf` package's numpy reference) on the same random blocks, in the
same process; the two outputs are checked bit-identical first.

    python benchmarks/bench_iquants.py                 # 4 Mi values per type, 1 thread
    python benchmarks/bench_iquants.py --mvalues 16 --threads 4

(On a machine shared by many processes, more than one thread measures OpenMP's waits, not the code.)

Prints, per type: millions of values dequantised per second by each, and ember's speed-up.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mvalues", type=float, default=4, help="millions of values per type")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    import gguf
    import numpy as np
    import torch

    import ggufmake as gm
    from ember.io import ggml

    torch.set_num_threads(args.threads)
    print(f"{'type':8} {'ember Mval/s':>13} {'gguf.quants Mval/s':>19} {'ember / gguf':>13}")
    for t in ggml.IQUANT_TYPES:
        n, _ = ggml.block_size(t)
        rows = max(1, int(args.mvalues * 1e6) // (16 * 256))
        raw = gm.random_blocks(t, rows, 16 * 256 // n, seed=t)
        shape = (rows, 16 * 256)
        data = torch.from_numpy(raw)
        ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(t))
        assert np.array_equal(ggml.dequantize(data, t, shape).numpy(), ref), ggml.type_name(t)
        a = best_of(lambda: ggml.dequantize(data, t, shape), args.repeat)
        b = best_of(lambda: gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(t)), args.repeat)
        values = rows * 16 * 256 / 1e6
        print(f"{ggml.type_name(t):8} {values / a:13.1f} {values / b:19.1f} {b / a:12.2f}x")


if __name__ == "__main__":
    main()
