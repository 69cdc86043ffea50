"""GGUF files of state-space and hybrid models (llama.cpp's mamba2, nemotron_h, falcon-h1, lfm2) written
from tiny transformers models as its converter writes them (tests/ggufconvert_ssm.py): ember's
logits from the file equal transformers' on the original model."""
import pytest
import torch

import ember
import ggufconvert_ssm as gc
from parity import tiny_hf_model

pytest.importorskip("gguf")

BASE = dict(vocab_size=265, hidden_size=64, num_hidden_layers=2, pad_token_id=None, bos_token_id=None,
            eos_token_id=None)
MODELS = {
    "mamba2": ("Mamba2Config", dict(num_heads=8, head_dim=16, state_size=16, n_groups=2, chunk_size=8)),
    "nemotron_h": ("NemotronHConfig", dict(layers_block_type=["linear_attention", "mlp", "full_attention", "mlp"],
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                           intermediate_size=96, mamba_num_heads=8, mamba_head_dim=16,
                                           ssm_state_size=16, n_groups=2, chunk_size=8,
                                           time_step_min=1e-9)),  # (no dt clamp: llama.cpp has none)
    # the µP multipliers folded into the weights by the converter; gated norm after the gate
    "falcon_h1": ("FalconH1Config", dict(intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128, mamba_d_ssm=64, mamba_n_heads=4,
                                         mamba_d_state=16, mamba_n_groups=2, mamba_chunk_size=8, mamba_rms_norm=True,
                                         mamba_norm_before_gate=False, tie_word_embeddings=False,
                                         embedding_multiplier=5.6, lm_head_multiplier=0.04, mlp_multipliers=[0.9, 0.6],
                                         key_multiplier=0.4, attention_in_multiplier=1.3, attention_out_multiplier=0.7,
                                         ssm_in_multiplier=1.1, ssm_out_multiplier=0.3,
                                         ssm_multipliers=[0.5, 0.8, 1.2, 0.9, 1.5])),
    # short-conv and attention layers, the MLP width adjusted by the converter
    "lfm2": ("Lfm2Config", dict(intermediate_size=96, block_multiple_of=32, num_hidden_layers=3,
                                layer_types=["conv", "full_attention", "conv"], num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)),
    # Granite 4: MoE with the shared MLP, NoPE, multipliers; and the dense form (the shared MLP as ffn_*)
    "granite4_moe": ("GraniteMoeHybridConfig", dict(
        intermediate_size=32, shared_intermediate_size=48, num_hidden_layers=3, layer_types=["mamba", "attention", "mamba"],
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        position_embedding_type=None, max_position_embeddings=128, embedding_multiplier=2.0, residual_multiplier=0.5,
        attention_multiplier=0.2, logits_scaling=2.0, mamba_n_heads=8, mamba_n_groups=2, mamba_d_state=16,
        mamba_d_conv=4, mamba_chunk_size=8)),
    "granite4_dense": ("GraniteMoeHybridConfig", dict(
        hidden_size=48, shared_intermediate_size=64, num_hidden_layers=2, layer_types=["attention", "mamba"],
        num_attention_heads=4, num_key_value_heads=1, num_local_experts=0, attention_multiplier=0.25,
        max_position_embeddings=128, mamba_n_heads=6, mamba_n_groups=1, mamba_d_state=8, mamba_d_conv=3,
        mamba_chunk_size=16)),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", list(MODELS))
def test_ssm_gguf_matches_transformers(name, tmp_path):
    import transformers

    cls, kw = MODELS[name]
    hf = tiny_hf_model(getattr(transformers, cls)(**{**BASE, **kw}))
    path = gc.convert(hf, tmp_path / f"{name}.gguf")
    llm = ember.load(path, dtype=torch.float32, device="cpu")
    assert llm._loaded.entry.model_type == hf.config.model_type
    ids = torch.randint(0, 265, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(llm.model(ids), hf(ids).logits, atol=1e-4, rtol=0)
