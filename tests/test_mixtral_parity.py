"""Mixtral (sparse MoE, always-renormalised top-k) against transformers on tiny random checkpoints,
in both expert layouts: the per-expert Hub layout save_pretrained writes
(`block_sparse_moe.experts.N.w1/w2/w3`) and the fused in-memory one (`mlp.experts.gate_up_proj`)."""
import pytest

from ember.io.safetensors import read_header

from parity import check_parity, save, save_state_dict, tiny_hf_model

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, bos_token_id=None, eos_token_id=None,
            pad_token_id=None)

SHAPES = {
    "4experts_top2": dict(num_local_experts=4, num_experts_per_tok=2),
    # tied head, a sliding window shorter than the 24-token sequence, explicit head_dim
    "6experts_top3_tied_window": dict(num_local_experts=6, num_experts_per_tok=3, tie_word_embeddings=True,
                                      sliding_window=7, head_dim=24),
}


def _cfg(**kw):
    from transformers import MixtralConfig

    return MixtralConfig(**{**BASE, **kw})


@pytest.mark.parametrize("shape", list(SHAPES))
def test_mixtral_hub_layout_matches_transformers(tmp_path, shape):
    cfg = _cfg(**SHAPES[shape])
    hf = tiny_hf_model(cfg)
    folder = save(hf, tmp_path)
    keys, _ = read_header(tmp_path / "model.safetensors")
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in keys
    llm = check_parity(hf, folder, cfg.vocab_size)
    moe = llm.model.model.layers[0].mlp
    assert moe.gate_up.shape == (cfg.num_local_experts, 2 * cfg.intermediate_size, cfg.hidden_size)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_mixtral_fused_layout_matches_transformers(tmp_path, shape):
    cfg = _cfg(**SHAPES[shape])
    hf = tiny_hf_model(cfg)
    assert "model.layers.0.mlp.experts.gate_up_proj" in hf.state_dict()
    check_parity(hf, save_state_dict(hf, tmp_path), cfg.vocab_size)


@pytest.mark.parametrize("bad", [dict(num_local_experts=2, num_experts_per_tok=3), dict(num_experts_per_tok=0),
                                 dict(num_attention_heads=4, num_key_value_heads=3)])
def test_mixtral_config_rejects_impossible_values(bad):
    from ember import registry
    from ember.errors import ConfigError

    with pytest.raises(ConfigError):
        registry.lookup({"model_type": "mixtral"}).parse_config({"model_type": "mixtral", **bad})
