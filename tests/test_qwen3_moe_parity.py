"""Qwen3-MoE (Mixtral with flags: q/k RMSNorm, norm_topk_prob, dense layers) against transformers
on tiny random checkpoints, in the per-expert Hub layout (`mlp.experts.N.gate_proj`, written by
save_pretrained) and the fused in-memory one (`mlp.experts.gate_up_proj`)."""
import json

import pytest

from parity import check_parity, save, save_state_dict, tiny_hf_model

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
            bos_token_id=None, eos_token_id=None, pad_token_id=None)

SHAPES = {
    "4experts_top2_unnormalised": dict(num_experts=4, num_experts_per_tok=2, norm_topk_prob=False),
    "6experts_top3_normalised_tied": dict(num_experts=6, num_experts_per_tok=3, norm_topk_prob=True,
                                          tie_word_embeddings=True),
    # layer 0 dense through decoder_sparse_step, then through mlp_only_layers
    "sparse_step2": dict(num_experts=4, num_experts_per_tok=2, decoder_sparse_step=2, norm_topk_prob=True),
    "mlp_only_layer1_window": dict(num_experts=6, num_experts_per_tok=3, mlp_only_layers=[1],
                                   use_sliding_window=True, sliding_window=6),
}


def _cfg(**kw):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**{**BASE, **kw})


@pytest.mark.parametrize("shape", list(SHAPES))
def test_qwen3_moe_hub_layout_matches_transformers(tmp_path, shape):
    cfg = _cfg(**SHAPES[shape])
    hf = tiny_hf_model(cfg)
    folder = save(hf, tmp_path)
    # the Hub's config.json (transformers 4) names the expert count num_experts
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["num_experts"] = raw.pop("num_local_experts")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    llm = check_parity(hf, folder, cfg.vocab_size)
    kinds = [type(layer.mlp).__name__ for layer in llm.model.model.layers]
    ref = [type(layer.mlp).__name__ for layer in hf.model.layers]
    assert [k == "SparseMoE" for k in kinds] == [r.endswith("SparseMoeBlock") for r in ref]


@pytest.mark.parametrize("shape", ["4experts_top2_unnormalised", "mlp_only_layer1_window"])
def test_qwen3_moe_fused_layout_matches_transformers(tmp_path, shape):
    cfg = _cfg(**SHAPES[shape])
    hf = tiny_hf_model(cfg)
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in hf.state_dict())
    check_parity(hf, save_state_dict(hf, tmp_path), cfg.vocab_size)


def test_qwen3_moe_config_names_and_defaults():
    from ember import registry
    from ember.errors import ConfigError

    entry = registry.lookup({"model_type": "qwen3_moe"})
    cfg = entry.parse_config({"model_type": "qwen3_moe", "num_experts": 6, "num_experts_per_tok": 2, "max_window_layers": 1,
                              "use_sliding_window": True, "sliding_window": 8, "num_hidden_layers": 3})
    assert cfg.num_local_experts == 6 and cfg.qk_norm and not cfg.norm_topk_prob
    assert cfg.layer_windows() == [8, 8, 8]  # Qwen3-MoE slides every layer, whatever max_window_layers says
    assert entry.parse_config({"model_type": "qwen3_moe", "sliding_window": 8}).layer_windows()[0] is None
    for bad in (dict(num_experts=4, num_experts_per_tok=5), dict(decoder_sparse_step=0),
                dict(mlp_only_layers=["a"])):
        with pytest.raises(ConfigError):
            entry.parse_config({"model_type": "qwen3_moe", **bad})
