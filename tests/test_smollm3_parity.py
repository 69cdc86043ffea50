"""SmolLM3 (Llama with NoPE layers, optional sliding windows on them) against transformers on tiny
random checkpoints."""
import pytest

from parity import check_parity, save, tiny_hf_model

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            max_position_embeddings=128, bos_token_id=None, eos_token_id=None, pad_token_id=None)

SHAPES = {
    "gqa_tied_interval4": dict(num_key_value_heads=2),
    "mqa_untied_bias_listed_nope_window": dict(num_key_value_heads=1, tie_word_embeddings=False, attention_bias=True,
                                               no_rope_layers=[0, 1, 0, 1], use_sliding_window=True, sliding_window=6),
    "yarn_interval2": dict(num_key_value_heads=4, no_rope_layer_interval=2, num_hidden_layers=2,
                           rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0,
                                            "original_max_position_embeddings": 64}),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_smollm3_matches_transformers(tmp_path, shape):
    from transformers import SmolLM3Config

    cfg = SmolLM3Config(**{**BASE, **SHAPES[shape]})
    hf = tiny_hf_model(cfg)
    llm = check_parity(hf, save(hf, tmp_path), cfg.vocab_size)
    layers = llm.model.model.layers
    assert [int(layer.self_attn.rotary) for layer in layers] == list(cfg.no_rope_layers)
    assert [layer.self_attn.window for layer in layers] == [
        cfg.sliding_window if cfg.use_sliding_window and t == "sliding_attention" else None for t in cfg.layer_types]


@pytest.mark.parametrize("bad, match", [(dict(no_rope_layers=[1, 0]), "no_rope_layers"),
                                        (dict(no_rope_layer_interval=0), "no_rope_layer_interval")])
def test_smollm3_config_rejects_impossible_values(bad, match):
    from ember.errors import ConfigError
    from ember.registry import lookup

    raw = {"model_type": "smollm3", **BASE, **bad}
    with pytest.raises(ConfigError, match=match):
        lookup(raw).parse_config(raw)
