"""The prefix cache (generation/prefix_cache.py): greedy outputs are the same token for token with
and without it, whatever the batch (several requests at once, shared prefixes with divergent
suffixes, a prompt that is wholly a cached prefix, a chat's next turn, prefill in chunks, the
engine's static step), for a full-attention family (Llama) and sliding-window ring families
(Mistral, Gemma 2); and its memory is bounded, with least-recently-used eviction."""
from __future__ import annotations

import pytest
import torch

import ember
from ember.engine import Engine
from ember.engine.presets import random_model
from ember.generation.loop import Generator, Request
from ember.generation.prefix_cache import PrefixCache

W = 7
LLAMA = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
MISTRAL = dict(LLAMA, model_type="mistral", sliding_window=W, head_dim=16)
GEMMA2 = dict(model_type="gemma2", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
              sliding_window=W, attn_logit_softcapping=20.0, final_logit_softcapping=30.0, query_pre_attn_scalar=16)
FAMILIES = {"llama": LLAMA, "mistral": MISTRAL, "gemma2": GEMMA2}
MAX_LEN = 96


def _model(family):
    torch.manual_seed(0)
    _, m = random_model(FAMILIES[family], torch.float32, prepack=False)
    for p in m.parameters():  # larger than the presets' 0.02: varied, non-repeating greedy text
        p.data.mul_(8.0 if p.dim() > 1 else 1.0)
    m.family = family
    return m


@pytest.fixture(scope="module", params=["llama", "mistral"])
def model(request):
    return _model(request.param)


def _prompts():
    g = torch.Generator().manual_seed(0)
    system = torch.randint(0, 128, (40,), generator=g).tolist()
    # a shared prefix with divergent suffixes, one a token long; a prompt that is wholly a prefix of
    # the others (block-aligned, and not); a short one
    return [system + torch.randint(0, 128, (k,), generator=g).tolist() for k in (3, 9, 17, 1)] + [
        system[:32], system[:29], system[:5]]


def _run(model, prompts, *, prefix=None, max_batch=3, chunk=512, engine=False, max_tokens=6):
    if engine:
        gen = Engine(model, None, max_batch=max_batch, max_len=MAX_LEN, cuda_graphs=True).generator()
        gen.prefill_chunk = chunk
    else:
        gen = Generator(model, None, max_batch=max_batch, max_len=MAX_LEN, prefill_chunk=chunk)
    gen.prefix_cache = prefix
    reqs = [Request(list(p), max_tokens=max_tokens, ignore_eos=True) for p in prompts]
    out = {r.id: [] for r in reqs}
    for ev in gen.run(reqs):
        out[ev.request.id].append(ev.token_id)
    return [out[r.id] for r in reqs]


def _bytes(model, blocks, block):
    return blocks * PrefixCache(model, 0, block=block).block_bytes(torch.float32)


COMBOS = [(4, 3, 512, False), (1, 8, 16, False), (16, 4, 512, True)]


@pytest.mark.parametrize("block,max_batch,chunk,engine", COMBOS, ids=["block4-batch3", "block1-batch8-chunk16",
                                                                      "block16-engine"])
def test_greedy_outputs_identical_with_prefix_cache(model, block, max_batch, chunk, engine):
    prompts = _prompts()
    want = _run(model, prompts, max_batch=max_batch, chunk=chunk, engine=engine)
    # the chat's next turn: each prompt, its reply (ending with the token it stopped at, as a chat
    # template writes the end-of-turn token the model stopped at), a new message
    turn2 = [p + o + [5, 6, 7] for p, o in zip(prompts, want)]
    want2 = _run(model, turn2, max_batch=max_batch, chunk=chunk, engine=engine)
    pc = PrefixCache(model, _bytes(model, 1000, block), block=block)
    assert _run(model, prompts, prefix=pc, max_batch=max_batch, chunk=chunk, engine=engine) == want
    first = pc.stats["hit_tokens"]
    assert _run(model, prompts, prefix=pc, max_batch=max_batch, chunk=chunk, engine=engine) == want  # all cached
    assert pc.stats["hit_tokens"] > first
    before = pc.stats["hit_tokens"]
    assert _run(model, turn2, prefix=pc, max_batch=max_batch, chunk=chunk, engine=engine) == want2
    # every next turn reuses its whole previous turn (prompt + reply; the last token of the reply was
    # never fed, unless a pipelined step fed it), rings included
    assert pc.stats["hit_tokens"] - before >= sum(len(p) + len(o) - 1 for p, o in zip(prompts, want))


def test_gemma2_greedy_outputs_identical_with_prefix_cache():
    """Gemma 2: sliding-window layers between global ones, soft-capping."""
    test_greedy_outputs_identical_with_prefix_cache(_model("gemma2"), *COMBOS[0])


def test_eviction_keeps_memory_bounded_and_outputs_identical(model):
    prompts = _prompts()
    want = _run(model, prompts)
    pc = PrefixCache(model, _bytes(model, 6, 4), block=4)
    for _ in range(2):
        assert _run(model, prompts, prefix=pc) == want
        assert pc.used_blocks <= pc.capacity == 6
    assert pc.stats["evicted_blocks"] > 0
    assert sum(t.numel() * t.element_size() for t in pc.k + pc.v) <= pc.max_bytes


def test_least_recently_used_sequence_is_evicted_first(model):
    g = torch.Generator().manual_seed(3)
    a, b, c = (torch.randint(0, 128, (12,), generator=g).tolist() for _ in range(3))
    pc = PrefixCache(model, _bytes(model, 7, 4), block=4)  # room for two sequences of 3 blocks, not three
    cache = model.new_cache(1, MAX_LEN)
    gen = Generator(model, None, max_batch=1, max_len=MAX_LEN)
    gen.cache, gen.prefix_cache = cache, pc
    for seq in (a, b):
        list(Generator(model, None, max_batch=1, max_len=MAX_LEN, prefix_cache=pc).run([Request(seq, 1)]))
    assert pc.restore(cache, 0, a + [1]) == 12  # a is now more recent than b
    list(Generator(model, None, max_batch=1, max_len=MAX_LEN, prefix_cache=pc).run([Request(c, 1)]))
    assert pc.restore(cache, 0, a + [1]) == 12
    assert pc.restore(cache, 0, c + [1]) == 12
    assert pc.restore(cache, 0, b + [1]) < 12


def test_ring_layers_reuse_only_what_their_windows_saw(model):
    """A ring keeps a row's last W positions: a prompt that leaves an earlier sequence long before
    its end cannot get its window layers' keys back, so it reuses nothing (full attention: up to
    where it diverges). A prompt that continues the sequence reuses all of it."""
    g = torch.Generator().manual_seed(4)
    seq = torch.randint(0, 128, (40,), generator=g).tolist()
    pc = PrefixCache(model, _bytes(model, 100, 4), block=4)
    list(Generator(model, None, max_batch=1, max_len=MAX_LEN, prefix_cache=pc).run([Request(seq, 1)]))
    cache = model.new_cache(1, MAX_LEN)
    assert pc.restore(cache, 0, seq + [1, 2]) == 40
    early = pc.restore(cache, 0, seq[:20] + [1, 2])
    assert early == (0 if model.family != "llama" else 20)


def test_prefix_cache_from_python(tiny_chat):
    llm = ember.load(tiny_chat, device="cpu", dtype="float32")
    turn1 = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me about foxes."}]
    want1 = llm.chat(turn1, max_tokens=12)
    turn2 = turn1 + [{"role": "assistant", "content": want1}, {"role": "user", "content": "And dogs?"}]
    want2 = llm.chat(turn2, max_tokens=12)
    pc = llm.enable_prefix_cache(64 << 20)
    assert llm.chat(turn1, max_tokens=12) == want1
    assert llm.chat(turn2, max_tokens=12) == want2
    assert pc.stats["hits"] == 1 and pc.stats["hit_tokens"] >= len(llm.tokenizer.encode_chat(turn1))
    assert llm.enable_prefix_cache(0) is None and llm.prefix_cache is None
