"""Hostile requests against `ember serve` (the tiny chat model on 127.0.0.1): each gets a 4xx with an
OpenAI-style error body, never a 500 or a dropped connection, and the server keeps serving with no
leaked slot. Also a fuzz over request bodies (see tests/hostile.py for budgets).
"""
from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

import ember  # noqa: E402
from ember.serve import create_app  # noqa: E402
from ember.serve.engine import wait_idle  # noqa: E402
from ember.serve.protocol import MAX_BODY_BYTES  # noqa: E402
from hostile import fuzz_settings  # noqa: E402
from test_serve import StubEmbedder, running_server  # noqa: E402

CHAT, COMP, EMB = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"
OK = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def srv(tiny_chat):
    llm = ember.load(tiny_chat, device="cpu", dtype="float32")
    # max_len 64: whatever a fuzzed request asks for, a generation stays short
    app = create_app(llm, StubEmbedder(llm.tokenizer), model_name="tiny", embedding_model_name="stub-embed",
                     max_batch=4, max_len=64)
    with running_server(app) as url:
        yield url, app.state.engine


@pytest.fixture
def http(srv):
    with httpx.Client(base_url=srv[0], timeout=60) as c:
        yield c


def _post(http, path, body: bytes | dict):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post(path, content=content, headers={"content-type": "application/json"})


def _assert_openai_error(r, status: int | tuple, code: str | None = None):
    assert r.status_code in ((status,) if isinstance(status, int) else status), r.text[:300]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    if code is not None:
        assert err["code"] == code, err


HOSTILE = [
    # (id, path, body, status, code)
    ("deep-json", CHAT, b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json"),
    ("deep-json-field", CHAT, b'{"model": "tiny", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "invalid_json"),
    ("deep-json-message", CHAT, b'{"model": "tiny", "messages": [{"role": "user", "content": '
     + b"[" * 50_000 + b"]" * 50_000 + b"}]}", 400, None),
    ("non-utf8", CHAT, b'{"model": "\xff\xfe"}', 400, "invalid_json"),
    ("utf16", CHAT, json.dumps(OK).encode("utf-16"), (200, 400), None),
    ("int-digits", CHAT, b'{"model": "tiny", "max_tokens": ' + b"9" * 5000 + b"}", 400, "invalid_json"),
    ("nan", CHAT, json.dumps({**OK, "temperature": float("nan")}).encode(), 400, "invalid_value"),
    ("n-huge", CHAT, {**OK, "n": 10**9}, 400, "invalid_value"),
    ("n-float-huge", CHAT, b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 1e300}', 400, None),
    ("stop-1e5", CHAT, {**OK, "stop": ["x"] * 10**5}, 400, "invalid_value"),
    ("stop-token-ids-1e5", CHAT, {**OK, "stop_token_ids": list(range(10**5))}, 400, "invalid_value"),
    ("prompt-10MB-string", COMP, {"model": "tiny", "prompt": "fox " * (10**6 // 2), "max_tokens": 2}, 413,
     "context_length_exceeded"),
    ("prompt-1e6-ids", COMP, {"model": "tiny", "prompt": [5] * 10**6, "max_tokens": 2}, 413, "context_length_exceeded"),
    ("prompt-huge-id", COMP, {"model": "tiny", "prompt": [10**30], "max_tokens": 2}, 400, "invalid_value"),
    ("prompts-1e5", COMP, {"model": "tiny", "prompt": ["a"] * 10**5, "max_tokens": 2}, 400, "invalid_value"),
    ("messages-1e5", CHAT, {**OK, "messages": [{"role": "user", "content": "abc"}] * 10**5}, 413,
     "context_length_exceeded"),
    ("content-parts-1e5", CHAT, {**OK, "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 10**5}]},
     413, "context_length_exceeded"),
    ("surrogate-chat", CHAT, b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 2}',
     400, "invalid_value"),
    ("surrogate-prompt", COMP, b'{"model": "tiny", "prompt": "a\\ud800b", "max_tokens": 2}', 400, "invalid_value"),
    ("surrogate-model", COMP, b'{"model": "\\ud800", "prompt": "ab", "max_tokens": 2}', 404, "model_not_found"),
    ("embed-1e5", EMB, {"model": "stub-embed", "input": ["a"] * 10**5}, 400, "invalid_value"),
    ("logit-bias-1e5", CHAT, {**OK, "logit_bias": {str(i): 1 for i in range(10**5)}}, 400, "unsupported_parameter"),
    ("seed-huge", CHAT, {**OK, "seed": 10**30}, 400, "invalid_value"),
    ("top-logprobs-huge", CHAT, {**OK, "logprobs": True, "top_logprobs": 10**18}, 400, "invalid_value"),
]


@pytest.mark.parametrize("path,body,status,code", [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_request(srv, http, path, body, status, code):
    r = _post(http, path, body)
    if r.status_code == 200:
        assert status == (200, 400) or status == 200
    else:
        _assert_openai_error(r, status, code)
    assert http.post(CHAT, json=OK).status_code == 200  # the same connection keeps working


def test_absurd_max_tokens_is_capped_by_the_context(http):
    r = http.post(CHAT, json={**OK, "max_tokens": 10**18})
    assert r.status_code == 200 and r.json()["usage"]["total_tokens"] <= 64


def test_request_body_limit(srv, http):
    """Bodies beyond the limit (8 MiB) get a 413 before they are read in full: declared with a
    Content-Length, or streamed chunked without one."""
    big = b'{"model": "tiny", "prompt": "' + b"a" * (MAX_BODY_BYTES + 1) + b'"}'
    r = _post(http, COMP, big)
    _assert_openai_error(r, 413, "request_too_large")

    def chunks():
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(MAX_BODY_BYTES // (1 << 20) + 2):
            yield b"a" * (1 << 20)
        yield b'"}'

    with httpx.Client(base_url=srv[0], timeout=60) as h:
        r = h.post(COMP, content=chunks(), headers={"content-type": "application/json"})
    _assert_openai_error(r, 413, "request_too_large")
    assert http.post(CHAT, json=OK).status_code == 200


def test_body_limit_is_configurable(tiny_chat):
    llm = ember.load(tiny_chat, device="cpu", dtype="float32")
    app = create_app(llm, model_name="tiny", max_body_bytes=1000)
    with running_server(app) as url, httpx.Client(base_url=url, timeout=60) as h:
        _assert_openai_error(h.post(COMP, json={"model": "tiny", "prompt": "a" * 2000}), 413, "request_too_large")
        assert h.post(COMP, json={"model": "tiny", "prompt": "a", "max_tokens": 1}).status_code == 200


def test_regression_lone_surrogate_in_an_echoed_error_was_a_500(http):
    """Bug: a model name with a lone surrogate (JSON "\\ud800") was echoed in the 404 message, whose
    UTF-8 encoding failed: a 500, and the connection was dropped."""
    r = _post(http, COMP, b'{"model": "\\ud800", "prompt": "ab"}')
    assert r.status_code == 404 and r.json()["error"]["message"].startswith("The model '\ud800'")


def test_regression_deep_or_huge_number_json_was_a_500(http):
    """Bug: RecursionError (deep nesting) and ValueError (ints beyond 4300 digits) from json.loads
    were 500s (and dropped the keep-alive connection)."""
    for body in (b"[" * 100_000, b'{"n": ' + b"1" * 5000 + b"}"):
        _assert_openai_error(_post(http, CHAT, body), 400, "invalid_json")


def test_regression_lone_surrogate_prompt_was_a_500(http):
    """Bug: /v1/completions let the tokenizer's error for a lone surrogate escape (500)."""
    _assert_openai_error(_post(http, COMP, b'{"model": "tiny", "prompt": "\\udfff"}'), 400, "invalid_value")


# ---- fuzz ---------------------------------------------------------------------------------------------
FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p",
          "repetition_penalty", "seed", "n", "stop", "stop_token_ids", "stream", "stream_options", "logprobs",
          "top_logprobs", "echo", "ignore_eos", "presence_penalty", "frequency_penalty", "logit_bias", "response_format",
          "tools", "best_of", "suffix", "input", "encoding_format", "dimensions", "user"]
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2, 70), st.sampled_from([10**6, 10**18, 10**30, -10**9, 2**63]),
              st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=6),
              st.sampled_from(["tiny", "stub-embed", "text", "base64", "float", "user", "\ud800"])),
    lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(
        st.sampled_from(["role", "content", "type", "text", "include_usage", "name"]), c, max_size=3)),
    max_leaves=6)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]),
                                           "content": st.one_of(st.text(max_size=10), json_values)}),
                    min_size=0, max_size=3)


@fuzz_settings(60, deadline_ms=None)
@given(path=st.sampled_from([CHAT, COMP, EMB]), body=st.dictionaries(
    st.sampled_from(FIELDS), st.one_of(json_values, messages), max_size=6), model=st.booleans(),
    stream=st.booleans())
def test_fuzz_request_bodies(srv, path, body, model, stream):
    """Any JSON object of known fields: 200 (streamed or not) or an OpenAI-style 4xx, never a 500."""
    if model:
        body.setdefault("model", "stub-embed" if path == EMB else "tiny")
    if stream and path != EMB:
        body["stream"] = True
    with httpx.Client(base_url=srv[0], timeout=60) as h:
        with h.stream("POST", path, content=json.dumps(body).encode(), headers={"content-type": "application/json"}) as r:
            raw = r.read()
    assert r.status_code < 500, raw[:300]
    if r.status_code >= 400:
        err = json.loads(raw)["error"]
        assert set(err) == {"message", "type", "param", "code"}
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        assert raw.rstrip().endswith(b"data: [DONE]") or b'"error"' in raw
    assert wait_idle(srv[1], 30)
