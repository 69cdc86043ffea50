"""OLMo 3 (OLMo 2's layers, sliding/full layer types, a rotary table per layer type) against
transformers on tiny random checkpoints."""
import pytest

from parity import check_parity, save, tiny_hf_model

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            max_position_embeddings=128, bos_token_id=None, eos_token_id=None, pad_token_id=None, sliding_window=6)

SHAPES = {
    "gqa_untied_default_types": dict(num_key_value_heads=2),
    "mqa_tied_bias_yarn_full_layers": dict(
        num_key_value_heads=1, attention_bias=True, tie_word_embeddings=True, num_hidden_layers=2,
        layer_types=["full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0,
                                            "original_max_position_embeddings": 64},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}}),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_olmo3_matches_transformers(tmp_path, shape):
    from transformers import Olmo3Config

    cfg = Olmo3Config(**{**BASE, **SHAPES[shape]})
    hf = tiny_hf_model(cfg)
    llm = check_parity(hf, save(hf, tmp_path), cfg.vocab_size)
    assert llm.model.cache_windows() == [6 if t == "sliding_attention" else None for t in cfg.layer_types]


def test_olmo3_old_style_rope_scales_the_full_layers_only():
    from ember.registry import lookup

    raw = {"model_type": "olmo3", **BASE, "rope_theta": 1000.0, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    ropes = lookup(raw).parse_config(raw).rope_configs()
    assert ropes["full_attention"]["rope_parameters"] == {"rope_theta": 1000.0, "rope_type": "linear", "factor": 2.0}
    assert ropes["sliding_attention"]["rope_parameters"] == {"rope_theta": 1000.0}


@pytest.mark.parametrize("bad, match", [(dict(layer_types=["full_attention"] * 3 + ["chunked"]), "layer_types"),
                                        (dict(layer_types=["full_attention"]), "layer_types"),
                                        (dict(sliding_window=0), "sliding_window")])
def test_olmo3_config_rejects_impossible_values(bad, match):
    from ember.errors import ConfigError
    from ember.registry import lookup

    raw = {"model_type": "olmo3", **BASE, **bad}
    with pytest.raises(ConfigError, match=match):
        lookup(raw).parse_config(raw)
