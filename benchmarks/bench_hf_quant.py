"""Quantised Hugging Face checkpoints on CPU: resident memory and decode tokens/s per format against the
same model in bf16, in the same run.

    python benchmarks/bench_hf_quant.py                      # a random Llama (hidden 512, 4 layers)
    python benchmarks/bench_hf_quant.py --hidden 1024 --layers 8 --tokens 64 --threads 2

A random Llama is written once as a bf16 checkpoint and quantised into each format as the Hub lays
it out (tests/hfquant_make.py: GPTQ, AWQ, compressed-tensors W4A16 / W8A8 / FP8, block FP8). Each
run is a fresh process: `ember.load` (its default transforms: integer formats repacked for the
native kernels, FP8 dequantised a slab at a time per forward on CPU), then greedy decoding of
`--tokens` tokens from a 16-token prompt. Memory is the process's resident set after loading
(VmRSS) and its peak (VmHWM), Python and torch included. Ratios are against the bf16 run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FORMATS = ["bf16", "gptq-int4-g128", "awq-int4-g128", "ct-w4a16-g128", "ct-w8a8-int8", "ct-fp8-channel", "fp8-block-128"]


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import ember

    t0 = time.time()
    llm = ember.load(args.folder, device="cpu")
    load_s = time.time() - t0
    rss = _status_mb("VmRSS")
    ids = list(range(3, 19))
    times = []
    for ev in llm.events([llm.request(ids, args.tokens, ignore_eos=True)]):
        if ev.token_id is not None:
            times.append(time.time())
    return {"load_s": load_s, "rss_mb": rss, "peak_mb": _status_mb("VmHWM"),
            "decode_tok_s": (len(times) - 1) / (times[-1] - times[0]), "dtype": str(llm.dtype).replace("torch.", ""),
            "transforms": ",".join(llm._loaded.transforms), "mode": llm._loaded.load_mode or "plain"}


def write_checkpoints(args, root: Path) -> dict[str, Path]:
    import torch

    sys.path.insert(0, str(HERE.parent / "tests"))
    import hfquant_make as hq

    model = hq.tiny_llama(hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4 // 128 * 128,
                          num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                          num_key_value_heads=max(1, args.hidden // 256), vocab_size=args.vocab,
                          max_position_embeddings=1024)
    w4 = hq.ct_scheme(fmt="pack-quantized", bits=4, typ="int", strategy="group", group_size=128)
    w8 = hq.ct_scheme(fmt="int-quantized", bits=8, typ="int", strategy="channel")
    f8 = hq.ct_scheme(fmt="float-quantized", bits=8, typ="float", strategy="channel")
    makers = {
        "gptq-int4-g128": (lambda n, w: hq.gptq(w, 4, 128, True, False),
                           {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False}),
        "awq-int4-g128": (lambda n, w: hq.awq(w, 128), {"quant_method": "awq", "bits": 4, "group_size": 128,
                                                         "zero_point": True, "version": "gemm"}),
        "ct-w4a16-g128": (lambda n, w: hq.compressed(w, w4), hq.ct_config({"group_0": w4}, "pack-quantized")),
        "ct-w8a8-int8": (lambda n, w: hq.compressed(w, w8), hq.ct_config({"group_0": w8}, "int-quantized")),
        "ct-fp8-channel": (lambda n, w: hq.compressed(w, f8), hq.ct_config({"group_0": f8}, "float-quantized")),
        "fp8-block-128": (lambda n, w: hq.fp8_block(w, [128, 128]), {"quant_method": "fp8", "weight_block_size": [128, 128]}),
    }
    out = {}
    bf16 = root / "bf16"
    model.to(torch.bfloat16).save_pretrained(bf16)
    out["bf16"] = bf16
    model = model.float()
    for name in args.formats:
        if name in makers:
            make, qc = makers[name]
            hq.write(root / name, model, make, qc)
            cfg = json.loads((root / name / "config.json").read_text())
            cfg["torch_dtype"] = cfg["dtype"] = "bfloat16"
            (root / name / "config.json").write_text(json.dumps(cfg))
            out[name] = root / name
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--formats", nargs="*", default=FORMATS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folders = write_checkpoints(args, Path(tmp))
        results = {}
        for name, folder in folders.items():
            cmd = [sys.executable, __file__, "--worker", "--folder", str(folder), "--tokens", str(args.tokens),
                   "--threads", str(args.threads)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                print(f"{name}: failed\n{r.stderr[-1500:]}", file=sys.stderr)
                continue
            results[name] = json.loads(r.stdout.strip().splitlines()[-1])
            results[name]["file_mb"] = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20
    base = results.get("bf16")
    print(f"random Llama hidden={args.hidden} layers={args.layers} vocab={args.vocab}, {args.tokens} tokens greedy, "
          f"{args.threads} threads (CPU)")
    print(f"{'format':16} {'file MB':>8} {'RSS MB':>7} {'peak MB':>8} {'tok/s':>7} {'x bf16':>7}  transforms / mode")
    for name, r in results.items():
        ratio = r["decode_tok_s"] / base["decode_tok_s"] if base else float("nan")
        print(f"{name:16} {r['file_mb']:8.1f} {r['rss_mb']:7.0f} {r['peak_mb']:8.0f} {r['decode_tok_s']:7.1f} "
              f"{ratio:7.2f}  {r['transforms'] or '-'} / {r['mode']} ({r['dtype']})")


if __name__ == "__main__":
    main()
