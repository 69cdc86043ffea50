"""Constrained decoding: grammars (JSON schemas, Lark) compiled by llguidance, applied as token masks.

A `Grammar` is compiled once for a tokenizer (checked at once: a schema llguidance cannot compile is
a `GrammarError` naming the part it refused); each request that decodes under it gets its own
`Matcher`, which the generation loop asks for the next token's mask (`allowed`) and tells what was
sampled (`advance`). Masks are per row: constrained and free requests share one batch.

llguidance was chosen over xgrammar by measurement (benchmarks/bench_grammar_libs.py): both compute
a mask in tens of microseconds on 49k and 151k vocabularies (far below a decode step), llguidance
compiles a schema in ~1 ms (xgrammar 5-30 ms, and tool calls compile one per request), and it has no
dependencies (xgrammar needs transformers and triton).

llguidance is optional (the `serve` extra): `import ember` works without it, and asking for
structured output without it is a GrammarError that says what to install.
"""
from __future__ import annotations

import json
import threading
import weakref
from typing import Any

import torch

from ..errors import GrammarError

# The JSON the model writes: compact separators, no free whitespace (a small model left free to add
# whitespace can loop on newlines), the order of properties as the schema gives it.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_JSON_OBJECT = {"type": "object"}
MAX_SCHEMA_CHARS = 1 << 20  # a schema is compiled per request: bound the work one request can ask for

_tokenizers: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def _llguidance():
    try:
        import llguidance
        import llguidance.torch  # noqa: F401 - the mask helpers
    except ImportError:
        raise GrammarError("structured output (json_schema, json_object, forced tool calls) needs the llguidance "
                           "package: pip install 'ember[serve]' (or pip install llguidance)") from None
    return llguidance


def _ll_tokenizer(tokenizer, vocab: int, eos_ids):
    """llguidance's view of an ember Tokenizer (building it takes ~0.2-1 s: cached per tokenizer)."""
    ll = _llguidance()
    key = (vocab, tuple(sorted(eos_ids)))
    with _lock:
        per = _tokenizers.setdefault(tokenizer, {})
        if key not in per:
            eos = list(key[1]) or None
            try:
                per[key] = ll.LLTokenizer(tokenizer.tk.to_str(), n_vocab=vocab, eos_token=eos)
            except Exception as e:  # noqa: BLE001 - llguidance raises plain errors on vocabularies it cannot read
                raise GrammarError(f"constrained decoding cannot use this tokenizer: {e}") from None
        return per[key]


def json_schema_grammar(schema: Any) -> str:
    """The llguidance grammar of a JSON schema (a dict or its JSON text); True or None: any JSON object."""
    ll = _llguidance()
    if schema is True or schema is None:
        schema = ANY_JSON_OBJECT
    if isinstance(schema, str):
        if len(schema) > MAX_SCHEMA_CHARS:
            raise GrammarError(f"the JSON schema is {len(schema)} characters long; the limit is {MAX_SCHEMA_CHARS}")
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise GrammarError(f"the JSON schema is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise GrammarError(f"a JSON schema must be an object (a dict), got {type(schema).__name__}")
    text = json.dumps(schema)
    if len(text) > MAX_SCHEMA_CHARS:
        raise GrammarError(f"the JSON schema is {len(text)} characters long; the limit is {MAX_SCHEMA_CHARS}")
    try:
        return ll.LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS)
    except ValueError as e:
        raise GrammarError(f"invalid JSON schema: {e}") from None


def response_format_grammar(rf: Any) -> tuple[str | None, str]:
    """(grammar, what it is) of an OpenAI `response_format`: {"type": "text"} (no grammar: None),
    {"type": "json_object"}, or {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}.
    The schema is enforced whether `strict` is set or not."""
    if not isinstance(rf, dict):
        raise GrammarError(f"response_format must be an object, got {type(rf).__name__}")
    kind = rf.get("type", "text")
    if kind == "text":
        return None, "text"
    if kind == "json_object":
        return json_schema_grammar(ANY_JSON_OBJECT), "response_format"
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise GrammarError("response_format.json_schema must be an object with a 'schema' (and 'name', 'strict')")
        schema = js.get("schema", ANY_JSON_OBJECT)
        name = js.get("name")
        what = f"response_format.json_schema{f' {name!r:.60}' if isinstance(name, str) else ''}"
        try:
            return json_schema_grammar(schema), what
        except GrammarError as e:
            raise GrammarError(f"{what}: {e}") from None
    raise GrammarError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r:.60}")


def lark_grammar(lark: str) -> str:
    """The llguidance grammar of a Lark grammar (llguidance's dialect: `%json{...}` embeds a schema)."""
    ll = _llguidance()
    if not isinstance(lark, str):
        raise GrammarError(f"a Lark grammar must be a string, got {type(lark).__name__}")
    try:
        return ll.LLMatcher.grammar_from_lark(lark)
    except ValueError as e:
        raise GrammarError(f"invalid grammar: {e}") from None


class Grammar:
    """A grammar checked against a tokenizer; `matcher()` starts one request's decoding under it."""

    def __init__(self, grammar: str, tokenizer, vocab: int, eos_ids, what: str = "grammar"):
        ll = _llguidance()
        self.what = what
        self.tok = _ll_tokenizer(tokenizer, vocab, eos_ids)
        self.vocab = vocab
        failed, messages = ll.LLMatcher.validate_grammar_with_warnings(grammar, self.tok)
        if failed:
            raise GrammarError(f"{what} cannot be compiled: {'; '.join(messages)[:500]}")
        self.grammar = grammar

    def matcher(self) -> "Matcher":
        return Matcher(self)


class Matcher:
    """One request's position in its grammar."""

    def __init__(self, grammar: Grammar):
        ll = _llguidance()
        self.grammar = grammar
        self.m = ll.LLMatcher(grammar.tok, grammar.grammar)
        if self.m.is_error():
            raise GrammarError(f"{grammar.what} cannot be compiled: {self.m.get_error()[:500]}")

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into bitmask[row] (int32 words, one bit per token)."""
        import llguidance.torch as lt

        lt.fill_next_token_bitmask(self.m, bitmask, row)

    def advance(self, token: int) -> bool:
        """Take the sampled token; False if the grammar refused it (an error state)."""
        return bool(self.m.consume_token(int(token)))

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing but the end of the sequence may follow."""
        return self.m.is_stopped()


def mask_logits(logits: torch.Tensor, matchers: list) -> torch.Tensor:
    """`logits` [B, V] with each constrained row's disallowed tokens at -inf (a new tensor; rows whose
    matcher is None are left as they are)."""
    import llguidance.torch as lt
    import numpy as np

    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return logits
    batch, vocab = logits.shape
    bits = lt.allocate_token_bitmask(len(rows), vocab)
    for j, i in enumerate(rows):
        matchers[i].fill(bits, j)
    # one bit per token (little-endian int32 words) → one bool per token: numpy's unpackbits is a single
    # C pass, far cheaper than shifting a [rows, words, 32] tensor
    unpacked = np.unpackbits(bits.numpy().view(np.uint8), axis=-1, bitorder="little").view(np.bool_)[:, :vocab]
    allowed = torch.from_numpy(np.ascontiguousarray(unpacked))
    if allowed.shape[1] < vocab:  # tokens past the grammar's vocabulary are never allowed
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
    if len(rows) < batch:
        full = torch.ones(batch, vocab, dtype=torch.bool)
        full[rows] = allowed
        allowed = full
    return torch.where(allowed.to(logits.device, non_blocking=True), logits, float("-inf"))
