"""State-space models: ember against transformers on the same random checkpoint, in the same run:
prefill time of a prompt and greedy decode tokens/s (fp32, CPU; transformers without the mamba_ssm /
causal_conv1d kernels, which need CUDA, runs its own PyTorch paths).

    python benchmarks/bench_ssm.py                          # Mamba, Mamba-2, Granite 4, LFM2 at hidden 512
    python benchmarks/bench_ssm.py --hidden 128 --layers 2 --tokens 16 --prompt 64   # a smoke run

No trained checkpoint can be fetched here (no Hub): the weights are random, which changes neither
side's arithmetic. Rows are ember / transformers ratios (> 1: ember faster).
"""
from __future__ import annotations

import argparse
import tempfile
import time


def families(h: int, layers: int) -> dict:
    return {
        "mamba": ("MambaConfig", dict(hidden_size=h, state_size=16, num_hidden_layers=layers)),
        "mamba2": ("Mamba2Config", dict(hidden_size=h, num_heads=h // 32, head_dim=64, state_size=64, n_groups=1,
                                        num_hidden_layers=layers, chunk_size=64)),
        "granitemoehybrid": ("GraniteMoeHybridConfig", dict(
            hidden_size=h, intermediate_size=h, shared_intermediate_size=2 * h, num_hidden_layers=layers,
            layer_types=["attention" if i % 4 == 1 else "mamba" for i in range(layers)], num_attention_heads=8,
            num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, mamba_n_heads=h // 32,
            mamba_d_state=64, mamba_chunk_size=64, max_position_embeddings=4096)),
        "lfm2": ("Lfm2Config", dict(
            hidden_size=h, intermediate_size=3 * h, num_hidden_layers=layers, num_attention_heads=8,
            num_key_value_heads=2, layer_types=["full_attention" if i % 4 == 1 else "conv" for i in range(layers)],
            block_multiple_of=64, max_position_embeddings=4096)),
    }


def best_of(n: int, fn) -> float:
    """The shortest of n timed calls (the machine may be shared)."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args()

    import torch
    import transformers

    import ember

    if args.threads:
        torch.set_num_threads(args.threads)
    prompt = [(7 * i + 3) % 1000 for i in range(args.prompt)]
    print(f"hidden {args.hidden}, {args.layers} layers, prompt {args.prompt}, {args.tokens} tokens, fp32, "
          f"{torch.get_num_threads()} threads")
    print(f"{'family':<18}{'prefill ember s':>16}{'hf s':>8}{'ratio':>7}{'decode ember tok/s':>20}{'hf tok/s':>10}{'ratio':>7}")
    for name, (cls, kw) in families(args.hidden, args.layers).items():
        if args.only and name not in args.only:
            continue
        cfg = getattr(transformers, cls)(vocab_size=1024, pad_token_id=0, bos_token_id=None, eos_token_id=None, **kw)
        torch.manual_seed(0)
        hf = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
        with tempfile.TemporaryDirectory() as d:
            hf.save_pretrained(d)
            llm = ember.load(d, dtype=torch.float32, device="cpu")
        ids = torch.tensor([prompt])
        with torch.no_grad():
            llm.model(ids), hf(ids)  # warm-up
            pe = best_of(3, lambda: llm.model(ids))
            ph = best_of(3, lambda: hf(ids))
            t = time.perf_counter()
            out = hf.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
            th = time.perf_counter() - t
        req = llm.request(prompt, args.tokens, ignore_eos=True)
        times = [time.perf_counter() for ev in llm.events([req]) if ev.token_id is not None]
        de = (len(times) - 1) / (times[-1] - times[0])
        # transformers' generate includes its prefill: take it out
        dh = (out.shape[1] - len(prompt) - 1) / max(th - ph, 1e-9)
        print(f"{name:<18}{pe:>16.3f}{ph:>8.3f}{ph / pe:>7.2f}{de:>20.1f}{dh:>10.1f}{de / dh:>7.2f}")


if __name__ == "__main__":
    main()
