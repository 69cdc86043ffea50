"""GPT-J (parallel attention + MLP on one LayerNorm, partial pairwise rotary, biased head) against
transformers on tiny random checkpoints."""
import pytest

from parity import check_parity, save, tiny_hf_model

BASE = dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=None, eos_token_id=None,
            pad_token_id=None)

SHAPES = {"rotary_dim8": dict(rotary_dim=8), "full_rotary_inner96": dict(rotary_dim=16, n_inner=96)}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_gptj_matches_transformers(tmp_path, shape):
    from transformers import GPTJConfig

    cfg = GPTJConfig(**{**BASE, **SHAPES[shape]})
    hf = tiny_hf_model(cfg)
    llm = check_parity(hf, save(hf, tmp_path), cfg.vocab_size)
    assert llm.model.lm_head.bias is not None and llm.model.model.rotary.rotary_dim == cfg.rotary_dim
