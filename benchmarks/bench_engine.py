"""The decode engine against transformers, same weights, same run.

    python benchmarks/bench_engine.py --config llama-1b --batches 1,32            # GPU: eager, CUDA graphs
    python benchmarks/bench_engine.py --config llama-1b --variants graphs,compiled
    python benchmarks/bench_engine.py --config smollm2-135m --device cpu --batches 1

Weights are random (a preset shape, no download), created once in a transformers model and handed
to ember through a VarBuilder over its state dict, so both sides run identical weights. Prints
decode tok/s per batch size for each ember variant and for transformers' generate, ratios, and the
achieved bandwidth as a share of the device's measured copy bandwidth.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ember import registry  # noqa: E402
from ember.engine import Engine  # noqa: E402
from ember.engine.bench import bench, copy_bandwidth  # noqa: E402
from ember.engine.presets import PRESETS  # noqa: E402
from ember.varbuilder import VarBuilder  # noqa: E402


def hf_model(preset: str, dtype, device):
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = dict(PRESETS[preset])
    mt = raw.pop("model_type")
    cfg = AutoConfig.for_model(mt, **raw)
    torch.manual_seed(0)
    with torch.device(device):
        m = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return m.eval()


def llamacpp_bf16(out: Path) -> Path:
    """SmolLM2-135M-Instruct as a BF16 GGUF for llama.cpp, made once from the default model's Q4_1
    file with llama.cpp's own quantize (requantising: the values are the Q4_1 ones, the layout and
    every byte streamed per token are those of a BF16 model, which is what decode speed depends on)."""
    import llama_cpp

    from ember.fixtures import default_model

    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_BF16
        params.allow_requantize = True
        tmp = out.with_suffix(".tmp")
        rc = llama_cpp.llama_model_quantize(str(default_model()).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize failed ({rc})")
        tmp.replace(out)
    return out


def llamacpp_decode(path: Path, prompt_len: int, gen_len: int, vocab: int, threads: int) -> float:
    """llama.cpp's greedy decode tok/s at batch 1 after a random prompt of prompt_len tokens."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=prompt_len + gen_len + 16, n_threads=threads, n_batch=512, verbose=False)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, min(vocab, llm.n_vocab()), (prompt_len,), generator=g).tolist()
    best = 0.0
    for _ in range(2):
        llm.reset()
        times = []
        for _tok in llm.generate(prompt, temp=0.0, reset=True):
            times.append(time.perf_counter())
            if len(times) == gen_len:
                break
        best = max(best, (len(times) - 1) / (times[-1] - times[0]))
    return best


def ember_from_hf(preset: str, hf, dtype, device):
    from ember import transforms
    from ember.loading import build

    raw = dict(PRESETS[preset])
    entry = registry.lookup(raw)
    cfg = entry.parse_config(raw)
    vb = VarBuilder.from_tensors(hf.state_dict(), dtype, device)
    model = build(entry, cfg, vb)  # as ember.load builds it (prepacked bf16 Linears on CPU)
    transforms.apply(model, transforms.plan(entry.task, dtype, torch.device(device)))
    return model


def hf_decode(hf, batch: int, prompt_len: int, gen_len: int, vocab: int, device) -> float:
    ids = torch.randint(0, vocab, (batch, prompt_len), device=device)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        hf.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)
        sync(device)
        t = time.perf_counter()
        hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        sync(device)
        one = time.perf_counter() - t
        t = time.perf_counter()
        hf.generate(ids, max_new_tokens=gen_len, min_new_tokens=gen_len, **kw)
        sync(device)
        total = time.perf_counter() - t
    return batch * (gen_len - 1) / (total - one)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def greedy_agreement(model, hf, vocab, device, n=32) -> dict:
    """bf16 sanity check: logits distance on a prompt, and how many greedy tokens agree."""
    from ember.generation.loop import Generator, Request

    prompt = torch.randint(0, vocab, (1, 24), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.inference_mode():
        a = hf(prompt).logits.float()
        b = model(prompt)
        rel = ((a - b).norm() / a.norm()).item()
        want = hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                           eos_token_id=None)[0, 24:].tolist()
    g = Generator(model, None, max_batch=1, max_len=64, device=device)
    got = [e.token_id for e in g.run([Request(prompt[0].tolist(), n, ignore_eos=True)])]
    same = next((i for i, (x, y) in enumerate(zip(want, got)) if x != y), n)
    return {"logits_rel_err_vs_transformers": rel, "greedy_tokens_agreeing": same}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="llama-1b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--variants", default="eager,graphs",
                    help="comma list of eager, graphs, compiled (max-autotune-no-cudagraphs), compiled_default")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--llama-cpp", action="store_true",
                    help="smollm2-135m on CPU: also llama.cpp (llama-cpp-python) on a BF16 GGUF of the same shape")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    batches = tuple(int(x) for x in args.batches.split(","))
    t = time.perf_counter()
    hf = hf_model(args.config, dtype, device)
    model = ember_from_hf(args.config, hf, dtype, device)
    vocab = PRESETS[args.config]["vocab_size"]
    results = {"config": args.config, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "build_s": time.perf_counter() - t,
               "copy_bandwidth_GBs": copy_bandwidth(device) / 1e9}
    results.update(greedy_agreement(model, hf, vocab, device))
    print(json.dumps(results), flush=True)
    for variant in args.variants.split(","):
        eng = Engine(model, None, [], max_batch=max(batches), max_len=args.prompt + args.tokens + 8,
                     cuda_graphs=variant != "eager",
                     compile={"compiled": True, "compiled_default": "default"}.get(variant, False))
        r = bench(model, None, device=device, dtype=dtype, batches=batches, prompt_len=args.prompt,
                  gen_len=args.tokens, prefill_len=512 if args.prompt + args.tokens + 8 >= 512 else args.prompt,
                  engine=eng, label=args.config)
        results[variant] = {k: v for k, v in r.items() if k not in ("model", "device", "dtype", "gpu")}
        print(variant, json.dumps(results[variant]), flush=True)
        del eng
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not args.no_transformers:
        results["transformers"] = {f"decode_b{b}_tok_s": hf_decode(hf, b, args.prompt, args.tokens, vocab, device)
                                   for b in batches}
        print("transformers", json.dumps(results["transformers"]), flush=True)
    if args.llama_cpp:
        if args.config != "smollm2-135m" or device.type != "cpu":
            raise SystemExit("--llama-cpp: only for --config smollm2-135m on --device cpu")
        path = llamacpp_bf16(Path.home() / ".cache" / "ember-fixtures" / "bench" / "SmolLM2-135M-Instruct.BF16.gguf")
        results["llama.cpp bf16"] = {"decode_b1_tok_s": llamacpp_decode(path, args.prompt, args.tokens, vocab,
                                                                       torch.get_num_threads())}
        print("llama.cpp bf16", json.dumps(results["llama.cpp bf16"]), flush=True)
    from ember.engine.bench import weight_bytes

    wb = weight_bytes(model)
    print(f"\n{args.config} {args.dtype} on {results['device']}, weights {wb / 1e9:.2f} GB, "
          f"copy bandwidth {results['copy_bandwidth_GBs']:.0f} GB/s, "
          f"limit ~{results['copy_bandwidth_GBs'] * 1e9 / wb:.0f} tok/s at batch 1")
    print(f"{'variant':<14}" + "".join(f"{'b' + str(b) + ' tok/s':>14}{'%bw':>7}" for b in batches))
    peers = ([] if args.no_transformers else ["transformers"]) + (["llama.cpp bf16"] if args.llama_cpp else [])
    for variant in args.variants.split(",") + peers:
        r = results[variant]
        row = f"{variant:<14}"
        for b in batches:
            row += f"{r.get(f'decode_b{b}_tok_s', float('nan')):>14.1f}{r.get(f'decode_b{b}_pct_copy_bw', float('nan')):>7.1f}"
        print(row)
    if args.llama_cpp:
        for variant in args.variants.split(","):
            print(f"{variant} / llama.cpp bf16: b1 "
                  f"{results[variant]['decode_b1_tok_s'] / results['llama.cpp bf16']['decode_b1_tok_s']:.2f}x")
    if not args.no_transformers:
        for variant in args.variants.split(","):
            print(f"{variant} / transformers: " + ", ".join(
                f"b{b} {results[variant][f'decode_b{b}_tok_s'] / results['transformers'][f'decode_b{b}_tok_s']:.1f}x"
                for b in batches))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"bench_engine_{args.config}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
