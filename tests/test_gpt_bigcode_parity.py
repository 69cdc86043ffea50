"""GPTBigCode (GPT-2's block with Linears and multi-query attention, or per-head fused q/k/v) against
transformers on tiny random checkpoints."""
import pytest

from parity import check_parity, save, tiny_hf_model

BASE = dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=None, eos_token_id=None,
            pad_token_id=None)

SHAPES = {"multi_query": dict(multi_query=True), "multi_head_inner96_untied": dict(multi_query=False, n_inner=96,
                                                                                 tie_word_embeddings=False)}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_gpt_bigcode_matches_transformers(tmp_path, shape):
    from transformers import GPTBigCodeConfig

    cfg = GPTBigCodeConfig(**{**BASE, **SHAPES[shape]})
    hf = tiny_hf_model(cfg)
    llm = check_parity(hf, save(hf, tmp_path), cfg.vocab_size)
    assert llm.model.cache_layout()[0] == (1 if cfg.multi_query else 4, 16)
