"""`ember bench`: prefill and decode throughput, time to first token, memory, and achieved bandwidth
against the device's measured copy bandwidth (the roofline for memory-bound decoding)."""
from __future__ import annotations

import json
import time

import torch

from ..generation.loop import Request
from ..nn.kv_cache import KVCache


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a large on-device copy, counting bytes read plus bytes written."""
    n = nbytes // 4 if device.type == "cuda" else nbytes // 8
    a = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    b = torch.empty_like(a)
    for _ in range(2):
        b.copy_(a)
    _sync(device)
    reps = 10 if device.type == "cuda" else 3
    t = time.perf_counter()
    for _ in range(reps):
        b.copy_(a)
    _sync(device)
    dt = (time.perf_counter() - t) / reps
    return 2 * a.numel() * 4 / dt


def peak_memory(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return float("nan")


def weight_bytes(model) -> int:
    """Bytes a decode step streams: parameters plus tensor buffers (prepacked or quantised weights
    live in buffers), each storage counted once. An embedding table is only gathered from, so it
    counts only where another module (a tied head) reads it whole."""
    def key(t):
        try:
            return (t.untyped_storage().data_ptr(), t.data_ptr())
        except (NotImplementedError, RuntimeError):  # oneDNN-prepacked weights have no plain storage
            return ("opaque", id(t))

    read, sizes = set(), {}
    for m in model.modules():
        if getattr(m, "decode_reads", True) is False:  # e.g. a prefill-only copy of a weight (NativeBf16Linear)
            continue
        gathered = "Embedding" in type(m).__name__
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            k = key(t)
            sizes[k] = t.numel() * t.element_size()
            if not gathered:
                read.add(k)
    return sum(sizes[k] for k in read)


def kv_bytes_read(model, dtype, length: float) -> float:
    """KV-cache bytes one row's decode step reads at a context of `length` tokens: a sliding-window
    layer reads at most its window."""
    es = torch.empty((), dtype=dtype).element_size()
    windows = model.cache_windows() if hasattr(model, "cache_windows") else [None] * len(model.cache_layout())
    return sum(KVCache.token_width(spec) * es * (length if w is None else min(length, w))
               for spec, w in zip(model.cache_layout(), windows))


def run_requests(gen, reqs) -> tuple[float, float, int]:
    """Run to completion; returns (time to first event, decode seconds after it, decode tokens)."""
    t0 = time.perf_counter()
    first = None
    n = 0
    for r in reqs:
        gen.add(r)
    while gen.has_work():
        evs = gen.step()
        if first is None and evs:
            first = time.perf_counter()
            continue
        n += len(evs)
    end = time.perf_counter()
    return first - t0, end - first, n


def bench(llm_model, tokenizer=None, *, device, dtype, batches=(1, 8, 32), prompt_len: int = 128, gen_len: int = 128,
          prefill_len: int = 512, engine=None, vocab: int | None = None, label: str = "") -> dict:
    from . import Engine

    model = llm_model
    vocab = vocab or model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    res: dict = {"model": label, "device": str(device), "dtype": str(dtype).replace("torch.", "")}
    if device.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(device)
        torch.cuda.reset_peak_memory_stats(device)
    wb = weight_bytes(model)
    res["weights_GB"] = wb / 1e9
    t = time.perf_counter()
    eng = engine or Engine(model, tokenizer, [], max_batch=max(batches), max_len=max(prefill_len, prompt_len + gen_len) + 8)
    if eng.decoder is not None:
        eng.warmup(sorted({b for b in (1, *batches)}))
    res["engine_setup_s"] = time.perf_counter() - t
    res["kv_cache_GB"] = eng.cache.nbytes / 1e9  # sliding-window layers keep only a ring of their window
    if eng.decoder is not None:
        res["graph_capture_s"] = eng.decoder.capture_seconds
        res["compile_s"] = eng.decoder.compile_seconds

    def prompt(n):
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    # warm-up at the measured shapes: lazy kernel loading, cuBLAS/cuDNN plans, the allocator
    run_requests(eng.generator(1), [Request(prompt(prompt_len), 4, ignore_eos=True)])
    run_requests(eng.generator(1), [Request(prompt(prefill_len), 1, ignore_eos=True)])
    _sync(device)
    ttft, _, _ = run_requests(eng.generator(1), [Request(prompt(prompt_len), 2, ignore_eos=True)])
    res["ttft_ms"] = ttft * 1e3
    pf, _, _ = run_requests(eng.generator(1), [Request(prompt(prefill_len), 1, ignore_eos=True)])
    res["prefill_tok_s"] = prefill_len / pf
    for b in batches:
        reqs = [Request(prompt(prompt_len), gen_len, ignore_eos=True) for _ in range(b)]
        _, dt, n = run_requests(eng.generator(b), reqs)
        steps = gen_len - 1
        tok_s = n / dt
        # bytes per decode step: every weight once, plus each row's KV cache read up to its position
        kv_read = b * kv_bytes_read(model, dtype, prompt_len + gen_len / 2)
        gbs = (wb + kv_read) * steps / dt / 1e9
        res[f"decode_b{b}_tok_s"] = tok_s
        res[f"decode_b{b}_GBs"] = gbs
    # peak memory before the bandwidth probe, whose 1-2 GB of buffers would otherwise count
    res["peak_memory_GB"] = peak_memory(device) / 1e9
    res["copy_bandwidth_GBs"] = copy_bandwidth(device) / 1e9
    for b in batches:
        res[f"decode_b{b}_pct_copy_bw"] = 100 * res[f"decode_b{b}_GBs"] / res["copy_bandwidth_GBs"]
    return res


def kernel_path(device: torch.device, model, transforms=()) -> dict:
    """The ISA and the kernels the model's layers run on (what the figures measured)."""
    out: dict = {}
    if device.type == "cpu":
        from ..backends.native import isa
        from ..kernels import cpu_isa

        out["cpu_isa"] = cpu_isa()
        out["kernel_isa"] = isa()
        import os

        for var in ("EMBER_CPU_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"):
            if os.environ.get(var):
                out[var] = os.environ[var]
        out["aten_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    layers: dict = {}
    for m in model.modules():
        name = type(m).__name__
        if name.endswith("Linear") and not list(m.children()):
            layers[name] = layers.get(name, 0) + 1
    out["linears"] = ", ".join(f"{k} x{v}" for k, v in sorted(layers.items()))
    out["transforms"] = ", ".join(transforms) or "none"
    return out


def format_table(res: dict) -> str:
    lines = [f"{k:<24} {v:.3f}" if isinstance(v, float) else f"{k:<24} {v}" for k, v in res.items()]
    return "\n".join(lines)


def main(args) -> int:
    import ember

    from .presets import random_model

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else None)
    batches = tuple(int(x) for x in args.batch.split(","))
    transforms: tuple = ()
    if args.config:
        from .presets import PRESETS

        if args.config not in PRESETS:
            raise SystemExit(f"ember bench: unknown --config {args.config!r}; presets: {', '.join(PRESETS)}")
        if getattr(args, "quantize", None) or getattr(args, "tp", 1) != 1:
            raise SystemExit("ember bench: --quantize and --tp apply to a model's weights, not --config presets")
        dtype = dtype or torch.bfloat16
        t = time.perf_counter()
        _, model = random_model(args.config, dtype, device, prepack=False if args.compile else None)
        load_s = time.perf_counter() - t
        tok, label = None, f"{args.config} (random weights)"
    else:
        from ember.fixtures import default_model

        name = args.model or default_model()
        t = time.perf_counter()
        kw = {"prepack": False} if args.compile else {}
        if getattr(args, "quantize", None):
            kw["quantize"] = args.quantize
        if getattr(args, "tp", 1) != 1:
            kw["tp"] = args.tp  # every rank runs the same seeded requests: the same steps
        llm = ember.load(name, dtype=dtype, device=device, **kw)
        load_s = time.perf_counter() - t
        model, tok, dtype, label = llm.model, llm.tokenizer, llm.dtype, name
        transforms = llm._loaded.transforms
    from . import Engine

    eng = Engine(model, tok, [], max_batch=max(batches), max_len=max(args.prefill, args.prompt + args.tokens) + 8,
                 cuda_graphs=None if not args.no_graphs else False, compile=args.compile)
    res = bench(model, tok, device=device, dtype=dtype, batches=batches, prompt_len=args.prompt, gen_len=args.tokens,
                prefill_len=args.prefill, engine=eng, label=label)
    res = {"load_s": load_s, "tp": getattr(args, "tp", 1), **kernel_path(device, model, transforms), **res}
    print(json.dumps(res) if args.json else format_table(res))
    return 0
