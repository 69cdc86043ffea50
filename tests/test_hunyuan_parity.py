"""Hunyuan dense V1 (Llama with per-head q/k RMSNorm after the rotation) against transformers on
tiny random checkpoints."""
import pytest

from parity import check_parity, save, tiny_hf_model

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, bos_token_id=None, eos_token_id=None, pad_token_id=None, eod_token_id=None)

SHAPES = {
    "gqa_untied": dict(num_key_value_heads=2, head_dim=16),
    "mqa_bias_tied_head_dim_dynamic": dict(num_key_value_heads=1, attention_bias=True, tie_word_embeddings=True,
                                           head_dim=32, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                         "rope_theta": 1e4}),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_hunyuan_v1_dense_matches_transformers(tmp_path, shape):
    from transformers import HunYuanDenseV1Config

    cfg = HunYuanDenseV1Config(**{**BASE, **SHAPES[shape]})
    hf = tiny_hf_model(cfg)
    dynamic = (cfg.rope_parameters or {}).get("rope_type") == "dynamic"
    llm = check_parity(hf, save(hf, tmp_path), cfg.vocab_size, padding_invariant=not dynamic)
    assert type(llm.model.model.layers[0].self_attn).__module__ == "ember.models.hunyuan"
