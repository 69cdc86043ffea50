"""GraniteMoE (Granite's multipliers, top-k-logits-then-softmax MoE with fused expert tensors)
against transformers on tiny random checkpoints, in the Hub layout and transformers 5's."""
import pytest

from parity import check_parity, save, save_state_dict, tiny_hf_model

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, bos_token_id=None, eos_token_id=None, pad_token_id=None)

# attention_multiplier as released checkpoints set it (transformers' default, 1.0, makes the softmax so
# sharp that float32 rounding differences between SDPA kernels reach 1e-4 in the logits)
SHAPES = {
    "gqa_4experts_top2_multipliers": dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                          embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2,
                                          logits_scaling=2.0),
    "mqa_6experts_top3_tied": dict(num_key_value_heads=1, num_local_experts=6, num_experts_per_tok=3, attention_multiplier=0.25,
                                   tie_word_embeddings=True),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_granitemoe_matches_transformers(tmp_path, shape):
    from transformers import GraniteMoeConfig

    cfg = GraniteMoeConfig(**{**BASE, **SHAPES[shape]})
    hf = tiny_hf_model(cfg)
    check_parity(hf, save(hf, tmp_path / "hub"), cfg.vocab_size)
    assert any(k.endswith("experts.gate_up_proj") for k in hf.state_dict())
    check_parity(hf, save_state_dict(hf, tmp_path / "mem"), cfg.vocab_size)


def test_granitemoeshared_matches_transformers(tmp_path):
    from transformers import GraniteMoeSharedConfig

    cfg = GraniteMoeSharedConfig(**{**BASE, **SHAPES["gqa_4experts_top2_multipliers"], "shared_intermediate_size": 48})
    hf = tiny_hf_model(cfg)
    llm = check_parity(hf, save(hf, tmp_path), cfg.vocab_size)
    assert type(llm.model.model.layers[0].mlp).__name__ == "SharedExpertMoE"
