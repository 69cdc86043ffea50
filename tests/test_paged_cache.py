"""The paged KV cache (nn/paged_cache.py): block tables over a free-block pool, giving the same logits
as the contiguous cache while rows of different lengths are admitted and freed."""
import pytest
import torch

import ember
from ember.errors import GenerationError
from ember.generation.loop import Generator
from ember.generation.speculative import Speculative
from ember.nn.kv_cache import KVCache
from ember.nn.paged_cache import PagedKVCache


@pytest.fixture(scope="module")
def llm(tiny_chat):
    return ember.load(tiny_chat, dtype=torch.float32)


def test_forwards_give_the_contiguous_caches_logits(llm):
    """Prefill rows of different lengths, decode them together (an idle row on the scratch column),
    free one row and admit a longer one into its slot: logits equal at every step."""
    m = llm.model
    torch.manual_seed(0)
    dense = m.new_cache(3, 64)
    paged = PagedKVCache.for_model(m, 3, 64, block=4, num_blocks=20)
    assert isinstance(dense, KVCache)
    lens = [5, 11, 3]
    ids = [torch.randint(0, 300, (n,)).tolist() for n in lens]

    def both(tokens, pos, kv_len, rows):
        x, p = torch.tensor(tokens), torch.tensor(pos)
        a = m(x, position_ids=p, cache=dense, kv_len=kv_len, cache_rows=rows)
        for r in range(rows.start, rows.stop):
            live = p[r - rows.start][p[r - rows.start] < 63]  # (63: the scratch position of an idle row)
            if len(live):
                paged.reserve(r, int(live.max()) + 1)
        b = m(x, position_ids=p, cache=paged, kv_len=kv_len, cache_rows=rows)
        live = (p < 63).any(dim=1)  # an idle row's logits are thrown away (and read other stale columns)
        torch.testing.assert_close(b[live], a[live], atol=1e-5, rtol=1e-5)
        return a

    for r, t in enumerate(ids):
        both([t], [list(range(len(t)))], len(t), slice(r, r + 1))
    cur = [t[-1] for t in ids]
    for step in range(6):  # rows at their own positions; row 2 idles on the scratch column after step 2
        pos = [[lens[0] + step], [lens[1] + step], [lens[2] + step if step < 3 else 63]]
        out = both([[c] for c in cur], pos, max(p[0] for p in pos if p[0] < 63) + 1, slice(0, 3))
        cur = out[:, 0].argmax(-1).tolist()
    held = paged.used_blocks
    paged.release(2)  # row 2 ends; a longer sequence takes its slot
    assert paged.used_blocks < held and paged.table[2].eq(0).all()
    new = torch.randint(0, 300, (19,)).tolist()
    both([new], [list(range(19))], 19, slice(2, 3))
    both([[cur[0]], [cur[1]], [new[-1]]], [[lens[0] + 6], [lens[1] + 6], [19]], 20, slice(0, 3))
    assert paged.used_blocks <= sum(-(-n // 4) for n in (lens[0] + 7, lens[1] + 7, 20))


def test_generation_with_a_paged_cache_matches_plain_and_frees_every_block(llm):
    prompts = ["The quick brown fox", "Once upon a time there was a little model that could", "1234", "def add(a, b):"]
    lens = [9, 3, 14, 6]
    want = [llm.generate(p, n, ignore_eos=True) for p, n in zip(prompts, lens)]
    cache = PagedKVCache.for_model(llm.model, 2, 64, block=4, num_blocks=12)  # less than 2 rows x 64 tokens
    gen = Generator(llm.model, llm.tokenizer, max_batch=2, cache=cache)
    reqs = [llm.request(p, n, ignore_eos=True) for p, n in zip(prompts, lens)]
    text = {r.id: "" for r in reqs}
    peak = 0
    for r in reqs:
        gen.add(r)  # 4 requests through 2 slots: each finished one frees its slot and blocks
    while gen.has_work():
        for ev in gen.step():
            text[ev.request.id] += ev.text
        peak = max(peak, cache.used_blocks)
    assert [text[r.id] for r in reqs] == want
    assert cache.used_blocks == 0 and cache.free_blocks == 12 and 0 < peak <= 12


def test_speculative_decoding_over_a_paged_cache(llm):
    p = "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return a"
    want = llm.generate(p, 20, ignore_eos=True)
    cache = PagedKVCache.for_model(llm.model, 1, 128, block=8)
    gen = Generator(llm.model, llm.tokenizer, max_batch=1, cache=cache)
    gen.speculator = Speculative(prompt_lookup_num_tokens=4).build(gen)
    r = llm.request(p, 20, ignore_eos=True)
    assert "".join(ev.text for ev in gen.run([r])) == want
    assert gen.speculator.stats["drafted"] > 0 and cache.used_blocks == 0


def test_a_full_pool_is_a_clear_error(llm):
    cache = PagedKVCache.for_model(llm.model, 1, 64, block=4, num_blocks=2)
    gen = Generator(llm.model, llm.tokenizer, max_batch=1, cache=cache)
    with pytest.raises(GenerationError, match="paged KV cache is full"):
        list(gen.run([llm.request("The quick brown fox jumps over the lazy dog", 10, ignore_eos=True)]))


def test_the_engine_over_a_paged_cache_matches_plain_decoding(llm):
    """The static-shape decode step (what CUDA graphs capture; eager on CPU) over a paged cache, with
    pipelined greedy steps, over three rows of different lengths."""
    from ember.engine.graphs import StaticDecoder

    prompts = ["The quick brown fox", "Héllo", "def add(a, b):"]
    want = [llm.generate(p, 12, ignore_eos=True) for p in prompts]
    fast = llm.with_engine(max_batch=4, max_len=96, cuda_graphs=True, kv_blocks=20, kv_block=8)
    assert isinstance(fast.engine.decoder, StaticDecoder) and isinstance(fast.engine.cache, PagedKVCache)
    assert fast.generate(prompts, 12, ignore_eos=True) == want
    assert fast.engine.cache.used_blocks == 0


def test_serve_options_paged_cache_and_a_named_assistant(tiny_chat):
    """What `ember serve --kv-blocks 24 --assistant-model M` sets up (serve.server.prepare_llm): an
    engine over a paged cache, the prefix cache off, the assistant loaded by name; the server's
    generator decodes as plain generation does."""
    import argparse

    pytest.importorskip("fastapi")
    from ember.serve import create_app
    from ember.serve.cli import _check_numbers, add_parser
    from ember.serve.server import prepare_llm

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    assert parser.parse_args(["serve", "--kv-blocks", "24"]).kv_blocks == 24
    with pytest.raises(SystemExit):
        _check_numbers(parser.parse_args(["serve", "--kv-blocks", "0"]))
    own = ember.load(tiny_chat, device="cpu", dtype="float32")
    want = own.generate("The quick brown fox", 10, ignore_eos=True)
    opts = {"prefix_cache": None}
    served = prepare_llm(own, 2, 64, kv_blocks=24, app_options=opts,
                         speculative={"assistant_model": str(tiny_chat), "num_assistant_tokens": 3})
    assert opts["prefix_cache"] == 0 and isinstance(served.engine.cache, PagedKVCache)
    assert served.speculative.assistant_model.tokenizer is not None
    app = create_app(served, model_name="tiny", max_batch=2, max_len=64, **opts)
    gen = app.state.scheduler.generator
    assert gen.cache is served.engine.cache and gen.speculator is not None and gen.prefix_cache is None
    assert served.generate("The quick brown fox", 10, ignore_eos=True) == want
    # create_app on its own (no prepare_llm) leaves the prefix cache off over a paged cache too
    assert create_app(served, model_name="tiny", max_batch=2, max_len=64).state.scheduler.generator.prefix_cache is None
