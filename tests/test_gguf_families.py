"""GGUF files of the families ember gained in 2026 (llama.cpp's deepseek2, gpt-oss, glm4, glm4moe,
smollm3, olmo2 (OLMo 2 and 3), exaone4, ernie4_5, ernie4_5-moe, hunyuan-dense, seed_oss, command-r,
cohere2, granitemoe, olmoe, minimax-m2, bloom, falcon, starcoder), written from tiny transformers
models as convert_hf_to_gguf.py writes them (tests/ggufconvert.py), against transformers."""
import pytest
import torch

import ember
from ember.io.gguf import GGUFFile
from ember.loading import gguf_config

import ggufconvert as gc

pytest.importorskip("gguf")

BASE = dict(vocab_size=265, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, bos_token_id=None, eos_token_id=None, pad_token_id=None)
# name: (transformers config class, overrides)
MODELS = {
    "seed_oss": ("SeedOssConfig", dict(head_dim=24)),
    "smollm3": ("SmolLM3Config", dict(num_hidden_layers=4, tie_word_embeddings=False)),
    "olmo2": ("Olmo2Config", {}),
    "olmo3": ("Olmo3Config", dict(num_hidden_layers=4, sliding_window=5)),
    "exaone4": ("Exaone4Config", dict(num_hidden_layers=4, sliding_window=5, head_dim=24)),
    "ernie4_5": ("Ernie4_5Config", dict(head_dim=16)),
    "hunyuan_v1_dense": ("HunYuanDenseV1Config", dict(head_dim=16)),
    "cohere": ("CohereConfig", dict(use_qk_norm=True)),
    "cohere2": ("Cohere2Config", dict(num_hidden_layers=4, sliding_window=5)),
    "glm4": ("Glm4Config", dict(head_dim=16)),
    "olmoe": ("OlmoeConfig", dict(num_experts=4, num_experts_per_tok=2)),
    "granitemoe": ("GraniteMoeConfig", dict(num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=2.0,
                                            residual_multiplier=0.5, logits_scaling=2.0, attention_multiplier=0.3)),
    "granitemoeshared": ("GraniteMoeSharedConfig", dict(num_local_experts=4, num_experts_per_tok=2,
                                                        shared_intermediate_size=48)),
    "minimax_m2": ("MiniMaxM2Config", dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16, rotary_dim=8)),
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", dict(num_hidden_layers=3, moe_num_experts=4, moe_k=2, moe_intermediate_size=32,
                                                moe_num_shared_experts=1, moe_layer_start_index=1)),
    "glm4_moe": ("Glm4MoeConfig", dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                       first_k_dense_replace=1, n_shared_experts=1, use_qk_norm=True, n_group=2,
                                       topk_group=1, routed_scaling_factor=1.5, partial_rotary_factor=0.5)),
    "gpt_oss": ("GptOssConfig", dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding_window=5)),
    # V3: q_lora, sigmoid group-limited routing with the correction bias, yarn with mscale_all_dim
    "deepseek_v3": ("DeepseekV3Config", dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                             q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                             v_head_dim=16, first_k_dense_replace=1, n_group=2, topk_group=1, num_key_value_heads=4,
                                             n_shared_experts=1, rope_parameters={
                                                 "rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                 "original_max_position_embeddings": 32, "mscale_all_dim": 1.0,
                                                 "mscale": 1.0, "beta_fast": 32.0, "beta_slow": 1.0})),
    # V2: q_proj without lora, softmax routing
    "deepseek_v2": ("DeepseekV2Config", dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                             q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
                                             v_head_dim=8, first_k_dense_replace=1, n_shared_experts=2,
                                             num_key_value_heads=4)),
    "bloom": ("BloomConfig", dict(n_layer=2, n_head=4)),
    # Falcon-40B's shape (KV groups, ln_attn / ln_mlp) and Falcon-7B's (multi-query, one norm)
    "falcon": ("FalconConfig", dict(new_decoder_architecture=True, num_kv_heads=2)),
    "falcon_7b": ("FalconConfig", dict(new_decoder_architecture=False, multi_query=True, tie_word_embeddings=False)),
    "gpt_bigcode": ("GPTBigCodeConfig", dict(n_embd=64, n_layer=2, n_head=4, n_positions=128)),
}


def _hf(kind: str, **over):
    import transformers as tf

    from parity import tiny_hf_model

    cls, extra = MODELS[kind]
    return tiny_hf_model(getattr(tf, cls)(**{**BASE, **extra, **over}))


def _ids(seed: int = 0, T: int = 12):
    return torch.randint(0, 256, (2, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", list(MODELS))
def test_family_gguf_logits_match_transformers(tmp_path, kind):
    hf = _hf(kind)
    path = gc.convert(hf, tmp_path / "m.gguf")
    raw = gguf_config(GGUFFile(path))
    assert raw["model_type"] == hf.config.model_type
    llm = ember.load(path, dtype=torch.float32, device="cpu")
    assert llm.config.model_type == hf.config.model_type
    with torch.no_grad():
        ref, got = hf(_ids()).logits, llm.model(_ids())
    assert (got - ref).abs().max().item() <= 1e-4
    assert llm.generate([5, 6, 7], max_tokens=6, ignore_eos=True)  # and it decodes through the cache
