"""Chat templates rendered as transformers renders them, inside jinja2's immutable sandbox.

Templates come from downloaded repositories, so they run sandboxed: attribute access to Python
internals (`__class__`, `__globals__`, ...) and mutation of caller objects are refused, and the
refusal surfaces as a `TemplateError` at once (the access itself fails, not only a later use of its
result), like any other template failure.

The sandbox is also bounded, so that a hostile template cannot exhaust memory or time either
(jinja's own sandbox only caps `range()`). Each render has a budget (`Limits`):
  * size, in bytes of memory (wide characters take 4, a new list 8 per item plus the items CPython
    does not share): no string, list or bytes a template operation makes may exceed `max_size`, and
    all that a render makes (operator, filter and method results, `~` concatenations, output) may
    not exceed `budget`. Operations whose result can be far larger than their operands (`*`, `**`, `%`,
    `str.center/ljust/rjust/zfill/expandtabs/join/replace/format`, `int.to_bytes`, the `center`,
    `indent`, `join`, `replace`, `format`, `wordwrap`, `urlize`, `sum`, `batch`, `slice` and
    `tojson` filters, `lipsum`) are checked before they run, and so is the text of a list or dict
    before anything turns it into a string; other results are charged after they are made;
  * steps: loop iterations, calls and filter/test applications together may not exceed `max_steps`;
  * work inside one step: comparing or hashing (`==`, `<`, `in`, tests such as `equalto`, dict keys,
    `max`/`min`/`unique`/`sort`/`dictsort`/`groupby`) costs the operands' expanded size (lists
    doubled 40 times compare in 2**40 steps in C, which no time check interrupts), and `wordwrap` its
    textwrap cost (a long word is cut one line at a time); both are charged to `max_work` before
    they run;
  * time: a render still running after `seconds` stops at its next step.
Exceeding any of them is a `TemplateError` ("... the sandbox forbids: resource limit ..."). Real chat
templates use a tiny fraction of each.
"""
from __future__ import annotations

import builtins
import contextvars
import functools
import inspect
import json
import re
import string
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from ..errors import TemplateError


@dataclass(frozen=True)
class Limits:
    max_size: int = 1 << 24  # bytes of memory one string, list or bytes a template makes may take (16 MiB)
    budget: int = 1 << 27  # ... all that one render makes may take, output included (128 MiB)
    max_steps: int = 1_000_000  # loop iterations + calls + filter/test applications per render
    max_work: int = 1 << 24  # elements compared or hashed (==, in, sort, max, unique, dict keys) per render
    seconds: float = 10.0  # wall time per render
    max_int_bits: int = 1 << 16  # integers a template computes (about 20k digits)
    max_width: int = 1 << 20  # a width, indent, batch size, slice count or format field width


LIMITS = Limits()


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


# ---- the budget --------------------------------------------------------------------------------------
class _Budget:
    """One render's account (see the module docstring)."""

    __slots__ = ("limits", "made", "steps", "deadline", "work")

    def __init__(self, limits: Limits):
        self.limits = limits
        self.made = 0
        self.steps = 0
        self.work = 0
        self.deadline = time.monotonic() + limits.seconds

    def step(self) -> None:
        self.steps += 1
        if self.steps > self.limits.max_steps:
            _refuse(f"more than {self.limits.max_steps} loop iterations and calls")
        if time.monotonic() > self.deadline:
            _refuse(f"more than {self.limits.seconds:g} s of rendering")

    def make(self, n: int) -> None:
        if n > self.limits.max_size:
            _refuse(f"a result of size {n} (limit {self.limits.max_size})")
        self.made += n
        if self.made > self.limits.budget:
            _refuse(f"more than {self.limits.budget} bytes made in one render")


_current: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("ember_template_budget", default=None)


def _refuse(what: str):
    from jinja2.exceptions import SecurityError

    raise SecurityError(f"resource limit: {what}")


def _forbid_attribute(obj: Any, attribute: Any):
    from jinja2.exceptions import SecurityError

    raise SecurityError(f"access to attribute {str(attribute)[:60]!r} of {type(obj).__name__!r} object is unsafe")


def _limits() -> Limits:
    b = _current.get()
    return b.limits if b is not None else LIMITS


def _make(n: int) -> None:
    """Charge a result of size n, or refuse it. Outside a render (jinja folding constants while it
    compiles) only the per-object limit applies."""
    b = _current.get()
    if b is not None:
        b.make(n)
    elif n > LIMITS.max_size:
        _refuse(f"a result of size {n} (limit {LIMITS.max_size})")


def _step() -> None:
    b = _current.get()
    if b is not None:
        b.step()


def _room() -> int:
    """The most a single new object may take now."""
    b = _current.get()
    if b is None:
        return LIMITS.max_size
    return max(min(b.limits.max_size, b.limits.budget - b.made), 0)


def _size(x: Any) -> int | None:
    return len(x) if isinstance(x, (str, bytes, list, tuple, dict)) else None


_SCALARS = (str, bytes, int, float)


def _item_bytes(v: Any) -> int:
    """Memory an item of a new container may add: 0 for the objects CPython shares (small ints,
    bools, None, one-character Latin-1 strings, the empty string), else its size."""
    if v is None or isinstance(v, bool):
        return 0
    if isinstance(v, int):
        return 0 if -5 <= v <= 256 else sys.getsizeof(v)
    if isinstance(v, str):
        return 0 if len(v) == 0 or (len(v) == 1 and v < "\u0100") else sys.getsizeof(v)
    if isinstance(v, (bytes, float)):
        return sys.getsizeof(v)
    return 0  # containers: charged when they were made


def _unit(x: Any) -> int:
    """Bytes per element of x when it is repeated or padded: 1 for ASCII text and bytes, 4 for other
    text (CPython stores 1, 2 or 4 per character), 8 for a list or tuple (a reference per item)."""
    if isinstance(x, str):
        return 1 if x.isascii() else 4
    if isinstance(x, (list, tuple, dict)):
        return 8
    return 1


def _units(*xs: Any) -> int:
    return max((_unit(x) for x in xs if isinstance(x, str)), default=1)


def _nbytes(x: Any) -> int | None:
    """The memory an operation's result takes: strings and bytes exactly (sys.getsizeof is O(1));
    containers their own size plus their scalar items (a list of 4M one-character non-Latin-1 strings
    is 4M items but 300 MB). Shared items are counted each time: a conservative bound."""
    if isinstance(x, (str, bytes)):
        return sys.getsizeof(x)
    if isinstance(x, (list, tuple)):
        return sys.getsizeof(x) + sum(map(_item_bytes, x))
    if isinstance(x, dict):
        return sys.getsizeof(x) + sum(_item_bytes(k) + _item_bytes(v) for k, v in x.items())
    return None


def _charged(x: Any) -> Any:
    """Charge the memory an operation's result takes (see _nbytes)."""
    n = _nbytes(x)
    if n is not None:
        _make(n)
    elif isinstance(x, int) and not isinstance(x, bool) and x.bit_length() > _limits().max_int_bits:
        _refuse(f"an integer of {x.bit_length()} bits")
    return x


class _TooBig(Exception):
    pass


def _text_size(x: Any, limit: int) -> int:
    """About how many bytes str(x) takes (counting stops past `limit`). Shared sub-lists are walked
    once but counted each time they appear, so this is also the size of x fully expanded: a bound on
    the cost of comparing or hashing x, which Python does element by element without sharing."""
    memo: dict[int, int] = {}

    def walk(y: Any) -> int:
        if isinstance(y, str):
            return len(y) if y.isascii() else 4 * len(y)
        if isinstance(y, bytes):
            return len(y)
        if isinstance(y, (list, tuple, dict)):
            k = id(y)
            if k in memo:
                return memo[k]
            total = 2
            for item in (y.items() if isinstance(y, dict) else y):
                total += 4 + (walk(item[0]) + walk(item[1]) if isinstance(y, dict) else walk(item))
                if total > limit:
                    raise _TooBig
            memo[k] = total
            return total
        if isinstance(y, int) and not isinstance(y, bool):
            return y.bit_length() // 3 + 2
        return 32

    try:
        return walk(x)
    except _TooBig:
        return limit + 1
    except RecursionError:
        _refuse("a value nested too deeply to turn into text")


def _compared(x: Any, times: int = 1) -> Any:
    """Charge the work of comparing or hashing x (`times` over: a sort compares each item about log n
    times). Containers cost their expanded size (see _text_size): two lists doubled 40 times compare
    in 2**40 steps though each is 40 objects; strings and numbers compare in C, cheaply."""
    if isinstance(x, (list, tuple, dict)):
        b = _current.get()
        limits = b.limits if b is not None else LIMITS
        room = limits.max_work - (b.work if b is not None else 0)
        n = _text_size(x, max(room // max(times, 1), 0)) * times
        if n > room:
            _refuse(f"comparing or hashing a {type(x).__name__} of about {n}+ elements (room for {max(room, 0)} "
                    f"of the {limits.max_work} per render)")
        if b is not None:
            b.work += n
    return x


def _compared_work(n: int, what: str) -> None:
    """Charge n units of comparison-like work done in C or a library (see Limits.max_work)."""
    b = _current.get()
    limits = b.limits if b is not None else LIMITS
    done = b.work if b is not None else 0
    if done + n > limits.max_work:
        _refuse(f"{what}: about {n} steps of work (room for {max(limits.max_work - done, 0)} of the "
                f"{limits.max_work} per render)")
    if b is not None:
        b.work += n


def _compared_all(*xs: Any) -> None:
    for x in xs:
        _compared(x)


def _textable(x: Any) -> Any:
    """Check that turning container `x` into text stays within the limits (before anything does)."""
    if isinstance(x, (list, tuple, dict)):
        room = _room()
        n = _text_size(x, room)
        if n > room:
            _refuse(f"turning a {type(x).__name__} of about {n}+ characters into text (room for {room})")
    return x


def _int_arg(v: Any, what: str) -> int:
    """A width-like argument: numbers beyond max_width are refused."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) > _limits().max_width:
        _refuse(f"{what} {v!r:.40} (limit {_limits().max_width})")
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


_PCT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_percent(fmt: str) -> None:
    """`fmt % args`: no `*` widths and no field width or precision beyond max_width."""
    for m in _PCT_SPEC.finditer(fmt):
        for g in m.groups():
            if g == "*":
                _refuse("'*' widths in %-formatting")
            if g is not None and len(g) > 6:
                _int_arg(int(g), "a %-format width")


def _check_format(fmt: str) -> None:
    """`fmt.format(...)`: no nested replacement fields and no width beyond max_width."""
    try:
        parsed = list(string.Formatter().parse(fmt))
    except ValueError:
        return  # str.format raises its own error
    for _, _, spec, _ in parsed:
        if spec:
            if "{" in spec:
                _refuse("nested replacement fields in str.format")
            for digits in re.findall(r"\d+", spec):
                if len(digits) > 6:
                    _int_arg(int(digits), "a format width")


def _check_args_textable(args, kwargs) -> None:
    for v in (*args, *kwargs.values()):
        _textable(v)


# ---- operators ---------------------------------------------------------------------------------------
def _check_binop(operator: str, left: Any, right: Any) -> None:
    if operator == "**":
        if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            bits = right * abs(left).bit_length()
            if bits > _limits().max_int_bits:
                _refuse(f"an integer power of about {bits} bits")
    elif operator == "*":
        for seq, n in ((left, right), (right, left)):
            if _size(seq) is not None and isinstance(n, int):
                _make(len(seq) * _unit(seq) * max(n, 0))
                return
        if isinstance(left, int) and isinstance(right, int):
            if left.bit_length() + right.bit_length() > _limits().max_int_bits:
                _refuse("an integer product beyond the size limit")
    elif operator == "%" and isinstance(left, str):
        _check_percent(left)
        _textable(right)


# ---- str/bytes/int methods reached by attribute ------------------------------------------------------
_METHODS = frozenset({"zfill", "ljust", "rjust", "center", "expandtabs", "join", "replace", "format", "format_map",
                      "to_bytes"})


def _check_method(name: str, obj: Any, args: tuple, kwargs: dict) -> tuple:
    if name in ("zfill", "ljust", "rjust", "center"):
        width = args[0] if args else kwargs.get("width", 0)
        _make(max(len(obj), _int_arg(width, f"{name} width")) * _unit(obj))
    elif name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        tabs = obj.count("\t" if isinstance(obj, str) else b"\t")
        _make((len(obj) + tabs * max(_int_arg(size, "tabsize"), 0)) * _unit(obj))
    elif name == "join" and args:
        items = list(args[0])
        args = (items, *args[1:])
        _make((sum(len(x) for x in items if _size(x) is not None) + len(obj) * max(len(items) - 1, 0))
              * _units(obj, *items[:1000]))
    elif name == "replace" and len(args) >= 2 and _size(args[0]) is not None and _size(args[1]) is not None:
        old, new = args[0], args[1]
        count = args[2] if len(args) > 2 else kwargs.get("count", -1)
        try:
            k = obj.count(old) if old else len(obj) + 1
        except TypeError:
            k = 0  # str/bytes mixed: replace raises its own error
        if isinstance(count, int) and count >= 0:
            k = min(k, count)
        _make((len(obj) + k * max(len(new) - len(old), 0)) * _units(obj, new))
    elif name in ("format", "format_map") and isinstance(obj, str):
        _check_format(obj)
        _check_args_textable(args, kwargs)
    elif name == "to_bytes":
        length = args[0] if args else kwargs.get("length", 1)
        _make(_int_arg(length, "to_bytes length"))
    return args, kwargs


def _guard_method(value: Any) -> Any:
    """Wrap a bound str/bytes/int method that can make a result far larger than its inputs."""
    name = getattr(value, "__name__", None)
    if name not in _METHODS or not callable(value):
        return value
    owner = getattr(value, "__self__", None)
    if owner is None:  # jinja's sandboxed str.format wrapper
        owner = getattr(getattr(value, "__wrapped__", None), "__self__", None)
    if not isinstance(owner, (str, bytes, int)) or isinstance(owner, bool):
        return value

    @functools.wraps(value)
    def method(*args, **kwargs):
        args, kwargs = _check_method(name, owner, args, kwargs)
        return _charged(value(*args, **kwargs))

    return method


# ---- filters and globals -----------------------------------------------------------------------------
# Filters that turn their value (or arguments) into text: lists and dicts passed to them are measured first.
_STRINGIFYING = frozenset({"string", "join", "pprint", "e", "escape", "forceescape", "striptags", "urlencode",
                           "xmlattr", "title", "upper", "lower", "capitalize", "trim", "truncate", "wordwrap", "center",
                           "indent", "replace", "format", "wordcount", "urlize", "tojson", "safe"})


def _filter_checks() -> dict[str, Any]:
    """Pre-checks for the filters whose result can be far larger than their inputs. Each gets the
    bound arguments (name → value, without jinja's context argument) and may replace an iterable it
    had to materialise to measure."""

    def center(a):
        v = str(a["value"])
        _make(max(len(v), _int_arg(a["width"], "center width")) * _unit(v))

    def indent(a):
        w = a["width"]
        ind = len(w) if isinstance(w, str) else max(_int_arg(w, "indent width"), 0)
        s = str(a["s"])
        _make((len(s) + (s.count("\n") + 1) * ind) * _units(s, w))

    def fmt(a):
        _check_percent(str(a["value"]))

    def join(a):
        items = list(a["value"])
        a["value"] = items
        d = a["d"] if isinstance(a["d"], str) else str(a["d"])
        _make(sum(_text_size(x, _room()) for x in items) + len(d) * _unit(d) * max(len(items) - 1, 0))

    def replace(a):
        s, old, new, count = str(a["s"]), str(a["old"]), str(a["new"]), a["count"]
        k = s.count(old) if old else len(s) + 1
        if isinstance(count, int) and count >= 0:
            k = min(k, count)
        _make((len(s) + k * max(len(new) - len(old), 0)) * _units(s, new))

    def wordwrap(a):
        s = str(a["s"])
        width = max(_int_arg(a["width"], "wordwrap width"), 1)
        wrap = a["wrapstring"]
        _make((len(s) + (len(s) // width + 1) * (len(wrap) if isinstance(wrap, str) else 1)) * _units(s, wrap))
        # textwrap's time: a step per chunk (word or space run), and a word longer than the width is
        # cut one line at a time, each cut copying the rest of the word: L²/width per long word
        # (('a' * 2000000)|wordwrap(1) took 102 s). Charged as comparison work, before it runs.
        work = 0
        if a.get("break_long_words", True):
            for m in re.finditer(r"\S{%d,}" % (width + 1), s):
                n = m.end() - m.start()
                work += n * (n // width + 1)
        _compared_work(work + len(s) // 4, "wrapping words")

    def list_(a):  # a string becomes a list of one-character strings (88 bytes each past Latin-1)
        v = a["value"]
        if isinstance(v, str):
            _make(len(v) * (8 if v.isascii() else 96))

    def compared(a):  # max, min, unique: each item compared or hashed about once
        items = list(a["value"])
        a["value"] = items
        _compared(items)

    def sort_(a):  # sort, dictsort, groupby: about log2(n) comparisons per item
        items = a["value"]
        if not isinstance(items, dict):
            items = list(items)
            a["value"] = items
        _compared(items, times=max(len(items), 1).bit_length())

    def urlize(a):
        for k in ("target", "rel"):
            if isinstance(a.get(k), str) and len(a[k]) > 1024:
                _refuse(f"urlize {k} of {len(a[k])} characters")

    def sum_(a):
        if _size(a["start"]) is not None:
            items = list(a["iterable"])
            a["iterable"] = items
            _make((len(a["start"]) + sum(len(x) for x in items if _size(x) is not None))
                  * _units(a["start"], *items[:1000]) * (8 if isinstance(a["start"], (list, tuple)) else 1))

    def batch(a):
        if a["fill_with"] is not None:
            _int_arg(a["linecount"], "batch size")

    def slice_(a):
        _make(max(_int_arg(a["slices"], "slice count"), 0) * 64)  # a list per slice

    def tojson(a):
        indent, seps = a.get("indent"), a.get("separators")
        if isinstance(indent, str) and len(indent) > 64 or not isinstance(indent, str) and indent is not None and \
                _int_arg(indent, "tojson indent") > 64:
            _refuse("a tojson indent beyond 64")
        if seps is not None and any(isinstance(s, str) and len(s) > 64 for s in seps):
            _refuse("tojson separators beyond 64 characters")

    return {"center": center, "indent": indent, "format": fmt, "join": join, "replace": replace,
            "wordwrap": wordwrap, "urlize": urlize, "sum": sum_, "batch": batch, "slice": slice_, "tojson": tojson,
            "list": list_, "max": compared, "min": compared, "unique": compared, "sort": sort_, "dictsort": sort_,
            "groupby": sort_}


def _guard_filter(name: str, fn, check=None):
    from jinja2.utils import _PassArg

    # jinja passes a context/environment first to filters marked so; async variants are marked even
    # when the function they wrap (whose signature inspect reports) takes none
    outer = 1 if _PassArg.from_obj(fn) is not None else 0
    inner = 1 if _PassArg.from_obj(inspect.unwrap(fn)) is not None else 0
    lead = outer - inner
    stringifies = name in _STRINGIFYING
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        sig = None

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _step()
        if stringifies:
            _check_args_textable(args[outer:], kwargs)
        if check is not None and sig is not None:
            try:
                bound = sig.bind(*args[lead:], **kwargs)
            except TypeError:
                return fn(*args, **kwargs)  # wrong arguments: the filter raises its own error
            bound.apply_defaults()
            names = list(bound.arguments)[inner:]
            a = {n: bound.arguments[n] for n in names}
            check(a)
            for n in names:
                bound.arguments[n] = a[n]
            args, kwargs = (*args[:lead], *bound.args), bound.kwargs
        return _charged(fn(*args, **kwargs))

    return wrapper


# jinja tests that compare or hash their operands (charged as comparison work, like ==)
_COMPARING_TESTS = frozenset({"==", "eq", "equalto", "!=", "ne", "<", "lt", "lessthan", "<=", "le", ">", "gt",
                              "greaterthan", ">=", "ge", "in"})


def _guard_test(name: str, fn):
    """A jinja test (`x is equalto y`, `select('in', ...)`): a step each, and the comparison's work."""
    comparing = name in _COMPARING_TESTS

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _step()
        if comparing:
            _compared_all(*args, *kwargs.values())
        return fn(*args, **kwargs)

    return wrapper


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers overrides jinja's tojson (which escapes HTML) with plain json.dumps
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _lipsum(fn):
    @functools.wraps(fn)
    def lipsum(n=5, html=True, min=20, max=100):  # noqa: A002 - jinja's parameter names
        paragraphs, words = _int_arg(n, "lipsum paragraphs"), _int_arg(max, "lipsum words")
        _make(builtins.max(paragraphs, 0) * builtins.max(words, 0) * 12)
        return _charged(fn(n, html, min, max))

    return lipsum


def _output(value: Any) -> Any:
    """jinja's `finalize`: every `{{ ... }}` value (in macros and blocks too) is charged as output."""
    if isinstance(value, str):
        _make(sys.getsizeof(value))
    elif isinstance(value, (list, tuple, dict)):
        _textable(value)
        _make(_text_size(value, _room()))
    return value


# ---- the template AST: loops, concatenations and literal output go through the budget --------------------
def _iterate(iterable):
    for x in iterable:
        _step()
        yield x


def _text(n: int) -> str:
    _make(n)
    return ""


def _instrument(ast):
    """Route every loop, `~` concatenation and piece of literal output through the budget."""
    from jinja2 import nodes
    from jinja2.visitor import NodeTransformer

    def call(name: str, *args):
        return nodes.Call(nodes.Name(name, "load"), list(args), [], None, None)

    class Instrument(NodeTransformer):
        def visit_For(self, node):
            node = self.generic_visit(node)
            node.iter = call("__ember_iter", node.iter)
            return node

        def visit_Compare(self, node):  # ==, <, in, ...: Python compares containers element by element
            node = self.generic_visit(node)
            node.expr = call("__ember_compared", node.expr)
            for op in node.ops:
                op.expr = call("__ember_compared", op.expr)
            return node

        def visit_Pair(self, node):  # a dict literal's keys are hashed
            node = self.generic_visit(node)
            node.key = call("__ember_compared", node.key)
            return node

        def visit_Concat(self, node):
            node = self.generic_visit(node)
            node.nodes = [call("__ember_textable", n) for n in node.nodes]
            return call("__ember_charged", node)

        def visit_Output(self, node):
            node = self.generic_visit(node)
            text = sum(len(c.data) for c in node.nodes if isinstance(c, nodes.TemplateData))
            if text:
                node.nodes.insert(0, call("__ember_text", nodes.Const(text)))
            return node

    return Instrument().visit(ast)


@lru_cache(maxsize=32)
def _compile(source: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(str(_textable(message))[:1000])

    def strftime_now(fmt):
        _check_percent(str(fmt))
        return _charged(datetime.now().strftime(fmt))

    class GenerationTag(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant spans in training templates; rendering keeps the body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def call_binop(self, context, operator, left, right):
            _check_binop(operator, left, right)
            return _charged(super().call_binop(context, operator, left, right))

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's signature
            _step()
            return _charged(super().call(__context, __obj, *args, **kwargs))

        # Reaching for a dunder (`__class__`, `__globals__`, `__subclasses__`, `__builtins__` ...) is refused
        # outright, whether or not the object has it. (jinja's own sandbox renders a blocked attribute as
        # an empty Undefined and fails only when that is used further.)
        def getattr(self, obj, attribute):
            if isinstance(attribute, str) and attribute.startswith("__"):
                _forbid_attribute(obj, attribute)
            return _guard_method(super().getattr(obj, attribute))

        def getitem(self, obj, argument):
            _compared(argument)  # a tuple key is hashed: its cost is its expanded size
            # a dict key that happens to be a dunder is data (`messages[0]['__x__']`), not an attribute
            is_key = isinstance(obj, dict) and argument in obj
            if isinstance(argument, str) and argument.startswith("__") and not is_key:
                _forbid_attribute(obj, argument)
            return _guard_method(super().getitem(obj, argument))

        def unsafe_undefined(self, obj, attribute):  # any other attribute the sandbox deems unsafe
            _forbid_attribute(obj, attribute)

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols],
                         finalize=_output)
    env.filters["tojson"] = _tojson
    checks = _filter_checks()
    for name, fn in list(env.filters.items()):
        env.filters[name] = _guard_filter(name, fn, checks.get(name))
    for name, fn in list(env.tests.items()):
        env.tests[name] = _guard_test(name, fn)
    class TemplateDict:
        # as transformers: `dict(...)` and `dict.fromkeys(...)`, not the type itself
        def __call__(self, *args, **kwargs):
            _compared_all(*args)
            return _charged(dict(*args, **kwargs))

        def fromkeys(self, *args, **kwargs):
            _compared_all(*args)
            return _charged(dict.fromkeys(*args, **kwargs))

    class TemplateNamespace(jinja2.utils.Namespace):
        # as transformers: namespaces refuse underscore-prefixed attributes
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}")

    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    env.globals["lipsum"] = _lipsum(env.globals["lipsum"])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals.update(__ember_iter=_iterate, __ember_charged=_charged, __ember_textable=_textable,
                       __ember_text=_text, __ember_compared=_compared)
    try:
        return env.from_string(_instrument(env.parse(source)))
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise TemplateError(f"chat template does not parse: {e.message} (line {e.lineno})") from None
    except (RecursionError, MemoryError) as e:  # absurdly nested sources
        raise TemplateError(f"chat template does not compile: {type(e).__name__}") from None


def render(source: str, messages: list[dict], *, add_generation_prompt: bool = True, tools=None, documents=None,
           limits: Limits | None = None, **kwargs) -> str:
    """The prompt string for `messages` ([{"role": ..., "content": ...}, ...]).

    `limits` bounds the render (default `LIMITS`; see the module docstring)."""
    import jinja2

    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
        raise TemplateError("messages must be a list of {'role': ..., 'content': ...} dicts")
    if not isinstance(source, str):
        raise TemplateError(f"a chat template must be a string, got {type(source).__name__}")
    template = _compile(source)
    token = _current.set(_Budget(limits or LIMITS))
    try:
        return template.render(
            messages=_plain(list(messages)),
            tools=_plain(tools),
            documents=_plain(documents),
            add_generation_prompt=add_generation_prompt,
            **_plain(kwargs),
        )
    except jinja2.exceptions.SecurityError as e:
        raise TemplateError(f"chat template tried an operation the sandbox forbids: {str(e)[:300]}") from None
    except jinja2.exceptions.TemplateError as e:
        raise TemplateError(f"chat template failed: {str(e)[:1000]}") from None
    except Exception as e:  # noqa: BLE001 - the template is untrusted code: whatever it raises is its failure
        raise TemplateError(f"chat template failed: {type(e).__name__}: {str(e)[:300]}") from None
    finally:
        _current.reset(token)
