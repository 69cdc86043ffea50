"""The engine's static-shape decode path (what CUDA graphs capture), exercised eagerly on CPU."""
import pytest
import torch

import ember
import ember.engine as engine
from ember.engine.graphs import StaticDecoder, bucket_for
from ember.engine.presets import PRESETS, random_model
from ember.generation.loop import Generator, Request


@pytest.fixture(scope="module")
def llm(tiny_chat):
    return ember.load(tiny_chat, dtype=torch.float32)


def _tokens(llm, prompts, n):
    reqs = [llm.request(p, n, ignore_eos=True) for p in prompts]
    out = {r.id: [] for r in reqs}
    for ev in llm.events(reqs):
        out[ev.request.id].append(ev.token_id)
    return [out[r.id] for r in reqs]


def test_static_decoder_greedy_equals_plain_path(llm):
    prompts = ["The quick brown fox", "Héllo", "def add(a, b):"]  # 3 rows → bucket 4 with an idle row
    want = _tokens(llm, prompts, 20)
    fast = llm.with_engine(max_batch=8, max_len=128, cuda_graphs=True)  # static step, eager on CPU
    assert isinstance(fast.engine.decoder, StaticDecoder) and llm.engine is None
    assert _tokens(fast, prompts, 20) == want
    assert set(fast.engine.decoder.graphs) == {4}


def test_requests_joining_a_running_batch_get_the_same_tokens(llm):
    """Continuous batching through the static decoder: a request admitted mid-way is unaffected."""
    prompts = ["Once upon a time", "The capital", "1234"]
    want = _tokens(llm, prompts, 16)
    eng = engine.Engine(llm.model, llm.tokenizer, [], max_batch=4, max_len=96, cuda_graphs=False)
    eng.decoder = StaticDecoder(llm.model, eng.cache, capture=False)
    g = eng.generator()
    reqs = [Request(llm.encode(p), 16, ignore_eos=True) for p in prompts]
    got = {r.id: [] for r in reqs}
    g.add(reqs[0])
    for i in range(40):
        if i == 3:
            g.add(reqs[1])
        if i == 7:
            g.add(reqs[2])
        for ev in g.step():
            got[ev.request.id].append(ev.token_id)
        if not g.has_work() and i > 7:
            break
    assert [got[r.id] for r in reqs] == want


def test_bucket_choice():
    assert bucket_for(1, (1, 2, 4)) == 1 and bucket_for(3, (1, 2, 4)) == 4
    with pytest.raises(ValueError):
        bucket_for(5, (1, 2, 4))


def test_long_requests_fall_back_to_a_plain_generator(llm):
    eng = engine.Engine(llm.model, llm.tokenizer, [], max_batch=2, max_len=32, cuda_graphs=False)
    assert eng.generator(1, 100).max_len == 101
    assert eng.generator(1, 10).cache is eng.cache


@pytest.mark.parametrize("preset", ["smollm2-135m", "qwen2.5-0.5b", "gemma3-1b"])
def test_presets_build_models_with_random_weights(preset):
    small = dict(PRESETS[preset], num_hidden_layers=6 if preset == "gemma3-1b" else 2, vocab_size=512)
    cfg, model = random_model(small, torch.float32)
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 512)
    if preset == "gemma3-1b":  # five sliding layers to one global: five rings of 513 columns
        cache = model.new_cache(1, 4096)
        assert [k.shape[2] for k in cache.k] == [513] * 5 + [4096]


def test_engine_mixed_sampling_and_logprobs_match_plain_path(llm):
    def run(l):
        reqs = [l.request("Once upon", 12, temperature=0.8, seed=3, ignore_eos=True),
                l.request("The quick", 12, ignore_eos=True, logprobs=2)]
        out = {r.id: [] for r in reqs}
        for ev in l.events(reqs):
            out[ev.request.id].append((ev.token_id, None if ev.logprob is None else round(ev.logprob, 4)))
        return [out[r.id] for r in reqs]

    want = run(llm)
    assert run(llm.with_engine(max_batch=4, max_len=64, cuda_graphs=True)) == want  # static path, eager on CPU


def test_pipelined_continuous_batching_with_random_admissions_and_aborts(llm):
    """The engine's pipelined greedy decode (tokens read one step late) under churn: every request
    that is not aborted gets exactly its solo greedy tokens; aborted ones a prefix of them."""
    import random

    prompts = ["Once upon a time", "The quick", "Héllo", "def add", "1234", "The capital of", "ça va", "emoji 🎉"]
    lens = [5, 17, 9, 30, 2, 12, 25, 7]
    want = {p: _tokens(llm, [p], n)[0] for p, n in zip(prompts, lens)}
    eng = engine.Engine(llm.model, llm.tokenizer, [], max_batch=4, max_len=96, cuda_graphs=True)
    rng = random.Random(0)
    for _ in range(3):
        g = eng.generator()
        reqs = {p: Request(llm.encode(p), n, ignore_eos=True) for p, n in zip(prompts, lens)}
        by_id = {r.id: p for p, r in reqs.items()}
        got = {p: [] for p in prompts}
        pending, aborted = list(prompts), set()
        rng.shuffle(pending)
        while pending or g.has_work():
            if pending and rng.random() < 0.5:
                g.add(reqs[pending.pop()])
            if rng.random() < 0.05 and g.running:
                victim = next(s for s in g.slots if s is not None)
                aborted.add(by_id[victim.req.id])
                g.abort(victim.req.id)
            for ev in g.step():
                got[by_id[ev.request.id]].append(ev.token_id)
        assert g.running == 0
        for p in prompts:
            assert got[p] == (want[p][: len(got[p])] if p in aborted else want[p]), p


@pytest.mark.slow
def test_compiled_static_decoder_on_cpu_matches_eager(tiny_chat):
    """torch.compile of the decode step (what the GPU engine captures), on CPU: same greedy tokens."""
    plain = ember.load(tiny_chat, dtype=torch.float32)
    want = _tokens(plain, ["The quick brown fox", "Héllo"], 12)
    llm = ember.load(tiny_chat, dtype=torch.float32, compile="default")
    assert llm.engine is not None and llm.engine.decoder is not None
    assert _tokens(llm, ["The quick brown fox", "Héllo"], 12) == want
    assert _tokens(llm, ["Héllo"], 12) == want[1:]  # batch 1: the single-row decode path, compiled
    assert llm.engine.decoder.compile_seconds > 0


@pytest.mark.slow
def test_compiled_buckets_warmed_up_do_not_recompile_while_decoding(tiny_chat):
    """Engine.warmup compiles each bucket as decoding will run it (inference mode): a bucket that
    recompiled on its first real step paid a compile inside the timed decode (bench's batch 8 ran
    at a tenth of its speed)."""
    import torch._dynamo

    llm = ember.load(tiny_chat, dtype=torch.float32)
    llm = llm.with_engine(max_batch=2, max_len=64, compile="default")
    llm.engine.warmup([1, 2])
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert len(_tokens(llm, ["The quick brown fox", "Héllo"], 6)[1]) == 6
        assert len(_tokens(llm, ["Héllo"], 6)[0]) == 6


def test_unpacking_prepacked_linears_gives_back_the_weights():
    from ember.backends.onednn import PrepackedLinear, can_prepack, unprepack_all

    if not can_prepack():
        pytest.skip("no oneDNN bf16 on this CPU")
    from ember.nn.layers import Linear

    w, b, w2 = torch.randn(24, 16).bfloat16(), torch.randn(24).bfloat16(), torch.randn(16, 24).bfloat16()
    m = torch.nn.Sequential(PrepackedLinear(Linear(w.clone(), b)), torch.nn.ReLU(), PrepackedLinear(Linear(w2.clone())))
    x = torch.randn(3, 16).bfloat16()
    want = m(x)
    assert unprepack_all(m) == 2 and not any(isinstance(c, PrepackedLinear) for c in m.modules())
    assert torch.equal(m[0].weight, w) and torch.equal(m[0].bias, b) and torch.equal(m[2].weight, w2)
    torch.testing.assert_close(m(x), want, rtol=2e-2, atol=2e-2)


@pytest.mark.slow
@pytest.mark.parametrize("prepack", [True, None])
def test_compiling_a_prepacked_bf16_model_on_cpu(tiny_chat, prepack):
    """llm.with_engine(compile=...) on a bf16 model ember.load made (prepack=True: with oneDNN-packed
    prefill copies; by default the native decode GEMV on the plain weights): Inductor cannot lower
    oneDNN's packed weights, so the engine unpacks them first; tokens match the eager path."""
    from ember.backends.onednn import PrepackedLinear, can_prepack

    if not can_prepack():
        pytest.skip("no oneDNN bf16 on this CPU")
    llm = ember.load(tiny_chat, dtype=torch.bfloat16, prepack=prepack)
    assert any(isinstance(m, PrepackedLinear) for m in llm.model.modules()) == bool(prepack)
    want = _tokens(llm, ["The quick brown fox"], 8)
    fast = llm.with_engine(max_batch=1, max_len=64, compile="default")
    assert not any(isinstance(m, PrepackedLinear) for m in fast.model.modules())
    assert _tokens(fast, ["The quick brown fox"], 8) == want


def test_weight_bytes_counts_prepacked_weights_and_not_gathered_tables():
    """What `ember bench` divides by: every Linear's bytes once, prepacked (opaque) ones included;
    the embedding table only where a tied head reads it whole."""
    from ember.engine.bench import weight_bytes
    from ember.backends.onednn import can_prepack

    small = dict(PRESETS["smollm2-135m"], num_hidden_layers=2, vocab_size=512)
    h, i, d = small["hidden_size"], small["intermediate_size"], small["head_dim"]
    q, kv = small["num_attention_heads"] * d, small["num_key_value_heads"] * d
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
    want = 2 * (2 * per_layer + h + 512 * h)  # bf16: layers, final norm, the (tied) head
    _, plain = random_model(small, torch.bfloat16, prepack=False)
    assert weight_bytes(plain) == want
    untied = dict(small, tie_word_embeddings=False)
    _, own_head = random_model(untied, torch.bfloat16, prepack=False)
    assert weight_bytes(own_head) == want  # the untied table is gathered, not streamed
    if can_prepack():
        _, packed = random_model(small, torch.bfloat16, prepack=True)
        assert any(type(m).__name__ == "PrepackedLinear" for m in packed.modules())
        assert weight_bytes(packed) >= want


def test_ember_bench_with_a_preset_runs_on_cpu(capsys):
    import argparse

    from ember.engine.bench import main
    from ember.engine.presets import PRESETS as P

    P["_tiny_test"] = dict(P["smollm2-135m"], num_hidden_layers=2, vocab_size=512)
    try:
        args = argparse.Namespace(config="_tiny_test", dtype="bfloat16", device="cpu", batch="1,2", prompt=8,
                                  tokens=6, prefill=16, compile=False, no_graphs=False, json=True, model=None)
        assert main(args) == 0
    finally:
        del P["_tiny_test"]
    import json

    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for k in ("decode_b1_tok_s", "decode_b2_tok_s", "prefill_tok_s", "ttft_ms", "peak_memory_GB",
              "copy_bandwidth_GBs", "decode_b1_pct_copy_bw"):
        assert res[k] > 0, k
    assert res["weights_GB"] > 0 and res["peak_memory_GB"] < 4
