"""`ember serve` for agents: structured output (response_format), tool calling (tools / tool_choice) and
reasoning content, driven by the official `openai` client and by LangChain against the default model
(SmolLM2-135M-Instruct Q4_1: a tiny model, so every structural guarantee here comes from constrained
decoding, not from the model's skill).
"""
from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("llguidance")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")

import ember  # noqa: E402
from ember.serve import create_app  # noqa: E402

from test_serve import TIMEOUT, running_server  # noqa: E402

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "color": {"type": "string", "enum": ["red", "green", "blue"]},
        "pets": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 1, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "score", "color", "pets", "address"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 30},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                                                    "b": {"type": "integer", "minimum": -1000, "maximum": 1000}},
                   "required": ["a", "b"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@pytest.fixture(scope="module")
def srv(smollm2_gguf):
    llm = ember.load(smollm2_gguf, device="cpu")
    app = create_app(llm, model_name="smol", max_batch=4, max_len=1024)
    with running_server(app) as url:
        yield url


@pytest.fixture
def client(srv):
    with openai.OpenAI(base_url=srv + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0) as c:
        yield c


def _chat(client, **kw):
    kw.setdefault("model", "smol")
    kw.setdefault("max_tokens", 120)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(**kw)


# ---- structured output ---------------------------------------------------------------------------
def test_json_schema_output_validates(client):
    r = _chat(client, messages=[{"role": "user", "content": "Describe a person who lives in Paris."}],
              response_format={"type": "json_schema",
                               "json_schema": {"name": "person", "schema": PERSON, "strict": True}}, max_tokens=200)
    c = r.choices[0]
    assert c.finish_reason == "stop"
    jsonschema.validate(json.loads(c.message.content), PERSON)


def test_json_object_output_is_an_object(client):
    r = _chat(client, messages=[{"role": "user", "content": "Give me a JSON object with the keys a and b."}],
              response_format={"type": "json_object"}, max_tokens=200)
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_json_schema_sampled_and_streamed_validates(client):
    schema = {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                                        "maxItems": 4},
                                               "n": {"type": "number", "minimum": -5, "maximum": 5}},
              "required": ["tags", "n"], "additionalProperties": False}
    stream = _chat(client, messages=ASK, stream=True, temperature=1.0, seed=3, max_tokens=100,
                   response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": schema}})
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("schema, part", [
    ({"type": "object", "properties": {"a": {"type": "strng"}}}, "strng"),
    ({"type": "string", "pattern": "(?<=x)a"}, "look-around"),
    ({"type": "integer", "minimum": 5, "maximum": 2}, "minimum"),
    ({"type": "object", "properties": {"a": {"$ref": "#/defs/missing"}}}, "/defs/missing"),
])
def test_bad_schema_is_a_400_naming_the_part(srv, schema, part):
    r = httpx.post(srv + "/v1/chat/completions", timeout=TIMEOUT, json={
        "messages": ASK, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "response_format" and part in err["message"]


def test_bad_tool_parameters_are_a_400(srv):
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "nope"}}}}}
    r = httpx.post(srv + "/v1/chat/completions", timeout=TIMEOUT,
                   json={"messages": ASK, "tools": [bad], "tool_choice": "required"})
    assert r.status_code == 400 and "nope" in r.json()["error"]["message"]
    r = httpx.post(srv + "/v1/chat/completions", timeout=TIMEOUT,
                   json={"messages": ASK, "tools": [WEATHER], "tool_choice": {"type": "function",
                                                                            "function": {"name": "nope"}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"


# ---- tool calling ----------------------------------------------------------------------------------
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_call_has_valid_arguments(client, choice):
    r = _chat(client, messages=ASK, tools=[ADD, WEATHER], tool_choice=choice)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    (call,) = c.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    tool = {"add": ADD, "get_weather": WEATHER}[call.function.name]
    if isinstance(choice, dict):
        assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_streamed_tool_calls_assemble_to_the_non_streamed_ones(client):
    kw = dict(messages=ASK, tools=[WEATHER, ADD], tool_choice="required")
    whole = _chat(client, **kw).choices[0].message.tool_calls
    calls: dict[int, dict] = {}
    finish = None
    for ch in _chat(client, stream=True, **kw):
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        for tc in d.tool_calls or []:
            c = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            c["id"] = tc.id or c["id"]
            c["name"] += (tc.function.name or "") if tc.function else ""
            c["arguments"] += (tc.function.arguments or "") if tc.function else ""
        finish = ch.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == \
        [(t.function.name, json.loads(t.function.arguments)) for t in whole]
    assert all(c["id"] for c in calls.values())


def test_history_with_tool_results(client):
    first = _chat(client, messages=ASK, tools=[WEATHER], tool_choice="required").choices[0].message
    call = first.tool_calls[0]
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                             "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "clear"})},
    ]
    r = _chat(client, messages=history, tools=[WEATHER], tool_choice="none", max_tokens=30)
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls
    r = _chat(client, messages=history, tools=[WEATHER], tool_choice="auto", max_tokens=30)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_tool_choice_none_and_auto_are_free_text(client):
    r = _chat(client, messages=[{"role": "user", "content": "Say hello."}], tools=[WEATHER], tool_choice="none",
              max_tokens=10)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")


# ---- a real agent client ---------------------------------------------------------------------------
def test_langchain_tool_loop_and_structured_output(srv):
    lc = pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    model = lc.ChatOpenAI(base_url=srv + "/v1", api_key="unused", model="smol", temperature=0, max_tokens=60,
                          timeout=TIMEOUT, max_retries=0)
    bound = model.bind_tools([add], tool_choice="add")
    msgs = [HumanMessage("What is 2 + 3? Use the add tool.")]
    ai = bound.invoke(msgs)
    (call,) = ai.tool_calls
    assert call["name"] == "add" and set(call["args"]) == {"a", "b"}
    result = add.invoke(call["args"])
    assert result == call["args"]["a"] + call["args"]["b"]
    msgs += [ai, ToolMessage(str(result), tool_call_id=call["id"])]
    final = model.invoke(msgs)  # the loop closes: the model answers with the tool's result in its history
    assert isinstance(final.content, str) and final.content

    from pydantic import BaseModel, Field

    class City(BaseModel):
        name: str = Field(max_length=30)
        population: int = Field(ge=0, le=10**9)

    for method in ("json_schema", "function_calling"):
        out = model.with_structured_output(City, method=method).invoke("Tell me about Paris.")
        assert isinstance(out, City)
