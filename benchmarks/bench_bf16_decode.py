"""bf16 decode and prefill on CPU, interleaved in one process so that a shared machine's load hits
every contender alike: ember's default path for a bf16 checkpoint (per phase: the decoder layer as
one native call over the plain bf16 weights for decode, the same weights in bf16 matmuls for prefill) against
ember's previous path (oneDNN-prepacked Linears and the separate ops, `--no-old` to skip),
transformers bf16, and llama.cpp BF16 (`--llama-bench`, a subprocess per round). Best of --rounds
each (decode timed after WARM tokens); ratios to ember's default.

    python benchmarks/bench_bf16_decode.py --llama-bench /root/llama/build-avx512/bin/llama-bench
    python benchmarks/bench_bf16_decode.py --isa avx2 --llama-bench /root/llama/build-avx2/bin/llama-bench

--isa avx2 must be applied before torch starts, so the script re-executes itself with the caps
bench_cpu.py sets. Model: SmolLM2-135M-Instruct bf16 (benchmarks/models.py).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# decode tokens left out of the timing: the first steps fault in weight pages the prefill did not
# read (ember's decode path reads the plain bf16 weights, its prefill the prepacked copy), and a
# machine that pages out cold file-backed memory evicts them between rounds
WARM = 4
AVX2_ENV = dict(EMBER_CPU_ISA="avx2", ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2", MKL_ENABLE_INSTRUCTIONS="AVX2",
                FBGEMM_ENABLE_INSTRUCTIONS="AVX2")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--isa", choices=["native", "avx2"], default="native")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--decode", type=int, default=32, help="tokens decoded per round (after a 128-token prompt)")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--llama-bench", help="llama-bench built for the ISA measured (the BF16 GGUF row)")
    ap.add_argument("--no-old", action="store_true", help="skip ember's previous (prepacked, separate ops) path")
    ap.add_argument("--no-transformers", action="store_true")
    a = ap.parse_args()
    if a.isa == "avx2" and os.environ.get("EMBER_CPU_ISA") != "avx2":
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_ENV})

    import torch

    torch.set_num_threads(a.threads)
    import ember
    from ember import transforms

    sys.path.insert(0, str(HERE))
    import models

    path = models.smollm2_hf_bf16()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(10, 30000, (max(a.prefill, 128),), generator=g).tolist()
    runners = {}

    new = ember.load(path)
    runners["ember"] = _ember(new, prompt, a)
    print(f"ember transforms: {', '.join(new._loaded.transforms)}; ISA {a.isa}; {a.threads} threads", flush=True)
    if not a.no_old:
        plan = transforms.plan
        native_bf16 = transforms.bf16_native()  # the old path: oneDNN-prepacked Linears (native bf16)
        transforms.plan = lambda *p, **k: [
            transforms.PREPACK if native_bf16 and s in (transforms.NATIVE_BF16_PREPACK, transforms.NATIVE_BF16) else s
            for s in plan(*p, **k)]
        old = ember.load(path)
        transforms.plan = plan
        old_ops = {"decoder_layer": None}  # the separate ops, as before the fused bf16 layer
        runners["ember (old path)"] = _ember(old, prompt, a, old_ops)
        print(f"old path transforms: {', '.join(old._loaded.transforms)}", flush=True)
    if not a.no_transformers:
        runners["transformers"] = _transformers(path, prompt, a)
    if a.llama_bench:
        gguf = path.parent.parent / "smollm2" / "SmolLM2-135M-Instruct.BF16.gguf"
        if not gguf.is_file():
            raise SystemExit(f"{gguf} is missing: make it with bench_cpu.py (llama-quantize ... BF16)")
        runners["llama.cpp BF16"] = _llama(a.llama_bench, gguf, a)

    best = {k: {"decode": 0.0, "prefill": 0.0} for k in runners}
    for r in range(a.rounds):
        for name, run in runners.items():
            for k, v in run().items():
                best[name][k] = max(best[name][k], v)
        ours = best["ember"]
        print(f"round {r + 1}: " + "; ".join(
            f"{n} decode {b['decode']:.1f} ({ours['decode'] / b['decode']:.2f}x) prefill {b['prefill']:.0f} "
            f"({ours['prefill'] / b['prefill']:.2f}x)" if n != "ember" else
            f"ember decode {b['decode']:.1f} prefill {b['prefill']:.0f}" for n, b in best.items()), flush=True)
    print(json.dumps(best))
    return 0


def _ember(llm, prompt, a, use_ops=None):
    from contextlib import nullcontext

    from ember.nn import ops

    def run():
        with ops.using(use_ops) if use_ops else nullcontext():
            req = llm.request(prompt[:128], a.decode + WARM, ignore_eos=True)
            times = [time.perf_counter() for _ in llm.events([req])][WARM:]
            decode = (len(times) - 1) / (times[-1] - times[0])
            req = llm.request(prompt[:a.prefill], 1, ignore_eos=True)
            t = time.perf_counter()
            list(llm.events([req]))
            return {"decode": decode, "prefill": a.prefill / (time.perf_counter() - t)}
    return run


def _transformers(path, prompt, a):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()

    def run():
        with torch.inference_mode():
            out = model(torch.tensor([prompt[:128]]), use_cache=True, logits_to_keep=1)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            times = []
            for _ in range(a.decode + WARM):
                out = model(tok, past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
                times.append(time.perf_counter())
            t = time.perf_counter()
            model(torch.tensor([prompt[:a.prefill]]), logits_to_keep=1)
            times = times[WARM:]
            return {"decode": (len(times) - 1) / (times[-1] - times[0]), "prefill": a.prefill / (time.perf_counter() - t)}
    return run


def _llama(binary, gguf, a):
    def run():
        out = subprocess.run([binary, "-m", str(gguf), "-t", str(a.threads), "-p", str(a.prefill), "-n", str(a.decode),
                              "-r", "1", "-o", "json"], capture_output=True, text=True, timeout=900)
        if out.returncode != 0:
            raise SystemExit(f"llama-bench failed: {out.stderr[-2000:]}")
        res = {}
        for row in json.loads(out.stdout):
            res["prefill" if row.get("n_gen", 0) == 0 else "decode"] = row["avg_ts"]
        return res
    return run


if __name__ == "__main__":
    sys.exit(main())
