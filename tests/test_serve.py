"""`ember serve`: the OpenAI-compatible server, driven by the official `openai` client (and httpx for
raw requests) against a uvicorn server started here on 127.0.0.1 with the tiny chat model.

Most embedding tests use a STUB embedder (deterministic vectors from a hash of the text: exact
expected values without a model); the server only needs an object with `embed(list[str]) -> [N, dim]`
and a `.tokenizer`. `test_embeddings_tiny_bert` serves a real `ember.Embedder` (a tiny random BERT),
and `test_ember_serve_end_to_end` runs the `ember serve` command itself in a subprocess.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import torch  # noqa: E402

import ember  # noqa: E402
from ember.serve import create_app  # noqa: E402
from ember.serve.scheduler import wait_idle  # noqa: E402

TIMEOUT = 60  # seconds, any single client call
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me about foxes."}]


class StubEmbedder:
    """STUB embedding model (not ember.embeddings): unit vectors seeded by the text's sha256."""

    dim = 16

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def vector(self, text: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(hashlib.sha256(text.encode()).hexdigest()[:12], 16))
        v = torch.randn(self.dim, generator=g)
        return v / v.norm()

    def embed(self, texts):
        return torch.stack([self.vector(t) for t in texts])


@contextmanager
def running_server(app, **config):
    """uvicorn in a thread on a free loopback port, configured as `ember serve` configures it (timeouts,
    limits); yields the base URL."""
    import uvicorn

    from ember.serve.server import uvicorn_config

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    end = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < end, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


@pytest.fixture(scope="module")
def llm(tiny_chat):
    # CPU float32 on every machine: the tests compare batched server output with one-at-a-time greedy
    # generation token for token, which reduced precision on a GPU does not guarantee.
    return ember.load(tiny_chat, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def srv(llm):
    embedder = StubEmbedder(llm.tokenizer)
    app = create_app(llm, embedder, model_name="tiny", embedding_model_name="stub-embed", max_batch=4)
    with running_server(app) as url:
        yield SimpleNamespace(url=url, app=app, scheduler=app.state.scheduler, llm=llm, embedder=embedder)


@pytest.fixture
def client(srv):
    with openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0) as c:
        yield c


@pytest.fixture
def http(srv):
    with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c:
        yield c


@pytest.fixture
def slow_model(llm):
    """Make every forward take a few ms longer (so that requests overlap in time)."""
    def hook(module, args):
        time.sleep(0.004)

    h = llm.model.register_forward_pre_hook(hook)
    yield
    h.remove()


def _ids(args, kwargs):
    x = args[0] if args else kwargs.get("input_ids")
    return x


# ---- basics ---------------------------------------------------------------------------------------
def test_models_and_health(client, http):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny", "stub-embed"]
    assert client.models.retrieve("tiny").id == "tiny"
    r = http.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_chat_matches_generate_and_usage(client, llm):
    want = llm.chat(MESSAGES, max_tokens=12)
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert len(r.choices) == 1
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want
    assert r.choices[0].finish_reason == "length"
    n_prompt = len(llm.tokenizer.encode_chat(MESSAGES, add_generation_prompt=True))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 12, n_prompt + 12)
    # max_completion_tokens is the newer name of max_tokens
    r2 = client.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=5, temperature=0)
    assert r2.usage.completion_tokens == 5 and want.startswith(r2.choices[0].message.content)


def test_streamed_chat_equals_non_streamed(client, llm):
    kw = dict(model="tiny", messages=MESSAGES, max_tokens=20, temperature=0)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content == llm.chat(MESSAGES, max_tokens=20)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1
    # without include_usage no usage chunk is sent
    plain = list(client.chat.completions.create(**kw, stream=True))
    assert all(c.choices for c in plain) and "".join(c.choices[0].delta.content or "" for c in plain) == text


def test_completions_stream_and_stop(client, llm):
    prompt = "The quick brown fox"
    want = llm.generate(prompt, max_tokens=24)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == want and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(llm.tokenizer.encode(prompt)) and r.usage.completion_tokens == 24
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == 24
    # token-id prompts give the same text
    r_ids = client.completions.create(model="tiny", prompt=llm.tokenizer.encode(prompt), max_tokens=24, temperature=0)
    assert r_ids.choices[0].text == want
    # a stop string from the middle of the greedy text cuts it there, finish_reason "stop"
    m = re.search(r"[A-Za-z]{2,}", want[3:])
    assert m, want
    stop = m.group(0)[:2]
    cut = want[: want.index(stop)]
    for stops in (stop, ["\x00never", stop]):
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, stop=stops)
        assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens < 24
        streamed = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0,
                                                  stop=stops, stream=True))
        assert "".join(c.choices[0].text for c in streamed) == cut
        assert streamed[-1].choices[0].finish_reason == "stop"
    # echo puts the prompt first
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0, echo=True)
    assert r.choices[0].text == prompt + llm.generate(prompt, max_tokens=4)


def test_several_prompts_and_n(client, llm):
    prompts = ["The capital of France", "Once upon a time"]
    r = client.completions.create(model="tiny", prompt=prompts, max_tokens=6, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    want = [llm.generate(p, max_tokens=6) for p in prompts]
    assert [c.text for c in r.choices] == [want[0], want[0], want[1], want[1]]
    assert r.usage.completion_tokens == 24
    assert r.usage.prompt_tokens == sum(len(llm.tokenizer.encode(p)) for p in prompts)
    # sampling with a seed: reproducible, choices differ from each other
    kw = dict(model="tiny", messages=MESSAGES, max_tokens=10, temperature=1.0, seed=1234, n=2)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.choices[0].message.content != a.choices[1].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True))
    for i in range(2):
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == i) == \
            a.choices[i].message.content


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 10
    for e in content:
        assert len(e.top_logprobs) == 3
        assert e.logprob <= 0 and e.logprob == pytest.approx(e.top_logprobs[0].logprob)  # greedy: the top one
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
    text = bytes(b for e in content for b in e.bytes).decode("utf-8", errors="replace")
    assert text == r.choices[0].message.content
    # streamed logprobs are the same entries
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0,
                                                 logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [(e.token, round(e.logprob, 5)) for e in content]
    # logprobs without top_logprobs: the chosen token's only
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3, temperature=0, logprobs=True)
    assert [len(e.top_logprobs) for e in r.choices[0].logprobs.content] == [0, 0, 0]
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3, temperature=0)
    assert r.choices[0].logprobs is None


def test_completion_logprobs(client):
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    assert all(len(t) <= 2 and max(t.values()) == pytest.approx(v) for t, v in zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    chunks = list(client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0,
                                            logprobs=2, stream=True))
    toks = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert toks == lp.tokens


def test_embeddings_stub(client, http, srv):
    """With the STUB embedder (see StubEmbedder)."""
    texts = ["hello world", "the quick brown fox"]
    # the openai client asks for base64 by default and decodes it
    r = client.embeddings.create(model="stub-embed", input=texts)
    assert [d.index for d in r.data] == [0, 1]
    for d, t in zip(r.data, texts):
        assert torch.allclose(torch.tensor(d.embedding), srv.embedder.vector(t), atol=1e-6)
    n_tok = sum(len(srv.llm.tokenizer.encode(t)) for t in texts)
    assert r.usage.prompt_tokens == n_tok and r.usage.total_tokens == n_tok
    r = client.embeddings.create(model="stub-embed", input="hello world", encoding_format="float")
    assert torch.allclose(torch.tensor(r.data[0].embedding), srv.embedder.vector("hello world"), atol=1e-6)
    raw = http.post("/v1/embeddings", json={"input": "hello world", "encoding_format": "base64"}).json()
    vec = torch.frombuffer(bytearray(base64.b64decode(raw["data"][0]["embedding"])), dtype=torch.float32)
    assert raw["model"] == "stub-embed" and torch.equal(vec, srv.embedder.vector("hello world"))


# ---- concurrency ----------------------------------------------------------------------------------
def _stream_text(client, i: int, llm) -> tuple[str, str, int, str]:
    """Request i (chat or completion, length by i), streamed; returns (got, want, tokens, finish)."""
    n = 3 + 2 * i
    if i % 2 == 0:
        msgs = [{"role": "user", "content": f"Request number {i}: say something."}]
        chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=n, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        got = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return got, llm.chat(msgs, max_tokens=n), chunks[-1].usage.completion_tokens, \
            [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    prompt = f"{i} The capital of Japan is"
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    got = "".join(c.choices[0].text for c in chunks if c.choices)
    return got, llm.generate(prompt, max_tokens=n), chunks[-1].usage.completion_tokens, \
        [c.choices[0].finish_reason for c in chunks if c.choices][-1]


def test_16_concurrent_streams(client, srv, llm):
    before = srv.scheduler.stats["steps"]
    with ThreadPoolExecutor(16) as ex:
        futs = [ex.submit(_stream_text, client, i, llm) for i in range(16)]
        results = [f.result(timeout=TIMEOUT) for f in futs]
    for i, (got, want, n_tok, finish) in enumerate(results):
        assert got == want, f"request {i}"
        assert n_tok == 3 + 2 * i and finish == "length"
    # 16 requests through 4 slots: continuous batching means far fewer steps than tokens
    steps = srv.scheduler.stats["steps"] - before
    assert steps < sum(3 + 2 * i for i in range(16))
    assert wait_idle(srv.scheduler, 10) and srv.scheduler.generator.running == 0


def test_disconnect_frees_slot(srv, client, llm, slow_model, caplog):
    caplog.set_level(logging.INFO, logger="ember.serve")
    aborted0 = srv.scheduler.stats["aborted"]
    with ThreadPoolExecutor(3) as ex:
        others = [ex.submit(_stream_text, client, i, llm) for i in (4, 5, 6)]
        # a stream that the client drops after a few chunks
        with httpx.Client(timeout=TIMEOUT) as h:
            with h.stream("POST", srv.url + "/v1/chat/completions",
                          json={"model": "tiny", "messages": MESSAGES, "max_tokens": 400, "temperature": 0,
                                "stream": True}) as resp:
                assert resp.status_code == 200
                n = 0
                for line in resp.iter_lines():
                    n += line.startswith("data: ")
                    if n >= 4:
                        break
        # a non-streaming request whose client gives up
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 400},
                       timeout=httpx.Timeout(TIMEOUT, read=0.5))
        for f in others:
            got, want, _, _ = f.result(timeout=TIMEOUT)
            assert got == want
    end = time.monotonic() + 10
    while srv.scheduler.stats["aborted"] < aborted0 + 2 and time.monotonic() < end:
        time.sleep(0.02)
    assert srv.scheduler.stats["aborted"] == aborted0 + 2
    assert wait_idle(srv.scheduler, 10) and srv.scheduler.generator.running == 0
    # both were cut short, long before their 400 tokens (logged with finish=abort)
    end = time.monotonic() + 5
    while time.monotonic() < end:
        lines = [r.getMessage() for r in caplog.records if "finish=abort" in r.getMessage()]
        if len(lines) == 2:
            break
        time.sleep(0.02)
    assert len(lines) == 2, lines
    for line in lines:
        assert int(re.search(r"completion=(\d+)", line).group(1)) < 400


# ---- faults ---------------------------------------------------------------------------------------
def test_failing_request_does_not_disturb_others(srv, client, http, llm, slow_model):
    poison = 7

    def hook(module, args, kwargs):
        ids = _ids(args, kwargs)
        if ids.shape[1] > 1 and bool((ids == poison).any()):
            raise RuntimeError("poisoned prompt")

    h = llm.model.register_forward_pre_hook(hook, with_kwargs=True)
    failed0 = srv.scheduler.stats["failed_requests"]
    try:
        good_ids = [t for t in llm.tokenizer.encode("The quick brown fox jumps") if t != poison]
        bad_ids = good_ids[:3] + [poison] + good_ids[3:]
        with ThreadPoolExecutor(4) as ex:
            long = ex.submit(_stream_text, client, 7, llm)  # running while the others come and go
            time.sleep(0.2)
            bad = ex.submit(http.post, "/v1/completions", json={"model": "tiny", "prompt": bad_ids, "max_tokens": 5})
            bad_stream = ex.submit(http.post, "/v1/completions", json={"model": "tiny", "prompt": bad_ids,
                                                                       "max_tokens": 5, "stream": True})
            good = ex.submit(client.completions.create, model="tiny", prompt=good_ids, max_tokens=8, temperature=0)
            for f in (bad, bad_stream):
                r = f.result(timeout=TIMEOUT)
                assert r.status_code == 500
                err = r.json()["error"]
                assert err["type"] == "server_error" and "poisoned prompt" in err["message"]
            assert good.result(timeout=TIMEOUT).choices[0].text == llm.generate(good_ids, max_tokens=8)
            got, want, _, _ = long.result(timeout=TIMEOUT)
            assert got == want
    finally:
        h.remove()
    assert srv.scheduler.stats["failed_requests"] == failed0 + 2
    assert http.get("/health").json()["status"] == "ok"
    r = client.completions.create(model="tiny", prompt=good_ids, max_tokens=3, temperature=0)
    assert r.choices[0].text == llm.generate(good_ids, max_tokens=3)


def test_decode_failure_is_contained(srv, client, http, llm):
    state = {"armed": True}

    def hook(module, args, kwargs):
        if _ids(args, kwargs).shape[1] == 1 and state["armed"]:
            state["armed"] = False
            raise RuntimeError("one bad decode step")

    h = llm.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 5})
        assert r.status_code == 500 and "one bad decode step" in r.json()["error"]["message"]
        with client.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0, stream=True) as s:
            assert "".join(c.choices[0].text for c in s) == llm.generate("Hello", max_tokens=5)
    finally:
        h.remove()
    assert wait_idle(srv.scheduler, 10)


# ---- bad requests ---------------------------------------------------------------------------------
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
EMB = "/v1/embeddings"
OK_CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

BAD = [
    # (path, body (dict, or raw str), status, param, code, message part)
    (CHAT, '{"model": "tiny", "messages": [', 400, None, "invalid_json", "Invalid JSON body"),
    (CHAT, "[1, 2]", 400, None, "invalid_json", "must be a JSON object"),
    (CHAT, {**OK_CHAT, "model": "gpt-9"}, 404, "model", "model_not_found", "The model 'gpt-9' does not exist"),
    (COMP, {"model": "gpt-9", "prompt": "x"}, 404, "model", "model_not_found", "does not exist"),
    (EMB, {"model": "gpt-9", "input": "x"}, 404, "model", "model_not_found", "does not exist"),
    (CHAT, {**OK_CHAT, "model": "stub-embed"}, 400, "model", "wrong_model_type", "is an embedding model"),
    (EMB, {"model": "tiny", "input": "x"}, 400, "model", "wrong_model_type", "is a generation model"),
    (CHAT, {**OK_CHAT, "model": 3}, 400, "model", "invalid_type", "expected a string"),
    (CHAT, {"model": "tiny"}, 400, "messages", "missing_required_parameter", "Missing required parameter: 'messages'"),
    (CHAT, {**OK_CHAT, "messages": "hi"}, 400, "messages", "invalid_type", "expected an array of messages"),
    (CHAT, {**OK_CHAT, "messages": []}, 400, "messages", "empty_array", "empty array"),
    (CHAT, {**OK_CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role", "invalid_value",
     "expected one of system"),
    (CHAT, {**OK_CHAT, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "invalid_type",
     "expected a string or an array of content parts"),
    (CHAT, {**OK_CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400,
     "messages[0].content[0].type", "unsupported_content", "only text parts"),
    (CHAT, {**OK_CHAT, "max_tokens": "10"}, 400, "max_tokens", "invalid_type", "expected an integer, but got string"),
    (CHAT, {**OK_CHAT, "max_tokens": 2.5}, 400, "max_tokens", "invalid_type", "expected an integer"),
    (CHAT, {**OK_CHAT, "max_tokens": -1}, 400, "max_tokens", "invalid_value", "expected a value >= 0, but got -1"),
    (COMP, {"model": "tiny", "prompt": "x", "max_tokens": -5}, 400, "max_tokens", "invalid_value", "got -5"),
    (CHAT, {**OK_CHAT, "max_completion_tokens": -3}, 400, "max_completion_tokens", "invalid_value", "got -3"),
    (CHAT, {**OK_CHAT, "temperature": 5}, 400, "temperature", "invalid_value", "expected a value <= 2.0"),
    (CHAT, {**OK_CHAT, "temperature": -0.5}, 400, "temperature", "invalid_value", "expected a value >= 0.0"),
    (CHAT, {**OK_CHAT, "temperature": "hot"}, 400, "temperature", "invalid_type", "expected a number"),
    (CHAT, {**OK_CHAT, "top_p": 0}, 400, "top_p", "invalid_value", "greater than 0.0"),
    (CHAT, {**OK_CHAT, "top_p": 1.5}, 400, "top_p", "invalid_value", "<= 1.0"),
    (CHAT, {**OK_CHAT, "seed": "abc"}, 400, "seed", "invalid_type", "expected an integer"),
    (CHAT, {**OK_CHAT, "n": 0}, 400, "n", "invalid_value", ">= 1"),
    (CHAT, {**OK_CHAT, "stream": "yes"}, 400, "stream", "invalid_type", "expected a boolean"),
    (CHAT, {**OK_CHAT, "stop": 5}, 400, "stop", "invalid_type", "a string or an array of strings"),
    (CHAT, {**OK_CHAT, "stream_options": {"include_usage": True}}, 400, "stream_options", "invalid_value",
     "only allowed when 'stream' is true"),
    (CHAT, {**OK_CHAT, "top_logprobs": 2}, 400, "top_logprobs", "invalid_value", "requires 'logprobs'"),
    (CHAT, {**OK_CHAT, "logprobs": True, "top_logprobs": 50}, 400, "top_logprobs", "invalid_value", "<= 20"),
    (COMP, {"model": "tiny", "prompt": "x", "logprobs": -1}, 400, "logprobs", "invalid_value", ">= 0"),
    (CHAT, {**OK_CHAT, "presence_penalty": 2.5}, 400, "presence_penalty", "invalid_value", "<= 2.0"),
    (CHAT, {**OK_CHAT, "tools": [{"type": "function", "function": {"name": 5}}]}, 400, "tools",
     "invalid_value", "Invalid 'tools[0].function.name'"),
    (CHAT, {**OK_CHAT, "response_format": {"type": "xml"}}, 400, "response_format", "invalid_value",
     "expected 'text', 'json_object' or 'json_schema'"),
    (COMP, {"model": "tiny"}, 400, "prompt", "missing_required_parameter", "Missing required parameter: 'prompt'"),
    (COMP, {"model": "tiny", "prompt": 12}, 400, "prompt", "invalid_type", "expected a string"),
    (COMP, {"model": "tiny", "prompt": [1, "a"]}, 400, "prompt", "invalid_type", "expected a string"),
    (COMP, {"model": "tiny", "prompt": [10 ** 9]}, 400, "prompt", "invalid_value", "prompt token ids must be integers"),
    (COMP, {"model": "tiny", "prompt": ""}, 400, None, "invalid_value", "the prompt is empty"),
    (CHAT, {**OK_CHAT, "messages": [{"role": "user", "content": "fox " * 600}]}, 413, "messages",
     "context_length_exceeded", "maximum context length is 512 tokens, but the prompt has"),
    (COMP, {"model": "tiny", "prompt": list(range(5, 600))}, 413, "prompt", "context_length_exceeded",
     "but the prompt has 595 tokens"),
    (EMB, {"model": "stub-embed"}, 400, "input", "missing_required_parameter", "'input'"),
    (EMB, {"model": "stub-embed", "input": []}, 400, "input", "empty_array", "empty array"),
    (EMB, {"model": "stub-embed", "input": [1, 2, 3]}, 400, "input", "unsupported_parameter", "Token-id input"),
    (EMB, {"model": "stub-embed", "input": "x", "encoding_format": "hex"}, 400, "encoding_format", "invalid_value",
     "expected 'float' or 'base64'"),
    (EMB, {"model": "stub-embed", "input": "x", "dimensions": 3}, 400, "dimensions", "invalid_value",
     "16-dimensional"),
]


@pytest.mark.parametrize("path,body,status,param,code,message", BAD,
                         ids=[f"{i}-{b[0].rsplit('/', 1)[1]}-{b[4]}" for i, b in enumerate(BAD)])
def test_bad_request(http, path, body, status, param, code, message):
    if isinstance(body, str):
        r = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = http.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert (err["param"], err["code"]) == (param, code)
    assert message in err["message"], err["message"]


def test_bad_request_openai_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=3)
    assert e.value.status_code == 400 and "temperature" in e.value.message
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=MESSAGES)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="tiny", prompt="fox " * 600)
    assert e.value.status_code == 413


def test_unknown_route_and_method(http):
    r = http.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_requests_log_one_line_each(client, caplog):
    caplog.set_level(logging.INFO, logger="ember.serve")
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3, temperature=0)
    end = time.monotonic() + 5
    while time.monotonic() < end and not any(r.id in x.getMessage() for x in caplog.records):
        time.sleep(0.01)
    lines = [x.getMessage() for x in caplog.records if r.id in x.getMessage()]
    assert len(lines) == 1
    assert re.search(r"POST /v1/chat/completions 200 prompt=\d+ completion=3 ttft=\S+s time=\S+s finish=length",
                     lines[0]), lines[0]


def test_cli_parser():
    import argparse

    from ember.serve.cli import add_parser

    parser = argparse.ArgumentParser(prog="ember")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "some/model", "--port", "9000", "--embedding-model", "e", "--max-batch", "3"])
    assert (args.model, args.host, args.port, args.embedding_model, args.max_batch) == ("some/model", "127.0.0.1",
                                                                                        9000, "e", 3)
    assert args.func.__module__ == "ember.serve.cli"


def test_sampling_defaults(llm):
    """Omitted sampling fields follow OpenAI (temperature 1) unless generation_config.json says otherwise."""
    from ember.serve.app import sampling_defaults

    assert sampling_defaults({}) == {}
    assert sampling_defaults({"temperature": 0.6, "top_p": 0.9, "do_sample": True}) == {"temperature": 0.6, "top_p": 0.9}
    assert json.dumps(sampling_defaults(llm.generation_config)) == "{}"


def test_embeddings_only_server(llm):
    """An app with only an embedding model (the STUB embedder): no generation endpoints."""
    embedder = StubEmbedder(llm.tokenizer)
    app = create_app(None, embedder, embedding_model_name="stub-only")
    with running_server(app) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as h:
        assert [m["id"] for m in h.get("/v1/models").json()["data"]] == ["stub-only"]
        r = h.post("/v1/embeddings", json={"input": ["a", "b", "c"], "encoding_format": "float"})
        assert r.status_code == 200 and len(r.json()["data"]) == 3
        r = h.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert h.get("/health").json() == {"status": "ok"}


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    """A tiny random BERT with sentence-transformers files (mean pooling, Dense, Normalize)."""
    import tinyencoders

    d = tmp_path_factory.mktemp("tiny_bert") / "tiny-bert"
    return tinyencoders.add_sentence_transformers(tinyencoders.tiny_bert(d), dense=[{"out_features": 16}],
                                                  normalize=True)


def _log_line(caplog, needle: str) -> str:
    """The one ember.serve log line that contains `needle` (written once the response has ended)."""
    end = time.monotonic() + 5
    while time.monotonic() < end and not any(needle in r.getMessage() for r in caplog.records):
        time.sleep(0.01)
    lines = [r.getMessage() for r in caplog.records if needle in r.getMessage()]
    assert len(lines) == 1, lines
    return lines[0]


def test_embeddings_tiny_bert(tiny_bert_dir, caplog):
    """A real ember Embedder behind /v1/embeddings: the vectors are embedder.embed()'s, bit for bit,
    in both encodings; usage counts its tokens; the request has an id (header and log line)."""
    caplog.set_level(logging.INFO, logger="ember.serve")
    emb = ember.load(tiny_bert_dir, dtype="float32", device="cpu")
    texts = ["The quick brown fox jumps over the lazy dog.", "fox", "ça va? 日本語", "word " * 100]
    want = emb.embed(texts)
    assert want.shape == (4, 16)
    app = create_app(None, emb, embedding_model_name="tiny-bert")
    with running_server(app) as url:
        with openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0) as c:
            r = c.embeddings.create(model="tiny-bert", input=texts)  # base64 on the wire, decoded by the client
        with httpx.Client(base_url=url, timeout=TIMEOUT) as h:
            raw = h.post("/v1/embeddings", json={"model": "tiny-bert", "input": texts, "encoding_format": "float"})
            bad = h.post("/v1/embeddings", json={"model": "tiny-bert", "input": []})
    assert [d.index for d in r.data] == [0, 1, 2, 3] and r.model == "tiny-bert"
    assert torch.equal(torch.tensor([d.embedding for d in r.data], dtype=torch.float32), want)
    assert raw.status_code == 200
    assert torch.equal(torch.tensor([d["embedding"] for d in raw.json()["data"]], dtype=torch.float32), want)
    n_tok = sum(len(emb.tokenizer.encode(t)) for t in texts)
    assert r.usage.prompt_tokens == r.usage.total_tokens == n_tok
    rid = raw.headers["x-request-id"]
    assert re.fullmatch(r"embd-[0-9a-f]{24}", rid)
    assert re.match(rf"{rid} POST /v1/embeddings 200 prompt={n_tok} completion=0 time=\S+s finish=embed",
                    _log_line(caplog, rid))
    # a refused request is logged with its own id too (it was "-")
    assert bad.status_code == 400
    line = _log_line(caplog, "POST /v1/embeddings 400")
    assert re.match(r"embd-[0-9a-f]{24} POST /v1/embeddings 400 ", line), line


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ember_serve_end_to_end(tiny_chat, tiny_bert_dir, llm, tmp_path):
    """`ember serve MODEL --embedding-model M --port P` as a user runs it (the CLI in a subprocess):
    it starts, says where it listens and what it serves, answers a chat completion and an embedding
    request, and stops cleanly on Ctrl-C."""
    port = _free_port()
    src = str(Path(ember.__file__).resolve().parents[1])  # the ember this test imports
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    out_path = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "ember.cli", "serve", str(tiny_chat), "--embedding-model", str(tiny_bert_dir),
           "--port", str(port), "--served-model-name", "tiny", "--device", "cpu", "--dtype", "float32",
           "--max-batch", "2"]
    with open(out_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"ember serve exited with {proc.returncode}:\n{out_path.read_text()}"
            try:
                if httpx.get(url + "/health", timeout=2).json().get("status") == "ok":
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < end, f"ember serve did not answer /health:\n{out_path.read_text()}"
            time.sleep(0.1)
        with httpx.Client(base_url=url, timeout=TIMEOUT) as h:
            assert [m["id"] for m in h.get("/v1/models").json()["data"]] == ["tiny", str(tiny_bert_dir)]
            r = h.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, "max_tokens": 6,
                                                     "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == llm.chat(MESSAGES, max_tokens=6)
            texts = ["hello world", "the quick brown fox"]
            r = h.post("/v1/embeddings", json={"model": str(tiny_bert_dir), "input": texts,
                                               "encoding_format": "float"})
            assert r.status_code == 200, r.text
        got = torch.tensor([d["embedding"] for d in r.json()["data"]])
        want = ember.load(tiny_bert_dir, dtype="float32", device="cpu").embed(texts)
        assert torch.allclose(got, want, atol=1e-5)
        proc.send_signal(signal.SIGINT)  # Ctrl-C: uvicorn shuts down gracefully, then ember exits 130 (or 0)
        assert proc.wait(timeout=20) in (0, 130), out_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = out_path.read_text()
    assert f"ember serve: listening on {url}/v1" in log, log
    assert re.search(r"^  model +tiny +\(LLM\(", log, re.M), log
    assert re.search(rf"^  embeddings +{re.escape(str(tiny_bert_dir))}$", log, re.M), log
    assert re.search(r"chatcmpl-\w+ POST /v1/chat/completions 200 ", log) and \
        re.search(r"embd-\w+ POST /v1/embeddings 200 ", log), log
    assert "Traceback" not in log, log


@pytest.mark.slow
def test_embeddings_real_encoder():
    """With a real encoder (all-MiniLM-L6-v2) through ember.embeddings, when that module exists."""
    pytest.importorskip("ember.embeddings")
    import realmodels

    emb = ember.load(realmodels.minilm_dir())
    texts = ["A man is eating food.", "A man is riding a horse."]
    want = emb.embed(texts).float()
    app = create_app(None, emb, embedding_model_name="minilm")
    with running_server(app) as url:
        with openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0) as c:
            r = c.embeddings.create(model="minilm", input=texts)
    got = torch.tensor([d.embedding for d in r.data])
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)
    assert r.usage.prompt_tokens > 0
