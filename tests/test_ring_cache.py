"""Sliding-window layers keep a ring of `window` columns in the KV cache (kv_cache.py). Whatever
way a sequence is fed (one prefill, chunks shorter or longer than the window, token by token, rows
at different positions in one decode batch, the engine's static step), its logits must equal the
uncached forward's, where the window is applied by the mask alone."""
import pytest
import torch

import ember
import ember.engine as engine
from ember.engine.graphs import StaticDecoder
from ember.engine.presets import random_model
from ember.nn.kv_cache import KVCache

W = 5
MISTRAL = dict(model_type="mistral", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
               sliding_window=W, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
GEMMA2 = dict(model_type="gemma2", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
              sliding_window=W, attn_logit_softcapping=20.0, final_logit_softcapping=30.0, query_pre_attn_scalar=16)


def _model(raw):
    torch.manual_seed(0)
    _, m = random_model(raw, torch.float32)
    for p in m.parameters():  # larger than the presets' 0.02 so that attention is far from uniform
        p.data.mul_(8.0 if p.dim() > 1 else 1.0)
    return m


@pytest.fixture(scope="module", params=["mistral", "gemma2"])
def model(request):
    return _model(MISTRAL if request.param == "mistral" else GEMMA2)


def _feed(model, cache, ids, chunks, row=0):
    """Feed ids [1, L] in the given chunk sizes into cache row `row`; logits [L, vocab]."""
    out, c0 = [], 0
    for n in chunks:
        c1 = c0 + n
        pos = torch.arange(c0, c1)[None]
        out.append(model(ids[:, c0:c1], position_ids=pos, cache=cache, kv_len=c1,
                         cache_rows=slice(row, row + 1), fresh=c0 == 0)[0])
        c0 = c1
    return torch.cat(out)


def test_windowed_layers_get_a_ring(model):
    cache = model.new_cache(2, 64)
    windows = model.cache_windows()
    assert W in windows
    for layer, w in enumerate(windows):
        assert cache.k[layer].shape[2] == (64 if w is None else W + 1)
    assert model.new_cache(1, W + 1).windows == [None] * len(windows)  # no room to save: plain columns
    full = KVCache(2, 64, model.cache_layout())
    assert cache.nbytes < full.nbytes


@pytest.mark.parametrize("chunks", [(23,), (1,) * 23, (3,) * 7 + (2,), (7, 1, 1, 6, 8), (2, 9, 12), (5, 5, 13)],
                         ids=lambda c: "-".join(map(str, c)))
def test_ring_logits_equal_the_uncached_forward(model, chunks):
    ids = torch.randint(0, 128, (1, sum(chunks)), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids)[0]
        got = _feed(model, model.new_cache(1, 40), ids, chunks)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_rows_at_different_positions_decode_together(model):
    """Continuous batching over a ring: rows prefilled to different lengths (past the window and
    not yet), then batched decode steps, as the Generator and the static engine step run them
    (kv_len = the batch's longest, or the whole cache). Row 3 idles through the first steps (it
    writes to the scratch position, as a row prefilled during that step does) and decodes after."""
    g = torch.Generator().manual_seed(2)
    lens, steps, max_len, late = [9, 3, 4, 8], 8, 32, 3
    seqs = [torch.randint(0, 128, (1, n + steps), generator=g) for n in lens]
    with torch.no_grad():
        # a row's k-th decode step feeds token n+k-1, so its logits are the uncached forward's at n+k-1
        want = [model(s)[0, n - 1:n + steps - 1] for s, n in zip(seqs, lens)]
        want[3] = want[3][: steps - late]
        for static in (False, True):
            cache = model.new_cache(4, max_len)
            for r, (s, n) in enumerate(zip(seqs, lens)):
                _feed(model, cache, s[:, :n - 1], (n - 1,), row=r)
            got = [[] for _ in lens]
            for t in range(steps):
                k = [t, t, t, t - late]  # row 3's own step count
                ids = torch.tensor([[s[0, n + j - 1].item() if j >= 0 else 0] for s, n, j in zip(seqs, lens, k)])
                pos = torch.tensor([[n + j - 1 if j >= 0 else max_len - 1] for n, j in zip(lens, k)])
                kv_len = max_len if static else int(pos[pos < max_len - 1].max()) + 1
                out = model(ids, position_ids=pos, cache=cache, kv_len=kv_len, cache_rows=slice(0, 4))
                for r, j in enumerate(k):
                    if j >= 0:
                        got[r].append(out[r, 0])
            for r in range(len(lens)):
                torch.testing.assert_close(torch.stack(got[r]), want[r], rtol=1e-4, atol=1e-4)


def test_equal_length_rows_prefill_together_past_the_window(model):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 128, (2, 14), generator=g)
    with torch.no_grad():
        want = model(ids)
        cache = model.new_cache(2, 32)
        out, c0 = [], 0
        for n in (4, 7, 3):
            pos = torch.arange(c0, c0 + n)[None].expand(2, -1)
            out.append(model(ids[:, c0:c0 + n], position_ids=pos, cache=cache, kv_len=c0 + n, fresh=c0 == 0))
            c0 += n
    torch.testing.assert_close(torch.cat(out, 1), want, rtol=1e-4, atol=1e-4)


def _greedy(model, ids, n):
    seq = ids
    with torch.no_grad():
        for _ in range(n):
            nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    return seq[0, ids.shape[1]:].tolist()


def test_generator_and_engine_over_a_ring_match_uncached_greedy(model):
    """Prompts of different lengths, longer and shorter than the window, arriving together: the
    Generator prefills them (a row at a time where padding would wrap) in chunks shorter and longer
    than the window; the engine's static step decodes them. Every continuation is the uncached
    greedy one."""
    from ember.generation.loop import Generator, Request

    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 128, (1, n), generator=g) for n in (11, 3, 7, 2)]
    want = [_greedy(model, p, 12) for p in prompts]
    assert any(len(set(w)) > 3 for w in want)
    for chunk, static in ((3, False), (8, False), (512, True)):
        cache = model.new_cache(4, 40)
        step = StaticDecoder(model, cache, capture=False) if static else None
        gen = Generator(model, None, max_batch=4, max_len=40, prefill_chunk=chunk, cache=cache, step=step)
        reqs = [Request(p[0].tolist(), 12, ignore_eos=True) for p in prompts]
        got = {r.id: [] for r in reqs}
        for ev in gen.run(reqs):
            got[ev.request.id].append(ev.token_id)
        assert [got[r.id] for r in reqs] == want, (chunk, static)


def test_engine_ring_cache_is_smaller(model):
    eng = engine.Engine(model, None, [], max_batch=2, max_len=64, cuda_graphs=False)
    full = KVCache(2, 64, model.cache_layout())
    assert eng.cache.nbytes < full.nbytes


@pytest.mark.slow
def test_compiled_static_step_over_a_ring():
    """The static decode step compiled (what CUDA graphs capture on a GPU) writes and reads the ring
    with tensor ops only: same greedy tokens as the uncached forward."""
    from ember.generation.loop import Generator, Request

    model = _model(MISTRAL)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 128, (1, n), generator=g) for n in (9, 2)]
    want = [_greedy(model, p, 10) for p in prompts]
    cache = model.new_cache(2, 24)
    step = StaticDecoder(model, cache, capture=False, compile=True, compile_mode="default")
    gen = Generator(model, None, max_batch=2, max_len=24, cache=cache, step=step)
    reqs = [Request(p[0].tolist(), 10, ignore_eos=True) for p in prompts]
    got = {r.id: [] for r in reqs}
    for ev in gen.run(reqs):
        got[ev.request.id].append(ev.token_id)
    assert [got[r.id] for r in reqs] == want
    assert step.compile_seconds > 0
