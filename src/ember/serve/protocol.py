"""OpenAI request parsing and validation, and the response pieces (errors, logprobs, usage).

Requests are checked field by field with OpenAI-style messages ("Invalid 'temperature': ..."), so a
client learns exactly which parameter is wrong. Unknown fields are ignored (clients send many that
do not apply here); known fields with a wrong type or value are rejected.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

_MISSING = object()
MAX_TOP_LOGPROBS = 20
MAX_N = 128  # choices per request (prompts x n); `n` alone is also bounded by the server's --max-batch
MAX_STOPS = 16  # stop strings per request (OpenAI: 4) ...
MAX_STOP_CHARS = 1024  # ... of at most this many characters each (the generator's own bounds)
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 300  # entries of logit_bias (OpenAI's bound)
MAX_BODY_BYTES = 8 << 20  # default request-body limit (8 MiB: far more text than any context holds)


class ApiError(Exception):
    """An error answered to the client as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    if isinstance(v, dict):
        return "object"
    return type(v).__name__


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, ints past the digit limit,
        # nesting deeper than the parser's recursion limit
        raise ApiError(400, f"Invalid JSON body: {str(e)[:200]}. Send a JSON object (Content-Type: application/json).",
                       code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"The request body must be a JSON object, got {json_type(body)}.", code="invalid_json")
    return body


# ---- field readers ----------------------------------------------------------------------------
def _bad_type(name: str, want: str, v: Any) -> ApiError:
    return ApiError(400, f"Invalid type for '{name}': expected {want}, but got {json_type(v)} ({_short(v)}).",
                    param=name, code="invalid_type")


def _bad_value(name: str, why: str, v: Any) -> ApiError:
    return ApiError(400, f"Invalid value for '{name}': {why}, but got {_short(v)}.", param=name, code="invalid_value")


def _short(v: Any) -> str:
    s = json.dumps(v) if not isinstance(v, float) or math.isfinite(v) else str(v)
    return s if len(s) <= 60 else s[:57] + "..."


def get_int(body: dict, name: str, default=None, *, lo: int | None = None, hi: int | None = None):
    v = body.get(name, _MISSING)
    if v is _MISSING or v is None:
        return default
    if isinstance(v, float) and v.is_integer():  # some clients send 16.0
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad_type(name, "an integer", v)
    _range(name, v, lo, hi)
    return v


def get_num(body: dict, name: str, default=None, *, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False):
    v = body.get(name, _MISSING)
    if v is _MISSING or v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad_type(name, "a number", v)
    if not math.isfinite(v):
        raise _bad_value(name, "expected a finite number", v)
    if lo_open and lo is not None and v <= lo:
        raise _bad_value(name, f"expected a number greater than {lo}" + (f" and at most {hi}" if hi is not None else ""), v)
    _range(name, v, lo, hi)
    return float(v)


def _range(name, v, lo, hi):
    if lo is not None and v < lo:
        raise _bad_value(name, f"expected a value >= {lo}" + (f" and <= {hi}" if hi is not None else ""), v)
    if hi is not None and v > hi:
        raise _bad_value(name, f"expected a value <= {hi}" + (f" and >= {lo}" if lo is not None else ""), v)


def get_bool(body: dict, name: str, default=False):
    v = body.get(name, _MISSING)
    if v is _MISSING or v is None:
        return default
    if not isinstance(v, bool):
        raise _bad_type(name, "a boolean", v)
    return v


def get_str(body: dict, name: str, default=None):
    v = body.get(name, _MISSING)
    if v is _MISSING or v is None:
        return default
    if not isinstance(v, str):
        raise _bad_type(name, "a string", v)
    return v


def _unsupported(name: str, why: str = "") -> ApiError:
    return ApiError(400, f"'{name}' is not supported by ember serve{why}.", param=name, code="unsupported_parameter")


# ---- generation parameters ----------------------------------------------------------------------
@dataclass
class GenParams:
    max_tokens: int | None = None  # None: up to the end of the context
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # None: off; k >= 0: the chosen token's plus the top k
    echo: bool = False  # completions only
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None

    def request_kwargs(self, choice: int = 0) -> dict:
        seed = self.seed
        if seed is not None and choice:
            seed = (seed + choice) % (1 << 63)  # n > 1: distinct but reproducible draws
        return dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                    repetition_penalty=self.repetition_penalty, seed=seed, stop=list(self.stop),
                    stop_token_ids=list(self.stop_token_ids), ignore_eos=self.ignore_eos, logprobs=self.logprobs,
                    presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                    logit_bias=self.logit_bias)


def parse_common(body: dict, defaults: dict, *, chat: bool) -> GenParams:
    p = GenParams()
    if chat:
        mct = get_int(body, "max_completion_tokens", None, lo=0)
        mt = get_int(body, "max_tokens", None, lo=0)
        p.max_tokens = mct if mct is not None else mt
    else:
        p.max_tokens = get_int(body, "max_tokens", 16, lo=0)
    p.temperature = get_num(body, "temperature", defaults.get("temperature", 1.0), lo=0.0, hi=2.0)
    p.top_p = get_num(body, "top_p", defaults.get("top_p", 1.0), lo=0.0, hi=1.0, lo_open=True)
    top_k = get_int(body, "top_k", defaults.get("top_k", 0), lo=-1)  # vLLM extension; -1 or 0: off
    p.top_k = max(top_k, 0)
    p.min_p = get_num(body, "min_p", defaults.get("min_p", 0.0), lo=0.0, hi=1.0)
    p.repetition_penalty = get_num(body, "repetition_penalty", defaults.get("repetition_penalty", 1.0), lo=0.0,
                                   lo_open=True)
    p.seed = get_int(body, "seed", None, lo=-(1 << 63), hi=(1 << 64) - 1)
    p.ignore_eos = get_bool(body, "ignore_eos", False)
    p.n = get_int(body, "n", 1, lo=1, hi=MAX_N)
    if get_int(body, "best_of", 1, lo=1) != 1:
        raise _unsupported("best_of", " (only best_of=1)")

    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise _bad_type("stop", "a string or an array of strings", body.get("stop"))
        if len(stop) > MAX_STOPS:
            raise _bad_value("stop", f"at most {MAX_STOPS} stop sequences", len(stop))
        for i, s in enumerate(stop):
            if len(s) > MAX_STOP_CHARS:
                raise ApiError(400, f"Invalid 'stop[{i}]': a stop sequence may have at most {MAX_STOP_CHARS} "
                               f"characters, but this one has {len(s)}.", param="stop", code="invalid_value")
        p.stop = [s for s in stop if s]
    sti = body.get("stop_token_ids")  # vLLM extension
    if sti is not None:
        if not isinstance(sti, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in sti):
            raise _bad_type("stop_token_ids", "an array of integers", sti)
        if len(sti) > MAX_STOP_TOKEN_IDS:  # copied into every choice's request: bound the amplification
            raise _bad_value("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} token ids", len(sti))
        p.stop_token_ids = sti

    p.stream = get_bool(body, "stream", False)
    so = body.get("stream_options")
    if so is not None:
        if not isinstance(so, dict):
            raise _bad_type("stream_options", "an object", so)
        if not p.stream:
            raise ApiError(400, "'stream_options' is only allowed when 'stream' is true.", param="stream_options",
                           code="invalid_value")
        p.include_usage = get_bool(so, "include_usage", False)

    p.presence_penalty = get_num(body, "presence_penalty", 0.0, lo=-2.0, hi=2.0)
    p.frequency_penalty = get_num(body, "frequency_penalty", 0.0, lo=-2.0, hi=2.0)
    p.logit_bias = parse_logit_bias(body)
    return p


def parse_logit_bias(body: dict) -> dict[int, float] | None:
    """OpenAI's logit_bias: {"token id": bias in [-100, 100]} (at most MAX_LOGIT_BIAS entries)."""
    lb = body.get("logit_bias")
    if lb is None:
        return None
    if not isinstance(lb, dict):
        raise _bad_type("logit_bias", "an object", lb)
    if len(lb) > MAX_LOGIT_BIAS:
        raise _bad_value("logit_bias", f"at most {MAX_LOGIT_BIAS} token ids", len(lb))
    out = {}
    for k, v in lb.items():
        if not (k.isascii() and k.isdigit() and len(k) <= 18):
            raise ApiError(400, f"Invalid 'logit_bias': keys must be token ids (non-negative integers as strings), "
                           f"but got {_short(k)}.", param="logit_bias", code="invalid_value")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _bad_type("logit_bias", "an object of numbers", v)
        if not -100 <= v <= 100:
            raise _bad_value("logit_bias", f"biases must be in [-100, 100] (token {k})", v)
        out[int(k)] = float(v)
    return out or None


# ---- chat ---------------------------------------------------------------------------------------
ROLES = ("system", "developer", "user", "assistant", "tool")


def _content(v: Any, where: str, images: bool) -> str | list[dict]:
    """A message's content: its text, or, when it holds images (image+text models only), its parts as
    {"type": "text", "text": ...} and {"type": "image_url", "image_url": {"url": ...}} in order."""
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, list):
        out = []
        for j, part in enumerate(v):
            if isinstance(part, str):
                out.append({"type": "text", "text": part})
                continue
            if not isinstance(part, dict):
                raise _bad_type(f"{where}[{j}]", "an object", part)
            kind = part.get("type")
            if kind == "image_url" and images:
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else None
                if not isinstance(url, str):
                    raise _bad_type(f"{where}[{j}].image_url.url", "a string (a data: URL)", url)
                out.append({"type": "image_url", "image_url": {"url": url}})
                continue
            if kind not in ("text", "input_text"):
                what = "text and image_url parts" if images else "only text parts (this model takes no images)"
                raise ApiError(400, f"Invalid content part {where}[{j}]: {what} are supported, got type "
                               f"{_short(kind)}.", param=f"{where}[{j}].type", code="unsupported_content")
            text = part.get("text")
            if not isinstance(text, str):
                raise _bad_type(f"{where}[{j}].text", "a string", text)
            out.append({"type": "text", "text": text})
        if any(p["type"] == "image_url" for p in out):
            return out
        return "\n".join(p["text"] for p in out)
    raise _bad_type(where, "a string or an array of content parts", v)


def content_text(content: str | list[dict]) -> str:
    """The text of a parsed message's content (its text parts joined)."""
    return content if isinstance(content, str) else "\n".join(p["text"] for p in content if p["type"] == "text")


def parse_messages(body: dict, images: bool = False) -> list[dict]:
    """The messages of a chat request; images: image_url parts are accepted in user messages."""
    msgs = body.get("messages", _MISSING)
    if msgs is _MISSING or msgs is None:
        raise ApiError(400, "Missing required parameter: 'messages'.", param="messages",
                       code="missing_required_parameter")
    if not isinstance(msgs, list):
        raise _bad_type("messages", "an array of messages", msgs)
    if not msgs:
        raise ApiError(400, "Invalid 'messages': empty array. Expected an array with at least one message.",
                       param="messages", code="empty_array")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad_type(where, "an object", m)
        role = m.get("role")
        if not isinstance(role, str):
            raise ApiError(400, f"Missing or invalid '{where}.role': expected one of {', '.join(ROLES)}.",
                           param=f"{where}.role", code="invalid_value")
        if role not in ROLES:
            raise _bad_value(f"{where}.role", f"expected one of {', '.join(ROLES)}", role)
        msg = {"role": "system" if role == "developer" else role,
               "content": _content(m.get("content"), f"{where}.content", images and role == "user")}
        for k in ("name", "tool_call_id"):
            if isinstance(m.get(k), str):
                msg[k] = m[k]
        out.append(msg)
    return out


def parse_chat(body: dict, defaults: dict, images: bool = False) -> tuple[list[dict], GenParams]:
    messages = parse_messages(body, images)
    p = parse_common(body, defaults, chat=True)
    want = get_bool(body, "logprobs", False)
    top = get_int(body, "top_logprobs", None, lo=0, hi=MAX_TOP_LOGPROBS)
    if top is not None and not want:
        raise ApiError(400, "'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs",
                       code="invalid_value")
    p.logprobs = (top or 0) if want else None
    # tools, tool_choice, response_format and chat_template_kwargs: serve/tools.py (parse_agent)
    return messages, p


# ---- completions --------------------------------------------------------------------------------
def _is_ids(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)


def parse_prompts(body: dict) -> list[str | list[int]]:
    """A string, an array of strings, an array of token ids, or an array of arrays of token ids."""
    v = body.get("prompt", _MISSING)
    if v is _MISSING or v is None:
        raise ApiError(400, "Missing required parameter: 'prompt'.", param="prompt", code="missing_required_parameter")
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and v:
        if all(isinstance(s, str) for s in v):
            return list(v)
        if _is_ids(v):
            return [list(v)]
        if all(_is_ids(x) for x in v):
            return [list(x) for x in v]
    if isinstance(v, list) and not v:
        raise ApiError(400, "Invalid 'prompt': empty array.", param="prompt", code="empty_array")
    raise _bad_type("prompt", "a string, an array of strings, an array of token ids or an array of arrays of "
                    "token ids", v)


def parse_completion(body: dict, defaults: dict) -> tuple[list[str | list[int]], GenParams]:
    prompts = parse_prompts(body)
    p = parse_common(body, defaults, chat=False)
    p.logprobs = get_int(body, "logprobs", None, lo=0, hi=MAX_TOP_LOGPROBS)
    p.echo = get_bool(body, "echo", False)
    if p.echo and p.logprobs is not None:
        raise _unsupported("echo", " together with logprobs (prompt logprobs)")
    if body.get("suffix") not in (None, ""):
        raise _unsupported("suffix")
    if len(prompts) * p.n > MAX_N:
        raise _bad_value("n", f"at most {MAX_N} completions per request (prompts x n)", len(prompts) * p.n)
    return prompts, p


# ---- embeddings ---------------------------------------------------------------------------------
MAX_EMBED_INPUTS = 2048


def parse_embeddings(body: dict, part=None) -> tuple[list, str, int | None]:
    """(items, encoding_format, dimensions): items are texts, or what `part(item, index)` makes of
    an object item (image_inputs.part: image content parts)."""
    v = body.get("input", _MISSING)
    if v is _MISSING or v is None:
        raise ApiError(400, "Missing required parameter: 'input'.", param="input", code="missing_required_parameter")
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list):
        raise _bad_type("input", "a string or an array of strings", v)
    if not v:
        raise ApiError(400, "Invalid 'input': empty array. Expected at least one string.", param="input",
                       code="empty_array")
    if part is not None and any(isinstance(s, dict) for s in v):
        v = [part(s, i) if isinstance(s, dict) else s for i, s in enumerate(v)]
    if not all(isinstance(s, (str, bytes)) for s in v):
        if _is_ids(v) or all(_is_ids(x) for x in v):
            raise ApiError(400, "Token-id input is not supported for embeddings; send the text.", param="input",
                           code="unsupported_parameter")
        raise _bad_type("input", "a string or an array of strings", v)
    if len(v) > MAX_EMBED_INPUTS:
        raise _bad_value("input", f"at most {MAX_EMBED_INPUTS} inputs per request", len(v))
    for i, s in enumerate(v):
        if isinstance(s, bytes):
            continue
        if not s:
            raise ApiError(400, f"Invalid 'input[{i}]': empty string.", param="input", code="invalid_value")
        bad = unicode_error(s)
        if bad:
            raise ApiError(400, f"Invalid 'input[{i}]': {bad}.", param="input", code="invalid_value")
    fmt = get_str(body, "encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise _bad_value("encoding_format", "expected 'float' or 'base64'", fmt)
    dims = get_int(body, "dimensions", None, lo=1)
    return v, fmt, dims


def unicode_error(s: str) -> str | None:
    """Why `s` is not valid Unicode text (a lone surrogate, e.g. from a JSON "\\ud800" escape), or None."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"not valid Unicode text ({e.reason} at position {e.start}: {s[e.start:e.end]!r})"
    return None


# ---- responses ----------------------------------------------------------------------------------
def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0


class TokenText:
    """Token id → its bytes and display text, for logprobs (cached)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.byte_level = _is_byte_level(tokenizer)
        self._added = {}
        try:
            self._added = {i: t.content for i, t in tokenizer.tk.get_added_tokens_decoder().items()}
        except Exception:  # noqa: BLE001 - a tokenizer without added-token info
            pass
        self._cache: dict[int, tuple[str, list[int]]] = {}
        if self.byte_level:
            from ..gguf_tokenizer import bytes_to_unicode

            self._unbyte = {c: b for b, c in bytes_to_unicode().items()}

    def __call__(self, tid: int) -> tuple[str, list[int]]:
        hit = self._cache.get(tid)
        if hit is None:
            b = self._bytes(tid)
            hit = (b.decode("utf-8", errors="backslashreplace"), list(b))
            if len(self._cache) < 1 << 18:
                self._cache[tid] = hit
        return hit

    def _bytes(self, tid: int) -> bytes:
        if tid in self._added:
            return self._added[tid].encode()
        piece = self.tok.id_to_token(tid) if self.tok is not None else None
        if piece is None:
            return b""
        if self.byte_level and all(c in self._unbyte for c in piece):
            return bytes(self._unbyte[c] for c in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        return piece.replace("\u2581", " ").encode()


def _is_byte_level(tokenizer) -> bool:
    try:
        state = json.loads(tokenizer.tk.decoder.__getstate__())
    except Exception:  # noqa: BLE001
        return False

    def walk(d):
        if isinstance(d, dict):
            return d.get("type") == "ByteLevel" or any(walk(x) for x in d.values())
        if isinstance(d, list):
            return any(walk(x) for x in d)
        return False

    return walk(state)
