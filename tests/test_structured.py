"""Constrained decoding (generation/grammar.py), the tool-call formats (serve/tools.py), reasoning
content (serve/reasoning.py) and their streamed deltas (serve/chat_output.py), on the tiny random chat
model: its text is gibberish, so every valid structure here is the grammar's doing.

Real chat templates of three families (tests/chat_templates/) are rendered with tools and a history of
tool calls and results, and a forced call is decoded and parsed in each family's format.
"""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

import ember  # noqa: E402
from ember.errors import GrammarError  # noqa: E402
from ember.serve.chat_output import ChatOutput, ChatPlan  # noqa: E402
from ember.serve.reasoning import prompt_opens_think, split_reasoning  # noqa: E402
from ember.serve.tools import FORMATS, detect, parse_agent  # noqa: E402

TEMPLATES = Path(__file__).parent / "chat_templates"
FAMILIES = {"llama3": "meta-llama-Llama-3.1-8B-Instruct.jinja", "mistral": "mistralai-Mistral-Nemo-Instruct-2407.jinja",
            "hermes": "Qwen-Qwen3-0.6B.jinja"}
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "n": {"type": "integer", "minimum": -50, "maximum": 50},
    "x": {"type": "number", "minimum": 0, "maximum": 1},
    "kind": {"enum": ["a", "b", "c"]},
    "items": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    "inner": {"type": "object", "properties": {"k": {"type": "string", "maxLength": 5}}, "required": ["k"],
              "additionalProperties": False}},
    "required": ["name", "n", "x", "kind", "items", "inner"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["a", "b"]}}}


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    """The tiny chat model with a 2048-token context (real templates' tool preambles are long in its
    400-token vocabulary)."""
    import tinymodels

    folder = tinymodels.tiny_chat_model(tmp_path_factory.mktemp("tiny_chat_2k"))
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 2048}))
    return ember.load(folder, device="cpu", dtype="float32")


def _with_template(llm, name: str):
    """The tiny model with another chat template (a shallow copy of its tokenizer)."""
    import copy

    other = copy.copy(llm)
    other.tokenizer = copy.copy(llm.tokenizer)
    other.tokenizer.chat_template = (TEMPLATES / name).read_text()
    return other


# ---- constrained decoding ------------------------------------------------------------------------------
def test_generate_json_schema_validates(llm):
    out = llm.generate("hello", max_tokens=200, json_schema=SCHEMA, temperature=1.0, seed=0)
    jsonschema.validate(json.loads(out), SCHEMA)
    out = llm.chat([{"role": "user", "content": "hi"}], max_tokens=200, response_format={
        "type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA, "strict": True}})
    jsonschema.validate(json.loads(out), SCHEMA)
    schema = {"type": "array", "items": {"enum": ["x", "yz"]}, "minItems": 2, "maxItems": 2}
    text = "".join(llm.stream("fox", max_tokens=40, json_schema=json.dumps(schema)))
    jsonschema.validate(json.loads(text), schema)


def test_json_object_and_lark_grammar(llm):
    assert isinstance(json.loads(llm.generate("x", max_tokens=200, response_format={"type": "json_object"},
                                              temperature=0.8, seed=1)), dict)
    out = llm.generate("x", max_tokens=20, grammar='start: ("yes" | "no") "!"')
    assert out in ("yes!", "no!")


def test_constrained_and_free_rows_share_a_batch(llm):
    """One generator, four slots: the free rows' tokens are exactly those of each run alone (float32),
    the constrained rows validate."""
    free = [llm.request(p, 24) for p in ("The quick", "Once upon")]
    alone = [[e.token_id for e in llm.events([llm.request(p, 24)])] for p in ("The quick", "Once upon")]
    tied = [llm.request(p, 200, json_schema=SCHEMA, temperature=1.0, seed=i) for i, p in enumerate(("a", "b"))]
    reqs = [free[0], tied[0], free[1], tied[1]]
    toks = {r.id: [] for r in reqs}
    for ev in llm.generator(reqs).run(reqs):
        toks[ev.request.id].append(ev.token_id)
    assert [toks[r.id] for r in free] == alone
    for r in tied:
        jsonschema.validate(json.loads(llm.tokenizer.decode(toks[r.id])), SCHEMA)


@pytest.mark.parametrize("schema, part", [({"type": "strng"}, "strng"), ({"type": "string", "pattern": "(?<=a)b"},
                                                                         "look-around"),
                                          ({"minimum": 3, "maximum": 1, "type": "number"}, "minimum"), ("{", "JSON")])
def test_bad_schema_names_the_part(llm, schema, part):
    with pytest.raises(GrammarError, match=part):
        llm.generate("x", json_schema=schema)


def test_more_than_one_way_to_constrain_is_refused(llm):
    with pytest.raises(ember.GenerationError, match="at most one"):
        llm.request("x", json_schema=SCHEMA, grammar='start: "a"')


def test_missing_llguidance_is_a_clear_error(llm, monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)
    with pytest.raises(GrammarError, match="pip install"):
        llm.generate("x", json_schema=SCHEMA)
    assert llm.generate("x", max_tokens=3)  # plain generation does not need it


def test_import_ember_does_not_import_llguidance():
    code = "import sys, ember, ember.serve.tools, ember.serve.chat_output; assert 'llguidance' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": str(Path(ember.__file__).parents[1])})


# ---- tool-call formats ------------------------------------------------------------------------------------
CALLS = [("get_weather", {"city": "Paris", "unit": "celsius"}), ("add", {"a": 2, "b": 3})]


def _written(fmt: str, calls) -> str:
    """Calls as each family's model writes them."""
    if fmt == "hermes":
        return "\n".join(f'<tool_call>\n{json.dumps({"name": n, "arguments": a})}\n</tool_call>' for n, a in calls)
    if fmt == "llama3":
        return "; ".join(json.dumps({"name": n, "parameters": a}) for n, a in calls)
    return "[TOOL_CALLS]" + json.dumps([{"name": n, "arguments": a} for n, a in calls])


def _pairs(calls):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


@pytest.mark.parametrize("fmt", ["hermes", "llama3", "mistral"])
def test_parsers_read_each_family_format(fmt):
    content, calls = FORMATS[fmt].parse(_written(fmt, CALLS))
    assert _pairs(calls) == CALLS and not content
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert FORMATS[fmt].parse("Just text, {no call}.") == ("Just text, {no call}.", [])


def test_parser_edge_cases():
    hermes, llama3, mistral = FORMATS["hermes"], FORMATS["llama3"], FORMATS["mistral"]
    content, calls = hermes.parse('Let me look.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>')
    assert content == "Let me look." and _pairs(calls) == [("f", {"x": 1})]
    assert _pairs(hermes.parse('<tool_call>\n{"name": "f", "arguments": {}}')[1]) == [("f", {})]  # unclosed at end
    assert hermes.parse("<tool_call>\n{broken\n</tool_call>")[1] == []
    assert _pairs(llama3.parse('<|python_tag|>{"name": "f", "parameters": {"q": "x"}}')[1]) == [("f", {"q": "x"})]
    assert llama3.parse('{"answer": 42}')[1] == []  # JSON that is not a call stays content
    assert _pairs(mistral.parse('[{"name": "f", "arguments": {"a": 1}}]')[1]) == [("f", {"a": 1})]  # tag dropped
    assert _pairs(mistral.parse('[TOOL_CALLS]f[ARGS]{"a": 1}')[1]) == [("f", {"a": 1})]  # v11



def test_hermes_call_whose_argument_holds_the_closing_tag():
    """The grammar lets a string argument hold "</tool_call>" (the soak's forced calls met one): the call
    ends where its JSON does, streamed or not."""
    args = {"city": "][1]}</tool_call>Em", "unit": "celsius"}
    text = f'<tool_call>\n{json.dumps({"name": "get_weather", "arguments": args})}\n</tool_call>'
    content, calls = FORMATS["hermes"].parse(text + " done")
    assert _pairs(calls) == [("get_weather", args)] and content == "done"
    out = ChatOutput(FORMATS["hermes"])
    deltas = [d for i in range(0, len(text), 5) for d in out.feed(text[i:i + 5])] + out.end()
    assert [json.loads(tc["function"]["arguments"]) for d in deltas for tc in d.get("tool_calls", [])
            if tc["function"]["arguments"]] == [args]
    assert not "".join(d.get("content", "") for d in deltas)

@pytest.mark.parametrize("fmt", ["hermes", "llama3", "mistral"])
def test_streamed_deltas_assemble_to_the_whole_message(fmt):
    text = "<think>\nweighing it</think>\n\n" + _written(fmt, CALLS)
    whole = ChatOutput(FORMATS[fmt]).message(text)
    rng = random.Random(0)
    for _ in range(5):
        out, deltas, i = ChatOutput(FORMATS[fmt]), [], 0
        while i < len(text):
            j = i + rng.randint(1, 6)
            deltas += out.feed(text[i:j])
            i = j
        deltas += out.end()
        reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
        content = "".join(d.get("content", "") for d in deltas)
        calls: dict[int, dict] = {}
        for d in deltas:
            for tc in d.get("tool_calls", []):
                c = calls.setdefault(tc["index"], {"name": "", "arguments": ""})
                c["name"] += tc.get("function", {}).get("name", "")
                c["arguments"] += tc["function"]["arguments"]
        assert reasoning == whole["reasoning_content"] == "\nweighing it"
        assert content == (whole["content"] or "")
        assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == _pairs(whole["tool_calls"])
        assert out.finish_reason("stop") == "tool_calls" and out.finish_reason("length") == "length"


def test_reasoning_split():
    assert split_reasoning("<think>a</think>\n\nb") == ("a", "b")
    assert split_reasoning("no think <think>x</think>") == (None, "no think <think>x</think>")
    assert split_reasoning("still thinking", in_think=True) == ("still thinking", "")
    assert split_reasoning("r</think>answer", in_think=True) == ("r", "answer")
    assert prompt_opens_think("<|im_start|>assistant\n<think>\n") and not prompt_opens_think("<think></think>")
    out = ChatOutput(None)
    pieces = out.feed("  plain") + out.end()
    assert "".join(d["content"] for d in pieces) == "  plain"


@pytest.mark.parametrize("fmt", ["hermes", "llama3", "mistral"])
def test_real_templates_render_tools_and_a_tool_history(llm, fmt):
    tpl = (TEMPLATES / FAMILIES[fmt]).read_text()
    assert detect(tpl) == (FORMATS[fmt], True)
    model = _with_template(llm, FAMILIES[fmt])
    raw = [{"role": "user", "content": "Weather in Paris?"},
           {"role": "assistant", "content": None, "tool_calls": [{"id": "call_0123456789abcdef", "type": "function",
                                                                  "function": {"name": "get_weather",
                                                                               "arguments": '{"city": "Paris"}'}}]},
           {"role": "tool", "tool_call_id": "call_0123456789abcdef", "content": '{"temp": 21}'}]
    msgs = [{"role": m["role"], "content": m["content"] or "",
             **({"tool_call_id": m["tool_call_id"]} if "tool_call_id" in m else {})} for m in raw]
    plan = ChatPlan(model, {"messages": raw, "tools": [WEATHER, ADD], "tool_choice": "required"}, msgs)
    assert "get_weather" in plan.prompt and '"temp": 21' in plan.prompt.replace('\\"', '"')
    assert "Paris" in plan.prompt  # the earlier call's arguments, rendered from a dict
    # a forced call, decoded by the random model under the family's grammar, parses in the family's format
    req = model.request(plan.ids, 160, grammar=plan.grammar, temperature=1.0, seed=0)
    text = "".join(e.text for e in model.events([req]))
    msg = plan.output().message(text)
    (call,) = msg["tool_calls"]
    tool = {"get_weather": WEATHER, "add": ADD}[call["function"]["name"]]
    jsonschema.validate(json.loads(call["function"]["arguments"]), tool["function"]["parameters"])


def test_default_format_for_a_template_without_tools(llm):
    """The tiny model's ChatML template renders no tools: ember writes them in Hermes form."""
    agent = parse_agent({"tools": [WEATHER]})
    assert agent.choice == "auto"
    plan = ChatPlan(llm, {"tools": [WEATHER, ADD], "tool_choice": {"type": "function", "function": {"name": "add"}},
                          "messages": []}, [{"role": "user", "content": "hi"}])
    assert plan.fmt is FORMATS["hermes"] and "<tools>" in plan.prompt and "<tool_call>" in plan.prompt


def test_chat_template_kwargs_reach_the_template_and_open_thinking(llm):
    model = _with_template(llm, FAMILIES["hermes"])
    msgs = [{"role": "user", "content": "hi"}]
    off = ChatPlan(model, {"chat_template_kwargs": {"enable_thinking": False}}, msgs)
    on = ChatPlan(model, {"chat_template_kwargs": {"enable_thinking": True}}, msgs)
    assert "<think>\n\n</think>" in off.prompt and "<think>" not in on.prompt
    assert on.reasoning and on.parses  # Qwen3's template knows think blocks


def test_engine_static_step_with_constrained_rows(llm):
    """The engine's static decode step (the CUDA-graph path; eager on CPU) feeds its own argmax back:
    constrained rows take the masked path instead, and free rows in the same batch are unchanged."""
    fast = llm.with_engine(max_batch=4, max_len=512, cuda_graphs=True)
    schema = {"type": "array", "items": {"enum": ["x", "yz"]}, "minItems": 3, "maxItems": 3}
    reqs = [fast.request("The quick", 16), fast.request("a", 40, json_schema=schema)]
    toks = {r.id: [] for r in reqs}
    for ev in fast.events(reqs):
        toks[ev.request.id].append(ev.token_id)
    assert toks[reqs[0].id] == [e.token_id for e in llm.events([llm.request("The quick", 16)])]
    jsonschema.validate(json.loads(llm.tokenizer.decode(toks[reqs[1].id])), schema)


@pytest.mark.parametrize("text, call", [
    ('```json\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n```', ("add", {"a": 1, "b": 2})),
    ('  {"name": "add", "parameters": {"a": 1}}', ("add", {"a": 1})),
    ('{"name": "not_a_tool", "arguments": {}}', None),
    ('{"answer": 42}', None),
    ('The answer is {"name": "add"}', None),
])
def test_bare_json_call_of_a_declared_tool(text, call):
    """A small model in `auto` mode may write the call as bare (or fenced) JSON instead of its
    format's tags (Qwen2.5-Coder-0.5B does): a call when it names a declared tool, content otherwise;
    streamed or not, the same."""
    whole = ChatOutput(FORMATS["hermes"], names=["add"]).message(text)
    out = ChatOutput(FORMATS["hermes"], names=["add"])
    deltas = [d for ch in text for d in out.feed(ch)] + out.end()
    content = "".join(d.get("content", "") for d in deltas)
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    if call is None:
        assert "tool_calls" not in whole and whole["content"] == text == content and not calls
    else:
        assert _pairs(whole["tool_calls"]) == [call] and not whole["content"] and not content
        assert (calls[0]["function"]["name"], json.loads(calls[1]["function"]["arguments"])) == call
