"""Gemma 2 against transformers on tiny random checkpoints: sliding windows shorter than the
sequence alternating with global layers, attention and final logit soft-capping small enough to
change the output, query_pre_attn_scalar, sandwich norms."""
import pytest
import torch

from parity import check_parity, save, tiny_hf_model

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, bos_token_id=None, eos_token_id=None, pad_token_id=None,
            attn_logit_softcapping=2.0, final_logit_softcapping=5.0)  # small enough to bite at parity.INIT

SHAPES = {
    # default layer_types (sliding, full), window 4, GQA, tied head
    "window4_gqa_tied": dict(num_key_value_heads=2, head_dim=16, sliding_window=4, query_pre_attn_scalar=20),
    # explicit layer_types, window 7, MQA, head_dim 24 != 64 / 4, own lm_head
    "window7_mqa_untied": dict(num_hidden_layers=3, num_key_value_heads=1, head_dim=24, sliding_window=7,
                               query_pre_attn_scalar=32, tie_word_embeddings=False,
                               layer_types=["full_attention", "sliding_attention", "sliding_attention"]),
}


# Seeds whose greedy continuations are varied (check_parity asserts it): with a tied head, a window of 4
# and scores capped at 2, a random Gemma 2 often settles on repeating one token.
SEEDS = {"window4_gqa_tied": 2}


def _caps_bite(llm, ids):
    """Logits change when either soft-cap is removed: the test values are small enough to matter."""
    m = llm.model
    with torch.no_grad():
        ref = m(ids)
        cap, m.final_logit_softcapping = m.final_logit_softcapping, None
        assert (m(ids) - ref).abs().max() > 1e-2, "final soft-cap does not change the logits"
        m.final_logit_softcapping = cap
        attn = [layer.self_attn for layer in m.model.layers]
        for a in attn:
            a.softcap = None
        assert (m(ids) - ref).abs().max() > 1e-2, "attention soft-cap does not change the logits"
        for a in attn:
            a.softcap = 2.0


@pytest.mark.parametrize("shape", list(SHAPES))
def test_gemma2_matches_transformers(tmp_path, shape):
    from transformers import Gemma2Config

    cfg = Gemma2Config(**{**BASE, **SHAPES[shape]})
    hf = tiny_hf_model(cfg, seed=SEEDS.get(shape, 0))
    llm = check_parity(hf, save(hf, tmp_path), cfg.vocab_size)
    windows = [layer.self_attn.window for layer in llm.model.model.layers]
    assert windows == [cfg.sliding_window if t == "sliding_attention" else None for t in cfg.layer_types]
    assert None in windows and cfg.sliding_window in windows
    _caps_bite(llm, torch.randint(0, cfg.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("bad, match", [
    (dict(attn_logit_softcapping=0), "attn_logit_softcapping"), (dict(final_logit_softcapping=-5.0), "final_logit"),
    (dict(query_pre_attn_scalar=0), "query_pre_attn_scalar"), (dict(layer_types=["sliding_attention"]), "layer_types"),
    (dict(layer_types=["sliding_attention", "chunked_attention"]), "chunked_attention"),
    (dict(sliding_window=0), "sliding_window"), (dict(num_key_value_heads=3), "multiple")])
def test_gemma2_config_rejects_impossible_values(bad, match):
    from ember.errors import ConfigError
    from ember.registry import lookup

    raw = {"model_type": "gemma2", **BASE, **bad}
    with pytest.raises(ConfigError, match=match):
        lookup(raw).parse_config(raw)
