"""Phi-3 against transformers on tiny random checkpoints: q/k/v and gate/up stored fused, partial
rotary, longrope (short and long factors), sliding window, tied and untied heads."""
import pytest

from parity import check_parity, save, tiny_hf_model

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def _longrope(orig: int, n: int) -> dict:
    return {"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(n)],
            "long_factor": [2.0 + 0.3 * i for i in range(n)], "original_max_position_embeddings": orig}


SHAPES = {
    # half the head dims rotated, GQA, every layer sliding with a window of 6, own lm_head
    "partial05_gqa_window6": dict(num_key_value_heads=2, partial_rotary_factor=0.5, sliding_window=6),
    # longrope with every sequence past original_max_position_embeddings (long factors, attention
    # factor from 128 / 4), partial rotary, MQA, tied head
    "longrope_long_partial05_mqa_tied": dict(num_key_value_heads=1, partial_rotary_factor=0.5,
                                             original_max_position_embeddings=4, rope_scaling=_longrope(4, 4),
                                             tie_word_embeddings=True),
    # longrope within original_max_position_embeddings (short factors, attention factor from 128 / 64),
    # written as the legacy "su" type
    "su_short_full_rotary": dict(num_key_value_heads=2, original_max_position_embeddings=64,
                                 rope_scaling={**_longrope(64, 8), "rope_type": "su"}),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_phi3_matches_transformers(tmp_path, shape):
    from transformers import Phi3Config

    cfg = Phi3Config(**{**BASE, **SHAPES[shape]})
    hf = tiny_hf_model(cfg)
    # Long factors apply once a sequence is longer than original_max_position_embeddings. A generation
    # that crosses that length mid-way differs by design: transformers' Phi-3 then drops its cache and
    # recomputes every key with the long factors, ember keeps the keys already cached (as transformers'
    # Llama does). So the long-factor prompts start past it, and the short-factor runs never reach it.
    prompts = ((5, 6, 7, 8, 9, 10, 11), (12, 13, 14, 15, 16)) if "long" in shape else ((5, 6, 7, 8, 9, 10, 11), (12, 13, 14))
    llm = check_parity(hf, save(hf, tmp_path), cfg.vocab_size, prompts=prompts)
    attn = llm.model.model.layers[0].self_attn
    assert attn.qkv.fused is not None and llm.model.model.layers[0].mlp.gate_up.fused is not None
    assert llm.model.model.rotary.rotary_dim == int(16 * SHAPES[shape].get("partial_rotary_factor", 1.0))
    assert attn.window == cfg.sliding_window


def test_phi3_rejects_other_rope_types():
    from ember.errors import ConfigError
    from ember.registry import lookup

    raw = {"model_type": "phi3", **BASE, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    with pytest.raises(ConfigError, match="phi3 supports"):
        lookup(raw).parse_config(raw)


@pytest.mark.parametrize("bad, match", [
    (dict(partial_rotary_factor=2.0), "partial_rotary_factor"), (dict(num_key_value_heads=3), "multiple")])
def test_phi3_config_rejects_impossible_values(bad, match):
    from ember.errors import ConfigError
    from ember.registry import lookup

    raw = {"model_type": "phi3", **BASE, **bad}
    with pytest.raises(ConfigError, match=match):
        lookup(raw).parse_config(raw)
