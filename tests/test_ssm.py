"""State-space models and hybrids (Mamba, Mamba-2, Granite 4, LFM2) against transformers on tiny random checkpoints, and their
recurrent-state cache (nn/state_cache.py): token by token against the uncached forward, chunked
prefill, batched decode with idle rows, and the engine's static step with a slot reset and
re-admitted while another row keeps decoding."""
import pytest
import torch

import ember
from ember.engine import Engine, StaticDecoder
from ember.errors import ConfigError
from ember.generation.loop import Request
from ember.nn.state_cache import StateCache
from parity import check_cache_token_by_token, check_parity, ember_greedy, models_by_shape

BASE = dict(vocab_size=256, num_hidden_layers=2, pad_token_id=0, bos_token_id=None, eos_token_id=None)

SHAPES = {
    # (hidden 64, state 8, conv 4 at seed 0 amplifies float32 rounding past 1e-4 in transformers
    # itself: 7e-5 from a float64 run)
    "mamba_tied": ("mamba", dict(hidden_size=64, state_size=4, conv_kernel=2)),
    "mamba_untied_bias_rank": ("mamba", dict(hidden_size=48, state_size=16, conv_kernel=3, expand=2, use_bias=True,
                                             time_step_rank=5, tie_word_embeddings=False)),
    # chunk_size 8: a 24-token prompt is three SSD chunks
    "mamba2_groups_chunked": ("mamba2", dict(hidden_size=64, num_heads=8, head_dim=16, state_size=16, n_groups=2,
                                             chunk_size=8)),
    # (a tied Mamba-2 head makes random greedy text collapse into one token)
    "mamba2_one_group_bias_limit": ("mamba2", dict(hidden_size=48, num_heads=6, head_dim=8 * 2, state_size=16,
                                                   n_groups=1, chunk_size=16, conv_kernel=3, use_bias=True,
                                                   time_step_limit=(0.0, 3.0))),
    # Granite 4: Mamba-2 layers and attention layers, GraniteMoeShared's MLPs and multipliers
    "granite4_rope_moe": ("granitemoehybrid", dict(
        hidden_size=64, intermediate_size=32, shared_intermediate_size=48, num_hidden_layers=3,
        layer_types=["mamba", "attention", "mamba"], num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2, position_embedding_type="rope", max_position_embeddings=128,
        embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=2.0,
        mamba_n_heads=8, mamba_n_groups=2, mamba_d_state=16, mamba_d_conv=4, mamba_chunk_size=8)),
    "granite4_nope_dense": ("granitemoehybrid", dict(
        hidden_size=48, shared_intermediate_size=64, num_hidden_layers=2, layer_types=["attention", "mamba"],
        num_attention_heads=4, num_key_value_heads=1, num_local_experts=0, attention_multiplier=0.25,
        max_position_embeddings=128, mamba_n_heads=6, mamba_n_groups=1, mamba_d_state=8, mamba_d_conv=3,
        mamba_chunk_size=16, mamba_proj_bias=False)),
    # LFM2: gated short convolutions and attention layers with per-head q/k norms
    "lfm2_mixed": ("lfm2", dict(hidden_size=64, intermediate_size=96, block_multiple_of=32, num_hidden_layers=3,
                                layer_types=["conv", "full_attention", "conv"], num_attention_heads=4,
                                num_key_value_heads=2, conv_L_cache=3, max_position_embeddings=128)),
    "lfm2_bias_untied": ("lfm2", dict(hidden_size=48, intermediate_size=80, block_auto_adjust_ff_dim=False,
                                      num_hidden_layers=2, layer_types=["full_attention", "conv"],
                                      num_attention_heads=4, num_key_value_heads=1, conv_L_cache=4, conv_bias=True,
                                      tie_word_embeddings=False, max_position_embeddings=128)),
}


def _config(shape):
    import transformers

    family, kw = SHAPES[shape]
    cls = {"mamba": "MambaConfig", "mamba2": "Mamba2Config", "granitemoehybrid": "GraniteMoeHybridConfig",
           "lfm2": "Lfm2Config"}[family]
    return getattr(transformers, cls)(**{**BASE, **kw})


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """shape -> (transformers model, folder), made once per module."""
    return models_by_shape(tmp_path_factory, _config)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_ssm_matches_transformers(built, shape):
    """Logits (plain, left- and right-padded batches) within 1e-4, greedy continuations equal."""
    hf, folder = built(shape)
    # a bias on in_proj makes padding positions nonzero before the conv, in transformers too:
    # padded rows then differ from the rows alone
    kw = SHAPES[shape][1]
    llm = check_parity(hf, folder, 256, padding_invariant=not (kw.get("use_bias") or kw.get("conv_bias")))
    cache = llm.model.new_cache(2, 16)
    assert isinstance(cache, StateCache)
    # keys and values for the attention layers only, state for the state-space layers only
    attention = [t in ("attention", "full_attention") for t in kw.get("layer_types", ["mamba"] * 2)]
    assert [k.numel() > 0 for k in cache.k] == attention == [s is None for s in cache.states]


def _load(folder):
    return ember.load(folder, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("shape", ["mamba_tied", "mamba2_groups_chunked", "granite4_rope_moe", "lfm2_mixed"])
def test_state_cache_matches_the_uncached_forward_token_by_token(built, shape):
    """Prefill in two chunks (the second continuing from the state), then decode one token at a
    time: every step's logits equal the uncached forward's at that position."""
    _, folder = built(shape)
    model = _load(folder).model
    check_cache_token_by_token(model, 256, length=20, chunks=(7, 11))


def test_idle_rows_keep_their_state_and_reset_rows_zeroes_it(built):
    """A row on the scratch position (an idle slot in a batched decode step) keeps its state;
    reset_rows clears a slot for a new sequence."""
    _, folder = built("mamba2_groups_chunked")
    model = _load(folder).model
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cache = model.new_cache(2, 32)
        model(ids[:, :8], position_ids=torch.arange(8).expand(2, -1), cache=cache, kv_len=8, fresh=True)
        before = [t.clone() for t in cache.states[0]]
        pos = torch.tensor([[8], [cache.scratch]])  # row 1 idles
        model(ids[:, 8:], position_ids=pos, cache=cache, kv_len=9)
        for now, was in zip(cache.states[0], before):
            assert torch.equal(now[1], was[1]) and not torch.equal(now[0], was[0])
        cache.reset_rows(slice(1, 2))
        assert all(not t[1].any() and t[0].any() for s in cache.states for t in s)


@pytest.mark.parametrize("shape", ["mamba_untied_bias_rank", "mamba2_groups_chunked", "granite4_nope_dense",
                                   "lfm2_bias_untied"])
def test_engine_static_step_with_a_slot_reset_and_readmitted(built, shape):
    """Two slots through the engine's static decode step: the request in slot 0 finishes, a new one
    takes slot 0 (its state reset) while slot 1 keeps decoding, and idles through the decode step
    of the step it is prefilled in. Every request's tokens equal the request run alone."""
    _, folder = built(shape)
    llm = _load(folder)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 16], [20, 21, 22, 23, 24, 25]]
    lengths = [4, 24, 10]
    want = [ember_greedy(llm, [p], n)[0] for p, n in zip(prompts, lengths)]
    eng = Engine(llm.model, None, [], max_batch=2, max_len=64, cuda_graphs=False)
    eng.decoder = StaticDecoder(llm.model, eng.cache, capture=False)
    assert isinstance(eng.cache, StateCache)
    g = eng.generator()
    reqs = [Request(p, n, ignore_eos=True) for p, n in zip(prompts, lengths)]
    got = {r.id: [] for r in reqs}
    g.add(reqs[0])
    g.add(reqs[1])
    slots = {}
    for _ in range(60):
        if not g.has_work():
            break
        if len(got[reqs[0].id]) == lengths[0] and not g.waiting and reqs[2].id not in slots:
            g.add(reqs[2])
        for ev in g.step():
            got[ev.request.id].append(ev.token_id)
        for s in g.slots:
            if s is not None:
                slots.setdefault(s.req.id, s.slot)
    assert slots == {reqs[0].id: 0, reqs[1].id: 1, reqs[2].id: 0}
    assert [got[r.id] for r in reqs] == want
    assert len(got[reqs[2].id]) == 10 and len(got[reqs[1].id]) == 24


def test_compiled_engine_step_equals_eager(built):
    """compile=True on CPU (torch.compile of the static step) gives the eager tokens."""
    _, folder = built("mamba2_groups_chunked")
    llm = _load(folder)
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    want = ember_greedy(llm, prompts, 6)
    fast = llm.with_engine(max_batch=2, max_len=32, compile=True)
    assert fast.engine.decoder._compile
    assert ember_greedy(fast, prompts, 6) == want


def test_batched_generate_with_unequal_prompts_equals_each_alone(built):
    """The Generator prefills rows of unequal lengths apart (padding would enter their state)."""
    _, folder = built("mamba_tied")
    llm = _load(folder)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13]]
    together = ember_greedy(llm, prompts, 12)
    assert together == [ember_greedy(llm, [p], 12)[0] for p in prompts]


def test_prefix_cache_stays_off_for_recurrent_state(built):
    from ember.generation.prefix_cache import for_generator

    _, folder = built("mamba2_one_group_bias_limit")
    gen = _load(folder).generator(max_batch=2, max_len=32)
    assert for_generator(gen) is None


@pytest.mark.parametrize("family, bad, match", [
    ("mamba2", dict(num_heads=3), "num_heads \\* head_dim"),
    ("mamba2", dict(n_groups=4, num_heads=6, head_dim=16, hidden_size=48), "multiple of its groups"),
    ("mamba2", dict(time_step_limit=[2.0, 1.0]), "time_step_limit"),
    ("mamba2", dict(time_step_limit=[1.0]), "time_step_limit"),
    ("mamba", dict(time_step_rank="big"), "time_step_rank"),
    ("mamba", dict(state_size=0), "state_size"),
])
def test_ssm_config_rejects_impossible_values(family, bad, match):
    from ember.registry import lookup

    raw = {"model_type": family, "hidden_size": 64, "num_heads": 8, "head_dim": 16, "n_groups": 2, **bad}
    with pytest.raises(ConfigError, match=match):
        lookup(raw).parse_config(raw)


def test_mamba2_reads_an_infinite_time_step_limit(built):
    """transformers writes the default (0, inf) as {"__float__": "Infinity"}: no limit."""
    _, folder = built("mamba2_groups_chunked")
    model = _load(folder).model
    assert model.model.layers[0].mixer.d.dt_limit is None
    _, folder = built("mamba2_one_group_bias_limit")
    assert _load(folder).model.model.layers[0].mixer.d.dt_limit == (0.0, 3.0)
