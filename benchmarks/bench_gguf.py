"""ember on a GGUF file against llama.cpp (llama-cpp-python, when installed) and transformers on the
same file: load time, time to first token from process start, decode tokens/s, peak memory.

    python benchmarks/bench_gguf.py                       # the default model (SmolLM2-135M-Instruct Q4_1)
    python benchmarks/bench_gguf.py path/to/model.gguf --tokens 64 --threads 2
    python benchmarks/bench_gguf.py --only ember          # ember's loading modes only

Every run is a fresh process (so "first token" counts interpreter start, imports, load and
prefill, and peak RSS is that run's alone); runs are repeated `--repeat` times and the best is kept.
ember runs in its loading modes: the default (`keep_quantized=None`), all kept quantised, all dequantised at load,
in float32 and bfloat16. Greedy decoding, ignore EOS, a fixed prompt.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


# ---- workers (run in a subprocess) ------------------------------------------------------------
def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_ember(args, t_start: float) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import ember

    t_import = time.time()
    kw = {}
    if args.packed != "auto":
        kw["keep_quantized"] = args.packed == "packed"
    if args.dtype != "auto":
        kw["dtype"] = args.dtype
    llm = ember.load(args.model, device="cpu", **kw)
    t_load = time.time()
    ids = llm.tokenizer.encode_chat([{"role": "user", "content": PROMPT}]) if llm.tokenizer.chat_template else llm.encode(PROMPT)
    req = llm.request(ids, args.tokens, ignore_eos=True)
    times = []
    for ev in llm.events([req]):
        if ev.token_id is not None:
            times.append(time.time())
    return {
        "import_s": t_import - t_start, "load_s": t_load - t_import, "first_token_s": times[0] - t_start,
        "decode_tok_s": (len(times) - 1) / (times[-1] - times[0]), "tokens": len(times), "prompt_tokens": len(ids),
        "peak_rss_mb": _rss_mb(), "mode": llm._loaded.load_mode or "?", "dtype": str(llm.dtype).replace("torch.", ""),
    }


def worker_transformers(args, t_start: float) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer  # noqa: F401

    t_import = time.time()
    folder, name = os.path.dirname(os.path.abspath(args.model)), os.path.basename(args.model)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    t_load = time.time()
    if tok.chat_template:
        ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    else:
        ids = tok(PROMPT, return_tensors="pt").input_ids
    times = []

    class Clock:
        def put(self, value):
            times.append(time.time())

        def end(self):
            pass

    with torch.no_grad():
        model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False, streamer=Clock(),
                       pad_token_id=tok.eos_token_id)
    times = times[1:]  # the first put() is the prompt
    return {
        "import_s": t_import - t_start, "load_s": t_load - t_import, "first_token_s": times[0] - t_start,
        "decode_tok_s": (len(times) - 1) / (times[-1] - times[0]), "tokens": len(times), "prompt_tokens": ids.shape[1],
        "peak_rss_mb": _rss_mb(), "mode": "GgufConfig default (dequantised)", "dtype": "float32",
    }


def worker_llamacpp(args, t_start: float) -> dict:
    from llama_cpp import Llama

    t_import = time.time()
    llm = Llama(model_path=args.model, n_ctx=1024, n_threads=args.threads, verbose=False)
    t_load = time.time()
    msgs = [{"role": "user", "content": PROMPT}]
    times = []
    for _ in llm.create_chat_completion(msgs, max_tokens=args.tokens, temperature=0.0, stream=True):
        times.append(time.time())
    times = times[1:]  # the first chunk carries only the role
    return {
        "import_s": t_import - t_start, "load_s": t_load - t_import, "first_token_s": times[0] - t_start,
        "decode_tok_s": (len(times) - 1) / (times[-1] - times[0]), "tokens": len(times), "prompt_tokens": None,
        "peak_rss_mb": _rss_mb(), "mode": "llama.cpp", "dtype": "native",
    }


WORKERS = {"ember": worker_ember, "transformers": worker_transformers, "llama.cpp": worker_llamacpp}


# ---- driver ------------------------------------------------------------------------------------
def run_one(args, engine: str, packed: str = "auto", dtype: str = "auto") -> dict | None:
    cmd = [sys.executable, __file__, args.model, "--worker", engine, "--tokens", str(args.tokens), "--threads",
           str(args.threads), "--packed", packed, "--dtype", dtype, "--t-start"]
    best = None
    for _ in range(args.repeat):
        t0 = time.time()
        r = subprocess.run(cmd + [repr(t0)], capture_output=True, text=True)
        if r.returncode != 0:
            print(f"  {engine} {packed} {dtype}: failed\n{r.stderr[-1500:]}", file=sys.stderr)
            return None
        res = json.loads(r.stdout.strip().splitlines()[-1])
        if best is None or res["decode_tok_s"] > best["decode_tok_s"]:
            best = res
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="a .gguf file (default: ember's default model)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--only", choices=["ember", "transformers", "llama.cpp"])
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--packed", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--t-start", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.model is None:
        from ember.fixtures import default_model

        args.model = default_model()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args, args.t_start or time.time())))
        return

    import platform

    print(f"model {args.model} ({os.path.getsize(args.model) / 1e6:.0f} MB), {args.tokens} tokens greedy, "
          f"{args.threads} threads, {platform.processor() or platform.machine()}, best of {args.repeat}")
    runs = []
    if args.only in (None, "ember"):
        for packed, dtype in (("auto", "auto"), ("packed", "float32"), ("dequant", "float32"), ("packed", "bfloat16"),
                              ("dequant", "bfloat16")):
            runs.append((f"ember packed={packed} dtype={dtype}", run_one(args, "ember", packed, dtype)))
    if args.only in (None, "llama.cpp"):
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("llama.cpp: llama_cpp (llama-cpp-python) is not installed; skipped")
        else:
            runs.append(("llama.cpp (llama-cpp-python)", run_one(args, "llama.cpp")))
    if args.only in (None, "transformers"):
        runs.append(("transformers (GGUF, dequantised f32)", run_one(args, "transformers")))
    print(f"\n{'engine':46} {'load s':>7} {'1st tok s':>9} {'tok/s':>7} {'RSS MB':>7}  mode")
    for name, r in runs:
        if r is None:
            print(f"{name:46} failed")
            continue
        print(f"{name:46} {r['load_s']:7.2f} {r['first_token_s']:9.2f} {r['decode_tok_s']:7.1f} {r['peak_rss_mb']:7.0f}  "
              f"{r['mode']} ({r['dtype']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({name: r for name, r in runs}, f, indent=1)


if __name__ == "__main__":
    main()
