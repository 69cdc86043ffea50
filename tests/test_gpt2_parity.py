"""GPT-2 against transformers on tiny random checkpoints: Conv1D weights, learned positions,
tied and untied heads, layer-index attention scaling, and checkpoints with and without the
`transformer.` prefix.

transformers' GPT-2 numbers positions 0.. by index unless position_ids are given; check_parity
passes the padding-aware position_ids to the reference, so left padding is compared fairly."""
import pytest
import torch

from parity import check_parity, save, save_state_dict, tiny_hf_model

BASE = dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=None,
            eos_token_id=None, pad_token_id=None)

SHAPES = {
    "tied": dict(),
    "untied_inner_relu_layer_scaled": dict(tie_word_embeddings=False, n_inner=96, activation_function="relu",
                                           scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True),
    "unscaled_gelu": dict(n_head=2, scale_attn_weights=False, activation_function="gelu"),
}


def _cfg(**kw):
    from transformers import GPT2Config

    return GPT2Config(**{**BASE, **kw})


@pytest.mark.parametrize("shape", list(SHAPES))
def test_gpt2_matches_transformers(tmp_path, shape):
    cfg = _cfg(**SHAPES[shape])
    hf = tiny_hf_model(cfg)
    check_parity(hf, save(hf, tmp_path), cfg.vocab_size)


def test_gpt2_checkpoint_without_transformer_prefix(tmp_path):
    """The original `gpt2` repositories store GPT2Model's tensors: `h.0.attn.c_attn.weight`, `wte.weight`."""
    from ember.io.safetensors import save_file

    cfg = _cfg(tie_word_embeddings=True)
    hf = tiny_hf_model(cfg)
    hf.config.save_pretrained(tmp_path)
    save_file(hf.transformer.state_dict(), tmp_path / "model.safetensors")
    check_parity(hf, str(tmp_path), cfg.vocab_size)


def test_gpt2_weights_are_transposed_once_at_load(tmp_path):
    import ember

    cfg = _cfg()
    hf = tiny_hf_model(cfg)
    llm = ember.load(save(hf, tmp_path), dtype=torch.float32)
    attn = llm.model.model.layers[0].self_attn
    ref = hf.transformer.h[0].attn.c_attn
    assert torch.equal(attn.c_attn.weight, ref.weight.t())  # stored [out, in]: a plain F.linear per forward
    assert attn.c_attn.weight.is_contiguous()


@pytest.mark.parametrize("bad", [dict(n_embd=64, n_head=5), dict(n_layer=0), dict(activation_function="nope"),
                                 dict(add_cross_attention=True)])
def test_gpt2_config_rejects_impossible_values(bad):
    from ember import registry
    from ember.errors import ConfigError

    with pytest.raises(ConfigError):
        registry.lookup({"model_type": "gpt2"}).parse_config({"model_type": "gpt2", **bad})
