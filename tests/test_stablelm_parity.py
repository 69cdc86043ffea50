"""StableLM against transformers on tiny random checkpoints: partial rotary (0.25, 0.5), LayerNorm,
q/k/v bias, per-head q/k LayerNorm, parallel residual on and off, tied and untied heads."""
import pytest

from parity import check_parity, save, tiny_hf_model

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, bos_token_id=None, eos_token_id=None, pad_token_id=None)

SHAPES = {
    "rotary_0.25_qkv_bias": dict(num_key_value_heads=2, partial_rotary_factor=0.25, use_qkv_bias=True),
    "rotary_0.5_qk_layernorm_parallel": dict(num_key_value_heads=2, partial_rotary_factor=0.5, qk_layernorm=True,
                                             use_parallel_residual=True),
    "full_rotary_mha_tied": dict(num_key_value_heads=4, partial_rotary_factor=1.0, tie_word_embeddings=True,
                                 qk_layernorm=True),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_stablelm_matches_transformers(tmp_path, shape):
    from transformers import StableLmConfig

    cfg = StableLmConfig(**{**BASE, **SHAPES[shape]})
    hf = tiny_hf_model(cfg)
    check_parity(hf, save(hf, tmp_path), cfg.vocab_size)


@pytest.mark.parametrize("bad", [dict(hidden_size=64, num_attention_heads=6),
                                 dict(num_attention_heads=4, num_key_value_heads=3),
                                 dict(hidden_size=64, num_attention_heads=4, partial_rotary_factor=1.5),
                                 dict(hidden_size=64, num_attention_heads=4, partial_rotary_factor=0.2)])
def test_stablelm_config_rejects_impossible_values(bad):
    from ember import registry
    from ember.errors import ConfigError

    with pytest.raises(ConfigError):
        registry.lookup({"model_type": "stablelm"}).parse_config({"model_type": "stablelm", **bad})
