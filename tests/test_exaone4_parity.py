"""EXAONE 4.0 (norms after the sublayers, per-head q/k norm, sliding layers with rotary, NoPE full
layers) against transformers on tiny random checkpoints."""
import pytest

from parity import check_parity, save, tiny_hf_model

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            max_position_embeddings=128, bos_token_id=None, eos_token_id=None, pad_token_id=None)

SHAPES = {
    "gqa_window_pattern4": dict(num_key_value_heads=2, sliding_window=6, sliding_window_pattern=4),
    "mqa_tied_pattern2": dict(num_key_value_heads=1, tie_word_embeddings=True, sliding_window=5,
                              sliding_window_pattern=2, num_hidden_layers=2),
    "no_window_all_rotary": dict(num_key_value_heads=4, sliding_window=None, num_hidden_layers=2,
                                 layer_types=["full_attention"] * 2),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_exaone4_matches_transformers(tmp_path, shape):
    from transformers import Exaone4Config

    cfg = Exaone4Config(**{**BASE, **SHAPES[shape]})
    hf = tiny_hf_model(cfg)
    llm = check_parity(hf, save(hf, tmp_path), cfg.vocab_size)
    layers = llm.model.model.layers
    sliding = [t == "sliding_attention" for t in cfg.layer_types]
    assert [layer.self_attn.rotary for layer in layers] == [cfg.sliding_window is None or s for s in sliding]


def test_exaone4_string_pattern():
    from ember.registry import lookup

    raw = {"model_type": "exaone4", **BASE, "sliding_window": 8, "sliding_window_pattern": "LLG"}
    assert lookup(raw).parse_config(raw).layer_windows() == [8, 8, None, 8]
