"""A mixture-of-experts GGUF in several quantisations against the same model in bf16: resident memory
and greedy decode tokens/s, each in a fresh process, in the same run.

    python benchmarks/bench_gguf_moe.py                   # a random Qwen3-MoE, hidden 1024, 32 experts
    python benchmarks/bench_gguf_moe.py --hidden 512 --experts 8 --layers 2 --tokens 16   # a smoke run

No MoE GGUF can be fetched here (no Hub), so the model is a random transformers Qwen3-MoE converted
as llama.cpp's converter writes it (tests/ggufmake.py): the numbers measure ember's loading and
compute paths (which the weights' values do not change), not a trained model's text. Rows:

  transformers bf16   the transformers model itself, bf16
  ember BF16 GGUF     ember on the BF16 GGUF (no quantisation)
  ember Q8_0 / Q4_K / IQ4_XS / MXFP4-experts GGUF
                      ember's default load: experts and linears kept as the file's blocks (native
                      kernels where the type has one, else dequantised once)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(kind: str, path: str, tokens: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    prompt = list(range(10, 42))
    if kind == "transformers":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        dt = time.perf_counter() - t0
        return {"tok_s": (out.shape[1] - len(prompt)) / dt, "rss_mb": _rss_mb(), "mode": "bf16"}
    import ember

    llm = ember.load(path, device="cpu")
    req = llm.request(prompt, tokens, ignore_eos=True)
    times = [time.perf_counter() for ev in llm.events([req]) if ev.token_id is not None]
    return {"tok_s": (len(times) - 1) / (times[-1] - times[0]), "rss_mb": _rss_mb(),
            "mode": f"{llm._loaded.load_mode} {','.join(llm._loaded.transforms)}"}


def run(kind: str, path: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, str(path), "--tokens", str(args.tokens), "--threads",
           str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.tokens, args.threads)))
        return

    sys.path.insert(0, str(HERE.parent / "tests"))
    import torch
    import transformers as tf

    import ggufmake as gm
    from ember.io import ggml, iquants

    torch.manual_seed(0)
    cfg = tf.Qwen3MoeConfig(vocab_size=4096, hidden_size=args.hidden, intermediate_size=args.hidden,
                            moe_intermediate_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=8,
                            num_key_value_heads=4, head_dim=args.hidden // 8, num_experts=args.experts,
                            num_experts_per_tok=args.top_k, norm_topk_prob=True, max_position_embeddings=512)
    model = tf.Qwen3MoeForCausalLM(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        model.to(torch.bfloat16).save_pretrained(d / "hf")
        files = {
            "BF16": gm.hf_to_gguf(model.float(), d / "bf16.gguf", qtype=30, tokenizer=False),
            "Q8_0": gm.hf_to_gguf(model, d / "q8.gguf", qtype=ggml.Q8_0, tokenizer=False),
            "Q4_K": gm.hf_to_gguf(model, d / "q4k.gguf", qtype=ggml.Q4_K, tokenizer=False),
            "IQ4_XS": gm.hf_to_gguf(model, d / "iq4xs.gguf", qtype=iquants.IQ4_XS, tokenizer=False),
            "MXFP4 experts, Q8_0 rest": gm.hf_to_gguf(
                model, d / "mxfp4.gguf", tokenizer=False,
                qtype=lambda n: iquants.MXFP4 if n.endswith("_exps.weight") else ggml.Q8_0),
        }
        rows = [("transformers bf16 (safetensors)", run("transformers", d / "hf", args))]
        for name, p in files.items():
            rows.append((f"ember {name} GGUF ({p.stat().st_size / 2**20:.0f} MiB)", run("ember", p, args)))
    base = rows[0][1]
    print(f"Qwen3-MoE random: hidden {args.hidden}, {args.layers} layers, {args.experts} experts (top {args.top_k}); "
          f"{args.tokens} tokens, {args.threads} threads")
    print(f"{'run':46} {'decode tok/s':>12} {'vs bf16':>8} {'peak RSS MiB':>13} {'vs bf16':>8}  mode")
    for name, r in rows:
        print(f"{name:46} {r['tok_s']:12.1f} {r['tok_s'] / base['tok_s']:7.2f}x {r['rss_mb']:13.0f} "
              f"{r['rss_mb'] / base['rss_mb']:7.2f}x  {r['mode']}")


if __name__ == "__main__":
    main()
