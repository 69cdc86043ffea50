"""Llama, Mistral, Qwen2, Qwen3 against transformers on tiny random checkpoints."""
import pytest
import torch

from parity import check_parity, save, tiny_hf_model

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def _llama(**kw):
    from transformers import LlamaConfig

    return LlamaConfig(**{**BASE, **kw})


LLAMA_SHAPES = {
    "mha": dict(num_key_value_heads=4),
    "gqa2": dict(num_key_value_heads=2),
    "mqa": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "head_dim_ne_hidden_over_heads": dict(num_key_value_heads=2, head_dim=24),
    "attention_and_mlp_bias": dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True),
    "rope_linear": dict(num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    # max_position_embeddings below the sequence so dynamic NTK actually rescales
    "rope_dynamic": dict(num_key_value_heads=2, max_position_embeddings=16,
                         rope_scaling={"rope_type": "dynamic", "factor": 4.0}),
    "rope_yarn": dict(num_key_value_heads=2, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                             "original_max_position_embeddings": 32}),
    "rope_llama3": dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    # short factors under 16 positions, long factors past them: both used within one test
    "rope_longrope": dict(num_key_value_heads=2, max_position_embeddings=64, rope_scaling={
        "rope_type": "longrope", "original_max_position_embeddings": 16,
        "short_factor": [1.0 + 0.1 * i for i in range(8)], "long_factor": [2.0 + 0.3 * i for i in range(8)]}),
}


@pytest.mark.parametrize("shape", list(LLAMA_SHAPES))
def test_llama_logits_and_greedy_match_transformers(tmp_path, shape):
    cfg = _llama(**LLAMA_SHAPES[shape])
    hf = tiny_hf_model(cfg)
    check_parity(hf, save(hf, tmp_path), cfg.vocab_size, padding_invariant=shape not in ("rope_dynamic", "rope_longrope"))


def test_llama_sharded_checkpoint_matches(tmp_path):
    cfg = _llama(num_key_value_heads=2)
    hf = tiny_hf_model(cfg)
    folder = save(hf, tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    check_parity(hf, folder, cfg.vocab_size)


@pytest.mark.parametrize("window", [4, 7])
def test_mistral_sliding_window_shorter_than_sequence(tmp_path, window):
    from transformers import MistralConfig

    cfg = MistralConfig(**{**BASE, "num_key_value_heads": 2, "sliding_window": window})
    hf = tiny_hf_model(cfg)
    check_parity(hf, save(hf, tmp_path), cfg.vocab_size)


@pytest.mark.parametrize("kw", [dict(num_key_value_heads=2), dict(num_key_value_heads=1, tie_word_embeddings=True),
                                dict(num_key_value_heads=2, use_sliding_window=True, sliding_window=5,
                                     max_window_layers=1)])
def test_qwen2_attention_bias_matches(tmp_path, kw):
    from transformers import Qwen2Config

    cfg = Qwen2Config(**{**BASE, **kw})
    hf = tiny_hf_model(cfg)
    check_parity(hf, save(hf, tmp_path), cfg.vocab_size)


@pytest.mark.parametrize("kw", [dict(num_key_value_heads=2, head_dim=32), dict(num_key_value_heads=4, head_dim=8,
                                                                                tie_word_embeddings=True)])
def test_qwen3_qk_norm_explicit_head_dim_matches(tmp_path, kw):
    from transformers import Qwen3Config

    cfg = Qwen3Config(**{**BASE, **kw})
    hf = tiny_hf_model(cfg)
    check_parity(hf, save(hf, tmp_path), cfg.vocab_size)


def test_unfused_projections_match_fused(tmp_path):
    import ember

    cfg = _llama(num_key_value_heads=2)
    hf = tiny_hf_model(cfg)
    folder = save(hf, tmp_path)
    a = ember.load(folder, dtype=torch.float32)
    b = ember.load(folder, dtype=torch.float32, fuse=False)
    assert b.model.model.layers[0].self_attn.qkv.fused is None
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        assert (a.model(ids) - b.model(ids)).abs().max() < 1e-5
