"""The decoder families of issue 19 against transformers on tiny random checkpoints: Llama 4 (text and
the image-text checkpoint's decoder), Ministral 3 / Mistral 3, PhiMoE."""
import json

import pytest
import torch

from parity import check_parity, ember_greedy, save, tiny_hf_model

pytest.importorskip("transformers")

def check_static_engine(llm) -> None:
    """The engine's static decode step (what CUDA graphs capture, run eagerly here) gives the plain
    path's greedy tokens for a batch of three prompts of different lengths."""
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], list(range(30, 41))]
    want = ember_greedy(llm, prompts, 12)
    assert ember_greedy(llm.with_engine(max_batch=4, max_len=64, cuda_graphs=True), prompts, 12) == want


BASE = dict(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, bos_token_id=None, eos_token_id=None, pad_token_id=None)

# ---- Llama 4 -------------------------------------------------------------------------------------
LLAMA4 = dict(BASE, intermediate_size=48, intermediate_size_mlp=96, head_dim=16, num_local_experts=4)
LLAMA4_SHAPES = {
    # chunks of 4 positions and temperature tuning from position 3 on, so both act within the test's
    # sequences; top-1 routing, dense and MoE layers alternating, NoPE on layer 3
    "chunk4_tuned_interleaved_top1": (dict(attention_chunk_size=4, floor_scale=4, attn_scale=0.5,
                                           interleave_moe_layer_step=2), False),
    # listed NoPE layers, no q/k norm, top-2, every layer MoE, llama3 rope, tied, MQA, biases
    "listed_nope_top2_llama3_tied_mqa": (dict(no_rope_layers=[1, 0, 1, 0], use_qk_norm=False, num_experts_per_tok=2,
                                              num_key_value_heads=1, tie_word_embeddings=True, attention_bias=True,
                                              attn_temperature_tuning=False,
                                              rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0,
                                                               "factor": 8.0, "low_freq_factor": 1.0,
                                                               "high_freq_factor": 4.0,
                                                               "original_max_position_embeddings": 32}), True),
}


@pytest.mark.parametrize("shape", list(LLAMA4_SHAPES))
def test_llama4_text_matches_transformers(tmp_path, shape):
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    over, reference_left_padding = LLAMA4_SHAPES[shape]
    cfg = Llama4TextConfig(**{**LLAMA4, **over})
    hf = tiny_hf_model(cfg, Llama4ForCausalLM)
    llm = check_parity(hf, save(hf, tmp_path), cfg.vocab_size, reference_left_padding=reference_left_padding)
    if cfg.attention_chunk_size < 24:  # the chunked shape: chunk masks over the static cache
        check_static_engine(llm)
    attn = [layer.self_attn for layer in llm.model.model.layers]
    assert [int(a.rotary) for a in attn] == list(cfg.no_rope_layers)
    assert [a.chunk for a in attn] == [cfg.attention_chunk_size if t == "chunked_attention" else None
                                       for t in cfg.layer_types]


def test_llama4_multimodal_checkpoint_matches_transformers(tmp_path):
    """Llama4ForConditionalGeneration (the Hub's form): text_config, weights under language_model.*;
    compared with its language model (transformers 5.24's multimodal forward fails on text alone)."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    text = {**LLAMA4, **LLAMA4_SHAPES["chunk4_tuned_interleaved_top1"][0]}
    vision = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14, vision_output_dim=16, projector_input_dim=16, projector_output_dim=16)
    hf = tiny_hf_model(Llama4Config(text_config=text, vision_config=vision), Llama4ForConditionalGeneration)
    folder = save(hf, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama4"
    check_parity(hf.language_model, folder, text["vocab_size"], reference_left_padding=False)


@pytest.mark.parametrize("bad, match", [(dict(no_rope_layers=[1, 0]), "no_rope_layers"),
                                        (dict(layer_types=["sliding_attention"] * 4), "layer_types"),
                                        (dict(num_experts_per_tok=5), "num_experts_per_tok"),
                                        (dict(attention_chunk_size=0), "attention_chunk_size")])
def test_llama4_config_rejects_impossible_values(bad, match):
    from ember.errors import ConfigError
    from ember.registry import lookup

    raw = {"model_type": "llama4_text", **LLAMA4, **bad}
    with pytest.raises(ConfigError, match=match):
        lookup(raw).parse_config(raw)


# ---- Ministral 3 / Mistral 3 -----------------------------------------------------------------------
MINISTRAL3 = dict(BASE, intermediate_size=96, head_dim=16)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 8,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0, "llama_4_scaling_beta": 0.5}
MINISTRAL3_SHAPES = {
    # query scaling from position 8 on (original_max_position_embeddings 8), GQA, untied
    "yarn_scaled_gqa": dict(rope_parameters=YARN),
    # MQA, tied, a sliding window, head_dim 32 (q wider than hidden)
    "window_mqa_tied": dict(rope_parameters=dict(YARN, original_max_position_embeddings=4, llama_4_scaling_beta=0.2),
                            num_key_value_heads=1, tie_word_embeddings=True, sliding_window=6, head_dim=32),
}


@pytest.mark.parametrize("shape", list(MINISTRAL3_SHAPES))
def test_ministral3_matches_transformers(tmp_path, shape):
    from transformers import Ministral3Config, Ministral3ForCausalLM

    cfg = Ministral3Config(**{**MINISTRAL3, **MINISTRAL3_SHAPES[shape]})
    hf = tiny_hf_model(cfg, Ministral3ForCausalLM)
    llm = check_parity(hf, save(hf, tmp_path), cfg.vocab_size)
    assert all(layer.self_attn.temperature is not None for layer in llm.model.model.layers)


@pytest.mark.parametrize("text_type, tie", [("ministral3", True), ("mistral", False)])
def test_mistral3_multimodal_checkpoint_matches_transformers(tmp_path, text_type, tie):
    """Mistral3ForConditionalGeneration: text_config (ministral3, or mistral as in Mistral Small 3.1),
    decoder weights under language_model.*; the outer config ties the head."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    text = dict(MINISTRAL3, model_type=text_type, **(MINISTRAL3_SHAPES["yarn_scaled_gqa"] if text_type == "ministral3"
                                                     else dict(sliding_window=6)))
    vision = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, head_dim=8,
                  image_size=28, patch_size=14)
    cfg = Mistral3Config(text_config=text, vision_config=vision, tie_word_embeddings=tie)
    hf = tiny_hf_model(cfg, Mistral3ForConditionalGeneration)
    folder = save(hf, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "mistral3"
    llm = check_parity(hf, folder, text["vocab_size"])
    assert (llm.model.lm_head.weight is llm.model.model.embed_tokens.weight) == tie


# ---- PhiMoE --------------------------------------------------------------------------------------
PHIMOE = dict(BASE, intermediate_size=48, num_local_experts=4)
PHIMOE_SHAPES = {
    # a jitter wide enough that the softmax weighs more than one logit, biases everywhere, GQA
    "biases_wide_jitter": dict(attention_bias=True, lm_head_bias=True, router_jitter_noise=0.5),
    # longrope with equal mscales (as Phi-3.5-MoE), MQA, tied, a sliding window, six experts
    "longrope_window_mqa_tied": dict(num_key_value_heads=1, tie_word_embeddings=True, sliding_window=6,
                                     num_local_experts=6, rope_parameters={
                                         "rope_type": "longrope", "rope_theta": 10000.0,
                                         "short_factor": [1.0 + i / 16 for i in range(8)],
                                         "long_factor": [2.0 + i / 8 for i in range(8)],
                                         "short_mscale": 1.2, "long_mscale": 1.2,
                                         "original_max_position_embeddings": 64}),
}


@pytest.mark.parametrize("shape", list(PHIMOE_SHAPES))
def test_phimoe_matches_transformers(tmp_path, shape):
    from transformers import PhimoeConfig, PhimoeForCausalLM

    cfg = PhimoeConfig(**{**PHIMOE, **PHIMOE_SHAPES[shape]})
    hf = tiny_hf_model(cfg, PhimoeForCausalLM)
    check_parity(hf, save(hf, tmp_path), cfg.vocab_size)


def test_phimoe_unequal_mscales_are_a_config_error():
    from ember.errors import ConfigError
    from ember.registry import lookup

    rope = dict(PHIMOE_SHAPES["longrope_window_mqa_tied"]["rope_parameters"], long_mscale=1.5)
    raw = {"model_type": "phimoe", **PHIMOE, "rope_parameters": rope}
    with pytest.raises(ConfigError, match="mscale"):
        lookup(raw).parse_config(raw)


def test_llama4_gguf_matches_transformers(tmp_path):
    """llama.cpp's llama4 architecture, written from a tiny model with the values llama.cpp fixes
    (chunks of 8192, NoPE every fourth layer, temperature tuning from 8192): dense and MoE layers,
    the router and shared expert under their GGUF names."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    import ember
    import ggufmake as gm
    from ember.io.gguf import GGUFFile
    from ember.loading import gguf_config

    pytest.importorskip("gguf")
    cfg = Llama4TextConfig(**{**LLAMA4, "vocab_size": 265, "interleave_moe_layer_step": 2, "num_experts_per_tok": 2})
    hf = tiny_hf_model(cfg, Llama4ForCausalLM)
    path = gm.hf_to_gguf(hf, tmp_path / "m.gguf")
    raw = gguf_config(GGUFFile(path))
    assert raw["model_type"] == "llama4_text" and raw["intermediate_size"] == cfg.intermediate_size
    assert raw["intermediate_size_mlp"] == cfg.intermediate_size_mlp and raw["interleave_moe_layer_step"] == 2
    llm = ember.load(path, dtype=torch.float32, device="cpu")
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (llm.model(ids) - hf(ids).logits).abs().max().item() <= 1e-4
    want = hf.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert llm.generate([5, 6, 7], max_tokens=8, ignore_eos=True, details=True).token_ids == want[0, 3:].tolist()


# ---- Gemma 4 -------------------------------------------------------------------------------------
GEMMA4 = dict(BASE, intermediate_size=96, head_dim=16, sliding_window=4, pad_token_id=0,
              layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
GEMMA4_SHAPES = {
    # everything at once: per-layer inputs, the last two layers sharing keys/values (double-wide MLPs
    # there), an MoE block beside each MLP, global layers of head_dim 32 with one head whose values are
    # its keys
    "ple_shared_kv_moe_k_eq_v": dict(hidden_size_per_layer_input=8, vocab_size_per_layer_input=256,
                                     num_kv_shared_layers=2, use_double_wide_mlp=True, enable_moe_block=True,
                                     num_experts=4, top_k_experts=2, moe_intermediate_size=32,
                                     attention_k_eq_v=True, global_head_dim=32, num_global_key_value_heads=1),
    # the plain decoder: five layers (the last forced global), untied, final soft-cap, MQA, half the
    # global head rotated
    "plain_untied_softcap_mqa": dict(hidden_size_per_layer_input=0, num_hidden_layers=5, layer_types=None,
                                     tie_word_embeddings=False, final_logit_softcapping=5.0, num_key_value_heads=1,
                                     global_head_dim=16, rope_parameters={
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                         "full_attention": {"rope_type": "proportional", "rope_theta": 100000.0,
                                                            "partial_rotary_factor": 0.5}}),
}


@pytest.mark.parametrize("shape", list(GEMMA4_SHAPES))
def test_gemma4_text_matches_transformers(tmp_path, shape):
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    cfg = Gemma4TextConfig(**{**GEMMA4, **GEMMA4_SHAPES[shape]})
    hf = tiny_hf_model(cfg, Gemma4ForCausalLM)
    llm = check_parity(hf, save(hf, tmp_path), cfg.vocab_size)
    shared = cfg.num_kv_shared_layers
    if shared:  # rings and shared keys/values over the static cache
        check_static_engine(llm)
    assert [a.num_kv_heads == 0 for a in (layer.self_attn for layer in llm.model.model.layers)] == \
        [i >= cfg.num_hidden_layers - shared for i in range(cfg.num_hidden_layers)]


def test_gemma4_multimodal_checkpoint_matches_transformers(tmp_path):
    """Gemma4ForConditionalGeneration: text_config, weights under model.language_model.*, the vision
    tower left unread."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    text = {**GEMMA4, **GEMMA4_SHAPES["ple_shared_kv_moe_k_eq_v"], "final_logit_softcapping": 5.0}
    vision = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, head_dim=8)
    cfg = Gemma4Config(text_config=text, vision_config=vision, audio_config=None)
    hf = tiny_hf_model(cfg, Gemma4ForConditionalGeneration)
    folder = save(hf, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gemma4"
    llm = check_parity(hf, folder, text["vocab_size"])
    assert llm.model.final_logit_softcapping == 5.0


@pytest.mark.parametrize("bad, match", [(dict(num_kv_shared_layers=4), "shares the keys"),
                                        (dict(per_layer_config={"1": {"sliding_window": 3}}), "per_layer_config"),
                                        (dict(enable_moe_block=True, num_experts=2, top_k_experts=3,
                                              moe_intermediate_size=8), "top_k_experts"),
                                        (dict(use_bidirectional_attention="all"), "bidirectional")])
def test_gemma4_config_rejects_what_it_cannot_run(bad, match):
    from ember.errors import ConfigError
    from ember.registry import lookup

    raw = {"model_type": "gemma4_text", **GEMMA4, **bad}
    with pytest.raises(ConfigError, match=match):
        lookup(raw).parse_config(raw)


def test_phimoe_gguf_matches_transformers(tmp_path):
    """llama.cpp's phimoe architecture (the phi3 converter's metadata, experts merged into 3-D tensors,
    LayerNorm biases, attention and head biases) from a tiny model. The file has no router jitter:
    transformers' default (0.01) applies, as the model here has it."""
    from transformers import PhimoeConfig, PhimoeForCausalLM

    import ember
    import ggufmake as gm

    pytest.importorskip("gguf")
    cfg = PhimoeConfig(**{**PHIMOE, "attention_bias": True, "lm_head_bias": True, "vocab_size": 265, "sliding_window": 6})
    hf = tiny_hf_model(cfg, PhimoeForCausalLM)
    llm = ember.load(gm.hf_to_gguf(hf, tmp_path / "m.gguf"), dtype=torch.float32, device="cpu")
    assert llm.config.model_type == "phimoe" and llm.config.sliding_window == 6
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (llm.model(ids) - hf(ids).logits).abs().max().item() <= 1e-4
