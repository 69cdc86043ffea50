"""Gemma 3 against transformers on tiny random checkpoints: per-layer layer_types with a sliding
window shorter than the sequence, separate rotary tables for sliding and global layers, q/k norm,
final logit soft-capping small enough to change the output (and attn_logit_softcapping, which the
reference stores but never applies, not applied either); the text-only (gemma3_text) and the
multimodal (gemma3, text_config) checkpoint layouts; legacy config keys (rope_local_base_freq,
rope_scaling, sliding_window_pattern)."""
import json

import pytest
import torch

from parity import check_parity, save, tiny_hf_model

TEXT = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_attention_heads=4, max_position_embeddings=128,
            bos_token_id=None, eos_token_id=None, pad_token_id=None)

SHAPES = {
    # sliding, sliding, global; window 5; GQA; tied; the global layers' rope linearly scaled; final cap 5 and
    # an attention cap the reference stores but does not apply
    "pattern3_window5_gqa_tied": dict(
        num_hidden_layers=3, sliding_window_pattern=3, num_key_value_heads=2, head_dim=16, sliding_window=5,
        query_pre_attn_scalar=24, final_logit_softcapping=5.0, attn_logit_softcapping=2.0,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}),
    # explicit layer_types, window 8, MQA, head_dim 24 != 64 / 4, own lm_head
    "types_window8_mqa_untied": dict(
        num_hidden_layers=2, layer_types=["full_attention", "sliding_attention"], num_key_value_heads=1, head_dim=24,
        sliding_window=8, query_pre_attn_scalar=16, tie_word_embeddings=False),
}


def _caps(llm, ids, final: float | None, attention: float | None):
    """The soft-caps the test values would make bite. `final` is applied: removing it changes the
    logits. `attention` is stored but, as in transformers' Gemma 3, not applied: applying it would
    change the logits, so parity with the reference shows that neither side applies it."""
    m = llm.model
    attn = [layer.self_attn for layer in m.model.layers]
    assert m.final_logit_softcapping == final and all(a.softcap is None for a in attn)
    with torch.no_grad():
        ref = m(ids)
        if final is not None:
            m.final_logit_softcapping = None
            assert (m(ids) - ref).abs().max() > 1e-2, "final soft-cap does not change the logits"
            m.final_logit_softcapping = final
        if attention is not None:
            for a in attn:
                a.softcap = attention
            assert (m(ids) - ref).abs().max() > 1e-2, "an attention soft-cap would not change the logits"
            for a in attn:
                a.softcap = None


def _ids(vocab: int):
    return torch.randint(0, vocab, (1, 24), generator=torch.Generator().manual_seed(1))


def _text_config(**kw):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(**{**TEXT, **kw})


@pytest.mark.parametrize("shape", list(SHAPES))
def test_gemma3_text_matches_transformers(tmp_path, shape):
    cfg = _text_config(**SHAPES[shape])
    hf = tiny_hf_model(cfg)
    llm = check_parity(hf, save(hf, tmp_path), cfg.vocab_size)
    model = llm.model.model
    assert [layer.self_attn.window for layer in model.layers] == [
        cfg.sliding_window if t == "sliding_attention" else None for t in cfg.layer_types]
    assert model.layer_rope == cfg.layer_types
    assert not torch.equal(model.rotaries["full_attention"].inv_freq, model.rotaries["sliding_attention"].inv_freq)
    _caps(llm, _ids(cfg.vocab_size), cfg.final_logit_softcapping, cfg.attn_logit_softcapping)


def test_gemma3_legacy_config_keys(tmp_path):
    """A config written before rope_parameters (rope_theta, rope_local_base_freq, rope_scaling for the
    global layers, sliding_window_pattern instead of layer_types) loads to the same model."""
    import ember

    cfg = _text_config(**SHAPES["pattern3_window5_gqa_tied"])
    hf = tiny_hf_model(cfg)
    save(hf, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    for k in ("rope_parameters", "layer_types", "_sliding_window_pattern"):
        raw.pop(k, None)
    raw.update(rope_theta=1000.0, rope_local_base_freq=100.0, rope_scaling={"rope_type": "linear", "factor": 4.0},
               sliding_window_pattern=3)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    llm = ember.load(str(tmp_path), dtype=torch.float32, device="cpu")
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (llm.model(ids) - hf(ids).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("tie", [True, False])
def test_gemma3_multimodal_checkpoint_matches_transformers(tmp_path, tie):
    """Gemma3ForConditionalGeneration: text config nested under text_config, decoder weights under
    language_model.*; text-only prompts give the text model's logits (no final soft-cap there)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    text = _text_config(**SHAPES["types_window8_mqa_untied"], final_logit_softcapping=5.0)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, tie_word_embeddings=tie)
    hf = tiny_hf_model(cfg, Gemma3ForConditionalGeneration)
    folder = save(hf, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gemma3"
    llm = check_parity(hf, folder, text.vocab_size)
    _caps(llm, _ids(text.vocab_size), final=None, attention=None)
    # the text config's final cap would bite: parity shows that the multimodal model does not apply it
    with torch.no_grad():
        ref = llm.model(_ids(text.vocab_size))
        llm.model.final_logit_softcapping = text.final_logit_softcapping
        assert (llm.model(_ids(text.vocab_size)) - ref).abs().max() > 1e-2
    assert (llm.model.lm_head.weight is llm.model.model.embed_tokens.weight) == tie


@pytest.mark.parametrize("bad, match", [
    (dict(sliding_window_pattern=0), "sliding_window_pattern"), (dict(rope_local_base_freq=-1.0), "rope_local_base_freq"),
    (dict(head_dim=0), "head_dim")])
def test_gemma3_config_rejects_impossible_values(bad, match):
    from ember.errors import ConfigError
    from ember.registry import lookup

    raw = {"model_type": "gemma3_text", **TEXT, "num_hidden_layers": 2, **bad}
    with pytest.raises(ConfigError, match=match):
        lookup(raw).parse_config(raw)


def test_gemma3_multimodal_in_memory_weight_names(tmp_path):
    """The same checkpoint with transformers' in-memory names (model.language_model.*, lm_head.*)."""
    from safetensors.torch import load_file, save_file
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    import ember

    text = _text_config(**SHAPES["types_window8_mqa_untied"])
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, tie_word_embeddings=False)
    hf = tiny_hf_model(cfg, Gemma3ForConditionalGeneration)
    save(hf, tmp_path)
    f = tmp_path / "model.safetensors"
    tensors = load_file(str(f))
    renamed = {k.replace("language_model.model.", "model.language_model.").replace("language_model.lm_head", "lm_head"): v
               for k, v in tensors.items()}
    assert "model.language_model.embed_tokens.weight" in renamed and "lm_head.weight" in renamed
    save_file(renamed, str(f), metadata={"format": "pt"})
    llm = ember.load(str(tmp_path), dtype=torch.float32, device="cpu")
    ids = torch.randint(0, text.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (llm.model(ids) - hf(ids).logits).abs().max() <= 1e-4
