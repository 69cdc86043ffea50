"""Fuzzing config.json (and generation_config.json) against tiny valid checkpoints of each family.

Property: with a hostile config beside valid weights, `ember.load` (registry.lookup →
entry.parse_config → model construction from the VarBuilder) either raises an `EmberError` or
returns a model that runs: a short greedy generation works and `max_context` is an int. Never
another exception, never a hang, never a big allocation (RLIMIT_DATA caps growth at 1 GB while an
example runs: a config claiming hidden_size=10**12 must fail on the shape check against the
weights, before allocating anything sized by it). See tests/hostile.py for budgets.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ember
from ember import registry
from ember.errors import ConfigError, EmberError
from hostile import fuzz_settings, memory_cap, time_limit

pytest.importorskip("transformers")

# Tiny configs, one per structurally distinct family (remaps like mistral/qwen2 share llama's code).
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=None, eos_token_id=None,
            pad_token_id=None)
FAMILIES = {
    "llama": ("LlamaConfig", dict(TINY, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "qwen3": ("Qwen3Config", dict(TINY, head_dim=8)),
    "phi3": ("Phi3Config", dict(TINY, num_key_value_heads=4, original_max_position_embeddings=32,
                                rope_scaling={"type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4})),
    "gemma2": ("Gemma2Config", dict(TINY, head_dim=8, sliding_window=4, attn_logit_softcapping=2.0,
                                    final_logit_softcapping=5.0)),
    "gemma3_text": ("Gemma3TextConfig", dict(TINY, head_dim=8, sliding_window=4,
                                             rope_scaling={"rope_type": "yarn", "factor": 2.0})),
    "phi": ("PhiConfig", dict(TINY, partial_rotary_factor=0.5)),
    "mixtral": ("MixtralConfig", dict(TINY, num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(TINY, head_dim=8, moe_intermediate_size=16, num_experts=4,
                                         num_experts_per_tok=2)),
    "gpt2": ("GPT2Config", dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=None,
                                eos_token_id=None)),
    "gpt_neox": ("GPTNeoXConfig", dict(TINY, rotary_pct=0.5)),
    "stablelm": ("StableLmConfig", dict(TINY)),
    "starcoder2": ("Starcoder2Config", dict(TINY, sliding_window=8)),
    "olmo2": ("Olmo2Config", dict(TINY)),
    "granite": ("GraniteConfig", dict(TINY, embedding_multiplier=2.0, attention_multiplier=0.5)),
    "mamba": ("MambaConfig", dict(vocab_size=64, hidden_size=32, state_size=4, num_hidden_layers=2, bos_token_id=None,
                                  eos_token_id=None, pad_token_id=None)),
    "mamba2": ("Mamba2Config", dict(vocab_size=64, hidden_size=32, num_heads=4, head_dim=16, state_size=4, n_groups=2,
                                    num_hidden_layers=2, chunk_size=4, bos_token_id=None, eos_token_id=None,
                                    pad_token_id=None)),
    "granitemoehybrid": ("GraniteMoeHybridConfig", dict(TINY, layer_types=["mamba", "attention"], num_local_experts=4,
                                                        num_experts_per_tok=2, shared_intermediate_size=16,
                                                        mamba_n_heads=4, mamba_d_state=4, mamba_chunk_size=4)),
    "lfm2": ("Lfm2Config", dict(TINY, layer_types=["conv", "full_attention"], block_multiple_of=16)),
    "llama4_text": ("Llama4TextConfig", dict(TINY, head_dim=8, intermediate_size_mlp=64, num_local_experts=4,
                                             interleave_moe_layer_step=2, attention_chunk_size=4, floor_scale=4)),
    "gemma4_text": ("Gemma4TextConfig", dict(TINY, head_dim=8, global_head_dim=16, sliding_window=4,
                                             hidden_size_per_layer_input=8, vocab_size_per_layer_input=64,
                                             num_kv_shared_layers=1, enable_moe_block=True, num_experts=4,
                                             top_k_experts=2, moe_intermediate_size=16, num_hidden_layers=3,
                                             layer_types=["sliding_attention", "full_attention", "full_attention"])),
}
# Encoders (ember.load gives an Embedder): transformers model class, config class, config; the vocabulary
# is the tiny WordPiece tokenizer's (tests/tinyencoders.py), whose files are copied beside the weights.
ENC = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, max_position_embeddings=64)
ENCODERS = {
    "bert": ("BertModel", "BertConfig", dict(ENC, pad_token_id=0)),
    "distilbert": ("DistilBertModel", "DistilBertConfig", dict(dim=32, n_layers=2, n_heads=4, hidden_dim=48,
                                                                max_position_embeddings=64)),
    "mpnet": ("MPNetModel", "MPNetConfig", dict(ENC, max_position_embeddings=80)),
    "modernbert": ("ModernBertModel", "ModernBertConfig", dict(ENC, local_attention=8, pad_token_id=0,
                                                                bos_token_id=2, eos_token_id=3, cls_token_id=2,
                                                                sep_token_id=3)),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, dict, list[str]]]:
    """model_type → (folder with config.json + model.safetensors, the valid config dict, keys to mutate)."""
    import transformers
    from parity import save, tiny_hf_model

    import shutil

    import tinyencoders

    out = {}
    root = tmp_path_factory.mktemp("fuzz_cfg")
    bert = tinyencoders.tiny_bert(root / "_bert_tokenizer")
    vocab = json.loads((bert / "config.json").read_text())["vocab_size"]
    for mt, spec in (*FAMILIES.items(), *ENCODERS.items()):
        folder = root / mt
        if mt in ENCODERS:
            model_cls, cls, kw = spec
            save(tiny_hf_model(getattr(transformers, cls)(vocab_size=vocab, **kw), getattr(transformers, model_cls)),
                 folder)
            for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
                shutil.copyfile(bert / name, folder / name)
        else:
            cls, kw = spec
            save(tiny_hf_model(getattr(transformers, cls)(**kw)), folder)
        raw = json.loads((folder / "config.json").read_text())
        entry = registry.lookup(raw)
        cfg_cls, _ = entry.load()
        keys = sorted({f.name for f in dataclasses.fields(cfg_cls) if f.name != "raw"} | set(raw) | ROPE_KEYS)
        out[mt] = (folder, raw, keys)
    return out


# ---- hostile values ---------------------------------------------------------------------------------
ROPE_KEYS = {"rope_scaling", "rope_parameters", "rope_theta", "partial_rotary_factor", "rotary_pct",
             "original_max_position_embeddings", "layer_types", "sliding_window", "text_config", "model_type",
             "architectures"}
BIG_LIST = [0] * 100_000
NUMBERS = [-(10**12), -1, 0, 1, 2, 3, 7, 65, 10**6, 10**12, 2**31, 2**63, 10**30, 10**300, 0.0, 0.5, -0.5, 1.5,
           1e-300, 1e300, math.nan, math.inf, -math.inf]
scalars = st.one_of(st.sampled_from(NUMBERS), st.none(), st.booleans(), st.integers(-3, 70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
                    st.sampled_from(["silu", "gelu", "default", "linear", "dynamic", "yarn", "llama3", "longrope", "su",
                                     "sliding_attention", "full_attention", "llama", "zap"]))
ROPE_FIELDS = ["rope_type", "type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
               "beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "short_factor", "long_factor",
               "rope_theta", "partial_rotary_factor", "truncate"]
rope_types = st.sampled_from(["default", "linear", "dynamic", "yarn", "llama3", "longrope", "su", "mrope", "warp", 3])
factor_lists = st.one_of(st.lists(st.sampled_from([1.0, 0.0, -1.0, math.nan, math.inf, 1e300]), max_size=6),
                         st.just([1.0] * 4), st.just([2.0] * 16), st.lists(st.text(max_size=1), max_size=4))
rope_dicts = st.fixed_dictionaries(
    {}, optional={"rope_type": rope_types, "type": rope_types, "factor": scalars, "low_freq_factor": scalars,
                  "high_freq_factor": scalars, "original_max_position_embeddings": scalars, "beta_fast": scalars,
                  "beta_slow": scalars, "attention_factor": scalars, "mscale": scalars, "mscale_all_dim": scalars,
                  "short_factor": st.one_of(factor_lists, scalars), "long_factor": st.one_of(factor_lists, scalars),
                  "rope_theta": scalars, "partial_rotary_factor": scalars, "truncate": scalars})
values = st.one_of(
    scalars, scalars, scalars,
    rope_dicts,
    st.lists(scalars, max_size=4),
    st.lists(st.sampled_from(["sliding_attention", "full_attention", "x"]), min_size=0, max_size=4),
    st.just(BIG_LIST), st.just({}), st.just({"a": {"b": [1, {"c": None}]}}),
)
non_dicts = st.one_of(st.none(), st.integers(), st.text(max_size=4), st.lists(st.integers(), max_size=3))
gen_configs = st.one_of(st.none(), non_dicts, st.dictionaries(
    st.sampled_from(["eos_token_id", "bos_token_id", "temperature", "top_p", "top_k", "max_length", "do_sample"]),
    st.one_of(scalars, st.lists(scalars, max_size=3)), max_size=4))


@st.composite
def mutations(draw, keys: list[str]):
    """[(key, value or DELETE)], or ("whole", non-dict)."""
    if draw(st.integers(0, 29)) == 0:
        return "whole", draw(non_dicts)
    muts = []
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(keys))
        muts.append((key, "<delete>" if draw(st.integers(0, 7)) == 0 else draw(values)))
    return "keys", muts


def _apply(raw: dict, mutation) -> object:
    kind, what = mutation
    if kind == "whole":
        return what
    out = dict(raw)
    for key, value in what:
        if value == "<delete>":
            out.pop(key, None)
        else:
            out[key] = value
    return out


def _load_and_run(folder: Path) -> None:
    """The property's body: EmberError, or a model that generates (an encoder: that embeds)."""
    try:
        llm = ember.load(folder, dtype=torch.float32, device="cpu")
    except EmberError:
        return
    if not hasattr(llm, "request"):  # an Embedder
        try:
            vecs = llm.embed(["hello world", "the quick brown fox"])
        except EmberError:
            return
        assert vecs.shape[0] == 2 and vecs.dim() == 2
        return
    assert isinstance(llm.model.max_context, int) and llm.model.max_context > 0
    try:
        n = _tokens(llm)
    except EmberError:  # e.g. a context shorter than the prompt: refused as a GenerationError
        return
    assert n == 2


def _tokens(llm) -> int:
    """Greedy tokens generated for a 3-token prompt (max 2), through the reference Generator."""
    events = list(llm.events([llm.request([1, 2, 3], 2, ignore_eos=True)]))
    return sum(ev.token_id is not None for ev in events)


def _write_config(folder: Path, cfg: object, gen: object) -> None:
    (folder / "config.json").write_text(json.dumps(cfg, allow_nan=True))
    g = folder / "generation_config.json"
    if gen is None:
        g.unlink(missing_ok=True)
    else:
        g.write_text(json.dumps(gen, allow_nan=True))


@pytest.mark.parametrize("family", [*FAMILIES, *ENCODERS])
@fuzz_settings(15, deadline_ms=None)
@given(data=st.data())
def test_fuzz_config(checkpoints, family, data):
    folder, raw, keys = checkpoints[family]
    cfg = _apply(raw, data.draw(mutations(keys), label="mutation"))
    gen = data.draw(gen_configs, label="generation_config")
    _write_config(folder, cfg, gen)
    try:
        with time_limit(20), memory_cap(1 << 30):
            _load_and_run(folder)
    finally:
        _write_config(folder, raw, None)


def test_valid_tiny_checkpoints_load(checkpoints):
    """The fuzz starts from checkpoints that load and run."""
    for family, (folder, raw, _) in checkpoints.items():
        llm = ember.load(folder, dtype=torch.float32, device="cpu")
        if family in ENCODERS:
            assert llm.embed(["hello world"]).shape[0] == 1, family
        else:
            assert _tokens(llm) == 2, family


# ---- regressions ------------------------------------------------------------------------------------
def _load_with(checkpoints, family, **changes):
    folder, raw, _ = checkpoints[family]
    _write_config(folder, {**raw, **changes}, None)
    try:
        with time_limit(20), memory_cap(1 << 30):
            return ember.load(folder, dtype=torch.float32, device="cpu")
    finally:
        _write_config(folder, raw, None)


def test_huge_sizes_fail_on_the_shape_check_before_allocating(checkpoints):
    for key in ("hidden_size", "intermediate_size", "vocab_size"):
        with pytest.raises(EmberError, match="shape|multiple"):
            _load_with(checkpoints, "llama", **{key: 10**12})
    with pytest.raises(EmberError):
        _load_with(checkpoints, "llama", num_hidden_layers=10**12)


def test_regression_layer_count_allocated_per_layer_lists(checkpoints):
    """Bug: num_hidden_layers = 10**12 built a 10**12-entry list of layer windows before any weight
    was checked (MemoryError); 1e300 (read as an int) raised OverflowError."""
    for n in (10**12, 1e300, 2**40):
        with pytest.raises(ConfigError, match="layers is not a real model"):
            _load_with(checkpoints, "llama", num_hidden_layers=n)


L3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 32, "rope_theta": 10000.0}
LONG = {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4, "rope_theta": 10000.0}
ROPE_CRASHES = [
    # (family, config changes): each raised TypeError/ValueError/ZeroDivisionError/OverflowError/RuntimeError
    ("llama", {"original_max_position_embeddings": ""}),  # float('') in llama3 scaling
    ("llama", {"original_max_position_embeddings": 0}),  # old / low_freq_factor ... division by zero
    ("llama", {"original_max_position_embeddings": 1e300}),  # int too big to convert (torch)
    ("llama", {"rope_parameters": {**L3, "low_freq_factor": 0}}),  # division by zero
    ("llama", {"rope_parameters": {"rope_type": "linear", "factor": "2", "rope_theta": 10000.0}}),
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 1e308, "rope_theta": 10000.0}}),  # int(inf)
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": -10**6, "rope_theta": 10000.0}}),  # negative context
    ("phi3", {"original_max_position_embeddings": 1}),  # log(1) == 0 in the longrope scale
    ("phi3", {"rope_parameters": {**LONG, "short_factor": ["a"] * 4}}),  # torch.tensor of strings
    ("phi3", {"rope_parameters": {**LONG, "factor": -1.0}}),  # math domain error
    ("gemma3_text", {"rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                         "full_attention": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1}}}),
    ("gemma3_text", {"rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                         "full_attention": {"rope_type": "yarn", "factor": 2.0, "beta_fast": "x",
                                                            "rope_theta": 10000.0}}}),
    ("starcoder2", {"partial_rotary_factor": math.nan}),  # int(nan)
    ("starcoder2", {"partial_rotary_factor": 2}),  # rotates more dims than a head has: shape error in forward
    ("starcoder2", {"partial_rotary_factor": -10**12}),  # negative arange
]


@pytest.mark.parametrize("family,changes", ROPE_CRASHES, ids=[f"{i}-{f}-{'-'.join(c)}" for i, (f, c) in enumerate(ROPE_CRASHES)])
def test_regression_rope_parameters_crashed(checkpoints, family, changes):
    """Bugs found by test_fuzz_config: hostile rope numbers crashed inside the rotary tables (or at
    the first forward) instead of being ConfigErrors."""
    with pytest.raises(ConfigError):
        llm = _load_with(checkpoints, family, **changes)
        llm.model.max_context  # noqa: B018
        _tokens(llm)


@pytest.mark.parametrize("field,value", [("rms_norm_eps", math.nan), ("rope_theta", math.inf),
                                         ("rms_norm_eps", -math.inf)])
def test_non_finite_numbers_are_refused_by_name(field, value):
    """JSON's NaN/Infinity literals parse to floats; a NaN epsilon or rope base used to load and then
    produce NaN logits silently."""
    from ember.models.llama import Config as LlamaConfig

    cfg = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "vocab_size": 100, field: value}
    with pytest.raises(ConfigError, match=f"{field}.*finite"):
        LlamaConfig.from_dict(json.loads(json.dumps(cfg, allow_nan=True)))
