"""GPT-NeoX against transformers on tiny random checkpoints: per-head interleaved
query_key_value, partial rotary fractions, parallel and sequential residual, untied embed_out and
tied heads, and the old config names (rotary_pct, rotary_emb_base)."""
import json

import pytest
import torch

from parity import check_parity, save, tiny_hf_model

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, bos_token_id=None, eos_token_id=None, pad_token_id=None)

SHAPES = {
    "rotary_0.25_parallel": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                  "partial_rotary_factor": 0.25}, use_parallel_residual=True),
    "rotary_0.5_sequential": dict(rope_parameters={"rope_type": "default", "rope_theta": 500.0,
                                                   "partial_rotary_factor": 0.5}, use_parallel_residual=False),
    "full_rotary_tied_no_bias": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                      "partial_rotary_factor": 1.0},
                                     tie_word_embeddings=True, attention_bias=False, hidden_act="gelu_new"),
}


def _cfg(**kw):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(**{**BASE, **kw})


@pytest.mark.parametrize("shape", list(SHAPES))
def test_gpt_neox_matches_transformers(tmp_path, shape):
    cfg = _cfg(**SHAPES[shape])
    hf = tiny_hf_model(cfg)
    folder = save(hf, tmp_path)
    check_parity(hf, folder, cfg.vocab_size)


def test_gpt_neox_hub_config_names(tmp_path):
    """Pythia's config.json says rotary_pct / rotary_emb_base instead of rope_parameters."""
    cfg = _cfg(rope_parameters={"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5})
    hf = tiny_hf_model(cfg)
    folder = save(hf, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    del raw["rope_parameters"]
    raw.update(rotary_pct=0.5, rotary_emb_base=500)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    import ember

    llm = ember.load(folder, dtype=torch.float32)
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert (llm.model(ids) - hf(ids).logits).abs().max() <= 1e-4


def test_gpt_neox_head_is_embed_out(tmp_path):
    import ember

    cfg = _cfg()
    hf = tiny_hf_model(cfg)
    llm = ember.load(save(hf, tmp_path), dtype=torch.float32)
    assert torch.equal(llm.model.lm_head.weight, hf.lm_head.weight)
    assert not torch.equal(llm.model.lm_head.weight, llm.model.model.embed_in.weight)


@pytest.mark.parametrize("bad", [dict(hidden_size=64, num_attention_heads=5), dict(rotary_pct=1.5),
                                 dict(hidden_size=64, num_attention_heads=4, rotary_pct=0.2),  # 3 of 16 dims: odd
                                 dict(rope_parameters={"rope_type": "nope"})])
def test_gpt_neox_config_rejects_impossible_values(bad):
    from ember import registry
    from ember.errors import ConfigError

    with pytest.raises(ConfigError):
        registry.lookup({"model_type": "gpt_neox"}).parse_config({"model_type": "gpt_neox", **bad})
