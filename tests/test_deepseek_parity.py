"""DeepSeek-V3 and -V2 (multi-head latent attention, group-limited MoE with shared experts) against
transformers on tiny random checkpoints, and the MLA cache holding the compressed latent."""
import pytest
import torch

from parity import check_parity, ember_greedy, save, tiny_hf_model

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12,
            max_position_embeddings=128, bos_token_id=None, eos_token_id=None, pad_token_id=None,
            first_k_dense_replace=1)

V3 = {
    "q_lora_8experts_4groups_interleaved": dict(q_lora_rank=24, n_routed_experts=8, n_group=4, topk_group=2,
                                                num_experts_per_tok=3, n_shared_experts=1),
    "no_q_lora_ungrouped_halves_yarn_tied": dict(
        q_lora_rank=None, n_routed_experts=6, n_group=1, topk_group=1, num_experts_per_tok=2, n_shared_experts=2,
        rope_interleave=False, norm_topk_prob=False, routed_scaling_factor=1.5, first_k_dense_replace=0,
        tie_word_embeddings=True, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                   "original_max_position_embeddings": 32, "mscale": 1.0,
                                                   "mscale_all_dim": 1.0}),
}
V2 = {
    "greedy_lite": dict(q_lora_rank=None, n_routed_experts=6, num_experts_per_tok=2, n_shared_experts=2,
                        topk_method="greedy", routed_scaling_factor=1.0),
    "group_limited_q_lora": dict(q_lora_rank=24, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3,
                                 n_shared_experts=1, topk_method="group_limited_greedy", routed_scaling_factor=2.0),
}


def _perturb_router_bias_(hf):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in hf.modules():
            b = getattr(m, "e_score_correction_bias", None)
            if b is not None:
                b.copy_(torch.randn(b.shape, generator=g) * 0.3)
    return hf


@pytest.mark.parametrize("shape", list(V3))
def test_deepseek_v3_matches_transformers(tmp_path, shape):
    from transformers import DeepseekV3Config

    cfg = DeepseekV3Config(**{**BASE, **V3[shape]})
    hf = _perturb_router_bias_(tiny_hf_model(cfg))
    llm = check_parity(hf, save(hf, tmp_path), cfg.vocab_size)
    # the cache holds each token's latent and rotated key part: (kv_lora_rank + qk_rope_head_dim) numbers a layer
    cache = llm.model.new_cache(1, 32)
    assert [tuple(k.shape[1:]) + (v.shape[-1],) for k, v in zip(cache.k, cache.v)] == [(1, 32, 16, 8)] * 2
    assert llm.model.kv_bytes_per_token(torch.float32) == 2 * (16 + 8) * 4
    _check_cached_decoding(llm)


def _check_cached_decoding(llm):
    """Token by token through the latent cache equals the uncached forward; the engine's static
    decode step (what CUDA graphs capture, eager on CPU) generates what the plain path does."""
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = llm.model(ids)
        cache = llm.model.new_cache(2, 32)
        for t in range(ids.shape[1]):
            pos = torch.full((2, 1), t)
            step = llm.model(ids[:, t:t + 1], position_ids=pos, cache=cache, kv_len=t + 1)
            assert (step[:, 0] - full[:, t]).abs().max().item() <= 1e-4, (t, (step[:, 0] - full[:, t]).abs().max().item(), full.abs().max().item())
    prompts = [[5, 6, 7, 8, 9], [12, 13, 14]]
    want = ember_greedy(llm, prompts, 12)
    assert ember_greedy(llm.with_engine(max_batch=4, max_len=64, cuda_graphs=True), prompts, 12) == want


@pytest.mark.parametrize("shape", list(V2))
def test_deepseek_v2_matches_transformers(tmp_path, shape):
    from transformers import DeepseekV2Config

    cfg = DeepseekV2Config(**{**BASE, **V2[shape]})
    hf = tiny_hf_model(cfg)
    check_parity(hf, save(hf, tmp_path), cfg.vocab_size)


@pytest.mark.parametrize("bad, match", [
    (dict(n_routed_experts=8, n_group=3, topk_group=2), "n_group"),
    (dict(n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=3), "topk_group"),
    (dict(kv_lora_rank=0), "kv_lora_rank"),
    (dict(n_routed_experts=4, num_experts_per_tok=5, n_group=1), "num_experts_per_tok")])
def test_deepseek_config_rejects_impossible_values(bad, match):
    from ember.errors import ConfigError
    from ember.registry import lookup

    raw = {"model_type": "deepseek_v3", **BASE, **bad}
    with pytest.raises(ConfigError, match=match):
        lookup(raw).parse_config(raw)


def test_mla_decode_absorbs_kv_b_and_matches_the_expanded_path(tmp_path, monkeypatch):
    """Decode steps attend in the latent space (kv_b_proj absorbed into the query and the output), a
    long prefill expands the latents; both agree with transformers' uncached forward chunk by chunk,
    and with each other when the choice is forced, for V3 (low-rank q, interleaved rotary) and V2."""
    from transformers import DeepseekV2Config, DeepseekV3Config

    import ember
    from ember.models import deepseek

    calls = []  # the query length of each absorbed attention
    real, choose = deepseek.Attention._absorbed, deepseek.Attention.absorbs
    monkeypatch.setattr(deepseek.Attention, "_absorbed", lambda self, *a: calls.append(a[-1]) or real(self, *a))
    chunks = (8, 1, 1, 2, 1, 1)  # a prefill, then decode steps (one of two tokens)
    ids = torch.randint(0, 256, (2, sum(chunks)), generator=torch.Generator().manual_seed(4))
    for cfg in (DeepseekV3Config(**{**BASE, **V3["q_lora_8experts_4groups_interleaved"]}),
                DeepseekV2Config(**{**BASE, **V2["greedy_lite"]})):
        hf = tiny_hf_model(cfg)
        llm = ember.load(save(hf, tmp_path / cfg.model_type), dtype=torch.float32, device="cpu")
        att = llm.model.model.layers[0].self_attn
        assert att.absorbs(1, 8) and att.absorbs(1, 4096) and not att.absorbs(512, 512)

        def chunked():
            out, cache, t = [], llm.model.new_cache(2, 32), 0
            for n in chunks:
                pos = torch.arange(t, t + n).expand(2, n)
                out.append(llm.model(ids[:, t:t + n], position_ids=pos, cache=cache, kv_len=t + n))
                t += n
            return torch.cat(out, dim=1)

        with torch.no_grad():
            full = hf(ids).logits
            calls.clear()
            auto = chunked()
            # the 8-token prefill expanded the latents, every decode step absorbed kv_b_proj
            assert sorted(calls) == sorted(list(chunks[1:]) * cfg.num_hidden_layers)
            assert (auto - full).abs().max().item() <= 1e-4
            monkeypatch.setattr(deepseek.Attention, "absorbs", lambda self, T, S: True)
            absorbed = chunked()
            monkeypatch.setattr(deepseek.Attention, "absorbs", lambda self, T, S: False)
            expanded = chunked()
            monkeypatch.setattr(deepseek.Attention, "absorbs", choose)
        assert (absorbed - expanded).abs().max().item() <= 1e-4
        assert (absorbed - full).abs().max().item() <= 1e-4
        # the cache per token and layer: the latent and the shared rotary key, nothing per head
        assert llm.model.kv_bytes_per_token(torch.float32) == cfg.num_hidden_layers * (16 + 8) * 4
