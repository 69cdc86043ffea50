"""`ember serve` for production: the prefix cache through the server, API keys, CORS, /metrics, the
bound on waiting requests (429 + Retry-After), /tokenize and /detokenize, presence/frequency
penalties and logit_bias, and the request schemas in /openapi.json (schemathesis finds no 5xx).
Servers run as in test_serve.py (uvicorn on loopback, the tiny chat model)."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import torch  # noqa: E402

import ember  # noqa: E402
from ember.serve import create_app  # noqa: E402
from ember.serve.scheduler import wait_idle  # noqa: E402

from test_serve import MESSAGES, StubEmbedder, running_server  # noqa: E402

KEY = "sk-test-0123456789"
ORIGIN = "https://app.example"
TIMEOUT = 60


@pytest.fixture(scope="module")
def llm(tiny_chat):
    return ember.load(tiny_chat, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def srv(llm):
    app = create_app(llm, StubEmbedder(llm.tokenizer), model_name="tiny", embedding_model_name="stub-embed",
                     max_batch=3, max_len=256, api_key=KEY, allowed_origins=[ORIGIN])
    with running_server(app) as url:
        yield SimpleNamespace(url=url, app=app, scheduler=app.state.scheduler)


@pytest.fixture
def client(srv):
    with openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, timeout=TIMEOUT, max_retries=0) as c:
        yield c


@pytest.fixture
def http(srv):
    with httpx.Client(base_url=srv.url, timeout=TIMEOUT, headers={"authorization": f"Bearer {KEY}"}) as c:
        yield c


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


# ---- prefix cache ------------------------------------------------------------------------------
def test_prefix_cache_is_on_and_chat_turns_match_uncached_generation(srv, client, llm):
    pc = srv.scheduler.generator.prefix_cache
    assert pc is not None
    hits0 = pc.stats["hit_tokens"]
    history = list(MESSAGES)
    for turn in range(3):
        got = client.chat.completions.create(model="tiny", messages=history, max_tokens=8, temperature=0)
        text = got.choices[0].message.content
        assert text == llm.chat(history, max_tokens=8)  # the Python LLM has no prefix cache
        history += [{"role": "assistant", "content": text}, {"role": "user", "content": f"And {turn}?"}]
    assert pc.stats["hit_tokens"] - hits0 >= len(llm.tokenizer.encode_chat(MESSAGES))
    assert wait_idle(srv.scheduler)


def test_concurrent_requests_sharing_a_system_prompt(srv, client, llm):
    system = {"role": "system", "content": "You answer in one line. " * 6}
    convs = [[system, {"role": "user", "content": q}] for q in ("Foxes?", "Dogs?", "Cats and owls?", "Hi", "Foxes?")]
    want = [llm.chat(m, max_tokens=6) for m in convs]
    with ThreadPoolExecutor(5) as ex:
        got = list(ex.map(lambda m: client.chat.completions.create(
            model="tiny", messages=m, max_tokens=6, temperature=0).choices[0].message.content, convs))
    assert got == want


# ---- API key, CORS -----------------------------------------------------------------------------
def test_api_key_required_on_model_endpoints(srv):
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 2}
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": KEY}, {"authorization": f"Basic {KEY}"}):
        r = httpx.post(srv.url + "/v1/completions", json=body, headers=headers)
        assert r.status_code == 401, headers
        assert r.json() == {"error": {"message": r.json()["error"]["message"], "type": "invalid_request_error",
                                      "param": None, "code": "invalid_api_key"}}
        assert r.headers["www-authenticate"] == "Bearer"
    for path in ("/v1/models", "/tokenize"):
        assert httpx.post(srv.url + path, json={}).status_code in (401, 405)
    ok = httpx.post(srv.url + "/v1/completions", json=body, headers={"authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200
    for path in ("/health", "/metrics", "/openapi.json"):  # open, as in vLLM
        assert httpx.get(srv.url + path).status_code == 200


def test_api_key_from_environment(llm, monkeypatch):
    monkeypatch.setenv("EMBER_API_KEY", "from-env")
    app = create_app(llm, model_name="tiny", max_batch=1, max_len=32)
    with running_server(app) as url:
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/v1/models", headers={"authorization": "Bearer from-env"}).status_code == 200


def test_cors(srv):
    pre = httpx.options(srv.url + "/v1/chat/completions", headers={
        "origin": ORIGIN, "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == ORIGIN
    denied = httpx.get(srv.url + "/v1/models", headers={"origin": ORIGIN})  # no key: 401, with CORS headers
    assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(srv.url + "/v1/models", headers={"origin": "https://evil.example",
                                                           "access-control-request-method": "GET"})
    assert "access-control-allow-origin" not in other.headers


# ---- metrics -----------------------------------------------------------------------------------
def test_metrics(srv, http, client):
    before = http.get("/metrics").text
    client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=5, temperature=0,
                              extra_body={"ignore_eos": True})
    assert wait_idle(srv.scheduler)
    r = http.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    n_prompt = len(srv.app.state.ember.tok.encode("The quick brown fox"))
    assert _metric(text, "ember_prompt_tokens_total") - _metric(before, "ember_prompt_tokens_total") == n_prompt
    assert _metric(text, "ember_generation_tokens_total") - _metric(before, "ember_generation_tokens_total") == 5
    assert _metric(text, "ember_time_to_first_token_seconds_count") - _metric(
        before, "ember_time_to_first_token_seconds_count") == 1
    assert _metric(text, "ember_inter_token_latency_seconds_count") - _metric(
        before, "ember_inter_token_latency_seconds_count") == 4
    assert 'ember_request_success_total{finished_reason="length"}' in text
    assert 'ember_http_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert _metric(text, "ember_num_requests_running") == 0 and _metric(text, "ember_num_requests_waiting") == 0
    assert _metric(text, "ember_kv_cache_usage_perc") == 0
    for name in ("queries", "hits", "query_tokens", "hit_tokens"):
        assert _metric(text, f"ember_prefix_cache_{name}_total") >= 0
    assert _metric(text, "ember_prefix_cache_queries_total") >= 1
    assert 0 < _metric(text, "ember_prefix_cache_usage_perc") <= 1
    http.get("/no/such/path")
    assert 'endpoint="other",status="404"' in http.get("/metrics").text  # no label per unknown path


# ---- back-pressure -----------------------------------------------------------------------------
def test_waiting_requests_are_bounded(llm):
    app = create_app(llm, model_name="tiny", max_batch=1, max_len=400, max_waiting=1)
    gate = threading.Event()
    h = llm.model.register_forward_pre_hook(lambda m, a: gate.wait(10) and None)
    try:
        with running_server(app) as url, ThreadPoolExecutor(2) as ex:
            body = {"model": "tiny", "prompt": "Hi", "max_tokens": 3, "temperature": 0}
            running = ex.submit(httpx.post, url + "/v1/completions", json=body, timeout=TIMEOUT)
            sch = app.state.scheduler
            end = time.monotonic() + 10
            while sch.running + sch.waiting < 1 and time.monotonic() < end:
                time.sleep(0.01)
            waiting = ex.submit(httpx.post, url + "/v1/completions", json=body, timeout=TIMEOUT)
            while sch.waiting < 1 and time.monotonic() < end:
                time.sleep(0.01)
            r = httpx.post(url + "/v1/completions", json=body, timeout=TIMEOUT)  # a third: refused at once
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "rate_limit_exceeded"
            gate.set()
            assert running.result().status_code == 200 and waiting.result().status_code == 200
            assert httpx.post(url + "/v1/completions", json=body, timeout=TIMEOUT).status_code == 200
    finally:
        gate.set()
        h.remove()


# ---- tokenize / detokenize -----------------------------------------------------------------------
def test_tokenize_and_detokenize(http, llm):
    tok = llm.tokenizer
    r = http.post("/tokenize", json={"model": "tiny", "prompt": "The quick brown fox", "return_token_strs": True})
    assert r.status_code == 200
    ids = tok.encode("The quick brown fox")
    assert r.json() == {"count": len(ids), "max_model_len": 256, "tokens": ids,
                        "token_strs": [tok.id_to_token(i) for i in ids]}
    r = http.post("/tokenize", json={"messages": MESSAGES})
    assert r.json()["tokens"] == tok.encode_chat(MESSAGES, add_generation_prompt=True)
    r = http.post("/tokenize", json={"messages": MESSAGES, "add_generation_prompt": False})
    assert r.json()["tokens"] == tok.encode_chat(MESSAGES, add_generation_prompt=False)
    r = http.post("/detokenize", json={"model": "tiny", "tokens": ids})
    assert r.json() == {"prompt": "The quick brown fox"}
    for body, param in (({"tokens": [10**9]}, "tokens"), ({"tokens": "abc"}, "tokens"), ({}, "tokens")):
        r = http.post("/detokenize", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param
    r = http.post("/tokenize", json={"prompt": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = http.post("/tokenize", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


# ---- penalties and logit bias ------------------------------------------------------------------------
def _reference(llm, prompt_ids, n, presence=0.0, frequency=0.0, bias=None):
    """Greedy decoding with OpenAI's penalties, by full forwards (no cache)."""
    ids, counts = list(prompt_ids), torch.zeros(llm.config.vocab_size)
    with torch.no_grad():
        for _ in range(n):
            logits = llm.model(torch.tensor([ids]))[0, -1]
            logits = logits - frequency * counts - presence * (counts > 0).float()
            for k, v in (bias or {}).items():
                logits[k] += v
            t = int(logits.argmax())
            counts[t] += 1
            ids.append(t)
    return ids[len(prompt_ids):]


def test_penalties_and_logit_bias_match_a_reference(llm, client):
    prompt = llm.tokenizer.encode("The quick brown fox")
    for kw in (dict(presence=1.5), dict(frequency=2.0), dict(presence=-1.0, frequency=0.7),
               dict(bias={5: 100.0}), dict(bias={int(t): -100.0 for t in _reference(llm, prompt, 3)})):
        want = _reference(llm, prompt, 8, **kw)
        opts = dict(presence_penalty=kw.get("presence", 0.0), frequency_penalty=kw.get("frequency", 0.0),
                    logit_bias=kw.get("bias"))
        req = llm.request(prompt, 8, ignore_eos=True, **opts)
        assert [e.token_id for e in llm.events([req])] == want, kw
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, logprobs=0,
                                      presence_penalty=opts["presence_penalty"],
                                      frequency_penalty=opts["frequency_penalty"],
                                      logit_bias={str(k): v for k, v in (opts["logit_bias"] or {}).items()},
                                      extra_body={"ignore_eos": True})
        assert r.choices[0].text == llm.tokenizer.decode(want), kw
    assert set(_reference(llm, prompt, 6, bias={5: 100.0})) == {5}


def test_bad_penalties_and_bias(http):
    chat = {"model": "tiny", "messages": MESSAGES, "max_tokens": 2}
    for extra, param, code in (({"presence_penalty": 3}, "presence_penalty", "invalid_value"),
                               ({"frequency_penalty": "x"}, "frequency_penalty", "invalid_type"),
                               ({"logit_bias": {"abc": 1}}, "logit_bias", "invalid_value"),
                               ({"logit_bias": {"5": 101}}, "logit_bias", "invalid_value"),
                               ({"logit_bias": {"99999999": 1}}, "logit_bias", "invalid_value"),
                               ({"logit_bias": [1]}, "logit_bias", "invalid_type")):
        r = http.post("/v1/chat/completions", json={**chat, **extra})
        assert r.status_code == 400, extra
        err = r.json()["error"]
        assert (err["param"], err["code"]) == (param, code), extra


# ---- schemas -----------------------------------------------------------------------------------------
def test_openapi_documents_every_request_body(http):
    doc = http.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]

    def body(path):
        return doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]

    assert body("/v1/chat/completions") == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    chat = schemas["ChatCompletionRequest"]["properties"]
    for field in ("messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p",
                  "repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias", "seed", "n", "stop",
                  "stop_token_ids", "stream", "stream_options", "logprobs", "top_logprobs", "ignore_eos", "tools",
                  "tool_choice", "response_format", "chat_template_kwargs"):
        assert field in chat, field
    assert chat["temperature"]["anyOf"][0] == {"type": "number", "minimum": 0.0, "maximum": 2.0}
    assert "prompt" in schemas["CompletionRequest"]["properties"]
    assert "input" in schemas["EmbeddingRequest"]["properties"]
    assert {s["$ref"].rsplit("/", 1)[1] for s in body("/tokenize")["anyOf"]} == {"TokenizeCompletionRequest",
                                                                                  "TokenizeChatRequest"}
    assert "tokens" in schemas["DetokenizeRequest"]["properties"]
    err = doc["paths"]["/v1/completions"]["post"]["responses"]["400"]["content"]["application/json"]["schema"]
    assert err == {"$ref": "#/components/schemas/ErrorResponse"}
    assert set(schemas["ErrorDetail"]["properties"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/tokenize",
                                  "/detokenize"])
def test_schemathesis_finds_no_server_error(srv, path):
    """Bodies drawn from /openapi.json's own schemas (bounded: a few dozen per endpoint): 2xx or an
    OpenAI-style 4xx, never a 5xx."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_dict(srv.app.openapi())
    op = schema[path]["POST"]
    seen = {}

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=op.as_strategy())
    def check(case):
        r = case.call(base_url=srv.url, headers={"authorization": f"Bearer {KEY}"}, timeout=TIMEOUT)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, (case.body, r.text[:300])
        if r.status_code >= 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}

    check()
    assert wait_idle(srv.scheduler, 30)
    assert any(s < 300 for s in seen) or path == "/v1/completions", seen  # not only refusals


# ---- the command line --------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,want", [
    ([], dict(api_key=None, allowed_origins=None, max_waiting=256, prefix_cache=None)),
    (["--api-key", "k", "--allowed-origins", "https://a.example, https://b.example", "--max-waiting", "3",
      "--prefix-cache-mb", "1.5"],
     dict(api_key="k", allowed_origins=["https://a.example", "https://b.example"], max_waiting=3,
          prefix_cache=3 << 19)),
    (["--no-prefix-cache"], dict(prefix_cache=0)),
])
def test_cli_flags_reach_the_app(monkeypatch, argv, want):
    import argparse

    import ember.serve.server as server
    from ember.serve.cli import add_parser, main

    got = {}
    monkeypatch.setattr(server, "serve", lambda *a, **kw: got.update(kw))
    parser = argparse.ArgumentParser(prog="ember")
    add_parser(parser.add_subparsers(dest="command"))
    main(parser.parse_args(["serve", "some/model", *argv]))
    assert {k: got[k] for k in want} == want
    for bad in (["--max-waiting", "-1"], ["--prefix-cache-mb", "0"]):
        with pytest.raises(SystemExit, match=bad[0]):
            main(parser.parse_args(["serve", "some/model", *bad]))
