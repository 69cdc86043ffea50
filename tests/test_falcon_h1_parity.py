"""Falcon-H1 (Mamba-2 and attention side by side in every layer, µP multipliers) against transformers
on tiny random checkpoints, and its StateCache token by token against the uncached forward."""
import pytest
import torch

import ember
from ember.nn.state_cache import StateCache
from parity import check_cache_token_by_token, check_parity, models_by_shape

BASE = dict(vocab_size=256, pad_token_id=0, bos_token_id=None, eos_token_id=None, hidden_size=64,
            intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_state=16, mamba_n_groups=2,
            mamba_d_conv=4, mamba_chunk_size=8)

SHAPES = {
    # the multipliers of the released configs (not 1), no gated norm
    "mup": dict(embedding_multiplier=5.6, lm_head_multiplier=0.04, mlp_multipliers=[0.9, 0.6], key_multiplier=0.4,
                attention_in_multiplier=1.3, attention_out_multiplier=0.7, ssm_in_multiplier=1.1,
                ssm_out_multiplier=0.3, ssm_multipliers=[0.5, 0.8, 1.2, 0.9, 1.5], mamba_rms_norm=False),
    # the gated group norm, after and before the gate
    "norm_after_gate": dict(mamba_rms_norm=True, mamba_norm_before_gate=False, tie_word_embeddings=True,
                            mamba_conv_bias=False),
    "norm_before_gate": dict(mamba_rms_norm=True, mamba_norm_before_gate=True, projectors_bias=True,
                             ssm_multipliers=[1.0, 0.5, 1.0, 2.0, 1.0]),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    import transformers

    return models_by_shape(tmp_path_factory, lambda shape: transformers.FalconH1Config(**{**BASE, **SHAPES[shape]}))


@pytest.mark.parametrize("shape", list(SHAPES))
def test_falcon_h1_matches_transformers(built, shape):
    hf, folder = built(shape)
    llm = check_parity(hf, folder, 256)
    cache = llm.model.new_cache(2, 16)
    assert isinstance(cache, StateCache) and all(k.numel() for k in cache.k) and all(cache.states)


def test_state_cache_matches_the_uncached_forward_token_by_token(built):
    _, folder = built("mup")
    model = ember.load(folder, dtype=torch.float32, device="cpu").model
    check_cache_token_by_token(model, 256, length=18, chunks=(7, 11))
