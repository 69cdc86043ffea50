"""MiniMax-M2 (full-projection q/k norm, partial rotary, sigmoid routing with score-correction bias)
against transformers on tiny random checkpoints, in the Hub layout and transformers 5's."""
import json

import pytest

from parity import check_parity, save, save_state_dict, tiny_hf_model
from test_deepseek_parity import _perturb_router_bias_

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            head_dim=16, max_position_embeddings=128, bos_token_id=None, eos_token_id=None, pad_token_id=None)

SHAPES = {
    "gqa_8experts_top3_half_rotary": dict(num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=3,
                                          partial_rotary_factor=0.5),
    "mqa_4experts_top2_tied": dict(num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                                   tie_word_embeddings=True),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_minimax_m2_matches_transformers(tmp_path, shape):
    from transformers import MiniMaxM2Config

    cfg = MiniMaxM2Config(**{**BASE, **SHAPES[shape]})
    hf = _perturb_router_bias_(tiny_hf_model(cfg))
    check_parity(hf, save(hf, tmp_path / "hub"), cfg.vocab_size)
    check_parity(hf, save_state_dict(hf, tmp_path / "mem"), cfg.vocab_size)


def test_minimax_m2_rotary_dim_is_partial_rotary(tmp_path):
    from ember.registry import lookup

    raw = {"model_type": "minimax_m2", **BASE, "num_key_value_heads": 2, "rotary_dim": 8}
    cfg = lookup(raw).parse_config(raw)
    assert cfg.raw["partial_rotary_factor"] == 0.5
    assert json.dumps(cfg.raw)
