"""Seed-OSS (Llama with q/k/v bias, an optional o_proj bias, explicit head_dim) against transformers
on tiny random checkpoints."""
import pytest

from parity import check_parity, save, tiny_hf_model

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            head_dim=32, max_position_embeddings=128, bos_token_id=None, eos_token_id=None, pad_token_id=None)

SHAPES = {
    "gqa_qkv_bias": dict(num_key_value_heads=2),
    "mqa_all_biases_tied": dict(num_key_value_heads=1, attention_out_bias=True, mlp_bias=True, tie_word_embeddings=True),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_seed_oss_matches_transformers(tmp_path, shape):
    from transformers import SeedOssConfig

    cfg = SeedOssConfig(**{**BASE, **SHAPES[shape]})
    hf = tiny_hf_model(cfg)
    llm = check_parity(hf, save(hf, tmp_path), cfg.vocab_size)
    attn = llm.model.model.layers[0].self_attn
    assert (attn.o_proj.bias is not None) == cfg.attention_out_bias


def test_seed_oss_o_bias_alone_is_refused():
    from ember.errors import ConfigError
    from ember.registry import lookup

    raw = {"model_type": "seed_oss", **BASE, "attention_bias": False, "attention_out_bias": True}
    with pytest.raises(ConfigError, match="attention_out_bias"):
        lookup(raw).parse_config(raw)
