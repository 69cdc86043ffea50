"""GLM-4.5 MoE (q/k/v bias, optional per-head q/k norm, partial rotary, DeepSeek-V3 routing with
shared experts) against transformers on tiny random checkpoints."""
import pytest

from parity import check_parity, save, tiny_hf_model
from test_deepseek_parity import _perturb_router_bias_

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, head_dim=16, max_position_embeddings=128, bos_token_id=None, eos_token_id=None,
            pad_token_id=None)

SHAPES = {
    "gqa_qk_norm_8experts_4groups": dict(num_key_value_heads=2, use_qk_norm=True, n_routed_experts=8, n_group=4,
                                         topk_group=2, num_experts_per_tok=3, routed_scaling_factor=2.5),
    "mqa_ungrouped_2shared_no_bias_tied": dict(num_key_value_heads=1, attention_bias=False, n_routed_experts=6,
                                               num_experts_per_tok=2, n_shared_experts=2, first_k_dense_replace=0,
                                               tie_word_embeddings=True, norm_topk_prob=False),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_glm4_moe_matches_transformers(tmp_path, shape):
    from transformers import Glm4MoeConfig

    cfg = Glm4MoeConfig(**{**BASE, **SHAPES[shape]})
    hf = _perturb_router_bias_(tiny_hf_model(cfg))
    llm = check_parity(hf, save(hf, tmp_path), cfg.vocab_size)
    assert llm.model.model.rotary.rotary_dim == 8
