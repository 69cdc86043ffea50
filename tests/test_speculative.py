"""Speculative decoding (generation/speculative.py): prompt lookup and a draft model, verified by the
model in one forward; greedy output equal to plain decoding token for token, sampling by the
rejection rule."""
import shutil

import pytest
import torch

import ember
import tinymodels
from ember.engine import Engine
from ember.engine.graphs import StaticDecoder
from ember.errors import GenerationError
from ember.generation.loop import Request
from ember.generation.speculative import Speculative, _Ngrams, accept_or_resample

CODE = ("def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n"
        "The quick brown fox jumps over the lazy dog. The quick brown fox")
PROMPTS = [CODE, "Once upon a time there was a little model", "The capital of France is Paris. The capital"]


@pytest.fixture(scope="module")
def llm(tiny_chat):
    return ember.load(tiny_chat, dtype=torch.float32)


@pytest.fixture(scope="module")
def draft(tmp_path_factory):
    """A smaller random model with the tiny chat model's tokenizer (other weights: some drafts fail)."""
    folder = tinymodels.tiny_chat_model(tmp_path_factory.mktemp("draft"), seed=1, num_hidden_layers=1,
                                        hidden_size=32)
    return ember.load(folder, dtype=torch.float32)


def _run(llm, prompts, n, speculative=None, **kw):
    """(completions, the speculator's stats) of one batch."""
    reqs = [llm.request(p, n, **kw) for p in prompts]
    gen = llm.generator(reqs, speculative=speculative)
    out = {r.id: [] for r in reqs}
    finish = {}
    for ev in gen.run(reqs):
        out[ev.request.id].append((ev.token_id, ev.text, ev.logprob))
        if ev.finished:
            finish[ev.request.id] = ev.finish_reason
    stats = gen.speculator.stats if gen.speculator is not None else None
    return [(out[r.id], finish[r.id]) for r in reqs], stats


def _tokens(res):
    return [[t for t, _, _ in evs] for evs, _ in res]


def test_ngram_index_takes_the_latest_longest_match():
    idx = _Ngrams(3)
    idx.tokens = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    assert idx.propose(4) == [7, 8, 5, 2]  # "2 3" last seen before 7; "5 2 3" never
    idx.tokens += [7]
    assert idx.propose(2) == [8, 5]  # "2 3 7" now matches, incrementally recorded
    idx.tokens = [4, 4]
    idx2 = _Ngrams(2)
    idx2.tokens = [4]
    assert idx2.propose(3) == []  # nothing before the last token


def test_prompt_lookup_greedy_identical_to_plain_decoding(llm):
    want, _ = _run(llm, PROMPTS, 40, ignore_eos=True)
    got, stats = _run(llm, PROMPTS, 40, Speculative(prompt_lookup_num_tokens=4), ignore_eos=True)
    assert _tokens(got) == _tokens(want)
    assert ["".join(t for _, t, _ in evs) for evs, _ in got] == ["".join(t for _, t, _ in evs) for evs, _ in want]
    assert stats["steps"] > 0 and stats["drafted"] > 0 and stats["accepted"] > 0
    assert stats["emitted"] > stats["steps"]  # some steps emitted several tokens


def test_generate_and_stream_take_transformers_argument_names(llm):
    want = llm.generate(CODE, 24, ignore_eos=True)
    assert llm.generate(CODE, 24, ignore_eos=True, prompt_lookup_num_tokens=3) == want
    assert "".join(llm.stream(CODE, 24, ignore_eos=True, prompt_lookup_num_tokens=3,
                              max_matching_ngram_size=2)) == want
    assert llm.generate(CODE, 24, ignore_eos=True, assistant_model=llm, num_assistant_tokens=3) == want


def test_draft_model_greedy_identical_to_plain_decoding(llm, draft):
    want, _ = _run(llm, PROMPTS, 30, ignore_eos=True)
    got, stats = _run(llm, PROMPTS, 30, Speculative(assistant_model=draft, num_assistant_tokens=3), ignore_eos=True)
    assert _tokens(got) == _tokens(want)
    assert stats["drafted"] > 0 and stats["accepted"] < stats["drafted"]  # a different model: rejections happen


def test_the_model_as_its_own_draft_accepts_every_token(llm):
    want, _ = _run(llm, PROMPTS, 25, ignore_eos=True)
    got, stats = _run(llm, PROMPTS, 25, Speculative(assistant_model=llm, num_assistant_tokens=4), ignore_eos=True)
    assert _tokens(got) == _tokens(want)
    assert stats["accepted"] == stats["drafted"] > 0


def test_stops_and_limits_inside_an_accepted_run_match_plain_decoding(llm):
    plain, _ = _run(llm, [CODE], 40, ignore_eos=True)
    toks = _tokens(plain)[0]
    text = "".join(t for _, t, _ in plain[0][0])
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cases = [dict(stop=[stop]), dict(stop_token_ids=[toks[13]]), dict(ignore_eos=True)]
    spec = Speculative(prompt_lookup_num_tokens=6)
    for kw in cases:
        for n in (2, 7, 40):
            want, _ = _run(llm, [CODE, PROMPTS[2]], n, **kw)
            got, _ = _run(llm, [CODE, PROMPTS[2]], n, spec, **kw)
            assert [(_tokens([r])[0], "".join(t for _, t, _ in r[0]), r[1]) for r in got] == \
                   [(_tokens([r])[0], "".join(t for _, t, _ in r[0]), r[1]) for r in want], (kw, n)


def test_logprobs_and_penalties_match_plain_decoding(llm):
    kw = dict(ignore_eos=True, logprobs=2, repetition_penalty=1.3, frequency_penalty=0.5)
    want, _ = _run(llm, PROMPTS, 30, **kw)
    got, stats = _run(llm, PROMPTS, 30, Speculative(prompt_lookup_num_tokens=4), **kw)
    assert _tokens(got) == _tokens(want)
    lp_w = torch.tensor([lp for evs, _ in want for _, _, lp in evs])
    lp_g = torch.tensor([lp for evs, _ in got for _, _, lp in evs])
    torch.testing.assert_close(lp_g, lp_w, atol=1e-4, rtol=1e-4)


def test_engine_with_requests_joining_mid_way_matches_plain_decoding(llm):
    want, _ = _run(llm, PROMPTS, 20, ignore_eos=True)
    eng = Engine(llm.model, llm.tokenizer, [], max_batch=4, max_len=128, cuda_graphs=False)
    eng.decoder = StaticDecoder(llm.model, eng.cache, capture=False)  # the static step, eager on CPU
    g = eng.generator()
    g.speculator = Speculative(prompt_lookup_num_tokens=4).build(g)
    reqs = [Request(llm.encode(p), 20, ignore_eos=True) for p in PROMPTS]
    got = {r.id: [] for r in reqs}
    g.add(reqs[0])
    for i in range(60):
        if i == 2:
            g.add(reqs[1])
        if i == 5:
            g.add(reqs[2])
        for ev in g.step():
            got[ev.request.id].append(ev.token_id)
        if not g.has_work() and i > 5:
            break
    assert [got[r.id] for r in reqs] == _tokens(want)
    assert g.speculator.stats["accepted"] > 0


def test_rejection_rule_draws_from_the_target_distribution():
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    q = torch.tensor([0.3, 0.1, 0.4, 0.1, 0.1])
    n = 6000
    for draft_q in (None, q):
        counts = torch.zeros(5)
        accepted = 0
        for _ in range(n):
            d = 2 if draft_q is None else int(torch.multinomial(q, 1, generator=gen))
            t, a = accept_or_resample(p, d, draft_q, gen)
            counts[t] += 1
            accepted += a
        freq = counts / n
        assert (freq - p).abs().max() < 0.025, (freq, p)  # ~4 standard errors at n = 6000
        # acceptance: p(d) for a certain draft; sum(min(p, q)) for a draft distribution
        want = float(p[2]) if draft_q is None else float(torch.minimum(p, q).sum())
        assert abs(accepted / n - want) < 0.03


def test_sampled_speculative_generation_is_reproducible_with_a_seed(llm, draft):
    for spec in (Speculative(prompt_lookup_num_tokens=4), Speculative(assistant_model=draft, num_assistant_tokens=3)):
        kw = dict(ignore_eos=True, temperature=0.8, top_k=50, seed=3)
        a, stats = _run(llm, PROMPTS[:2], 16, spec, **kw)
        b, _ = _run(llm, PROMPTS[:2], 16, spec, **kw)
        assert _tokens(a) == _tokens(b) and all(len(t) == 16 for t in _tokens(a))
        assert stats["drafted"] > 0
        c, _ = _run(llm, PROMPTS[:2], 16, spec, **{**kw, "seed": 4})
        assert _tokens(c) != _tokens(a)


def test_bad_speculative_arguments_are_refused(llm, tiny_chat, tmp_path):
    for kw in (dict(prompt_lookup_num_tokens=0), dict(prompt_lookup_num_tokens=True),
               dict(prompt_lookup_num_tokens=10**6), dict(prompt_lookup_num_tokens=2, assistant_model=llm),
               dict(assistant_model=llm, num_assistant_tokens=-1), dict(assistant_model="nope")):
        with pytest.raises(GenerationError):
            llm.generate(CODE, 4, **kw)
    other = tmp_path / "other"
    shutil.copytree(tiny_chat, other)
    tinymodels.build_tokenizer(vocab_size=300).save(str(other / "tokenizer.json"))
    with pytest.raises(GenerationError, match="different tokenizer"):
        llm.generate(CODE, 4, assistant_model=ember.load(other, dtype=torch.float32))
    with pytest.raises(GenerationError, match="sliding-window"):
        llm.generate(CODE, 4, assistant_model=_ring_llm(tmp_path, 4))


def _ring_llm(tmp_path, window, layers=1):
    from transformers import MistralConfig

    from parity import save, tiny_hf_model

    cfg = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                        num_attention_heads=2, num_key_value_heads=1, sliding_window=window,
                        max_position_embeddings=128)
    save(tiny_hf_model(cfg), tmp_path / f"ring{window}")
    return ember.load(tmp_path / f"ring{window}", dtype=torch.float32)


def test_sliding_window_rings_roll_back_rejected_drafts(tmp_path):
    """A model whose layers keep a ring of their last 6 tokens, generating far past it: drafted tokens
    overwrite ring columns, and those of rejected drafts are put back; the tokens equal plain decoding's."""
    ring = _ring_llm(tmp_path, 6, layers=2)
    prompts = [[1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2], [7, 8, 9, 7, 8, 9, 7]]
    want, _ = _run(ring, prompts, 40, ignore_eos=True)
    for model in (ring, ring.with_engine(max_batch=2, max_len=128, cuda_graphs=True)):  # plain, and static steps
        got, stats = _run(model, prompts, 40, Speculative(prompt_lookup_num_tokens=8), ignore_eos=True)
        assert _tokens(got) == _tokens(want)
        assert 0 < stats["accepted"] < stats["drafted"]  # both kinds happened


def test_enable_speculative_applies_to_every_generation(llm):
    want = llm.generate(PROMPTS, 16, ignore_eos=True)
    try:
        assert llm.enable_speculative(prompt_lookup_num_tokens=3).num_tokens == 3
        gen = llm.generator(max_batch=2, max_len=64)
        assert gen.speculator is not None
        assert llm.generate(PROMPTS, 16, ignore_eos=True) == want
    finally:
        assert llm.enable_speculative() is None
    assert llm.generator(max_batch=2, max_len=64).speculator is None


EDIT_CODE = '''def adults(users):
    result = []
    for user in users:
        if user["age"] >= 18:
            result.append(user)
    return result


def emails(users):
    return [user["email"] for user in users]
'''


@pytest.mark.slow
def test_real_smollm2_code_edit_identical_with_prompt_lookup(smollm2_hf):
    """The real model (float32 weights) on a code-editing prompt: the reply copies the code, so most
    drafts hold; the tokens are the plain decode's. (Not the Q4_1 GGUF kept packed: its int8
    activation blocks turn the last-bit differences between a one-token and a five-token forward into
    visibly different logits, see speculative.py.)"""
    real = ember.load(smollm2_hf, dtype=torch.float32)
    prompt = "```python\n" + EDIT_CODE + "```\n\nThe same code, with `adults` renamed to `grown_ups`:\n\n```python\n"
    want, _ = _run(real, [prompt], 48, temperature=0)
    got, stats = _run(real, [prompt], 48, Speculative(prompt_lookup_num_tokens=4), temperature=0)
    assert _tokens(got) == _tokens(want)
    assert "result.append(user)" in "".join(t for _, t, _ in got[0][0])  # it copies the code
    # measured: 31 of 51 drafted tokens accepted, 44 tokens in 13 verifying forwards
    assert stats["accepted"] / stats["drafted"] > 0.4 and stats["emitted"] > 2 * stats["steps"]


def test_serve_flags_and_a_speculative_server_answer_as_plain_decoding(tiny_chat):
    import argparse

    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from ember.serve import create_app
    from ember.serve.cli import _check_numbers, add_parser
    from test_serve import running_server

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "--prompt-lookup-num-tokens", "4"])
    assert (args.prompt_lookup_num_tokens, args.assistant_model, args.num_assistant_tokens) == (4, None, 4)
    _check_numbers(args)
    for bad in (["--prompt-lookup-num-tokens", "0"], ["--prompt-lookup-num-tokens", "2", "--assistant-model", "m"],
                ["--assistant-model", "m", "--num-assistant-tokens", "100"]):
        with pytest.raises(SystemExit):
            _check_numbers(parser.parse_args(["serve", *bad]))

    own = ember.load(tiny_chat, device="cpu", dtype="float32")  # its own LLM: the speculative setting is per LLM
    want = [own.generate(p, 12, ignore_eos=True) for p in PROMPTS[:2]]
    own.enable_speculative(prompt_lookup_num_tokens=4)
    app = create_app(own, model_name="tiny", max_batch=2)
    assert app.state.scheduler.generator.speculator is not None
    with running_server(app) as url, httpx.Client(base_url=url, timeout=60) as h:
        for p, w in zip(PROMPTS[:2], want):
            r = h.post("/v1/completions", json={"model": "tiny", "prompt": p, "max_tokens": 12, "temperature": 0,
                                                "ignore_eos": True})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == w


def test_rows_under_a_grammar_decode_plainly_beside_drafting_rows(llm):
    pytest.importorskip("llguidance")
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    reqs = [llm.request(CODE, 16, ignore_eos=True), llm.request(CODE, 16, json_schema=schema)]
    want = [llm.generate(CODE, 16, ignore_eos=True), llm.generate(CODE, 16, json_schema=schema)]
    gen = llm.generator(reqs, speculative=Speculative(prompt_lookup_num_tokens=4))
    out = {r.id: "" for r in reqs}
    for ev in gen.run(reqs):
        out[ev.request.id] += ev.text
    assert [out[r.id] for r in reqs] == want
    assert gen.speculator.stats["drafted"] > 0


def test_models_with_recurrent_state_are_refused():
    from types import SimpleNamespace

    gen = SimpleNamespace(cache=SimpleNamespace(recurrent=True))  # a StateCache's flag (nn/state_cache.py)
    with pytest.raises(GenerationError, match="recurrent state"):
        Speculative(prompt_lookup_num_tokens=2).build(gen)
