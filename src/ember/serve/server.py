"""Load the models and run the app with uvicorn: what `ember serve` does."""
from __future__ import annotations

import logging
import sys

log = logging.getLogger("ember.serve")


def setup_logging(level: str = "info") -> None:
    """ember.serve's per-request lines to stderr (once)."""
    lg = logging.getLogger("ember.serve")
    lg.setLevel(getattr(logging, level.upper(), logging.INFO))
    if not any(getattr(h, "_ember", False) for h in lg.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        h._ember = True
        lg.addHandler(h)
        lg.propagate = False


def load_models(model, embedding_model=None, *, dtype=None, device=None):
    """(llm, embedder) from the names; a MODEL that is an encoder makes an embeddings-only server."""
    import ember
    from ember.errors import EmberError

    llm = embedder = None
    if model:
        m = ember.load(model, dtype=dtype, device=device)
        if hasattr(m, "embed") and not hasattr(m, "request"):
            if embedding_model:
                raise EmberError(f"{model} is an embedding model; give a generation model as MODEL "
                                 "or drop --embedding-model")
            embedder = m
        else:
            llm = m
    if embedding_model:
        embedder = ember.load(embedding_model, dtype=dtype, device=device)
        if not hasattr(embedder, "embed"):
            raise EmberError(f"--embedding-model {embedding_model} is not an embedding (encoder) model")
    return llm, embedder


def serve(model=None, host: str = "127.0.0.1", port: int = 8000, embedding_model=None, *, max_batch: int = 8,
          max_len: int | None = None, served_model_name: str | None = None, dtype=None, device=None,
          threads: int | None = None, log_level: str = "info") -> None:
    """Load MODEL (and an embedding model) and serve the OpenAI API on host:port until interrupted.

    threads: torch CPU threads (default: torch's choice).
    """
    import uvicorn

    from .app import create_app

    setup_logging(log_level)
    if threads:
        import torch

        torch.set_num_threads(threads)
    llm, embedder = load_models(model, embedding_model, dtype=dtype, device=device)
    name = served_model_name or (str(model) if llm is not None else None)
    emb_name = (str(embedding_model) if embedding_model else (str(model) if embedder is not None else None))
    if llm is None and served_model_name:
        emb_name = served_model_name
    app = create_app(llm, embedder, model_name=name, embedding_model_name=emb_name, max_batch=max_batch,
                     max_len=max_len)
    st = app.state.ember
    lines = []
    if llm is not None:
        eng = st.engine
        lines.append(f"  model      {name}  ({llm!r})")
        lines.append(f"  batching   {eng.max_batch} slots x {eng.max_len} tokens per request")
        if st.defaults:
            lines.append(f"  defaults   {st.defaults} (from generation_config.json)")
    if embedder is not None:
        lines.append(f"  embeddings {emb_name}")

    class _Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.should_exit:
                return
            addrs = []
            for srv in getattr(self, "servers", []):
                for s in srv.sockets:
                    h, p = s.getsockname()[:2]
                    addrs.append(f"http://{h if ':' not in h else f'[{h}]'}:{p}")
            print(f"ember serve: listening on {', '.join(addrs) or f'http://{host}:{port}'}/v1", file=sys.stderr)
            print("\n".join(lines), file=sys.stderr, flush=True)

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=5)
    _Server(config).run()
