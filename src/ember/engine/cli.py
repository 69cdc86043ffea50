"""`ember bench` registration for the CLI (light: the benchmark itself loads on use)."""
from __future__ import annotations


def _main(args) -> int:
    from .bench import main

    return main(args)


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure prefill/decode throughput, TTFT, memory and bandwidth")
    p.add_argument("model", nargs="?", help="model to load (default: the default chat model)")
    p.add_argument("--config", help="random weights of a preset shape instead: smollm2-135m, llama-1b, llama-3b, "
                                    "llama-8b, qwen2.5-0.5b, gemma3-1b")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device")
    p.add_argument("--batch", default="1,8,32", help="decode batch sizes (default 1,8,32)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens for decode runs")
    p.add_argument("--tokens", type=int, default=128, help="tokens generated per request")
    p.add_argument("--prefill", type=int, default=512, help="prompt tokens for the prefill measurement")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (reports its cost)")
    p.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantisation at load (CPU)")
    p.add_argument("--no-graphs", action="store_true", help="disable CUDA graphs")
    p.add_argument("--tp", type=int, default=1, metavar="N", help="tensor parallelism: split the model over N "
                   "processes (started here; figures of rank 0)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_main)
