"""The OpenAI-compatible HTTP app: /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings,
/health, and /tokenize, /detokenize (tokenize.py), /metrics (metrics.py); API keys (auth.py), a bound
on waiting requests (backpressure.py), request schemas for /openapi.json (schemas.py).

Handlers validate and tokenize (tokenizing off the event loop), then submit requests to the `Scheduler`
(one thread, continuous batching) and read their events from an asyncio queue; they never call the
model. Embeddings run on a one-thread executor. A client that goes away cancels its requests at the
next step (their slots free at once).
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..errors import EmberError, GenerationError
from ..generation.defaults import sampling_defaults as shared_sampling_defaults
from .chat_output import ChatPlan
from . import auth, image_inputs, metrics as metrics_, schemas, tokenize, transcriptions
from .backpressure import check_queue
from .scheduler import ClientGone, Scheduler, StepFailure, Submission
from .protocol import (MAX_BODY_BYTES, ApiError, GenParams, TokenText, content_text, error_body, finite, get_str,
                       parse_chat, parse_common, parse_completion, parse_embeddings, parse_json, usage)

log = logging.getLogger("ember.serve")

DEFAULT_MAX_LEN = 4096  # per-request context (prompt + completion) unless --max-len says otherwise
READ_TIMEOUT = 30.0  # seconds a client has to send a request's body (and, with server.py's protocol, its headers)
EMBED_BATCH = 32  # texts per embedding job: a request's jobs interleave with others', and stop when its client leaves


def _dumps(obj: Any) -> str:
    s = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (a request's "\ud800" echoed in an error): escape it instead
        s = json.dumps(obj, ensure_ascii=True, separators=(",", ":"))
    return s


class _JSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        return _dumps(content).encode()


def _sse(obj: Any) -> str:
    return f"data: {_dumps(obj)}\n\n"


def build_generator(llm, max_batch: int, max_len: int | None, prefix_cache: int | None = None):
    """The server's generator: the LLM's (its engine's, when it has one). prefix_cache: its prefix
    cache's bytes (None: the LLM's own prefix cache if it has one, else half the KV cache; 0: none)."""
    from ..generation.prefix_cache import for_generator

    ctx = llm.model.max_context
    want = max_len or DEFAULT_MAX_LEN
    if max_len and max_len > ctx:
        log.warning("--max-len %d is beyond the model's context (%d); using %d", max_len, ctx, ctx)
    want = min(want, ctx)
    gen = llm.generator(max_batch=max_batch, max_len=want)
    if prefix_cache == 0 or hasattr(gen.cache, "reserve"):  # (a paged KV cache has no rows to copy prefixes from)
        gen.prefix_cache = None
    elif gen.prefix_cache is None or prefix_cache is not None:
        for_generator(gen, prefix_cache)
    return gen


def _server_check(key: str, value: Any) -> Any:
    """A generation_config default as the server would take it from a client (raises ApiError otherwise)."""
    return getattr(parse_common({key: value}, {}, chat=True), key)


def sampling_defaults(generation_config: dict | None, source: str = "generation_config.json") -> dict:
    """Defaults for omitted sampling fields: the model's generation_config.json (as vLLM does, and as
    the Python API does: `ember.generation.defaults`), else OpenAI's (temperature 1, top_p 1).

    Each default is checked as if a client had sent it: one the server would refuse (top_k -5,
    temperature 7, a string ...) is dropped with a warning that names it, and the server starts with
    OpenAI's default for that field; otherwise every request that omits the field would be refused
    for a parameter its client never sent."""
    return shared_sampling_defaults(generation_config, source, _server_check)


def _max_token_chars(tok) -> int:
    """The longest vocabulary entry (characters), 0 if unknown: bounds how much text one token covers."""
    try:
        return max((len(t) for t in tok.tk.get_vocab(with_added_tokens=True)), default=0)
    except Exception:  # noqa: BLE001 - no tokenizer, or one without a vocabulary to read
        return 0


class _State:
    def __init__(self, llm, embedder, model_name, embedding_model_name, scheduler, defaults, read_timeout=READ_TIMEOUT):
        self.llm, self.embedder = llm, embedder
        self.model_name, self.embedding_model_name = model_name, embedding_model_name
        self.scheduler: Scheduler | None = scheduler
        self.defaults = defaults
        self.read_timeout = read_timeout
        self.created = int(time.time())
        self.tok = getattr(llm, "tokenizer", None) if llm is not None else None
        self.token_text = TokenText(self.tok) if self.tok is not None else None
        self.eos = set(getattr(llm, "eos_token_ids", ()) or ()) if llm is not None else set()
        self.max_token_chars = _max_token_chars(self.tok)
        self.embed_pool = ThreadPoolExecutor(1, thread_name_prefix="ember-embed") if embedder is not None else None
        self.max_waiting: int | None = None  # requests that may wait for a slot (backpressure.py)
        self.transcriber = None  # a Whisper Transcriber (transcriptions.py)
        self.transcription_model_name: str | None = None

    # ---- model routing ------------------------------------------------------------------------
    def resolve(self, body: dict, want: str) -> str:
        name = get_str(body, "model", None)
        served = [n for n in (self.model_name, self.embedding_model_name, self.transcription_model_name) if n]
        if want == "transcribe":
            if name != self.transcription_model_name:
                raise ApiError(404 if name not in served else 400,
                               f"The model '{name}' {'does not exist' if name not in served else 'is not a speech model'}"
                               f". This server transcribes with: {self.transcription_model_name}.", param="model",
                               code="model_not_found" if name not in served else "wrong_model_type")
            return name
        if name is None:
            name = self.model_name if want == "generate" else self.embedding_model_name
            if name is None:
                raise ApiError(404, f"This server has no {'generation' if want == 'generate' else 'embedding'} model"
                               f"{' (start it with --embedding-model)' if want == 'embed' else ''}.",
                               param="model", code="model_not_found")
            return name
        if name not in served:
            raise ApiError(404, f"The model '{name}' does not exist. This server serves: {', '.join(served)}.",
                           param="model", code="model_not_found")
        if name == self.transcription_model_name and name not in (self.model_name, self.embedding_model_name):
            raise ApiError(400, f"The model '{name}' is a speech-to-text model; use /v1/audio/transcriptions.",
                           param="model", code="wrong_model_type")
        if want == "generate" and name != self.model_name:
            raise ApiError(400, f"The model '{name}' is an embedding model; use /v1/embeddings.", param="model",
                           code="wrong_model_type")
        if want == "embed" and name != self.embedding_model_name:
            raise ApiError(400, f"The model '{name}' is a generation model; it does not make embeddings"
                           f"{' (start the server with --embedding-model)' if self.embedder is None else ''}.",
                           param="model", code="wrong_model_type")
        return name


# ---- generation ------------------------------------------------------------------------------
class _Choice:
    __slots__ = ("index", "req", "prompt_index", "parts", "tokens", "finish", "lps", "text_len", "stop_ids", "out")

    def __init__(self, index: int, req, prompt_index: int, eos: set[int]):
        self.index, self.req, self.prompt_index = index, req, prompt_index
        self.parts: list[str] = []
        self.tokens = 0
        self.finish: str | None = None
        self.lps: list[tuple] = []  # (token id, logprob, top [(id, lp)], text offset)
        self.text_len = 0
        self.stop_ids = set(req.stop_token_ids) | (set() if req.ignore_eos else eos)
        self.out = None  # a ChatOutput when the text is parsed (tool calls, reasoning)


class _Run:
    """One HTTP generation call: its choices, their accumulated output, and the response formats."""

    def __init__(self, st: _State, chat: bool, rid: str, model: str, prompts: list[list[int]],
                 prompt_texts: list[str], p: GenParams, reqs: list, info: dict, plan: ChatPlan | None = None):
        self.st, self.chat, self.rid, self.model, self.p = st, chat, rid, model, p
        self.prompt_tokens = sum(len(x) for x in prompts)
        self.prompt_texts = prompt_texts
        self.created = int(time.time())
        self.choices = [_Choice(i, r, i // p.n, st.eos) for i, r in enumerate(reqs)]
        if plan is not None and plan.parses:
            for c in self.choices:
                c.out = plan.output()
        self.by_id = {c.req.id: c for c in self.choices}
        self.info = info
        self.t0 = time.perf_counter()
        self.first: float | None = None

    def take(self, events: list) -> dict[int, tuple[_Choice, str, list]]:
        """Fold events into the choices; per choice touched: (choice, new text, new logprob entries)."""
        touched: dict[int, tuple[_Choice, list[str], list]] = {}
        for ev in events:
            c = self.by_id.get(ev.request.id)
            if c is None:
                continue
            if self.first is None:
                self.first = time.perf_counter()
            _, texts, lps = touched.setdefault(c.index, (c, [], []))
            if ev.token_id is not None:
                c.tokens += 1
                if ev.logprob is not None and ev.token_id not in c.stop_ids:
                    entry = (ev.token_id, ev.logprob, ev.top_logprobs or [], c.text_len)
                    c.lps.append(entry)
                    lps.append(entry)
            if ev.text:
                c.parts.append(ev.text)
                c.text_len += len(ev.text)
                texts.append(ev.text)
            if ev.finished:
                c.finish = ev.finish_reason if ev.finish_reason in ("stop", "length") else "stop"
        return {i: (c, "".join(t), lps) for i, (c, t, lps) in sorted(touched.items())}

    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices)

    def usage(self) -> dict:
        return usage(self.prompt_tokens, self.completion_tokens())

    # ---- logprobs formats ---------------------------------------------------------------------
    def chat_logprobs(self, entries: list) -> dict:
        tt = self.st.token_text
        content = []
        for tid, lp, top, _ in entries:
            text, b = tt(tid)
            content.append({"token": text, "logprob": finite(lp), "bytes": b,
                            "top_logprobs": [{"token": tt(i)[0], "logprob": finite(v), "bytes": tt(i)[1]}
                                             for i, v in top]})
        return {"content": content, "refusal": None}

    def completion_logprobs(self, entries: list, offset: int = 0) -> dict:
        tt = self.st.token_text
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tid, lp, top, off in entries:
            out["tokens"].append(tt(tid)[0])
            out["token_logprobs"].append(finite(lp))
            out["top_logprobs"].append({tt(i)[0]: finite(v) for i, v in top} if self.p.logprobs else None)
            out["text_offset"].append(offset + off)
        return out

    def _echo(self, c: _Choice) -> str:
        return self.prompt_texts[c.prompt_index] if self.p.echo else ""

    # ---- whole responses ----------------------------------------------------------------------
    def response(self) -> dict:
        out = []
        for c in self.choices:
            text = "".join(c.parts)
            lps = None
            if self.chat:
                if self.p.logprobs is not None:
                    lps = self.chat_logprobs(c.lps)
                msg = {"role": "assistant", "content": text, "refusal": None} if c.out is None else c.out.message(text)
                out.append({"index": c.index, "message": msg, "logprobs": lps,
                            "finish_reason": c.finish if c.out is None else c.out.finish_reason(c.finish)})
            else:
                if self.p.logprobs is not None:
                    lps = self.completion_logprobs(c.lps)
                out.append({"index": c.index, "text": self._echo(c) + text, "logprobs": lps,
                            "finish_reason": c.finish})
        return {"id": self.rid, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": out, "usage": self.usage()}

    # ---- streaming chunks ---------------------------------------------------------------------
    def _chunk(self, choices: list, usage_: Any = None, with_usage: bool = False) -> str:
        obj = {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.model, "choices": choices}
        if with_usage or self.p.include_usage:
            obj["usage"] = usage_
        return _sse(obj)

    def opening(self) -> list[str]:
        if self.chat:
            return [self._chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}]) for c in self.choices]
        if self.p.echo:
            return [self._chunk([{"index": c.index, "text": self._echo(c), "logprobs": None, "finish_reason": None}])
                    for c in self.choices]
        return []

    def chunks(self, touched: dict) -> list[str]:
        out = []
        for c, text, lps in touched.values():
            if c.out is not None:
                out += self._parsed_chunks(c, text, lps)
                continue
            if text or lps:
                if self.chat:
                    out.append(self._chunk([{"index": c.index, "delta": {"content": text},
                                             "logprobs": self.chat_logprobs(lps) if self.p.logprobs is not None else None,
                                             "finish_reason": None}]))
                else:
                    off = len(self._echo(c))
                    out.append(self._chunk([{"index": c.index, "text": text,
                                             "logprobs": self.completion_logprobs(lps, off)
                                             if self.p.logprobs is not None else None,
                                             "finish_reason": None}]))
            if c.finish is not None:
                if self.chat:
                    out.append(self._chunk([{"index": c.index, "delta": {}, "logprobs": None,
                                             "finish_reason": c.finish}]))
                else:
                    out.append(self._chunk([{"index": c.index, "text": "", "logprobs": None,
                                             "finish_reason": c.finish}]))
        return out

    def _parsed_chunks(self, c: _Choice, text: str, lps: list) -> list[str]:
        """A parsed choice's chunks: reasoning, content and tool-call deltas (the step's logprobs ride
        on its first chunk)."""
        deltas = c.out.feed(text) if text else []
        if c.finish is not None:
            deltas += c.out.end()
        out = []
        for d in deltas:
            lp = self.chat_logprobs(lps) if self.p.logprobs is not None and lps else None
            lps = []
            out.append(self._chunk([{"index": c.index, "delta": d, "logprobs": lp, "finish_reason": None}]))
        if c.finish is not None:
            out.append(self._chunk([{"index": c.index, "delta": {}, "logprobs": None,
                                     "finish_reason": c.out.finish_reason(c.finish)}]))
        return out

    def closing(self) -> list[str]:
        out = []
        if self.p.include_usage:
            out.append(self._chunk([], self.usage(), with_usage=True))
        out.append("data: [DONE]\n\n")
        return out

    def log_info(self, finish: str | None = None) -> None:
        self.info.update(id=self.rid, prompt=self.prompt_tokens, completion=self.completion_tokens(),
                         ttft=(self.first - self.t0) if self.first is not None else None,
                         finish=finish or ",".join(str(c.finish) for c in self.choices))


def _failure(exc: StepFailure) -> ApiError:
    cause = exc.cause
    if isinstance(cause, EmberError):
        return ApiError(400, str(cause))
    return ApiError(500, f"The model failed on this request: {type(cause).__name__}: {cause}", type="server_error",
                    code="engine_error")


class _Cancelled:
    """A flag `_watch_disconnect` sets (what embeddings watch between batches)."""

    cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


async def _watch_disconnect(request: Request, sub) -> None:
    """Cancel the submission when the client goes away (the body has been read already)."""
    try:
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                sub.cancel()
                return
    except asyncio.CancelledError:
        raise
    except Exception:  # noqa: BLE001 - a closed channel: nothing to watch
        return


async def _generate(st: _State, request: Request, run: _Run, reqs: list) -> Response:
    check_queue(st.scheduler, len(reqs), st.max_waiting)
    sub = st.scheduler.submit(Submission(reqs))
    # Watches for the client going away until the response has ended (for a stream, _stream ends it:
    # it lives on even if the stream body never starts).
    watcher = asyncio.ensure_future(_watch_disconnect(request, sub))
    headers = {"x-request-id": run.rid}
    handed_off = False
    try:
        first = await sub.next()  # wait for the first tokens: a failure at prefill is still an HTTP error
        if run.p.stream:
            handed_off = True
            return StreamingResponse(_stream(run, sub, first, watcher), media_type="text/event-stream",
                                     headers={**headers, "cache-control": "no-cache"})
        while first is not None:
            run.take(first)
            first = await sub.next()
        run.log_info()
        return _JSON(run.response(), headers=headers)
    except StepFailure as e:
        handed_off = False
        run.log_info("error")
        raise _failure(e) from None
    except ClientGone:
        handed_off = False
        run.log_info("abort")
        return Response(status_code=499)
    finally:
        if not handed_off:
            watcher.cancel()
            sub.cancel()  # a no-op once every request finished


async def _stream(run: _Run, sub: Submission, first: list | None, watcher: asyncio.Future):
    finish = None
    try:
        for s in run.opening():
            yield s
        batch = first
        while batch is not None:
            for s in run.chunks(run.take(batch)):
                yield s
            batch = await sub.next()
        for s in run.closing():
            yield s
    except StepFailure as e:
        finish = "error"
        yield _sse(_failure(e).body())
    except ClientGone:
        finish = "abort"
    except (asyncio.CancelledError, GeneratorExit):  # the response was cancelled: the client went away
        finish = "abort"
        raise
    finally:
        watcher.cancel()
        if not sub.done:
            sub.cancel()
            finish = finish or "abort"
        run.log_info(finish)


# ---- the app -----------------------------------------------------------------------------------
class _LogMiddleware:
    """One log line per HTTP request, written when its response (stream included) has ended."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        info: dict = {}
        scope.setdefault("state", {})["ember_log"] = info
        status = [None]

        async def send_(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_)
        except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - any escape (tokenizers' pyo3 PanicException is a
            # BaseException that FastAPI's handlers never see): an OpenAI-style JSON 500, and the server goes on
            log.error("internal error on %s %s: %s: %s", scope.get("method", ""), scope.get("path", ""),
                      type(exc).__name__, exc, exc_info=exc)
            info["error"] = f"internal_error: {type(exc).__name__}: {exc}"
            if status[0] is not None:
                raise  # the response has started (a stream): uvicorn ends the connection
            body = _dumps(error_body(f"Internal server error: {type(exc).__name__}: {str(exc)[:500]}",
                                     "server_error", None, "internal_error")).encode()
            status[0] = 500
            await send({"type": "http.response.start", "status": 500,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
        finally:
            dt = time.perf_counter() - t0
            path = scope.get("path", "")
            level = logging.DEBUG if path in ("/health", "/v1/models") and status[0] == 200 else logging.INFO
            if log.isEnabledFor(level):
                parts = [info.get("id", "-"), scope.get("method", ""), path, str(status[0] or "-")]
                if "prompt" in info:
                    parts.append(f"prompt={info['prompt']} completion={info.get('completion', 0)}")
                if info.get("ttft") is not None:
                    parts.append(f"ttft={info['ttft']:.3f}s")
                parts.append(f"time={dt:.3f}s")
                if info.get("finish"):
                    parts.append(f"finish={info['finish']}")
                if info.get("error"):
                    parts.append(f"error={info['error']!r}")
                log.log(level, " ".join(parts))


def create_app(llm=None, embedder=None, *, model_name: str | None = None, embedding_model_name: str | None = None,
               max_batch: int = 8, max_len: int | None = None, generator=None,
               defaults: dict | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               read_timeout: float = READ_TIMEOUT, api_key: str | list[str] | None = None,
               allowed_origins: list[str] | None = None, max_waiting: int | None = 256,
               prefix_cache: int | None = None, allow_remote_images: bool = False, transcriber=None,
               transcription_model_name: str | None = None) -> FastAPI:
    """The OpenAI-compatible app over a loaded `LLM` and/or an embedding model (anything with
    `embed(list[str]) -> [N, dim]`, and optionally `.tokenizer` for usage counts) and/or a Whisper
    `Transcriber` (/v1/audio/transcriptions).

    max_batch: decode slots (requests generated together); max_len: tokens per request, prompt and
    completion (default min(model context, 4096)); generator: a ready generator (add/step/abort/check)
    to use instead of building one; defaults: sampling defaults (default: the model's generation_config);
    max_body_bytes: larger request bodies are refused with a 413 before they are read in full (8 MiB);
    read_timeout: seconds a client has to send a request body (a 408 after that; 30).
    api_key: key(s) the /v1 endpoints require as `Authorization: Bearer` (default: $EMBER_API_KEY; none);
    allowed_origins: CORS origins browsers may call from (["*"]: any; default: no CORS headers);
    max_waiting: requests that may wait for a slot before new ones get a 429 (None: no bound);
    prefix_cache: bytes of the prefix cache (default: half the KV cache; 0: off; see
    generation/prefix_cache.py).
    allow_remote_images: image+text models download http(s) image_url parts (default: data: URLs only).
    """
    if llm is None and embedder is None and transcriber is None:
        raise ValueError("create_app needs a model (llm=), an embedding model (embedder=) and/or a speech model "
                         "(transcriber=)")
    if not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2):
        raise ValueError(f"max_len must be an integer >= 2 (a prompt token and a completion token), got {max_len!r}")
    if isinstance(read_timeout, bool) or not isinstance(read_timeout, (int, float)) or not 0 < read_timeout < 1e6:
        raise ValueError(f"read_timeout must be a positive number of seconds, got {read_timeout!r}")
    if prefix_cache is not None and (isinstance(prefix_cache, bool) or not isinstance(prefix_cache, int)
                                     or prefix_cache < 0):
        raise ValueError(f"prefix_cache must be None or a number of bytes >= 0, got {prefix_cache!r}")
    scheduler = None
    if llm is not None:
        gen = generator if generator is not None else build_generator(llm, max_batch, max_len, prefix_cache)
        scheduler = Scheduler(gen, max_batch=max_batch)
        model_name = model_name or "ember"
    if embedder is not None:
        embedding_model_name = embedding_model_name or "ember-embedding"
    if defaults is None:
        defaults = sampling_defaults(getattr(llm, "generation_config", None))
    else:
        defaults = sampling_defaults(defaults, "defaults")
    st = _State(llm, embedder, model_name, embedding_model_name, scheduler, defaults, read_timeout)
    if transcriber is not None:
        st.transcriber, st.transcription_model_name = transcriber, transcription_model_name or "ember-whisper"
    if max_waiting is not None and (isinstance(max_waiting, bool) or not isinstance(max_waiting, int) or max_waiting < 0):
        raise ValueError(f"max_waiting must be None or a non-negative integer, got {max_waiting!r}")
    st.max_waiting = max_waiting
    st.allow_remote_images = bool(allow_remote_images)
    if api_key is None:
        import os

        api_key = os.environ.get("EMBER_API_KEY") or None
    keys = [api_key] if isinstance(api_key, str) else list(api_key or [])

    @asynccontextmanager
    async def lifespan(app):
        if st.scheduler is not None:
            st.scheduler.start()
        yield
        if st.scheduler is not None:
            await run_in_threadpool(st.scheduler.stop)
        if st.embed_pool is not None:
            st.embed_pool.shutdown(wait=False)
        st.asr_pool.shutdown(wait=False)

    app = FastAPI(title="ember", description="OpenAI-compatible server", lifespan=lifespan)
    app.state.ember = st
    app.state.scheduler = scheduler
    st.metrics = metrics_.Metrics(scheduler)
    if scheduler is not None:
        scheduler.observer = st.metrics
    # outermost last: CORS (its headers on every answer, 401s included) > log > metrics > API key
    if keys:
        app.add_middleware(auth.ApiKeyMiddleware, keys=keys)
    app.add_middleware(metrics_.MetricsMiddleware, metrics=st.metrics)
    app.add_middleware(_LogMiddleware)
    if allowed_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["*"],
                           allow_headers=["*"])

    def _log_error(request: Request, err: ApiError) -> None:
        info = request.scope.get("state", {}).get("ember_log")
        if info is not None:
            info["error"] = f"{err.code or err.type}: {err.message}"

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        _log_error(request, err)
        return _JSON(err.body(), status_code=err.status, headers=getattr(err, "headers", None))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        msg = f"{exc.detail}: {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        err = ApiError(exc.status_code, msg, code=code)
        _log_error(request, err)
        return _JSON(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        err = ApiError(400, f"Invalid request: {exc.errors()}")
        _log_error(request, err)
        return _JSON(err.body(), status_code=400)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        err = ApiError(500, f"Internal server error: {type(exc).__name__}: {exc}", type="server_error")
        _log_error(request, err)
        return _JSON(err.body(), status_code=500)

    def _too_large() -> ApiError:
        return ApiError(413, f"The request body is larger than this server's limit of {max_body_bytes} bytes.",
                        code="request_too_large")

    async def body_of(request: Request) -> dict:
        """The JSON body, read up to max_body_bytes (a larger one is refused as soon as it is seen)."""
        return parse_json(await body_bytes(request))

    async def body_bytes(request: Request) -> bytes:
        """The body, read up to max_body_bytes within read_timeout."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            raise _too_large()
        chunks = []

        async def read():
            n = 0
            async for chunk in request.stream():
                n += len(chunk)
                if n > max_body_bytes:
                    raise _too_large()
                chunks.append(chunk)

        try:  # a client that trickles its body (slowloris) gets read_timeout seconds in all
            await asyncio.wait_for(read(), st.read_timeout)
        except asyncio.TimeoutError:
            raise ApiError(408, f"The request body did not arrive within {st.read_timeout:g} seconds.",
                           code="request_timeout") from None
        return b"".join(chunks)

    # ---- endpoints ----------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        eng = st.scheduler
        if eng is not None and eng.generator is not None and eng._thread is not None and not eng.alive:
            return _JSON({"status": "error", "error": eng.last_error or "the scheduler thread stopped"}, status_code=503)
        out = {"status": "ok"}
        if eng is not None:
            out.update(running=eng.running, waiting=eng.waiting)
        return _JSON(out)

    def _model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": st.created, "owned_by": "ember"}

    @app.get("/v1/models")
    async def models():
        names = [n for n in (st.model_name, st.embedding_model_name, st.transcription_model_name) if n]
        return _JSON({"object": "list", "data": [_model_card(n) for n in names]})

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if not name or name not in (st.model_name, st.embedding_model_name, st.transcription_model_name):
            raise ApiError(404, f"The model '{name}' does not exist.", param="model", code="model_not_found")
        return _JSON(_model_card(name))

    def _need_llm():
        if st.llm is None:
            only = "a speech-to-text model" if st.embedder is None else "an embedding model"
            raise ApiError(404, f"This server has no generation model, only {only}.", param="model",
                           code="model_not_found")

    def _check_text_len(text: str, param: str) -> None:
        """Refuse, before tokenizing it, text that cannot fit the context whatever its tokens: no token
        covers more than the tokenizer's longest vocabulary entry (x4 for normalisers that shorten text)."""
        if st.max_token_chars and len(text) > 4 * st.max_token_chars * st.scheduler.max_len:
            raise ApiError(413, f"This model's maximum context length is {st.scheduler.max_len} tokens, but the "
                           f"{'messages have' if param == 'messages' else 'prompt has'} {len(text)} characters, far "
                           f"more than that many tokens can hold. Shorten the "
                           f"{'messages' if param == 'messages' else 'prompt'}.", param=param,
                           code="context_length_exceeded")

    def _check_len(ids: list[int], param: str) -> None:
        limit = st.scheduler.max_len
        if len(ids) >= limit:
            raise ApiError(413, f"This model's maximum context length is {limit} tokens, but the prompt has "
                           f"{len(ids)} tokens. Shorten the {'messages' if param == 'messages' else 'prompt'}.",
                           param=param, code="context_length_exceeded")

    def _requests(prompts: list[list[int]], p: GenParams, grammar=None, image_embeds=None, rope_positions=None) -> list:
        if p.n > st.scheduler.max_batch:
            raise ApiError(400, f"Invalid value for 'n': this server generates at most {st.scheduler.max_batch} "
                           f"choices of one prompt together (--max-batch), but got {p.n}.", param="n",
                           code="invalid_value")
        max_tokens = p.max_tokens if p.max_tokens is not None else st.scheduler.max_len
        reqs = []
        try:
            for ids in prompts:
                for i in range(p.n):
                    r = st.llm.request(ids, max_tokens, **p.request_kwargs(i), grammar=grammar,
                                       **({"image_embeds": image_embeds} if image_embeds is not None else {}),
                                       **({"rope_positions": rope_positions} if rope_positions is not None else {}))
                    st.scheduler.check(r)
                    reqs.append(r)
        except GenerationError as e:
            msg = str(e)
            param = next((k for k in ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                                      "seed", "stop_token_ids", "stop", "logprobs", "presence_penalty",
                                      "frequency_penalty", "logit_bias") if msg.startswith(k)), None)
            raise ApiError(400, msg, param=param, code="invalid_value") from None
        return reqs

    def _log_info(request: Request) -> dict:
        return request.scope.setdefault("state", {}).setdefault("ember_log", {})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await body_of(request)
        _need_llm()
        model = st.resolve(body, "generate")
        messages, p = parse_chat(body, st.defaults, images=getattr(st.llm, "takes_images", False))
        if st.tok is None:
            raise ApiError(400, "This model has no tokenizer; use /v1/completions with token ids.", param="messages")
        _check_text_len("".join(content_text(m["content"]) for m in messages), "messages")
        # template, tools, grammar; images decoded and through the vision tower
        plan = await run_in_threadpool(ChatPlan, st.llm, body, messages, st.allow_remote_images)
        ids = plan.ids
        _check_len(ids, "messages")
        reqs = _requests([ids], p, plan.grammar, plan.image_embeds, plan.rope_positions)
        run = _Run(st, True, f"chatcmpl-{uuid.uuid4().hex[:24]}", model, [ids], [""], p, reqs, _log_info(request),
                   plan)
        return await _generate(st, request, run, reqs)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await body_of(request)
        _need_llm()
        model = st.resolve(body, "generate")
        prompts, p = parse_completion(body, st.defaults)
        if st.tok is None and any(isinstance(x, str) for x in prompts):
            raise ApiError(400, "This model has no tokenizer; send the prompt as token ids.", param="prompt")

        vocab = getattr(st.scheduler.generator, "vocab", None) or st.llm.config.vocab_size
        for i, x in enumerate(prompts):
            if isinstance(x, str):
                _check_text_len(x, "prompt")
            else:  # before anything (echo's decode) reads them: ids past int64 overflow in the tokenizer
                _check_len(x, "prompt")
                bad = next((t for t in x if not 0 <= t < vocab), None)
                if bad is not None:
                    where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
                    raise ApiError(400, f"Invalid '{where}': prompt token ids must be integers in [0, {vocab}), "
                                   f"but got {str(bad)[:40]}.", param="prompt", code="invalid_value")

        def encode():
            ids = [st.tok.encode(x) if isinstance(x, str) else x for x in prompts]
            texts = [x if isinstance(x, str) else (st.tok.decode(x, skip_special_tokens=False) if p.echo else "")
                     for x in prompts]
            return ids, texts

        try:
            ids, texts = await run_in_threadpool(encode)
        except EmberError as e:  # text the tokenizer refuses (not valid Unicode)
            raise ApiError(400, f"Could not tokenize the prompt: {e}", param="prompt", code="invalid_value") from None
        for x in ids:
            _check_len(x, "prompt")
        reqs = _requests(ids, p)
        run = _Run(st, False, f"cmpl-{uuid.uuid4().hex[:24]}", model, ids, texts, p, reqs, _log_info(request))
        return await _generate(st, request, run, reqs)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        rid = f"embd-{uuid.uuid4().hex[:24]}"
        info = _log_info(request)
        info["id"] = rid  # the request's log line carries it, refusals included
        body = await body_of(request)
        model = st.resolve(body, "embed")
        texts, fmt, dims = parse_embeddings(body, image_inputs.part)
        emb = st.embedder
        import numpy as np

        def work(batch: list, idx: list[int]):
            vecs = image_inputs.embed_mixed(emb, batch, idx)
            tok = getattr(emb, "tokenizer", None)
            n = 0
            if tok is not None:
                for t in batch:
                    if isinstance(t, bytes):  # an image: no tokens
                        continue
                    ids = tok.encode(t)
                    n += len(getattr(ids, "ids", ids))
            arr = vecs.detach().float().cpu().numpy() if hasattr(vecs, "detach") else np.asarray(vecs, dtype=np.float32)
            return np.ascontiguousarray(arr, dtype="<f4"), n

        # In jobs of EMBED_BATCH texts (longest first, for little padding): the one embedding thread
        # interleaves concurrent requests' jobs, and a request whose client has gone stops at the next job.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        gone = _Cancelled()
        watcher = asyncio.ensure_future(_watch_disconnect(request, gone))
        rows, n_tokens = [None] * len(texts), 0
        try:
            for b0 in range(0, len(order), EMBED_BATCH):
                if gone.cancelled:
                    info.update(prompt=n_tokens, completion=0, finish="abort")
                    return Response(status_code=499)
                idx = order[b0:b0 + EMBED_BATCH]
                part, n = await asyncio.get_running_loop().run_in_executor(
                    st.embed_pool, work, [texts[i] for i in idx], idx)
                if part.ndim != 2 or part.shape[0] != len(idx):
                    raise RuntimeError(f"the embedding model returned shape {part.shape} for {len(idx)} texts")
                for j, i in enumerate(idx):
                    rows[i] = part[j]
                n_tokens += n
        except EmberError as e:
            raise ApiError(400, str(e), param="input", code="invalid_value") from None
        finally:
            watcher.cancel()
        arr = np.stack(rows)
        if dims is not None and dims != arr.shape[1]:
            raise ApiError(400, f"Invalid value for 'dimensions': this model makes {arr.shape[1]}-dimensional "
                           f"embeddings, but got {dims}.", param="dimensions", code="invalid_value")
        data = []
        for i, row in enumerate(arr):
            e = base64.b64encode(row.tobytes()).decode() if fmt == "base64" else row.tolist()
            data.append({"object": "embedding", "index": i, "embedding": e})
        info.update(prompt=n_tokens, completion=0, finish="embed")
        return _JSON({"object": "list", "data": data, "model": model,
                      "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}, headers={"x-request-id": rid})

    tokenize.register(app, st, body_of)
    transcriptions.register(app, st, body_bytes)
    metrics_.register(app, st.metrics)
    st.metrics.routes = {r.path for r in app.routes}
    schemas.document(app)
    return app
