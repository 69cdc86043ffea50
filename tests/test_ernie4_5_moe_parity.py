"""ERNIE 4.5 MoE (pairwise rotary, softmax routing with score-correction bias, shared experts, MoE
layer range) against transformers on tiny random checkpoints."""
import pytest
import torch

from parity import check_parity, save, tiny_hf_model

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, head_dim=16, max_position_embeddings=128, bos_token_id=None, eos_token_id=None,
            pad_token_id=None)

SHAPES = {
    "gqa_8experts_top3_shared2_dense_first": dict(num_key_value_heads=2, moe_num_experts=8, moe_k=3),
    "mha_biases_untied_4experts_no_shared_all_moe": dict(num_key_value_heads=4, moe_num_experts=4, moe_k=2,
                                                        moe_num_shared_experts=0, moe_layer_start_index=0,
                                                        use_bias=True, tie_word_embeddings=False),
}


def _perturb_statics_(hf):
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("e_score_correction_bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return hf


@pytest.mark.parametrize("shape", list(SHAPES))
def test_ernie4_5_moe_matches_transformers(tmp_path, shape):
    from transformers import Ernie4_5_MoeConfig

    cfg = Ernie4_5_MoeConfig(**{**BASE, **SHAPES[shape]})
    hf = _perturb_statics_(tiny_hf_model(cfg))
    llm = check_parity(hf, save(hf, tmp_path), cfg.vocab_size)
    kinds = [type(layer.mlp).__name__ for layer in llm.model.model.layers]
    assert kinds[-1] in ("SharedExpertMoE", "GroupLimitedMoE") and (kinds[0] == "MLP") == (cfg.moe_layer_start_index > 0)
