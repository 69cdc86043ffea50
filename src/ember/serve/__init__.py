"""`ember serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) with continuous batching.

    from ember.serve import create_app, serve
    serve("HuggingFaceTB/SmolLM2-135M-Instruct", port=8000)          # blocks
    app = create_app(llm, embedder, model_name="smollm2")              # an ASGI app to run yourself

Needs the `serve` extra (fastapi, uvicorn).
"""
from __future__ import annotations


def create_app(*args, **kwargs):
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)


def serve(*args, **kwargs):
    from .server import serve as _serve

    return _serve(*args, **kwargs)


__all__ = ["create_app", "serve"]
