"""generate / stream / chat on a tiny chat model with a real tokenizer."""
import re

import pytest
import torch

import ember
from ember.errors import GenerationError, TemplateError
from ember.generation.detokenize import StreamDecoder


@pytest.fixture(scope="module")
def llm(tiny_chat):
    return ember.load(tiny_chat, dtype=torch.float32)


def test_stream_pieces_join_to_the_generated_text(llm):
    full = llm.generate("Once upon a time", max_tokens=40)
    pieces = list(llm.stream("Once upon a time", max_tokens=40))
    assert "".join(pieces) == full and len(pieces) > 5


def test_batch_generation_equals_one_by_one(llm):
    prompts = ["The quick brown fox", "Héllo", "def add(a, b):"]
    assert llm.generate(prompts, max_tokens=24) == [llm.generate(p, max_tokens=24) for p in prompts]


def test_stream_never_splits_a_multibyte_character(llm):
    tok = llm.tokenizer
    text = "ça 🎉🔥 日本語 wörld"
    ids = tok.encode(text, add_special_tokens=False)
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # the byte-level tokenizer must split some emoji into several tokens for this to mean anything
    assert len(ids) > len(text.split())


def test_max_tokens_counts_tokens(llm):
    evs = list(llm.events([llm.request("The capital", 7, ignore_eos=True)]))
    assert len(evs) == 7 and evs[-1].finish_reason == "length"
    assert llm.generate("The capital", max_tokens=0) == ""


def test_stop_strings_cut_the_text_and_end_generation(llm):
    full = llm.generate("Once upon a time", max_tokens=40)
    stop = full[10:13]
    out = llm.generate("Once upon a time", max_tokens=40, stop=[stop])
    assert out == full[: full.index(stop)]
    streamed = "".join(llm.stream("Once upon a time", max_tokens=40, stop=stop))
    assert streamed == out
    evs = list(llm.events([llm.request("Once upon a time", 40, stop=[stop])]))
    assert evs[-1].finish_reason == "stop"


def test_eos_token_stops_generation(llm):
    ids = llm.encode("Once upon a time")
    first = next(iter(llm.events([llm.request(ids, 5)]))).token_id
    evs = list(llm.events([llm.request(ids, 20, stop_token_ids=[first])]))
    assert len(evs) == 1 and evs[0].finish_reason == "stop" and evs[0].text == ""
    evs = list(llm.events([llm.request(ids, 20, stop_token_ids=[first], ignore_eos=True)]))
    assert len(evs) == 1  # explicit stop ids still apply; ignore_eos only drops the model's EOS


def test_eos_ids_come_from_config_and_tokenizer(llm):
    assert llm.tokenizer.eos_token_id in llm.eos_token_ids


@pytest.mark.parametrize("as_list", [False, True], ids=["int", "list"])
def test_generation_config_eos_ids_stop_generation(llm, tiny_chat, tmp_path, as_list):
    """generation_config.json's eos_token_id (an int or a list), other than config.json's and the
    tokenizer's, ends generation at that token."""
    import json
    import shutil

    ids = llm.encode("Once upon a time")
    full = [ev.token_id for ev in llm.events([llm.request(ids, 16, ignore_eos=True)])]
    k = next(i for i in range(3, len(full)) if full[i] not in full[:i])  # a token first generated at step k
    stop, unused = full[k], next(t for t in range(3, 400) if t not in full)
    folder = tmp_path / "model"
    shutil.copytree(tiny_chat, folder)
    config_eos = json.loads((folder / "config.json").read_text())["eos_token_id"]
    assert stop not in (config_eos, llm.tokenizer.eos_token_id)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [unused, stop] if as_list else stop}))
    m = ember.load(folder, dtype=torch.float32)
    assert stop in m.eos_token_ids and (unused in m.eos_token_ids) == as_list
    evs = list(m.events([m.request(ids, 16)]))
    assert [ev.token_id for ev in evs] == full[:k + 1]
    assert evs[-1].finish_reason == "stop" and evs[-1].text == ""
    assert m.generate(ids, max_tokens=16) == llm.tokenizer.decode(full[:k])
    assert len(list(m.events([m.request(ids, 16, ignore_eos=True)]))) == 16


def test_seeded_sampling_reproduces(llm):
    a = llm.generate("Once", max_tokens=20, temperature=1.0, seed=7)
    b = llm.generate("Once", max_tokens=20, temperature=1.0, seed=7)
    c = llm.generate("Once", max_tokens=20, temperature=1.0, seed=8)
    assert a == b and a != c


def test_logprobs_are_log_softmax_of_the_model(llm):
    ids = llm.encode("The quick")
    evs = list(llm.events([llm.request(ids, 1, logprobs=3)]))
    with torch.no_grad():
        ref = torch.log_softmax(llm.model(torch.tensor([ids]))[0, -1], -1)
    assert abs(evs[0].logprob - ref[evs[0].token_id].item()) < 1e-4
    assert [t for t, _ in evs[0].top_logprobs] == ref.topk(3).indices.tolist()


def test_chat_template_matches_transformers(llm, tiny_chat):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(tiny_chat)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🎉"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    for agp in (True, False):
        assert llm.tokenizer.apply_chat_template(msgs, add_generation_prompt=agp) == \
            ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=agp)
    assert llm.tokenizer.encode_chat(msgs) == ref.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True,
                                                                         return_dict=False)


def test_chat_returns_the_reply_to_the_templated_prompt(llm):
    msgs = [{"role": "user", "content": "Hi"}]
    ids = llm.tokenizer.encode_chat(msgs)
    assert llm.chat(msgs, max_tokens=10) == llm.generate(ids, max_tokens=10)
    assert "".join(llm.chat(msgs, max_tokens=10, stream=True)) == llm.chat(msgs, max_tokens=10)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{% set x = messages.append(1) %}{{ x }}",
])
def test_template_reaching_python_internals_is_refused(llm, template):
    with pytest.raises(TemplateError, match="sandbox forbids"):
        llm.tokenizer.apply_chat_template([{"role": "user", "content": "x"}], template=template)


def test_template_raise_exception_and_syntax_errors_are_template_errors(llm):
    with pytest.raises(TemplateError, match="no system role"):
        llm.tokenizer.apply_chat_template([], template="{{ raise_exception('no system role') }}")
    with pytest.raises(TemplateError, match="does not parse"):
        llm.tokenizer.apply_chat_template([], template="{% for %}")


@pytest.mark.parametrize("kw, msg", [
    (dict(max_tokens=-1), "max_tokens"), (dict(temperature=-0.5), "temperature"), (dict(stop=[3]), "stop"),
])
def test_bad_generation_arguments_raise_generation_error(llm, kw, msg):
    max_tokens = kw.pop("max_tokens", 5)
    with pytest.raises(GenerationError, match=msg):
        llm.generate("Hi", max_tokens=max_tokens, **kw)


@pytest.mark.parametrize("kw, msg", [
    (dict(max_tokens="5"), "max_tokens must be a non-negative integer, got '5'"),  # was: TypeError int + str
    (dict(max_tokens=2.5), "max_tokens must be a non-negative integer, got 2.5"),
    (dict(max_tokens=None), "max_tokens must be a non-negative integer, got None"),
    (dict(stop=5), "stop must be a string or a list of strings, got 5"),  # was: TypeError not iterable
    (dict(stop_token_ids=5), "stop_token_ids must be a list of non-negative integer token ids, got 5"),
    (dict(stop_token_ids=["a"]), "stop_token_ids must be a list of non-negative integer token ids"),
    (dict(ignore_eos="yes"), "ignore_eos must be True or False, got 'yes'"),
    (dict(logprobs="2"), "logprobs must be None or a non-negative integer"),  # was: TypeError in topk
    (dict(logprobs=-1), "logprobs must be None or a non-negative integer"),  # was: RuntimeError in topk
    (dict(logprobs=10**6), "logprobs must be None or an integer in [0, 400]"),
])
def test_bad_arguments_to_generate_and_stream_are_generation_errors(llm, kw, msg):
    kw = {"max_tokens": 4, **kw}
    for call in (lambda: llm.generate("Hi", **kw), lambda: list(llm.stream("Hi", **kw)),
                 lambda: llm.chat([{"role": "user", "content": "Hi"}], **kw)):
        with pytest.raises(GenerationError, match=re.escape(msg)):
            call()


def test_bad_arguments_to_chat_are_generation_errors(llm):
    msgs = [{"role": "user", "content": "Hi"}]
    with pytest.raises(GenerationError, match="chat_template_kwargs must be a dict, got int"):
        llm.chat(msgs, max_tokens=2, chat_template_kwargs=5)
    with pytest.raises(GenerationError, match="stream must be True or False, got 1"):
        llm.chat(msgs, max_tokens=2, stream=1)


def test_unknown_generation_options_are_refused_with_a_suggestion(llm):
    """A misspelt option is an ArgumentError naming it and the option it resembles (before: Python's
    TypeError from deep inside), from every entry point, before anything runs."""
    from ember.errors import ArgumentError

    calls = [lambda: llm.generate("Hi", max_token=5), lambda: list(llm.stream("Hi", temprature=0.5)),
             lambda: llm.chat([{"role": "user", "content": "Hi"}], topp=0.9), lambda: llm("Hi", stream=True)]
    for call, (name, hint) in zip(calls, [("max_token", "max_tokens"), ("temprature", "temperature"),
                                           ("topp", "top_p"), ("stream", None)]):
        with pytest.raises(ArgumentError, match=re.escape(repr(name))) as e:
            call()
        assert (f"did you mean {hint!r}" in str(e.value)) if hint else "did you mean" not in str(e.value)
        assert "the options are max_tokens, temperature" in str(e.value)


def test_prompt_longer_than_the_context_is_refused(llm):
    with pytest.raises(GenerationError, match="context holds"):
        llm.generate([5] * 600, max_tokens=4)
    with pytest.raises(GenerationError, match="empty"):
        llm.generate("", max_tokens=4)  # this tokenizer adds no BOS: zero tokens
    with pytest.raises(GenerationError, match="token ids must be"):
        llm.generate([10**9], max_tokens=4)
