"""The `ember serve` subcommand: `add_parser(subparsers)` registers it, `main(args)` runs it."""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve MODEL over an OpenAI-compatible API (/v1/chat/completions, /v1/completions, "
                    "/v1/embeddings, /v1/models, /health) with continuous batching.")
    p.add_argument("model", nargs="?", default=None,
                   help="Hub id, local folder or .safetensors/.gguf file (default: the default model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--embedding-model", default=None, metavar="M", help="also serve this encoder on /v1/embeddings")
    p.add_argument("--max-batch", type=int, default=8, metavar="N",
                   help="requests decoded together (KV-cache slots; default 8)")
    p.add_argument("--max-len", type=int, default=None, metavar="T",
                   help="tokens per request, prompt + completion (default: min(model context, 4096))")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model name clients send (default: MODEL as given)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: per device)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N | mps (default: cuda if available)")
    p.add_argument("--max-body-mb", type=float, default=8.0, metavar="MB",
                   help="refuse request bodies larger than this (413; default 8 MiB)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (default: torch's choice)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"ember serve needs the server extra ({e.name} is missing): pip install 'ember[serve]'") from None
    from .server import serve

    model, name = args.model, args.served_model_name
    if model is None:
        from pathlib import Path

        from ..fixtures import default_model

        model = default_model()
        name = name or Path(model).stem  # not the cache path
    if args.max_batch < 1:
        raise SystemExit("ember serve: --max-batch must be at least 1")
    serve(model, host=args.host, port=args.port, embedding_model=args.embedding_model, max_batch=args.max_batch,
          max_len=args.max_len, served_model_name=name, dtype=args.dtype, device=args.device,
          threads=args.threads, log_level=args.log_level, max_body_bytes=int(args.max_body_mb * (1 << 20)))
    return 0
