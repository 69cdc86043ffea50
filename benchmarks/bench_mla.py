"""DeepSeek's multi-head latent attention on decode: ember with kv_b_proj absorbed (its default on a
decode step), ember forced to expand the cached latents per head (what it did before, and what
transformers does), and transformers itself, at several context lengths, in the same run. Also the
cache's bytes per token: ember's latent cache against transformers' per-head K/V.

    python benchmarks/bench_mla.py                                   # DeepSeek-V2-Lite's attention shape
    python benchmarks/bench_mla.py --contexts 64 256 --steps 4 --layers 1   # a smoke run

The model is random (no Hub here) with dense MLPs only (first_k_dense_replace = layers), so the
timings are the attention's. Rows: median seconds per decode step (batch 1), and the ratio to
ember's absorbed step.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    import ember
    from ember.models import deepseek

    # DeepSeek-V2-Lite's attention: 16 heads, kv_lora_rank 512, qk_nope 128, qk_rope 64, v 128
    cfg = DeepseekV2Config(vocab_size=1024, hidden_size=2048, intermediate_size=1024, num_hidden_layers=args.layers,
                           num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None,
                           qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, first_k_dense_replace=args.layers,
                           n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                           max_position_embeddings=max(args.contexts) + args.steps + 8)
    torch.manual_seed(0)
    hf = DeepseekV2ForCausalLM(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        llm = ember.load(d, dtype=torch.float32, device="cpu")
    model = llm.model
    choose = deepseek.Attention.absorbs
    print(f"cache bytes per token (fp32): ember {model.kv_bytes_per_token(torch.float32)}, transformers "
          f"{args.layers * 16 * ((128 + 64) + 128) * 4}")
    print(f"{'context':>8} {'ember absorbed':>15} {'ember expanded':>15} {'transformers':>13}  expanded/absorbed  hf/absorbed")
    for S in args.contexts:
        ids = torch.randint(0, cfg.vocab_size, (1, S + args.steps))
        times = {}
        for name, force in (("absorbed", True), ("expanded", False)):
            deepseek.Attention.absorbs = lambda self, T, S_, f=force: f
            cache = model.new_cache(1, S + args.steps)
            with torch.no_grad():
                deepseek.Attention.absorbs = choose  # the prefill as ember runs it
                model(ids[:, :S], position_ids=torch.arange(S)[None], cache=cache, kv_len=S)
                deepseek.Attention.absorbs = lambda self, T, S_, f=force: f
                ts = []
                for t in range(S, S + args.steps):
                    t0 = time.perf_counter()
                    model(ids[:, t:t + 1], position_ids=torch.tensor([[t]]), cache=cache, kv_len=t + 1)
                    ts.append(time.perf_counter() - t0)
            times[name] = statistics.median(ts)
        deepseek.Attention.absorbs = choose
        with torch.no_grad():
            out = hf(ids[:, :S], use_cache=True)
            past, ts = out.past_key_values, []
            for t in range(S, S + args.steps):
                t0 = time.perf_counter()
                out = hf(ids[:, t:t + 1], past_key_values=past, use_cache=True)
                past = out.past_key_values
                ts.append(time.perf_counter() - t0)
        times["hf"] = statistics.median(ts)
        a = times["absorbed"]
        print(f"{S:>8} {a:>15.5f} {times['expanded']:>15.5f} {times['hf']:>13.5f}  "
              f"{times['expanded'] / a:>17.2f}  {times['hf'] / a:>11.2f}")


if __name__ == "__main__":
    main()
