"""Granite against transformers on tiny random checkpoints: Llama with embedding_multiplier,
residual_multiplier, attention_multiplier (the attention scale) and logits_scaling."""
import pytest
import torch

from parity import check_parity, save, tiny_hf_model

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, bos_token_id=None, eos_token_id=None, pad_token_id=None)
MULTIPLIERS = dict(embedding_multiplier=6.0, residual_multiplier=0.3, attention_multiplier=0.5, logits_scaling=4.0)

SHAPES = {
    "gqa_untied": dict(num_key_value_heads=2, **MULTIPLIERS),
    # an embedding multiplier below 1 and a residual one above: with a tied head, Granite's usual
    # large embeddings and damped blocks make a random model predict its input token again and again
    "mqa_tied_bias": dict(num_key_value_heads=1, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                          embedding_multiplier=0.5, residual_multiplier=1.5, attention_multiplier=0.0625,
                          logits_scaling=0.5),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_granite_matches_transformers(tmp_path, shape):
    from transformers import GraniteConfig

    cfg = GraniteConfig(**{**BASE, **SHAPES[shape]})
    hf = tiny_hf_model(cfg)
    llm = check_parity(hf, save(hf, tmp_path), cfg.vocab_size)
    assert llm.model.logits_scaling == cfg.logits_scaling
    assert llm.model.model.layers[0].self_attn.scale == cfg.attention_multiplier


def test_granite_attention_multiplier_defaults_to_one():
    """Granite's default attention scale is 1.0 (not head_dim ** -0.5 as in Llama)."""
    from ember.registry import lookup

    raw = {"model_type": "granite", **BASE}
    assert lookup(raw).parse_config(raw).attention_multiplier == 1.0
    raw = {"model_type": "llama", **BASE}
    assert lookup(raw).parse_config(raw).attention_multiplier is None


def test_granite_rejects_nonpositive_multipliers():
    from ember.errors import ConfigError
    from ember.registry import lookup

    raw = {"model_type": "granite", **BASE, "logits_scaling": 0}
    with pytest.raises(ConfigError, match="logits_scaling"):
        lookup(raw).parse_config(raw)
