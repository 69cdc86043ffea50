"""GLM-4 (q/k/v bias, partial rotary over adjacent pairs, fused gate_up_proj, norms after attention
and MLP) against transformers on tiny random checkpoints."""
import pytest

from parity import check_parity, save, tiny_hf_model

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            head_dim=16, max_position_embeddings=128, bos_token_id=None, eos_token_id=None, pad_token_id=None)

SHAPES = {
    "gqa_half_rotary": dict(num_key_value_heads=2),
    "mha_tied_no_bias_full_rotary_linear": dict(num_key_value_heads=4, attention_bias=False, tie_word_embeddings=True,
                                                partial_rotary_factor=1.0, head_dim=32,
                                                rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_glm4_matches_transformers(tmp_path, shape):
    from transformers import Glm4Config

    cfg = Glm4Config(**{**BASE, **SHAPES[shape]})
    hf = tiny_hf_model(cfg)
    llm = check_parity(hf, save(hf, tmp_path), cfg.vocab_size)
    attn = llm.model.model.layers[0].self_attn
    assert attn.interleaved and llm.model.model.rotary.rotary_dim == int(cfg.head_dim * cfg.rope_parameters["partial_rotary_factor"])


def test_glm4_config_defaults():
    from ember.registry import lookup

    raw = {"model_type": "glm4", **BASE}
    cfg = lookup(raw).parse_config(raw)
    assert cfg.qkv_bias and not cfg.attention_bias and cfg.raw["partial_rotary_factor"] == 0.5
