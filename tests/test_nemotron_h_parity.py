"""Nemotron-H (Mamba-2 / NoPE attention / relu² MLP / MoE blocks) against transformers on tiny random
checkpoints, and its StateCache token by token against the uncached forward."""
import pytest
import torch

import ember
from ember.errors import ConfigError
from ember.nn.state_cache import StateCache
from parity import check_cache_token_by_token, check_parity, models_by_shape

BASE = dict(vocab_size=256, pad_token_id=0, bos_token_id=None, eos_token_id=None, hidden_size=64,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96, mamba_num_heads=8,
            mamba_head_dim=16, ssm_state_size=16, n_groups=2, conv_kernel=4, chunk_size=8, max_position_embeddings=128)

SHAPES = {
    # every block type; MoE with groups, a correction bias and a latent width
    "all_blocks": dict(layers_block_type=["linear_attention", "moe", "full_attention", "mlp", "linear_attention"],
                       n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                       moe_shared_expert_intermediate_size=48, moe_latent_size=32, n_group=2, topk_group=1,
                       routed_scaling_factor=2.5,
                       # dt unclamped (the default clamps it at 0.001 in a prefill but not in a decode step, in
                       # transformers too, so its cached decode differs from its uncached forward; "dense" keeps it)
                       time_step_min=1e-9),
    # the dense model's pattern (Nemotron-H 8B style), untied head
    "dense": dict(layers_block_type=["linear_attention", "mlp", "full_attention", "mlp"], tie_word_embeddings=False,
                  n_groups=1, use_conv_bias=False),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _nonzero_bias(hf) -> None:
    """A nonzero routing correction bias, so that it matters for the choice."""
    with torch.no_grad():
        for m in hf.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.copy_(torch.linspace(-0.2, 0.2, m.e_score_correction_bias.numel()))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    import transformers

    return models_by_shape(tmp_path_factory, lambda shape: transformers.NemotronHConfig(**{**BASE, **SHAPES[shape]}),
                           _nonzero_bias)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_nemotron_h_matches_transformers(built, shape):
    hf, folder = built(shape)
    llm = check_parity(hf, folder, 256)
    cache = llm.model.new_cache(2, 16)
    assert isinstance(cache, StateCache)
    kinds = SHAPES[shape]["layers_block_type"]
    assert [k.numel() > 0 for k in cache.k] == [t == "full_attention" for t in kinds]
    assert [s is not None for s in cache.states] == [t == "linear_attention" for t in kinds]


def test_state_cache_matches_the_uncached_forward_token_by_token(built):
    _, folder = built("all_blocks")
    model = ember.load(folder, dtype=torch.float32, device="cpu").model
    check_cache_token_by_token(model, 256, length=18, chunks=(7, 11))


def test_hybrid_override_pattern_and_bad_blocks(built, tmp_path):
    import json
    import shutil

    _, folder = built("dense")
    d = tmp_path / "m"
    shutil.copytree(folder, d)
    cfg = json.loads((d / "config.json").read_text())
    want = ember.load(folder, dtype=torch.float32).model(torch.tensor([[3, 4, 5]]))
    cfg.pop("layers_block_type", None)
    cfg.pop("layer_types", None)
    cfg["hybrid_override_pattern"] = "M-*-"
    (d / "config.json").write_text(json.dumps(cfg))
    torch.testing.assert_close(ember.load(d, dtype=torch.float32).model(torch.tensor([[3, 4, 5]])), want)
    cfg["hybrid_override_pattern"] = "M-X-"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="hybrid_override_pattern"):
        ember.load(d, dtype=torch.float32)
