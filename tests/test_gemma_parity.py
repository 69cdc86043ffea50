"""Gemma against transformers on tiny random checkpoints: sqrt(hidden) embedding scale, (1 + w)
RMSNorm, GeGLU, head_dim from the config."""
import pytest

from parity import check_parity, save, tiny_hf_model

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, bos_token_id=None, eos_token_id=None, pad_token_id=None)

SHAPES = {
    # head_dim 24 != 64 / 4, GQA, tied head (Gemma's default)
    "gqa_head_dim24_tied": dict(num_key_value_heads=2, head_dim=24),
    # MQA, attention bias, own lm_head, legacy "gelu" (read as the tanh approximation)
    "mqa_bias_untied": dict(num_key_value_heads=1, head_dim=16, attention_bias=True, tie_word_embeddings=False,
                            hidden_act="gelu"),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_gemma_matches_transformers(tmp_path, shape):
    from transformers import GemmaConfig

    cfg = GemmaConfig(**{**BASE, **SHAPES[shape]})
    hf = tiny_hf_model(cfg)
    llm = check_parity(hf, save(hf, tmp_path), cfg.vocab_size)
    assert (llm.model.lm_head.weight is llm.model.model.embed_tokens.weight) == cfg.tie_word_embeddings


def test_gemma_rejects_bidirectional_attention():
    from ember.errors import ConfigError
    from ember.registry import lookup

    raw = {"model_type": "gemma", **BASE, "num_key_value_heads": 2, "use_bidirectional_attention": True}
    with pytest.raises(ConfigError, match="bidirectional"):
        lookup(raw).parse_config(raw)
