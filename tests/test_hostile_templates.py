"""Hostile chat templates: every attack is a TemplateError or a bounded render, never a crash, a hang
or a wild allocation (each runs under a time limit and a 1 GB memory cap: see tests/hostile.py).

Also: the bounded sandbox renders ordinary templates exactly as transformers does (a differential
fuzz over generated benign templates), and a fuzz over generated hostile ones.
"""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ember.errors import TemplateError
from ember.generation.chat_template import Limits, render
from hostile import fuzz_settings, memory_cap, time_limit

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2+2?"}]
MAX_OUTPUT = Limits().budget


def _bounded(template: str, messages=MSGS, **kw) -> str | TemplateError:
    """Render under guards: the result, or the TemplateError (anything else propagates)."""
    with time_limit(30), memory_cap(1 << 30):
        try:
            out = render(template, messages, **kw)
        except TemplateError as e:
            return e
    assert len(out) <= MAX_OUTPUT
    return out


# (id, template): Python internals through every object a template can reach
ESCAPES = [
    ("str-mro", "{{ ''.__class__.__mro__[1].__subclasses__() }}"),
    ("str-format-attr", "{{ '{0.__class__.__mro__}'.format('') }}"),
    ("str-format-map", "{{ '{x.__class__}'.format_map({'x': 1}) }}"),
    ("dict-items", "{{ messages[0].items().__class__.__mro__ }}"),
    ("dict-attr-filter", "{{ messages[0]|attr('__class__') }}"),
    ("getitem-dunder", "{{ messages['__class__']['__mro__'] }}"),
    ("loop", "{% for m in messages %}{{ loop.__class__.__init__.__globals__ }}{% endfor %}"),
    ("loop-cycle", "{% for m in messages %}{{ loop.cycle.__globals__ }}{% endfor %}"),
    ("cycler", "{{ cycler.__init__.__globals__ }}"),
    ("cycler-instance", "{{ cycler(1, 2).next.__func__.__globals__ }}"),
    ("joiner", "{{ joiner.__init__.__globals__ }}"),
    ("namespace", "{{ namespace.__init__.__globals__ }}"),
    ("namespace-set-dunder", "{% set ns = namespace(a=1) %}{% set ns.__class__ = 1 %}{{ ns }}"),
    ("namespace-kw-dunder", "{% set ns = namespace(__init__=1) %}{{ ns }}"),
    ("self", "{{ self.__init__.__globals__ }}"),
    ("self-context", "{{ self._TemplateReference__context.environment }}"),
    ("lipsum", "{{ lipsum.__globals__['os'] }}"),
    ("range", "{{ range.__globals__ }}"),
    ("dict-global", "{{ dict.__call__.__globals__ }}"),
    ("dict-mro", "{{ dict.mro() }}"),
    ("raise-exception", "{{ raise_exception.__globals__ }}"),
    ("strftime", "{{ strftime_now.__globals__ }}"),
    ("macro", "{% macro m() %}{% endmacro %}{{ m.__init__.__globals__ }}"),
    ("caller", "{% macro m() %}{{ caller.__globals__ }}{% endmacro %}{% call m() %}x{% endcall %}"),
    ("list-mutation", "{% set x = messages.append(1) %}{{ x }}"),
    ("dict-mutation", "{{ messages[0].update({'role': 'x'}) }}"),
    ("list-pop", "{{ messages.pop() }}"),
    ("int-attr", "{{ (1).__class__.__base__.__subclasses__() }}"),
    ("map-attribute", "{{ messages|map(attribute='__class__')|list }}"),
    ("selectattr", "{{ messages|selectattr('__class__')|list }}"),
    ("sort-attribute", "{{ messages|sort(attribute='__class__.__init__') }}"),
]


@pytest.mark.parametrize("template", [t for _, t in ESCAPES], ids=[i for i, _ in ESCAPES])
def test_no_way_out_of_the_sandbox(template):
    out = _bounded(template)
    assert isinstance(out, TemplateError), out  # refused, never rendered (not even as an empty value)


# (id, template): each reaches for a Python internal; the access itself is refused, whether the
# result is printed, tested, stored and never used, or the attribute does not exist at all
REACH = [
    ("mro", "{{ ''.__class__.__mro__ }}"),
    ("class", "{{ ''.__class__ }}"),
    ("class-unused", "{% set x = ''.__class__ %}ok"),
    ("class-in-if", "{% if ''.__class__ %}x{% endif %}"),
    ("class-is-defined", "{% if ''.__class__ is defined %}x{% endif %}"),
    ("mro-subclasses", "{{ ''.__class__.__mro__[1].__subclasses__() }}"),
    ("base-subclasses", "{{ ().__class__.__base__.__subclasses__() }}"),
    ("int-subclasses", "{{ (1).__class__.__subclasses__ }}"),
    ("globals", "{{ lipsum.__globals__ }}"),
    ("globals-unused", "{% set g = raise_exception.__globals__ %}ok"),
    ("globals-os", "{{ cycler.__init__.__globals__.os }}"),
    ("globals-builtins", "{{ lipsum.__globals__['__builtins__'] }}"),
    ("builtins", "{{ range.__builtins__ }}"),
    ("builtins-missing", "{{ messages.__builtins__ }}"),
    ("builtins-item", "{{ messages[0]['__builtins__'] }}"),
    ("class-item", "{{ messages[0]['__class__'] }}"),
    ("attr-filter", "{{ messages|attr('__class__') }}"),
    ("map-attribute", "{{ messages|map(attribute='__class__')|list }}"),
    ("selectattr", "{{ messages|selectattr('__class__')|list }}"),
    ("format-field", "{{ '{0.__class__.__mro__}'.format('') }}"),
    ("format-map-field", "{{ '{x.__globals__}'.format_map({'x': lipsum}) }}"),
    ("loop-cycle", "{% for m in messages %}{{ loop.cycle.__globals__ }}{% endfor %}"),
    ("caller", "{% macro m() %}{{ caller.__globals__ }}{% endmacro %}{% call m() %}x{% endcall %}"),
    ("self-dict", "{{ self.__dict__ }}"),
]


@pytest.mark.parametrize("template", [t for _, t in REACH], ids=[i for i, _ in REACH])
def test_reaching_python_internals_raises_template_error(template):
    from ember.errors import EmberError

    with time_limit(10), pytest.raises(TemplateError, match=r"sandbox forbids: access to attribute '__\w+__'") as e:
        render(template, MSGS)
    assert isinstance(e.value, EmberError)


def test_reaching_python_internals_through_the_tokenizer(tiny_chat):
    """The same refusal where ember renders a chat template: Tokenizer.apply_chat_template / encode_chat."""
    from ember.errors import EmberError
    from ember.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tiny_chat)
    msgs = [{"role": "user", "content": "hi"}]
    for template in ("{{ ''.__class__.__mro__ }}", "{% set x = lipsum.__globals__ %}ok"):
        with pytest.raises(EmberError, match="sandbox forbids"):
            tok.apply_chat_template(msgs, template=template)
    tok.chat_template = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(TemplateError, match="sandbox forbids"):
        tok.encode_chat(msgs)


def test_dunder_keys_of_message_dicts_are_data():
    """A message key that happens to look like a dunder is read as data, not refused."""
    assert render("{{ messages[0]['__x__'] }}", [{"role": "user", "content": "c", "__x__": "v"}]) == "v"


# (id, template): resource exhaustion
EXHAUSTION = [
    ("range-huge", "{{ range(10**10)|length }}"),
    ("str-mul", "{{ ('a' * 10**10)|length }}"),
    ("list-mul", "{{ ([1] * 10**10)|length }}"),
    ("str-mul-reversed", "{{ (10**10 * 'ab')|length }}"),
    ("pow", "{{ 2 ** (10**9) }}"),
    ("pow-chain", "{% set x = 10**4000 %}{{ x ** 10**6 }}"),
    ("int-mul-chain", "{% set ns = namespace(x=7) %}{% for i in range(64) %}{% set ns.x = ns.x * ns.x %}{% endfor %}{{ ns.x > 0 }}"),
    ("nested-loops", "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}x"),
    ("nested-loops-list", "{% set xs = range(100000)|list %}{% for a in xs %}{% for b in xs %}{% endfor %}{% endfor %}"),
    ("recursive-macro", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"),
    ("fanout-macro", "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}"),
    ("recursive-loop", "{% for x in [[1]] recursive %}{{ loop([x]) }}{% endfor %}"),
    ("concat-doubling", "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}"),
    ("plus-doubling", "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}"),
    ("list-doubling", "{% set ns = namespace(l=[1]) %}{% for i in range(64) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l|length }}"),
    ("nested-list-to-text", "{% set ns = namespace(l=['x' * 1000000]) %}{% for i in range(40) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}{{ ns.l }}"),
    ("nested-list-concat", "{% set ns = namespace(l=['x' * 1000000]) %}{% for i in range(40) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}{{ 'a' ~ ns.l }}"),
    ("nested-list-string", "{% set ns = namespace(l=['x' * 1000000]) %}{% for i in range(40) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}{{ ns.l|string|length }}"),
    ("nested-list-tojson", "{% set ns = namespace(l=['x' * 1000000]) %}{% for i in range(40) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}{{ ns.l|tojson|length }}"),
    ("output-in-loop", "{% set big = 'x' * 1000000 %}{% for i in range(100000) %}{{ big }}{% endfor %}"),
    ("macro-output-in-loop", "{% set big = 'x' * 1000000 %}{% macro m() %}{% for i in range(100000) %}{{ big }}{% endfor %}{% endmacro %}{{ m()|length }}"),
    ("literal-in-loop", "{% for i in range(100000) %}{% for j in range(9) %}" + "y" * 2000 + "{% endfor %}{% endfor %}"),
    ("set-block-in-loop", "{% for i in range(100000) %}{% set x %}{{ 'z' * 100000 }}{% endset %}{% endfor %}"),
    ("format-width", "{{ '%099999999d'|format(1) }}"),
    ("format-star", "{{ '%*d'|format(10**9, 1) }}"),
    ("percent-width", "{{ '%099999999d' % 1 }}"),
    ("percent-star", "{{ '%*d' % (10**9, 1) }}"),
    ("str-format-width", "{{ '{:>999999999}'.format(1) }}"),
    ("str-format-nested", "{{ '{:{w}}'.format(1, w='999999999') }}"),
    ("center", "{{ 'x'|center(10**10) }}"),
    ("indent", "{{ 'x\nx'|indent(10**10) }}"),
    ("indent-str", "{% set s = 'x\n' * 100000 %}{{ s|indent('y' * 100000) }}"),
    ("wordwrap", "{{ ('ab ' * 100000)|wordwrap(1, wrapstring='z' * 100000) }}"),
    ("join-product", "{{ (['a'] * 100000)|join('b' * 100000) }}"),
    ("str-join-product", "{{ ('b' * 100000).join(['a'] * 100000) }}"),
    ("replace-product", "{{ ('a' * 100000)|replace('', 'b' * 100000) }}"),
    ("str-replace-product", "{{ ('a' * 100000).replace('a', 'b' * 100000) }}"),
    ("zfill", "{{ 'x'.zfill(10**10) }}"),
    ("ljust", "{{ 'x'.ljust(10**10) }}"),
    ("rjust", "{{ 'x'.rjust(10**10) }}"),
    ("str-center", "{{ 'x'.center(10**10) }}"),
    ("expandtabs", "{{ ('\t' * 100000).expandtabs(100000) }}"),
    ("to-bytes", "{{ (1).to_bytes(10**10, 'big') }}"),
    ("encode-mul", "{{ 'x'.encode() * 10**10 }}"),
    ("bytes-ljust", "{{ 'x'.encode().ljust(10**10) }}"),
    ("lipsum", "{{ lipsum(10**6) }}"),
    ("lipsum-words", "{{ lipsum(5, false, 10, 10**9) }}"),
    ("batch-fill", "{{ range(10)|batch(10**10, 'x')|list }}"),
    ("slice", "{{ range(10)|slice(10**7)|list|length }}"),
    ("sum-lists", "{% set big = [1] * 1000000 %}{{ ([big] * 1000)|sum(start=[])|length }}"),
    ("tojson-indent", "{{ messages|tojson(indent=10**9) }}"),
    ("tojson-separators", "{{ messages|tojson(separators=(',' * 10**6, ':')) }}"),
    ("urlize-target", "{{ ('http://a.b ' * 10000)|urlize(target='t' * 100000) }}"),
    ("strftime", "{{ strftime_now('%Y' * 10**6)|length }}"),
    ("raise-huge", "{% set ns = namespace(l=['x' * 1000000]) %}{% for i in range(40) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}{{ raise_exception(ns.l) }}"),
    ("deep-source", "{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}"),
    ("deep-blocks", "{% if 1 %}" * 3000 + "{% endif %}" * 3000),
]


@pytest.mark.parametrize("template", [t for _, t in EXHAUSTION], ids=[i for i, _ in EXHAUSTION])
def test_resource_exhaustion_is_bounded(template):
    # (a lower step limit keeps the exponential macro fast in CI; the default limit bounds it too)
    out = _bounded(template, limits=Limits(max_steps=100_000) if "fanout" in template or "f(n - 1)" in template else None)
    assert isinstance(out, (str, TemplateError))


def test_refusals_name_the_limit():
    e = _bounded("{{ 'a' * 10**10 }}")
    assert isinstance(e, TemplateError) and "sandbox forbids" in str(e) and "resource limit" in str(e)


def test_time_limit():
    """Work that stays under the step and size limits still stops at the time limit."""
    slow = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
    e = _bounded(slow, limits=Limits(seconds=0.2, max_steps=10**12))
    assert isinstance(e, TemplateError) and "s of rendering" in str(e)


def test_limits_are_per_render():
    t = "{% for i in range(1000) %}{{ i }}{% endfor %}"
    for _ in range(5):  # five renders of 1000 steps each fit a 1500-step limit
        assert isinstance(_bounded(t, limits=Limits(max_steps=1500)), str)
    assert isinstance(_bounded(t, limits=Limits(max_steps=500)), TemplateError)


# ---- regressions: one test per bug ----------------------------------------------------------------------
def test_regression_range_overflow_escaped_as_overflowerror():
    """Bug: jinja's sandbox refuses range(10**10) with an OverflowError, which escaped render()."""
    with pytest.raises(TemplateError, match="Range too big"):
        render("{{ range(10**10) }}", MSGS)


def test_regression_string_multiplication_allocated_without_limit():
    """Bug: {{ 'a' * 10**10 }} tried to allocate 10 GB (jinja's sandbox does not bound operators)."""
    with memory_cap(256 << 20), pytest.raises(TemplateError, match="resource limit"):
        render("{{ 'a' * 10**10 }}", MSGS)


def test_regression_nested_loops_hung():
    """Bug: two nested range(100000) loops ran 10**10 iterations (hours)."""
    with time_limit(10), pytest.raises(TemplateError, match="loop iterations"):
        render("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}", MSGS)


def test_regression_integer_power_hung():
    """Bug: {{ 2 ** (10**10) }} computed a 10**10-bit integer (minutes of CPU, GBs)."""
    with time_limit(10), pytest.raises(TemplateError, match="integer power"):
        render("{{ 2 ** (10**10) }}", MSGS)


@pytest.mark.parametrize("template", ["{{ lipsum(10**6) }}", "{{ range(10)|slice(10**7)|list|length }}",
                                      "{{ 'x'|center(10**10) }}", "{{ (['a'] * 100000)|join('b' * 100000) }}",
                                      "{{ '%099999999d'|format(1) }}", "{{ 'x'.zfill(10**10) }}"],
                         ids=["lipsum", "slice", "center", "join", "format", "zfill"])
def test_regression_filters_and_methods_sized_by_arguments(template):
    """Bug: filters and str methods whose output size is an argument (or a product of sizes) ran
    unbounded: lipsum(10**6) and slice(10**7) for seconds to minutes, the others to MemoryError."""
    with time_limit(10), memory_cap(256 << 20), pytest.raises(TemplateError, match="resource limit"):
        render(template, MSGS)


def test_regression_exceptions_from_template_code_escaped():
    """Bug: only some exception types were turned into TemplateError; others (LookupError from an
    unknown codec, OverflowError, ...) escaped render()."""
    for t in ("{{ 'x'.encode('no-such-codec') }}", "{{ '\t'.expandtabs(2**70) }}", "{{ 1.5 ** 100000 }}",
              "{{ messages|tojson(indent='x' * 65) }}"):
        with pytest.raises(TemplateError):
            render(t, MSGS)


def test_regression_deeply_nested_template_source():
    """Bug: a template nested thousands deep raised RecursionError while compiling."""
    with pytest.raises(TemplateError):
        render("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", MSGS)


def test_regression_deeply_nested_messages():
    """Bug: messages nested thousands deep (llm.chat from Python) raised RecursionError."""
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(TemplateError):
        render("{{ messages }}", [{"role": "user", "content": deep}])


# ---- fuzz: hostile fragments ----------------------------------------------------------------------------
NUMS = st.sampled_from([0, 1, 2, 7, 100, 10**5, 10**6, 10**7, 10**9, 10**10, 2**63, -1, -10**9])
EXPRS = st.sampled_from(["'ab'", "[1, 2]", "messages", "messages[0]", "messages[0].content", "ns.s", "ns.l", "i",
                         "'x\ny'", "range(3)", "'%d'", "'{}'", "(1, 2)", "{'a': 1}", "loop", "none", "2"])
OPS = st.sampled_from(["*", "**", "+", "~", "%", "//", "-"])
FILTERS = st.sampled_from(["center({n})", "indent({n})", "join({e})", "replace('a', {e})", "format({e})",
                           "wordwrap({n})", "batch({n}, 0)", "slice({n})", "list", "string", "tojson",
                           "tojson(indent={n})", "sum(start=[])", "length", "truncate({n})", "urlize", "unique",
                           "sort", "map('string')", "reverse", "first", "trim", "title", "int", "float"])
METHODS = st.sampled_from(["zfill({n})", "ljust({n})", "center({n})", "expandtabs({n})", "join({e})",
                           "replace('a', {e})", "format({e})", "split()", "strip()", "upper()", "to_bytes({n})",
                           "encode()", "count('a')"])


@st.composite
def hostile_template(draw):
    parts = ["{% set ns = namespace(s='ab', l=[1, 2]) %}"]
    for _ in range(draw(st.integers(1, 4))):
        e1, e2, n = draw(EXPRS), draw(EXPRS), draw(NUMS)
        kind = draw(st.integers(0, 5))
        if kind == 0:
            expr = f"({e1} {draw(OPS)} {e2})"
        elif kind == 1:
            expr = f"({e1} {draw(OPS)} {n})"
        elif kind == 2:
            expr = f"({e1})|" + draw(FILTERS).format(n=n, e=e2)
        elif kind == 3:
            expr = f"({e1})." + draw(METHODS).format(n=n, e=e2)
        elif kind == 4:
            expr = f"lipsum({n})"
        else:
            expr = f"({e1} ~ {e2})"
        body = draw(st.sampled_from(["{{{{ {x} }}}}", "{{% set ns.s = {x} %}}", "{{% set ns.l = [{x}, ns.l] %}}",
                                     "{{% set ns.s = ns.s ~ ns.s %}}{{{{ {x} }}}}"])).format(x=expr)
        loops = draw(st.integers(0, 2))
        for _ in range(loops):
            body = f"{{% for i in range({draw(NUMS)}) %}}{body}{{% endfor %}}"
        parts.append(body)
    return "".join(parts)


@fuzz_settings(100, deadline_ms=None)
@given(template=hostile_template())
def test_fuzz_hostile_templates(template):
    """Any mix of hostile fragments: a TemplateError or a bounded render within the guards."""
    _bounded(template, limits=Limits(seconds=2, max_steps=20_000))


# ---- fuzz: benign templates render exactly as transformers renders them ----------------------------------
BENIGN = st.sampled_from([
    "{{ m.role }}: {{ m.content }}\n",
    "{{ m['content']|trim }}",
    "{% if m.role == 'user' %}<u>{{ m.content }}</u>{% else %}<o>{{ m.content|upper }}</o>{% endif %}",
    "{{ loop.index }}/{{ loop.length }}{% if loop.last %}!{% endif %}{% if loop.first %}^{% endif %}",
    "{% set ns.n = ns.n + 1 %}{{ ns.n }}",
    "{{ m.content|length }}{{ m.content.split()|join('_') }}",
    "{{ m|tojson }}",
    "{{ m.content.replace('i', 'I') }}{{ m.content.startswith('H') }}",
    "{{ '%s-%d'|format(m.role, loop.index0) }}",
    "{{ (m.content * 2)[:5] }}{{ [loop.index] + [1] }}",
    "{{ m.content ~ '|' ~ loop.revindex }}",
    "{% for w in m.content.split() %}[{{ w|center(8) }}]{% endfor %}",
    "{{ m.content|wordwrap(5)|indent(2) }}",
    "{{ messages|selectattr('role', 'equalto', 'user')|map(attribute='content')|list|length }}",
    "{% if m.content is string %}s{% endif %}{{ m.content|replace('e', 'E', 1) }}",
    "{{ dict(a=loop.index)|tojson }}{{ 2 ** loop.index }}{{ '{}/{}'.format(loop.index, 3) }}",
    "{{ m.content|batch(3)|list|length }}{{ m.content|list|slice(2)|list|length }}",
    "{{ raise_exception('no') if m.content == 'never' else '' }}",
])


@st.composite
def benign_template(draw):
    body = "".join(draw(st.lists(BENIGN, min_size=1, max_size=4)))
    return ("{% set ns = namespace(n=0) %}{% for m in messages %}" + body + "{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@fuzz_settings(60, deadline_ms=None)
@given(template=benign_template(), messages=st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text(max_size=20)}), min_size=1, max_size=4))
def test_fuzz_benign_templates_match_transformers(template, messages):
    tr = pytest.importorskip("transformers.utils.chat_template_utils")
    want = tr.render_jinja_template([messages], chat_template=template, add_generation_prompt=True)[0][0]
    assert render(template, messages, add_generation_prompt=True) == want


# ---- regressions: work inside one filter / comparison, memory counted in bytes --------------------------
DOUBLED = ("{% set ns = namespace(a=[1], b=[1], t=(1,)) %}{% for i in range(40) %}{% set ns.a = [ns.a, ns.a] %}"
           "{% set ns.b = [ns.b, ns.b] %}{% set ns.t = (ns.t, ns.t) %}{% endfor %}")
SINGLE_STEP = [
    ("wordwrap-long-word", "{{ ('a' * 2000000)|wordwrap(1)|length }}"),
    ("wordwrap-long-words", "{{ (('a' * 100000 ~ ' ') * 20)|wordwrap(3)|length }}"),
    ("max-nested", DOUBLED + "{{ [ns.a, ns.b]|max|length }}"),
    ("min-nested", DOUBLED + "{{ [ns.a, ns.b]|min|length }}"),
    ("sort-nested", DOUBLED + "{{ [ns.a, ns.b, ns.a]|sort|length }}"),
    ("unique-tuples", DOUBLED + "{{ [ns.t, ns.t]|unique|list|length }}"),
    ("eq-nested", DOUBLED + "{{ ns.a == ns.b }}"),
    ("lt-nested", DOUBLED + "{{ ns.a < ns.b }}"),
    ("in-nested", DOUBLED + "{{ ns.a in [ns.b] }}"),
    ("test-equalto", DOUBLED + "{{ [ns.a]|select('equalto', ns.b)|list|length }}"),
    ("is-eq", DOUBLED + "{{ ns.a is eq(ns.b) }}"),
    ("hash-tuple-key", DOUBLED + "{{ {ns.t: 1}|length }}"),
    ("hash-tuple-getitem", DOUBLED + "{{ {}[ns.t] is defined }}"),
    ("hash-dict-global", DOUBLED + "{{ dict([(ns.t, 1)])|length }}"),
    ("max-big-items", "{% set big = [1] * 1000000 %}{{ ([big] * 16)|max|length }}"),
    ("sort-many", "{{ (range(100000)|list * 150)|sort|length }}"),
]


@pytest.mark.parametrize("template", [t for _, t in SINGLE_STEP], ids=[i for i, _ in SINGLE_STEP])
def test_regression_single_steps_that_ran_for_minutes(template):
    """Bug: limits were checked between steps, so one filter call or comparison ran unbounded:
    ('a'*2000000)|wordwrap(1) took 102 s (textwrap cuts a long word a line at a time, copying the rest),
    a max over a huge nested list over 180 s, and comparing or hashing two lists (tuples) doubled 40
    times takes 2**40 steps in C, which no signal interrupts. Their work is measured first."""
    with time_limit(10), memory_cap(1 << 30), pytest.raises(TemplateError, match="resource limit"):
        render(template, MSGS)


@pytest.mark.parametrize("template", [
    "{{ ('\u20ac' * 4000000)|list|length }}",  # 4M distinct str objects: 350 MB for a 4M-item list
    "{{ ('\u20ac' * 5000000)|length }}",  # 20 MB of text (4 bytes a character), over the 16 MB object limit
    "{{ ('\u20ac' * 1000000).center(5000000)|length }}",
    "{% set ns = namespace(l=[]) %}{% for i in range(40) %}{% set ns.l = ns.l + [('\u20ac' * 1000000) ~ i] %}"
    "{% endfor %}{{ ns.l|length }}",  # 40 distinct 4 MB strings: 160 MB, over the 128 MB budget
], ids=["list-of-chars", "wide-text", "wide-center", "wide-strings-budget"])
def test_regression_budget_counted_items_not_bytes(template):
    """Bug: the 128M budget and 16M object limit counted characters and items, not bytes: wide
    characters take 4 bytes, a list of 4M one-character non-Latin-1 strings ~350 MB (4-5 GB were
    reached inside the budget). Both now count bytes."""
    with time_limit(10), memory_cap(1 << 30), pytest.raises(TemplateError, match="resource limit"):
        render(template, MSGS)


def test_ordinary_comparisons_and_wrapping_still_render():
    t = ("{{ messages|map(attribute='role')|list|sort|join(',') }}|{{ messages|map(attribute='role')|unique|list|length }}"
         "|{{ [3, 1, 2]|max }}|{{ ('hello world ' * 50)|wordwrap(20)|length }}|{{ messages[0] == messages[0] }}"
         "|{{ 'user' in ['user', 'assistant'] }}|{{ {('a', 1): 2}[('a', 1)] }}|{{ ('x' * 100)|wordwrap(7)|length }}")
    assert render(t, MSGS) == "assistant,system,user,user|3|3|599|True|True|2|114"
