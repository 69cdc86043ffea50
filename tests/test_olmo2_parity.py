"""OLMo 2 against transformers on tiny random checkpoints: norms after attention and MLP (no
input norm), RMSNorm over the whole q and k projections, GQA, tied and untied heads."""
import pytest

from parity import check_parity, save, tiny_hf_model

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, bos_token_id=None, eos_token_id=None, pad_token_id=None)

SHAPES = {
    "gqa_untied": dict(num_key_value_heads=2),
    "mqa_bias_tied_rope_linear": dict(num_key_value_heads=1, attention_bias=True, tie_word_embeddings=True,
                                      rope_scaling={"rope_type": "linear", "factor": 2.0}),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_olmo2_matches_transformers(tmp_path, shape):
    from transformers import Olmo2Config

    cfg = Olmo2Config(**{**BASE, **SHAPES[shape]})
    hf = tiny_hf_model(cfg)
    llm = check_parity(hf, save(hf, tmp_path), cfg.vocab_size)
    attn = llm.model.model.layers[0].self_attn
    assert attn.qk_norm == "full" and attn.k_norm.weight.shape == (cfg.num_key_value_heads * 16,)


@pytest.mark.parametrize("bad, match", [
    (dict(rms_norm_eps=-1e-5), "rms_norm_eps"), (dict(num_key_value_heads=3), "multiple"),
    (dict(hidden_size=0), "hidden_size")])
def test_olmo2_config_rejects_impossible_values(bad, match):
    from ember.errors import ConfigError
    from ember.registry import lookup

    raw = {"model_type": "olmo2", **BASE, **bad}
    with pytest.raises(ConfigError, match=match):
        lookup(raw).parse_config(raw)
