"""Chat templates rendered as transformers renders them, inside jinja2's immutable sandbox.

Templates come from downloaded repositories, so they run sandboxed: attribute access to Python
internals (`__class__`, `__globals__`, ...) and mutation of caller objects are refused, and the
refusal surfaces as a `TemplateError`, like any other template failure.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

from ..errors import TemplateError


def _plain(value: Any) -> Any:
    """Rebuild what the template sees from plain JSON types (no caller objects reach the sandbox)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if callable(getattr(value, "model_dump", None)):  # pydantic messages (the openai client's types)
        return _plain(value.model_dump())
    return repr(value)


@lru_cache(maxsize=32)
def _compile(source: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers overrides jinja's tojson (which escapes HTML) with plain json.dumps
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class GenerationTag(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant spans in training templates; rendering keeps the body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise TemplateError(f"chat template does not parse: {e.message} (line {e.lineno})") from None


def render(source: str, messages: list[dict], *, add_generation_prompt: bool = True, tools=None, documents=None,
           **kwargs) -> str:
    """The prompt string for `messages` ([{"role": ..., "content": ...}, ...])."""
    import jinja2

    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
        raise TemplateError("messages must be a list of {'role': ..., 'content': ...} dicts")
    template = _compile(source)
    try:
        return template.render(
            messages=_plain(list(messages)),
            tools=_plain(tools),
            documents=_plain(documents),
            add_generation_prompt=add_generation_prompt,
            **_plain(kwargs),
        )
    except jinja2.exceptions.SecurityError as e:
        raise TemplateError(f"chat template tried an operation the sandbox forbids: {e}") from None
    except jinja2.exceptions.TemplateError as e:
        raise TemplateError(f"chat template failed: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, ZeroDivisionError, RecursionError) as e:
        raise TemplateError(f"chat template failed: {type(e).__name__}: {e}") from None
