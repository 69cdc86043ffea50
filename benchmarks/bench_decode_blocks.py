"""A/B in one process: decoding with the fused native blocks (ops.decoder_layer: a layer's norms,
projections and the small ops between them in one native call; ops.swiglu_mlp and
ops.rope_cache_attention_block where the layer is not fused whole) against the separate ops (each
projection a module call, then add_rms_norm / silu_mul / rope_cache_attention).

The two variants alternate on the same loaded model, --rounds times, each round decoding --tokens
greedy tokens after a 128-token prompt; it prints the best and median tok/s of each, their ratio,
and the CPU time per token (process CPU seconds: robust to other processes on a shared machine,
at --threads 1 especially). Both variants produce the same tokens (checked).

    PYTHONPATH=src python benchmarks/bench_decode_blocks.py                      # default Q4_1 GGUF
    PYTHONPATH=src python benchmarks/bench_decode_blocks.py --model smollm2-int8 --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["smollm2-q4_1", "smollm2-int8"], default="smollm2-q4_1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=48)
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    sys.path.insert(0, str(HERE))
    import models

    import ember
    from ember import kernels
    from ember.nn import ops

    if a.model == "smollm2-q4_1":
        llm = ember.load(models.smollm2_gguf())
    else:
        llm = ember.load(models.smollm2_hf_bf16(), quantize="int8")
    ids = list(range(100, 228))
    separate = {"decoder_layer": None, "swiglu_mlp": None, "rope_cache_attention_block": None}

    def decode() -> tuple[float, float, list[int]]:
        req = llm.request(ids, a.tokens, ignore_eos=True)
        times, toks, cpu = [], [], []
        for ev in llm.events([req]):
            times.append(time.perf_counter())
            cpu.append(time.process_time())
            toks.append(ev.token_id)
        n = len(times) - 1
        return n / (times[-1] - times[0]), (cpu[-1] - cpu[0]) / n * 1e3, toks

    res: dict = {"fused": [], "separate": []}
    tokens = {}
    decode()  # warm-up
    for r in range(a.rounds):
        for name in (("fused", "separate") if r % 2 == 0 else ("separate", "fused")):
            with ops.using(separate if name == "separate" else {}):
                tps, cpu_ms, toks = decode()
            res[name].append((tps, cpu_ms))
            tokens[name] = toks
    assert tokens["fused"] == tokens["separate"], "the variants decoded different tokens"
    print(f"{a.model}, {a.threads} thread(s), ISA {kernels.isa()}, {a.rounds} alternating rounds of {a.tokens} tokens "
          f"(measured under whatever load the machine has)")
    for name, rows in res.items():
        tps = [t for t, _ in rows]
        cpu = [c for _, c in rows]
        print(f"  {name:9s} tok/s best {max(tps):6.1f} median {statistics.median(tps):6.1f};"
              f" CPU ms/token best {min(cpu):6.2f} median {statistics.median(cpu):6.2f}")
    f, s = res["fused"], res["separate"]
    print(f"  fused / separate: tok/s best {max(t for t, _ in f) / max(t for t, _ in s):.3f}x, "
          f"median {statistics.median(t for t, _ in f) / statistics.median(t for t, _ in s):.3f}x; "
          f"CPU per token (best) {min(c for _, c in f) / min(c for _, c in s):.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
