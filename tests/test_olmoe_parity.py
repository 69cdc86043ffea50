"""OLMoE (full-projection q/k norm, optional q/k/v clipping, softmax top-k MoE in every layer)
against transformers on tiny random checkpoints."""
import pytest

from parity import check_parity, save, tiny_hf_model

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, bos_token_id=None, eos_token_id=None, pad_token_id=None)

SHAPES = {
    "gqa_8experts_top2": dict(num_key_value_heads=2, num_experts=8, num_experts_per_tok=2),
    "mha_clip_normalised_tied_bias": dict(num_key_value_heads=4, num_experts=4, num_experts_per_tok=3, clip_qkv=1.5,
                                          norm_topk_prob=True, tie_word_embeddings=True, attention_bias=True),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_olmoe_matches_transformers(tmp_path, shape):
    from transformers import OlmoeConfig

    cfg = OlmoeConfig(**{**BASE, **SHAPES[shape]})
    hf = tiny_hf_model(cfg)
    llm = check_parity(hf, save(hf, tmp_path), cfg.vocab_size)
    assert llm.model.model.layers[0].self_attn.clip == cfg.clip_qkv
