"""ERNIE 4.5 dense (Llama with use_bias everywhere and rotary over adjacent pairs) against
transformers on tiny random checkpoints."""
import pytest

from parity import check_parity, save, tiny_hf_model

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            head_dim=16, max_position_embeddings=128, bos_token_id=None, eos_token_id=None, pad_token_id=None)

SHAPES = {
    "gqa_tied": dict(num_key_value_heads=2),
    "mha_biases_untied": dict(num_key_value_heads=4, use_bias=True, tie_word_embeddings=False, head_dim=32),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_ernie4_5_matches_transformers(tmp_path, shape):
    from transformers import Ernie4_5Config

    cfg = Ernie4_5Config(**{**BASE, **SHAPES[shape]})
    hf = tiny_hf_model(cfg)
    llm = check_parity(hf, save(hf, tmp_path), cfg.vocab_size)
    assert llm.model.model.layers[0].self_attn.interleaved
