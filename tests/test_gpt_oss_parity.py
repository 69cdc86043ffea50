"""GPT-OSS (attention sinks, alternating sliding/full layers, yarn, biased router and clamped-SwiGLU
experts) against transformers on tiny random checkpoints."""
import pytest
import torch

from parity import check_parity, save, tiny_hf_model

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            head_dim=16, max_position_embeddings=128, bos_token_id=None, eos_token_id=None, pad_token_id=None,
            sliding_window=6)

SHAPES = {
    "gqa_4experts_top2_default_yarn": dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                           rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0,
                                                            "beta_slow": 1.0, "truncate": False, "rope_theta": 1e4,
                                                            "original_max_position_embeddings": 32}),
    "mqa_6experts_top3_tight_limit_full_first": dict(num_key_value_heads=1, num_local_experts=6, num_experts_per_tok=3,
                                                     swiglu_limit=0.5, layer_types=["full_attention", "sliding_attention"],
                                                     rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
}


def _perturb_sinks_(hf):
    # transformers initialises the sinks like the weights; make them large enough to matter
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in hf.modules():
            if hasattr(m, "sinks"):
                m.sinks.copy_(torch.randn(m.sinks.shape, generator=g) * 2)
    return hf


@pytest.mark.parametrize("shape", list(SHAPES))
def test_gpt_oss_matches_transformers(tmp_path, shape):
    from transformers import GptOssConfig

    cfg = GptOssConfig(**{**BASE, **SHAPES[shape]})
    hf = _perturb_sinks_(tiny_hf_model(cfg))
    llm = check_parity(hf, save(hf, tmp_path), cfg.vocab_size)
    assert llm.model.cache_windows() == [6 if t == "sliding_attention" else None for t in cfg.layer_types]


def test_gpt_oss_default_rope_is_transformers_yarn():
    from ember.registry import lookup

    raw = {"model_type": "gpt_oss", **BASE, "num_key_value_heads": 2}
    cfg = lookup(raw).parse_config(raw)
    assert cfg.raw["rope_parameters"]["rope_type"] == "yarn" and cfg.layer_types == ["sliding_attention", "full_attention"]


def test_gpt_oss_cached_decode_keeps_the_sinks(tmp_path):
    """Bug: single-row CPU decode took Llama attention's fused rotary + cache + attention op, which has
    no sinks, so GPT-OSS decoded without them. Cached decode logits must equal the whole forward's."""
    import ember
    from transformers import GptOssConfig

    cfg = GptOssConfig(**{**BASE, **SHAPES["mqa_6experts_top3_tight_limit_full_first"]})
    hf = _perturb_sinks_(tiny_hf_model(cfg))
    llm = ember.load(save(hf, tmp_path), dtype=torch.float32, device="cpu")
    ids = torch.arange(3, 17)[None]
    with torch.no_grad():
        whole = llm.model(ids)
        cache = llm.model.new_cache(1, 64)
        llm.model(ids[:, :10], position_ids=torch.arange(10)[None], cache=cache, kv_len=10)
        steps = torch.cat([llm.model(ids[:, p:p + 1], position_ids=torch.tensor([[p]]), cache=cache, kv_len=p + 1)
                           for p in range(10, 14)], 1)
    assert (steps - whole[:, 10:14]).abs().max().item() <= 1e-4
