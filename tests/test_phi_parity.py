"""Phi (Phi-2) against transformers on tiny random checkpoints: partial rotary, parallel
attention/MLP off one LayerNorm, biases, `dense`, final LayerNorm, lm_head bias (kept when tied),
optional q/k LayerNorm, GQA."""
import pytest

from parity import check_parity, save, tiny_hf_model

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, bos_token_id=None, eos_token_id=None, pad_token_id=None)

SHAPES = {
    # 0.4 of head_dim 16 → 6 rotated dims (Phi-2's factor), MHA, own lm_head
    "partial04_mha_untied": dict(partial_rotary_factor=0.4),
    # the default factor 0.5, q/k LayerNorm, GQA, head tied to the embeddings with its own bias
    "partial05_qk_layernorm_gqa_tied": dict(num_key_value_heads=2, qk_layernorm=True, tie_word_embeddings=True),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_phi_matches_transformers(tmp_path, shape):
    from transformers import PhiConfig

    cfg = PhiConfig(**{**BASE, **SHAPES[shape]})
    hf = tiny_hf_model(cfg)
    llm = check_parity(hf, save(hf, tmp_path), cfg.vocab_size)
    head = llm.model.lm_head
    assert head.bias is not None
    assert (head.weight is llm.model.model.embed_tokens.weight) == cfg.tie_word_embeddings
    assert llm.model.model.rotary.rotary_dim == int(16 * SHAPES[shape].get("partial_rotary_factor", 0.5))


def test_phi_legacy_partial_rotary_key(tmp_path):
    """Phi-2's config.json carries partial_rotary_factor at the top level (no rope_parameters)."""
    import json

    import ember

    from transformers import PhiConfig

    cfg = PhiConfig(**{**BASE, "partial_rotary_factor": 0.4})
    hf = tiny_hf_model(cfg)
    save(hf, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.pop("rope_parameters")
    raw.update(partial_rotary_factor=0.4, rope_theta=10000.0, rope_scaling=None)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert ember.load(str(tmp_path)).model.model.rotary.rotary_dim == 6


@pytest.mark.parametrize("bad, match", [
    (dict(partial_rotary_factor=0), "partial_rotary_factor"), (dict(partial_rotary_factor=1.5), "partial_rotary_factor"),
    (dict(num_key_value_heads=3), "multiple"), (dict(layer_norm_eps=-1e-5), "layer_norm_eps"),
    (dict(hidden_act="nope"), "activation")])
def test_phi_config_rejects_impossible_values(bad, match):
    from ember.errors import ConfigError
    from ember.registry import lookup

    raw = {"model_type": "phi", **BASE, **bad}
    with pytest.raises(ConfigError, match=match):
        lookup(raw).parse_config(raw)
