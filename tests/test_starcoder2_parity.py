"""StarCoder2 against transformers on tiny random checkpoints: LayerNorm with bias, c_fc/c_proj
MLP, use_bias on and off, GQA, sliding windows shorter than the 24-token sequence, tied and untied
heads."""
import pytest

from parity import check_parity, save, tiny_hf_model

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, bos_token_id=None, eos_token_id=None, pad_token_id=None)

SHAPES = {
    "gqa_bias_window5_tied": dict(num_key_value_heads=2, sliding_window=5),
    "mqa_no_bias_window9_untied": dict(num_key_value_heads=1, use_bias=False, sliding_window=9,
                                       tie_word_embeddings=False),
    "mha_full_attention": dict(num_key_value_heads=4),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_starcoder2_matches_transformers(tmp_path, shape):
    from transformers import Starcoder2Config

    cfg = Starcoder2Config(**{**BASE, **SHAPES[shape]})
    hf = tiny_hf_model(cfg)
    check_parity(hf, save(hf, tmp_path), cfg.vocab_size)


@pytest.mark.parametrize("bad", [dict(num_attention_heads=4, num_key_value_heads=3), dict(sliding_window=0),
                                 dict(norm_epsilon=-1.0), dict(use_bias="yes")])
def test_starcoder2_config_rejects_impossible_values(bad):
    from ember import registry
    from ember.errors import ConfigError

    with pytest.raises(ConfigError):
        registry.lookup({"model_type": "starcoder2"}).parse_config({"model_type": "starcoder2", **bad})
