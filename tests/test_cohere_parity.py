"""Cohere and Cohere 2 (parallel attention + MLP on one bias-free LayerNorm, pairwise rotary,
logit_scale; per-head q/k LayerNorm; Cohere 2's sliding layers with NoPE full layers) against
transformers on tiny random checkpoints."""
import pytest

from parity import check_parity, save, tiny_hf_model

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, bos_token_id=None, eos_token_id=None, pad_token_id=None, logit_scale=0.5)

COHERE = {
    "gqa_tied": dict(num_key_value_heads=2),
    "mqa_qk_norm_bias_untied": dict(num_key_value_heads=1, use_qk_norm=True, attention_bias=True,
                                    tie_word_embeddings=False, logit_scale=0.3),
}
COHERE2 = {
    "gqa_window_pattern2": dict(num_key_value_heads=2, sliding_window=6, num_hidden_layers=4,
                                layer_types=["sliding_attention", "full_attention"] * 2),
}


@pytest.mark.parametrize("shape", list(COHERE))
def test_cohere_matches_transformers(tmp_path, shape):
    from transformers import CohereConfig

    import torch

    cfg = CohereConfig(**{**BASE, **COHERE[shape]})
    hf = tiny_hf_model(cfg)
    with torch.no_grad():  # per-head norm weights are 2-D: randomize_ leaves them at 1
        for name, p in hf.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.mul_(1 + torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
    check_parity(hf, save(hf, tmp_path), cfg.vocab_size)


@pytest.mark.parametrize("shape", list(COHERE2))
def test_cohere2_matches_transformers(tmp_path, shape):
    from transformers import Cohere2Config

    cfg = Cohere2Config(**{**BASE, **COHERE2[shape]})
    hf = tiny_hf_model(cfg)
    llm = check_parity(hf, save(hf, tmp_path), cfg.vocab_size)
    attn = [layer.self_attn for layer in llm.model.model.layers]
    assert [a.rotary for a in attn] == [a.window is not None for a in attn] == [True, False, True, False]


def test_cohere2_default_pattern():
    from ember.registry import lookup

    raw = {"model_type": "cohere2", **BASE, "num_hidden_layers": 4, "sliding_window": 8}
    assert lookup(raw).parse_config(raw).layer_windows() == [8, 8, 8, None]
