"""Qwen2-MoE (Qwen2 attention with q/k/v bias, softmax top-k experts, a shared expert behind a
sigmoid gate) against transformers on tiny random checkpoints: the per-expert Hub layout and the
fused in-memory one, dense layers, sliding layers."""
import pytest

from parity import check_parity, save, save_state_dict, tiny_hf_model

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
            shared_expert_intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, bos_token_id=None, eos_token_id=None, pad_token_id=None)

SHAPES = {
    "4experts_top2_unnormalised": dict(num_experts=4, num_experts_per_tok=2),
    "6experts_top3_normalised_tied_sparse_step2": dict(num_experts=6, num_experts_per_tok=3, norm_topk_prob=True,
                                                       tie_word_embeddings=True, decoder_sparse_step=2),
    "mlp_only_layer1_window": dict(num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1], use_sliding_window=True,
                                   sliding_window=6, max_window_layers=2),
}


def _cfg(**kw):
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(**{**BASE, **kw})


@pytest.mark.parametrize("shape", list(SHAPES))
def test_qwen2_moe_matches_transformers(tmp_path, shape):
    cfg = _cfg(**SHAPES[shape])
    hf = tiny_hf_model(cfg)
    llm = check_parity(hf, save(hf, tmp_path), cfg.vocab_size)
    kinds = [type(layer.mlp).__name__ for layer in llm.model.model.layers]
    ref = [type(layer.mlp).__name__ for layer in hf.model.layers]
    assert [k == "SharedExpertMoE" for k in kinds] == [r.endswith("SparseMoeBlock") for r in ref]
    assert llm.model.cache_windows() == [cfg.sliding_window if t == "sliding_attention" and cfg.use_sliding_window
                                         else None for t in cfg.layer_types]


def test_qwen2_moe_fused_layout_matches_transformers(tmp_path):
    cfg = _cfg(**SHAPES["4experts_top2_unnormalised"])
    hf = tiny_hf_model(cfg)
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in hf.state_dict())
    check_parity(hf, save_state_dict(hf, tmp_path), cfg.vocab_size)


def test_qwen2_moe_config_defaults_and_errors():
    from ember import registry
    from ember.errors import ConfigError

    entry = registry.lookup({"architectures": ["Qwen2MoeForCausalLM"]})
    cfg = entry.parse_config({"model_type": "qwen2_moe", "num_hidden_layers": 4, "use_sliding_window": True,
                              "sliding_window": 8, "max_window_layers": 3})
    assert cfg.qkv_bias and cfg.num_local_experts == 60 and cfg.layer_windows() == [8, None, 8, None]
    assert entry.parse_config({"model_type": "qwen2_moe", "sliding_window": 8}).layer_windows()[0] is None
    for bad in (dict(shared_expert_intermediate_size=0), dict(num_experts=4, num_experts_per_tok=5)):
        with pytest.raises(ConfigError):
            entry.parse_config({"model_type": "qwen2_moe", **bad})
