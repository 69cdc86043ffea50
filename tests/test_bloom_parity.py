"""BLOOM (ALiBi over real-token key positions, embedding LayerNorm, per-head fused qkv, residual
before or after the norms) against transformers on tiny random checkpoints, cached decoding
token by token and through the static engine step."""
import pytest
import torch

from parity import check_parity, save, tiny_hf_model
from test_deepseek_parity import _check_cached_decoding

BASE = dict(vocab_size=256, hidden_size=64, n_layer=2, bos_token_id=None, eos_token_id=None, pad_token_id=None,
            tie_word_embeddings=False)

GAIN = 2.0
QK_GAIN = 1.0
PROMPTS = ((5, 6, 7, 8, 9, 10, 11), (12, 13, 14))
SHAPES = {"8_heads": dict(n_head=8), "2_heads_post_layernorm_residual": dict(n_head=2, hidden_size=48,
                                                                           apply_residual_connection_post_layernorm=True,
                                                                           norm_gain=1.0)}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_bloom_matches_transformers(tmp_path, shape):
    from transformers import BloomConfig

    kw = dict(SHAPES[shape])
    gain = kw.pop("norm_gain", GAIN)
    cfg = BloomConfig(**{**BASE, **kw})
    hf = tiny_hf_model(cfg)
    with torch.no_grad():  # LayerNorms everywhere keep the stream O(1): gains give varied greedy text (parity.INIT)
        for mod in hf.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.mul_(gain)
            if hasattr(mod, "query_key_value"):  # content-based scores that outweigh ALiBi's recency bias
                mod.query_key_value.weight.mul_(QK_GAIN)
    # ALiBi's recency bias makes random models loop; the 8-head shape checks varied continuations
    llm = check_parity(hf, save(hf, tmp_path), cfg.vocab_size, prompts=PROMPTS,
                       require_varied=not cfg.apply_residual_connection_post_layernorm)
    _check_cached_decoding(llm)


def test_alibi_slopes_match_transformers():
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    from ember.models.bloom import alibi_slopes

    for n in (1, 4, 6, 8, 12):
        assert torch.equal(alibi_slopes(n), _get_alibi_slopes(n, torch.device("cpu")))
