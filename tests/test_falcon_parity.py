"""Falcon (rotary; fused qkv in the new grouped, multi-query and per-head layouts; parallel with one
or two norms, or sequential) against transformers on tiny random checkpoints."""
import pytest

from parity import check_parity, save, tiny_hf_model

BASE = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
            bos_token_id=None, eos_token_id=None, pad_token_id=None)

SHAPES = {
    "new_arch_gqa_two_norms": dict(new_decoder_architecture=True, num_kv_heads=2),
    "multi_query_parallel_bias": dict(multi_query=True, parallel_attn=True, bias=True),
    "multi_head_sequential_untied": dict(multi_query=False, parallel_attn=False, tie_word_embeddings=False,
                                         ffn_hidden_size=96),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_falcon_matches_transformers(tmp_path, shape):
    from transformers import FalconConfig

    cfg = FalconConfig(**{**BASE, **SHAPES[shape]})
    hf = tiny_hf_model(cfg)
    check_parity(hf, save(hf, tmp_path), cfg.vocab_size)


def test_falcon_alibi_is_refused():
    from ember.errors import ConfigError
    from ember.registry import lookup

    raw = {"model_type": "falcon", **BASE, "alibi": True}
    with pytest.raises(ConfigError, match="ALiBi"):
        lookup(raw).parse_config(raw)
