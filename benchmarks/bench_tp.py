"""Tensor parallelism on CPU: one model split over 2 ranks (gloo) against the same model in 1 process,
in the same run: decode tokens/s (batch 1, greedy) and each rank's resident memory.

    python benchmarks/bench_tp.py                       # a random Llama (~100M params, fp32) made here
    python benchmarks/bench_tp.py --model FOLDER --tokens 64

Each configuration runs in fresh processes started by torch's elastic launcher (what torchrun and
`ember run --tp N` use), with the machine's cores shared out between the ranks. On a CPU both ranks
compete for the same memory bandwidth, so this measures the overhead of the split (all-reduces per
layer, logits gathering) as much as any speed-up; the memory figures are what tensor parallelism is for.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import uuid


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MB (VmRSS, VmHWM: ru_maxrss would carry the
    launching process's peak over into its children)."""
    with open("/proc/self/status") as f:
        kb = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if k in ("VmRSS", "VmHWM")}
    return kb["VmRSS"] / 1e3, kb["VmHWM"] / 1e3


def worker(folder: str, tp: int, tokens: int) -> dict:
    import time

    import torch

    import ember

    llm = ember.load(folder, dtype=torch.float32, **({"tp": tp} if tp > 1 else {}))
    weights = sum(p.numel() * p.element_size() for p in llm.model.parameters()) / 1e6
    prompt = list(range(10, 42))
    llm.generate(prompt, 8, ignore_eos=True)  # warm-up
    t0 = time.perf_counter()
    llm.generate(prompt, 1, ignore_eos=True)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    llm.generate(prompt, tokens + 1, ignore_eos=True)
    decode = time.perf_counter() - t0 - prefill
    rss, peak = rss_mb()
    return {"decode_tok_s": tokens / decode, "weights_MB": weights, "rss_MB": rss, "peak_rss_MB": peak,
            "threads": torch.get_num_threads()}


def run(folder: str, tp: int, tokens: int, threads: int) -> dict:
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=tp, run_id=str(uuid.uuid4()), rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", max_restarts=0)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    return elastic_launch(config, worker)(folder, tp, tokens)


def make_model(folder: str) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                      num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=512)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a Hugging Face folder (default: a random Llama made in a temporary folder)")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--tp", type=int, default=2)  # (cores // tp threads per rank)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = a.model or make_model(tmp)
        cores = os.cpu_count() or 1
        # 1 rank on all the cores, and on as many as one rank of the split gets
        one = run(folder, 1, a.tokens, cores)[0]
        one_narrow = run(folder, 1, a.tokens, max(1, cores // a.tp))[0]
        split = run(folder, a.tp, a.tokens, max(1, cores // a.tp))
    rows = {"tp=1": one, "tp=1 narrow": one_narrow, **{f"tp={a.tp} rank {r}": v for r, v in sorted(split.items())}}
    for name, v in rows.items():
        print(f"{name:<12} " + "  ".join(f"{k} {x:.1f}" if isinstance(x, float) else f"{k} {x}" for k, x in v.items()))
    print(f"ratio tp={a.tp}/tp=1: decode tok/s {split[0]['decode_tok_s'] / one['decode_tok_s']:.2f}x "
          f"({split[0]['decode_tok_s'] / one_narrow['decode_tok_s']:.2f}x against 1 rank on {max(1, cores // a.tp)} "
          f"core(s)), "
          f"rank 0 weights {split[0]['weights_MB'] / one['weights_MB']:.2f}x, "
          f"rank 0 peak RSS {split[0]['peak_rss_MB'] / one['peak_rss_MB']:.2f}x")
    print(json.dumps({"tp1": one, "tp1_narrow": one_narrow, "split": split}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
