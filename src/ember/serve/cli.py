"""The `ember serve` subcommand: `add_parser(subparsers)` registers it, `main(args)` runs it."""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve MODEL over an OpenAI-compatible API (/v1/chat/completions, /v1/completions, "
                    "/v1/embeddings, /v1/audio/transcriptions, /v1/models, /tokenize, /detokenize, /metrics, /health) with continuous "
                    "batching and a prefix cache.")
    p.add_argument("model", nargs="?", default=None,
                   help="Hub id, local folder, .safetensors/.gguf file or short name (default: $EMBER_MODEL, else "
                        "smollm2, served under that name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--embedding-model", default=None, metavar="M", help="also serve this encoder on /v1/embeddings")
    p.add_argument("--transcription-model", default=None, metavar="M",
                   help="also serve this Whisper model on /v1/audio/transcriptions (a Whisper MODEL is served there "
                        "by itself)")
    p.add_argument("--max-batch", type=int, default=8, metavar="N",
                   help="requests decoded together (KV-cache slots; default 8)")
    p.add_argument("--max-len", type=int, default=None, metavar="T",
                   help="tokens per request, prompt + completion (default: min(model context, 4096))")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model name clients send (default: MODEL as given)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: per device)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N | mps (default: cuda if available)")
    p.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantisation at load (CPU; safetensors)")
    p.add_argument("--mmproj", metavar="FILE", help="a GGUF model's llama.cpp multimodal projector file "
                   "(mmproj-*.gguf) for image+text chat")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (slow to start, faster)")
    p.add_argument("--tp", type=int, default=1, metavar="N", help="tensor parallelism: split the model over N "
                   "processes (started here); rank 0 serves, the others follow its steps")
    p.add_argument("--max-body-mb", type=float, default=8.0, metavar="MB",
                   help="refuse request bodies larger than this (413; default 8 MiB)")
    p.add_argument("--read-timeout", type=float, default=30.0, metavar="S",
                   help="seconds a client has to send a request's headers, and again its body (408 after; default 30)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/*, /tokenize, /detokenize (default: $EMBER_API_KEY)")
    p.add_argument("--allowed-origins", default=None, metavar="ORIGINS",
                   help="CORS: comma-separated origins browsers may call from ('*': any; default: no CORS)")
    p.add_argument("--max-waiting", type=int, default=256, metavar="N",
                   help="requests that may wait for a slot; more get a 429 with Retry-After (default 256)")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="prefill every prompt in full (default: reuse the KV of prompt prefixes already seen)")
    p.add_argument("--prefix-cache-mb", type=float, default=None, metavar="MB",
                   help="memory of the prefix cache (default: half the KV cache)")
    p.add_argument("--prompt-lookup-num-tokens", type=int, default=None, metavar="N",
                   help="speculative decoding: draft N tokens per step by n-gram lookup in the prompt and output, "
                        "checked in one forward (greedy output unchanged; fastest when replies copy the prompt)")
    p.add_argument("--assistant-model", default=None, metavar="M",
                   help="speculative decoding: a smaller model with the same tokenizer drafts the tokens")
    p.add_argument("--num-assistant-tokens", type=int, default=4, metavar="N",
                   help="tokens the assistant model drafts per step (default 4)")
    p.add_argument("--kv-blocks", type=int, default=None, metavar="N",
                   help="a paged KV cache of N blocks of 16 tokens shared by all requests (memory follows the tokens "
                        "held, not --max-batch x --max-len; turns the prefix cache off)")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="image+text models: download http(s) image_url parts (default: data: URLs only)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (default: torch's choice)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=main)
    return p


MAX_BATCH = 4096  # far past any KV cache that fits; a bound so that a typo is an error, not an allocation


def _check_numbers(args: argparse.Namespace) -> None:
    """One-line errors for numeric flags out of range (instead of a traceback from deep inside)."""
    import math

    def bad(flag, want, v):
        raise SystemExit(f"ember serve: {flag} must be {want}, got {v}")

    if not 0 <= args.port <= 65535:
        bad("--port", "in 0..65535", args.port)
    if not 1 <= args.max_batch <= MAX_BATCH:
        bad("--max-batch", f"in 1..{MAX_BATCH}", args.max_batch)
    if args.max_len is not None and args.max_len < 2:
        bad("--max-len", "at least 2 (a prompt token and a completion token)", args.max_len)
    if not (math.isfinite(args.max_body_mb) and 0 < args.max_body_mb <= 1024):
        bad("--max-body-mb", "a number of MiB in (0, 1024]", args.max_body_mb)
    if not (math.isfinite(args.read_timeout) and 0 < args.read_timeout <= 3600):
        bad("--read-timeout", "a number of seconds in (0, 3600]", args.read_timeout)
    if args.max_waiting < 0:
        bad("--max-waiting", "at least 0", args.max_waiting)
    if args.prefix_cache_mb is not None and not (math.isfinite(args.prefix_cache_mb) and 0 < args.prefix_cache_mb <= 1 << 20):
        bad("--prefix-cache-mb", "a number of MiB in (0, 1048576]", args.prefix_cache_mb)
    if args.prompt_lookup_num_tokens is not None and args.assistant_model is not None:
        raise SystemExit("ember serve: give --prompt-lookup-num-tokens or --assistant-model, not both")
    for flag, v in (("--prompt-lookup-num-tokens", args.prompt_lookup_num_tokens),
                    ("--num-assistant-tokens", args.num_assistant_tokens)):
        if v is not None and not 1 <= v <= 64:
            bad(flag, "in 1..64", v)
    if args.kv_blocks is not None and not 1 <= args.kv_blocks <= 1 << 24:
        bad("--kv-blocks", f"in 1..{1 << 24}", args.kv_blocks)
    if args.threads is not None and args.threads < 1:
        bad("--threads", "at least 1", args.threads)


def main(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"ember serve needs the server extra ({e.name} is missing): pip install 'ember[serve]'") from None
    _check_numbers(args)  # before anything is loaded
    from .server import serve

    model, name = args.model, args.served_model_name
    if model is None:
        import os
        from pathlib import Path

        from ..fixtures import DEFAULT_MODEL, default_model

        if os.environ.get("EMBER_MODEL"):
            model = default_model()
            name = name or Path(model).stem  # not a cache path
        else:
            model = DEFAULT_MODEL.name  # served as "smollm2", the short name clients can also load by
    serve(model, host=args.host, port=args.port, embedding_model=args.embedding_model,
          transcription_model=args.transcription_model, max_batch=args.max_batch,
          max_len=args.max_len, served_model_name=name, dtype=args.dtype, device=args.device,
          threads=args.threads, log_level=args.log_level, max_body_bytes=int(args.max_body_mb * (1 << 20)),
          read_timeout=args.read_timeout, quantize=args.quantize, compile=args.compile, tp=args.tp, api_key=args.api_key,
          mmproj=args.mmproj,
          allowed_origins=[o.strip() for o in args.allowed_origins.split(",") if o.strip()] if args.allowed_origins
          else None, max_waiting=args.max_waiting, allow_remote_images=args.allow_remote_images,
          speculative={"prompt_lookup_num_tokens": args.prompt_lookup_num_tokens,
                       "assistant_model": args.assistant_model, "num_assistant_tokens": args.num_assistant_tokens},
          kv_blocks=args.kv_blocks,
          prefix_cache=0 if args.no_prefix_cache else (int(args.prefix_cache_mb * (1 << 20)) if args.prefix_cache_mb
                                                        else None))
    return 0
