"""Load the models and run the app with uvicorn: what `ember serve` does."""
from __future__ import annotations

import logging
import os
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


KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this many seconds (uvicorn's default)
MAX_HEADER_BYTES = 16 * 1024  # h11: request line + headers larger than this are refused (uvicorn's default)


def http_protocol(read_timeout: float):
    """uvicorn's HTTP protocol class (httptools when installed, as uvicorn's "auto" picks, else h11) with
    a deadline on request headers, which uvicorn lacks: a connection must deliver a request's complete
    headers within `read_timeout` seconds of opening (or of the previous response), else it gets an
    OpenAI-style 408 and is closed. Without it a client sending a header byte every few seconds
    (slowloris) holds its connection forever: uvicorn's keep-alive timer restarts on every byte.
    The body has its own deadline in the app (create_app's read_timeout)."""
    try:
        import httptools  # noqa: F401

        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base
    from .app import _dumps
    from .protocol import error_body

    body = _dumps(error_body(f"The request headers did not arrive within {read_timeout:g} seconds.",
                             code="request_timeout")).encode()
    timeout_response = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                        b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)) + body

    class EmberHTTPProtocol(Base):
        _ember_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._ember_arm()

        def on_response_complete(self):
            super().on_response_complete()
            self._ember_arm()

        def connection_lost(self, exc):
            self._ember_disarm()
            super().connection_lost(exc)

        def _ember_disarm(self):
            if self._ember_timer is not None:
                self._ember_timer.cancel()
                self._ember_timer = None

        def _ember_arm(self):
            self._ember_disarm()
            if not self.transport.is_closing():
                self._ember_timer = self.loop.call_later(read_timeout, self._ember_expired)

        def _ember_expired(self):
            self._ember_timer = None
            if self.transport.is_closing():
                return
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                return  # the headers came and the app has the request (it bounds the body itself)
            log.info("closing a connection from %s: no complete request headers within %gs",
                     "%s:%s" % tuple(self.client[:2]) if self.client else "?", read_timeout)
            self.transport.write(timeout_response)
            self.transport.close()

    EmberHTTPProtocol.__name__ = f"Ember{Base.__name__}"
    return EmberHTTPProtocol


def uvicorn_config(app, host: str = "127.0.0.1", port: int = 8000, *, read_timeout: float | None = None, **kw):
    """The uvicorn.Config `ember serve` runs `app` with: request-header deadline (see http_protocol),
    keep-alive and header-size limits. read_timeout defaults to the app's (create_app's read_timeout)."""
    import uvicorn

    if read_timeout is None:
        from .app import READ_TIMEOUT

        st = getattr(getattr(app, "state", None), "ember", None)
        read_timeout = getattr(st, "read_timeout", READ_TIMEOUT)
    opts = dict(log_level="warning", access_log=False, lifespan="on", timeout_keep_alive=KEEP_ALIVE_S,
                h11_max_incomplete_event_size=MAX_HEADER_BYTES, http=http_protocol(read_timeout))
    opts.update(kw)
    return uvicorn.Config(app, host=host, port=port, **opts)


def load_models(model, embedding_model=None, *, dtype=None, device=None, quantize=None, compile=False, tp=None,
                transcription_model=None, mmproj=None):
    """(llm, embedder, transcriber) from the names; a MODEL that is an encoder makes an embeddings-only
    server, a Whisper MODEL a speech-to-text one (with an embedding model beside it if asked)."""
    import ember
    from ember.errors import EmberError
    from ember.speech import Transcriber

    llm = embedder = transcriber = None
    if model:
        kw = {"quantize": quantize} if quantize else {}
        if tp is not None and tp != 1:
            kw["tp"] = tp
        if mmproj:
            kw["mmproj"] = mmproj
        m = ember.load(model, dtype=dtype, device=device, compile=compile, **kw)
        if isinstance(m, Transcriber):
            transcriber = m
        elif hasattr(m, "embed") and not hasattr(m, "request"):
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
    if transcription_model:
        if transcriber is not None:
            raise EmberError(f"{model} is a speech model already; drop --transcription-model")
        transcriber = ember.load(transcription_model, dtype=dtype, device=device)
        if not isinstance(transcriber, Transcriber):
            raise EmberError(f"--transcription-model {transcription_model} is not a speech-to-text (Whisper) model")
    return llm, embedder, transcriber


def prepare_llm(llm, max_batch: int, max_len: int | None, *, compile=False, speculative: dict | None = None,
                kv_blocks: int | None = None, app_options: dict | None = None):
    """The served LLM with its serving options. kv_blocks: a paged KV cache of that many 16-token
    blocks (an engine over it; the prefix cache goes off, as it needs contiguous rows).
    speculative: `LLM.enable_speculative`'s options (an assistant_model given by name is loaded here)."""
    from .app import DEFAULT_MAX_LEN

    if kv_blocks:
        if llm.tp is not None:
            raise SystemExit("ember serve: --kv-blocks does not work with --tp yet")
        if app_options is not None:
            if app_options.get("prefix_cache"):
                log.warning("the prefix cache is off with a paged KV cache (--kv-blocks)")
            app_options["prefix_cache"] = 0
        llm = llm.with_engine(max_batch=max_batch, max_len=min(max_len or DEFAULT_MAX_LEN, llm.model.max_context),
                              compile=compile, kv_blocks=kv_blocks)
    spec = dict(speculative or {})
    if spec.get("prompt_lookup_num_tokens") or spec.get("assistant_model"):
        if isinstance(spec.get("assistant_model"), (str, os.PathLike)):
            import ember

            spec["assistant_model"] = ember.load(spec["assistant_model"], dtype=llm.dtype, device=llm.device,
                                                 task="generate")
        llm.enable_speculative(**spec)
    return llm


def serve(model=None, host: str = "127.0.0.1", port: int = 8000, embedding_model=None, *,
          transcription_model=None, max_batch: int = 8,
          max_len: int | None = None, served_model_name: str | None = None, dtype=None, device=None,
          threads: int | None = None, log_level: str = "info", max_body_bytes: int | None = None,
          read_timeout: float | None = None, quantize: str | None = None, compile: bool = False,
          tp: int | None = None, speculative: dict | None = None, kv_blocks: int | None = None,
          mmproj=None, **app_options) -> None:
    """Load MODEL (and an embedding model) and serve the OpenAI API on host:port until interrupted.

    threads: torch CPU threads (default: torch's choice); read_timeout: seconds a client has to send a
    request's headers, and again its body (default 30). tp: split the model over this many ranks
    (tensor parallelism; every rank calls serve, rank 0 serves, the others follow its steps).
    speculative, kv_blocks: see `prepare_llm`. mmproj: a GGUF MODEL's multimodal projector file.
    app_options: create_app's api_key, allowed_origins, max_waiting, prefix_cache.
    """
    import uvicorn

    from .app import create_app

    setup_logging(log_level)
    if threads:
        import torch

        torch.set_num_threads(threads)
    llm, embedder, transcriber = load_models(model, embedding_model, dtype=dtype, device=device, quantize=quantize,
                                             compile=compile, tp=tp, transcription_model=transcription_model,
                                             mmproj=mmproj)
    if llm is not None:
        llm = prepare_llm(llm, max_batch, max_len, compile=compile, speculative=speculative, kv_blocks=kv_blocks,
                          app_options=app_options)
    generator = None
    if llm is not None and llm.tp is not None:
        from ..distributed.steps import LeaderGenerator, follow
        from .app import build_generator

        # no prefix cache under tensor parallelism: every rank must prefill exactly what rank 0 does
        if app_options.get("prefix_cache"):
            log.warning("the prefix cache is off under tensor parallelism")
        app_options["prefix_cache"] = 0
        if llm.tp.rank != 0:
            return follow(llm.tp, lambda **kw: build_generator(llm, **kw, prefix_cache=0))
        generator = LeaderGenerator(build_generator(llm, max_batch, max_len, prefix_cache=0), llm.tp,
                                    {"max_batch": max_batch, "max_len": max_len})
    name = served_model_name or (str(model) if llm is not None else None)
    emb_name = (str(embedding_model) if embedding_model else (str(model) if embedder is not None else None))
    if llm is None and transcriber is None and served_model_name:
        emb_name = served_model_name
    if transcriber is not None:
        app_options.update(transcriber=transcriber, transcription_model_name=(
            str(transcription_model) if transcription_model else served_model_name or str(model)))
    app = create_app(llm, embedder, model_name=name, embedding_model_name=emb_name, max_batch=max_batch,
                     max_len=max_len, generator=generator, **({"max_body_bytes": max_body_bytes} if max_body_bytes else {}),
                     **({"read_timeout": read_timeout} if read_timeout else {}), **app_options)
    st = app.state.ember
    lines = []
    if llm is not None:
        eng = st.scheduler
        lines.append(f"  model      {name}  ({llm!r})")
        lines.append(f"  batching   {eng.max_batch} slots x {eng.max_len} tokens per request")
        sp = llm.speculative
        if sp is not None:
            lines.append("  speculate  " + (f"prompt lookup, {sp.num_tokens} tokens" if sp.assistant_model is None
                                           else f"assistant model, {sp.num_tokens} tokens"))
        pc = getattr(eng.generator, "prefix_cache", None)
        lines.append(f"  prefix     {'off' if pc is None else f'cache of {pc.max_bytes / 2**20:.0f} MiB'}")
        if st.defaults:
            lines.append(f"  defaults   {st.defaults} (from generation_config.json)")
    if embedder is not None:
        lines.append(f"  embeddings {emb_name}")
    if transcriber is not None:
        lines.append(f"  speech     {st.transcription_model_name}  ({transcriber!r}) on /v1/audio/transcriptions")

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

    config = uvicorn_config(app, host, port, timeout_graceful_shutdown=5)
    try:
        _Server(config).run()
    finally:
        if generator is not None:
            generator.close()  # the other ranks stop following
