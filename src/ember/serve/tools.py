"""Tool calling: OpenAI `tools` / `tool_choice` in, `message.tool_calls` out.

Tools are rendered by the model's own chat template, and the model's output is parsed in the format
that template teaches it (`ToolFormat`, chosen from the template's text):
  * Hermes / Qwen: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` (one block per call);
  * Llama 3.x: the whole answer is `{"name": ..., "parameters": {...}}` (after an optional `<|python_tag|>`);
  * Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (or v11's `[TOOL_CALLS]name[ARGS]{...}`).
A template that renders no tools at all (SmolLM2's, a plain ChatML one) gets the Hermes format: ember
writes the tool list into the system message in Qwen2.5's words, and turns assistant tool calls and
tool results in the history into `<tool_call>` / `<tool_response>` text the template can render.

`tool_choice` "required" or a named function is enforced by constrained decoding: a grammar of the
format's call syntax around the tools' parameter schemas (llguidance), so even a tiny model returns a
call whose arguments validate. "auto" leaves the model free and parses what it writes; "none" leaves
the tools out of the prompt.
"""
from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..generation.grammar import JSON_OPTIONS
from .protocol import ApiError, json_type

MAX_TOOLS = 128
RESERVED_TEMPLATE_KWARGS = ("messages", "tools", "documents", "add_generation_prompt", "template")


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")


# ---- the request's fields --------------------------------------------------------------------
@dataclass
class Agent:
    """What a chat request asks beyond plain text: tools, tool choice, structured output, template kwargs."""

    tools: list[dict] = field(default_factory=list)  # the "function" objects: name, description, parameters
    choice: str = "none"  # none | auto | required | function (then `forced` names it)
    forced: str | None = None
    parallel: bool = False
    response_format: dict | None = None
    template_kwargs: dict = field(default_factory=dict)

    def tool(self, name: str) -> dict | None:
        return next((t for t in self.tools if t["name"] == name), None)


def parse_agent(body: dict) -> Agent:
    a = Agent()
    tools = body.get("tools")
    if tools is None and body.get("functions") is not None:  # the deprecated form
        fs = body["functions"]
        tools = [{"type": "function", "function": f} for f in fs] if isinstance(fs, list) else fs
    if tools is not None:
        if not isinstance(tools, list):
            raise _bad("tools", f"Invalid type for 'tools': expected an array of tools, but got {json_type(tools)}.")
        if len(tools) > MAX_TOOLS:
            raise _bad("tools", f"Invalid 'tools': at most {MAX_TOOLS} tools, but got {len(tools)}.")
        for i, t in enumerate(tools):
            a.tools.append(_parse_tool(t, f"tools[{i}]"))
        names = [t["name"] for t in a.tools]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise _bad("tools", f"Invalid 'tools': the function name {dup!r} appears more than once.")
    choice = body.get("tool_choice", body.get("function_call"))
    if choice is None:
        a.choice = "auto" if a.tools else "none"
    elif isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise _bad("tool_choice", f"Invalid value for 'tool_choice': expected 'none', 'auto', 'required' or "
                       f"a named function, but got {choice[:60]!r}.")
        a.choice = choice
    elif isinstance(choice, dict):
        fn = choice.get("function") if "function" in choice else choice  # function_call: {"name": ...}
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise _bad("tool_choice", "Invalid 'tool_choice': expected {\"type\": \"function\", \"function\": "
                       "{\"name\": ...}}.")
        a.choice, a.forced = "function", name
    else:
        raise _bad("tool_choice", f"Invalid type for 'tool_choice': expected a string or an object, but got "
                   f"{json_type(choice)}.")
    if a.choice in ("required", "function") and not a.tools:
        raise _bad("tool_choice", f"Invalid 'tool_choice': {a.choice!r} needs 'tools'.")
    if a.forced is not None and a.tool(a.forced) is None:
        raise _bad("tool_choice", f"Invalid 'tool_choice': no tool is named {a.forced[:60]!r} (the tools are "
                   f"{', '.join(t['name'] for t in a.tools)[:300]}).")
    par = body.get("parallel_tool_calls")
    if par is not None and not isinstance(par, bool):
        raise _bad("parallel_tool_calls", "Invalid type for 'parallel_tool_calls': expected a boolean.")
    a.parallel = bool(par)
    rf = body.get("response_format")
    if rf is not None:
        if not isinstance(rf, dict):
            raise _bad("response_format", f"Invalid type for 'response_format': expected an object, but got "
                       f"{json_type(rf)}.")
        kind = rf.get("type", "text")
        if kind not in ("text", "json_object", "json_schema"):
            raise _bad("response_format", f"Invalid 'response_format.type': expected 'text', 'json_object' or "
                       f"'json_schema', but got {str(kind)[:60]!r}.")
        if kind == "json_schema" and not isinstance(rf.get("json_schema"), dict):
            raise _bad("response_format", "Invalid 'response_format': type 'json_schema' needs a 'json_schema' "
                       "object with a 'schema'.")
        a.response_format = rf if kind != "text" else None
    kw = body.get("chat_template_kwargs")
    if kw is not None:
        if not isinstance(kw, dict):
            raise _bad("chat_template_kwargs", "Invalid type for 'chat_template_kwargs': expected an object.")
        bad = [k for k in kw if k in RESERVED_TEMPLATE_KWARGS]
        if bad:
            raise _bad("chat_template_kwargs", f"Invalid 'chat_template_kwargs': {bad[0]!r} is set by the request "
                       f"itself.")
        a.template_kwargs = dict(kw)
    return a


def _parse_tool(t: Any, where: str) -> dict:
    if not isinstance(t, dict):
        raise _bad("tools", f"Invalid type for '{where}': expected an object, but got {json_type(t)}.")
    if t.get("type", "function") != "function":
        raise _bad("tools", f"Invalid '{where}.type': only 'function' tools are supported, got "
                   f"{str(t.get('type'))[:60]!r}.")
    fn = t.get("function")
    if not isinstance(fn, dict):
        raise _bad("tools", f"Invalid '{where}.function': expected an object with a 'name'.")
    name = fn.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
        raise _bad("tools", f"Invalid '{where}.function.name': expected 1 to 64 letters, digits, '_', '.' or '-', "
                   f"but got {str(name)[:60]!r}.")
    params = fn.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(params, dict):
        raise _bad("tools", f"Invalid '{where}.function.parameters': expected a JSON schema object.")
    out = {"name": name, "parameters": params}
    if isinstance(fn.get("description"), str):
        out["description"] = fn["description"]
    return out


def openai_tools(agent: Agent) -> list[dict]:
    """The tools as templates expect them (transformers passes OpenAI's {"type": "function", ...})."""
    return [{"type": "function", "function": t} for t in agent.tools]


# ---- formats ----------------------------------------------------------------------------------
def _args_text(args: Any) -> str:
    return args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


def _call(name: str, args: Any) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:9]}", "type": "function",
            "function": {"name": name, "arguments": _args_text(args if args is not None else {})}}


def _call_from(obj: Any, args_key: str) -> dict | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if not isinstance(args, (dict, str)):
        return None
    return _call(obj["name"], args)


def _call_schema(tool: dict, args_key: str) -> dict:
    params = tool["parameters"]
    if "properties" in params and "additionalProperties" not in params:
        # a function's parameters are its signature: an argument it does not declare would fail the call
        params = {**params, "additionalProperties": False}
    return {"type": "object", "properties": {"name": {"const": tool["name"]}, args_key: params},
            "required": ["name", args_key], "additionalProperties": False}


def _lark_literal(tok, text: str) -> str:
    """A Lark terminal for `text`: the token itself where it is one special token (llguidance writes
    those as <[id]>), else the quoted text."""
    tid = tok.token_to_id(text) if tok is not None else None
    if tid is not None and tid in getattr(tok, "special_ids", set()):
        return f"<[{tid}]>"
    return json.dumps(text)


class ToolFormat:
    name = "base"
    args_key = "arguments"
    opener = ""  # where a call starts in streamed text ("" : only at the very start)

    def parse(self, text: str) -> tuple[str, list[dict]]:
        """(content, tool calls) of a whole output; (text, []) when it holds no call."""
        raise NotImplementedError

    def grammar(self, tools: list[dict], parallel: bool, tok) -> str:
        """A Lark grammar (llguidance's dialect) of one call (or several, if parallel) to one of `tools`."""
        raise NotImplementedError

    def starts_call(self, text: str) -> int | None:
        """Where in `text` a call begins (None: not yet); streamed content before it is plain text."""
        i = text.find(self.opener) if self.opener else (0 if text.lstrip().startswith(("{", "[")) else -1)
        return i if i >= 0 else None

    def may_start_call(self, text: str) -> int:
        """How much of text's end could still grow into the start of a call (held back when streaming)."""
        if not self.opener:
            return len(text) if not text.strip() else 0
        for n in range(min(len(self.opener) - 1, len(text)), 0, -1):
            if text.endswith(self.opener[:n]):
                return n
        return 0

    def _schema(self, tools: list[dict]) -> dict:
        schemas = [_call_schema(t, self.args_key) for t in tools]
        out = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
        return {**out, "x-guidance": JSON_OPTIONS}


class Hermes(ToolFormat):
    name = "hermes"
    opener = "<tool_call>"
    _close = re.compile(r"\s*(?:</tool_call>|\Z)")

    def parse(self, text):
        # each call's JSON is read whole (raw_decode), so a string value holding "</tool_call>" (which
        # the grammar allows) does not end the call early
        dec, calls, spans, pos = json.JSONDecoder(), [], [], 0
        while (a := text.find(self.opener, pos)) >= 0:
            i = a + len(self.opener)
            while i < len(text) and text[i].isspace():
                i += 1
            pos = i
            try:
                obj, j = dec.raw_decode(text, i)
            except ValueError:
                continue
            call, close = _call_from(obj, self.args_key), self._close.match(text, j)
            if call is not None and close is not None:
                calls.append(call)
                spans.append((a, close.end()))
                pos = close.end()
        if not calls:
            return text, []
        content, last = [], 0
        for a, b in spans:
            content.append(text[last:a])
            last = b
        content.append(text[last:])
        return "".join(content).strip(), calls

    def grammar(self, tools, parallel, tok):
        op, cl = _lark_literal(tok, "<tool_call>"), _lark_literal(tok, "</tool_call>")
        start = 'start: call ("\\n" call)*' if parallel else "start: call"
        return f'{start}\ncall: {op} "\\n" %json{json.dumps(self._schema(tools))} "\\n" {cl}\n'


class Llama3(ToolFormat):
    name = "llama3"
    args_key = "parameters"

    def parse(self, text):
        s = text.strip()
        if s.startswith("<|python_tag|>"):
            s = s[len("<|python_tag|>"):].strip()
        if not s.startswith("{"):
            return text, []
        calls = []
        for part in _json_values(s, sep=";"):
            call = _call_from(part, self.args_key)
            if call is None:
                return text, []
            calls.append(call)
        return ("", calls) if calls else (text, [])

    def grammar(self, tools, parallel, tok):
        start = 'start: call ("; " call)*' if parallel else "start: call"
        return f"{start}\ncall: %json{json.dumps(self._schema(tools))}\n"


class Mistral(ToolFormat):
    name = "mistral"
    opener = "[TOOL_CALLS]"
    _v11 = re.compile(r"([A-Za-z0-9_.\-]+)\[ARGS\](.*?)(?=\[TOOL_CALLS\]|$)", re.S)

    def starts_call(self, text):
        i = text.find(self.opener)
        if i >= 0:
            return i
        return 0 if text.lstrip().startswith("[{") else None  # the tag is a special token decoding may drop

    def may_start_call(self, text):
        if not text.strip() or (text.lstrip().startswith("[") and len(text.strip()) < 2):
            return len(text)
        return super().may_start_call(text)

    def parse(self, text):
        s = text.strip()
        i = s.find(self.opener)
        head, body = (s[:i], s[i + len(self.opener):]) if i >= 0 else ("", s)
        body = body.strip()
        calls = []
        if body.startswith("["):
            try:
                items = json.loads(body)
            except ValueError:
                items = None
            if isinstance(items, list):
                calls = [_call_from(x, self.args_key) for x in items]
        elif i >= 0:
            for m in self._v11.finditer(body):
                try:
                    calls.append(_call(m.group(1), json.loads(m.group(2))))
                except ValueError:
                    calls.append(None)
        if not calls or any(c is None for c in calls):
            return text, []
        return head.strip(), calls

    def grammar(self, tools, parallel, tok):
        arr = {"type": "array", "items": self._schema(tools), "minItems": 1, "x-guidance": JSON_OPTIONS}
        if not parallel:
            arr["maxItems"] = 1
        return f"start: {_lark_literal(tok, self.opener)} %json{json.dumps(arr)}\n"


FORMATS = {f.name: f for f in (Hermes(), Llama3(), Mistral())}
BARE_STARTS = ("{", "```")
_fence = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)


def bare_call(text: str, names) -> dict | None:
    """A call that a small model wrote without its format's tags: the whole answer one JSON object
    (bare or in a ```json fence) naming a declared tool, with "arguments" or "parameters"."""
    s = text.strip()
    m = _fence.match(s)
    if m:
        s = m.group(1)
    if not s.startswith("{"):
        return None
    try:
        obj = json.loads(s)
    except ValueError:
        return None
    call = _call_from(obj, "arguments")
    return call if call is not None and obj["name"] in names else None

HERMES_SYSTEM = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
    "function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\nFor each function call, "
    "return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n"
    "<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>")


def detect(template: str | None) -> tuple[ToolFormat, bool]:
    """(the format, whether the template renders tools itself) for a chat template's source."""
    src = template or ""
    native = "tools" in src
    if "[TOOL_CALLS]" in src:
        return FORMATS["mistral"], native
    if "<tool_call>" in src:
        return FORMATS["hermes"], native
    if "<|python_tag|>" in src or ("<|eot_id|>" in src and "parameters" in src and native):
        return FORMATS["llama3"], native
    return FORMATS["hermes"], native


# ---- the history ------------------------------------------------------------------------------
def _history_calls(raw: Any, where: str) -> list[dict]:
    if not isinstance(raw, list):
        raise _bad("messages", f"Invalid type for '{where}.tool_calls': expected an array.")
    out = []
    for j, c in enumerate(raw):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _bad("messages", f"Invalid '{where}.tool_calls[{j}]': expected {{\"type\": \"function\", "
                       f"\"function\": {{\"name\": ..., \"arguments\": ...}}}}.")
        args = fn.get("arguments", {})
        if isinstance(args, str):  # OpenAI sends a JSON string; templates index into a dict
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                pass
        call = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(c.get("id"), str):
            call["id"] = c["id"]
        out.append(call)
    return out


def template_inputs(messages: list[dict], raw_messages: list, agent: Agent, fmt: ToolFormat, native: bool):
    """(messages, tools) to render: assistant `tool_calls` (arguments as dicts) and `tool` messages kept
    for a template that renders them, turned into Hermes text for one that does not."""
    use_tools = agent.tools and agent.choice != "none"
    out = []
    raws = list(raw_messages)[: len(messages)]
    raws += [None] * (len(messages) - len(raws))
    for i, (m, raw) in enumerate(zip(messages, raws)):
        m = dict(m)
        calls = raw.get("tool_calls") if isinstance(raw, dict) else None
        if fmt.name == "mistral" and "tool_call_id" in m:
            m["tool_call_id"] = _mistral_id(m["tool_call_id"])
        if m["role"] == "assistant" and calls is not None:
            calls = _history_calls(calls, f"messages[{i}]")
            if fmt.name == "mistral":
                for c in calls:
                    c["id"] = _mistral_id(c.get("id", ""))
            if native:
                m["tool_calls"] = calls
            else:
                text = "\n".join(f"<tool_call>\n{json.dumps({'name': c['function']['name'], 'arguments': c['function']['arguments']}, ensure_ascii=False)}\n</tool_call>"  # noqa: E501
                                 for c in calls)
                m["content"] = f"{m['content']}\n{text}".strip()
        elif m["role"] == "tool" and not native:
            m = {"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"}
        out.append(m)
    if use_tools and not native:
        block = HERMES_SYSTEM.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in openai_tools(agent)))
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{block}".strip()}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out, (openai_tools(agent) if use_tools and native else None)


def _mistral_id(tid: str) -> str:
    """Mistral's templates refuse a tool call id that is not 9 letters or digits: a longer id (OpenAI's
    "call_...") becomes 9 characters of its hash, the same for the call and its result."""
    if re.fullmatch(r"[A-Za-z0-9]{9}", tid):
        return tid
    return hashlib.sha256(tid.encode()).hexdigest()[:9]


def tool_grammar(agent: Agent, fmt: ToolFormat, tok) -> str | None:
    """The Lark grammar enforcing `tool_choice` "required" / a named function, else None."""
    if agent.choice == "required":
        return fmt.grammar(agent.tools, agent.parallel, tok)
    if agent.choice == "function":
        return fmt.grammar([agent.tool(agent.forced)], False, tok)
    return None


def _json_values(s: str, sep: str) -> list:
    """The JSON values in s, one after another (separated by whitespace or `sep`); [] if s is not that."""
    dec, out, i = json.JSONDecoder(), [], 0
    while i < len(s):
        while i < len(s) and (s[i].isspace() or s[i] == sep):
            i += 1
        if i >= len(s):
            break
        try:
            v, i = dec.raw_decode(s, i)
        except ValueError:
            return []
        out.append(v)
    return out
