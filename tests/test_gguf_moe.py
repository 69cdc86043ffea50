"""Mixture-of-experts GGUF files (llama.cpp's names: `ffn_gate_inp` router, `ffn_{gate,up,down}_exps`
stacked experts, Qwen2-MoE's `ffn_*_shexp` shared expert and `ffn_gate_inp_shexp` gate) for Mixtral
(llama architecture with `llama.expert_count`), Qwen2-MoE (`qwen2moe`) and Qwen3-MoE (`qwen3moe`),
written from tiny transformers models as convert_hf_to_gguf.py writes them, against transformers."""
import pytest
import torch

import ember
from ember.errors import ConfigError, EmberError, ShapeMismatchError, TensorNotFoundError
from ember.io import ggml, iquants
from ember.io.gguf import GGUFFile
from ember.loading import gguf_config

import ggufmake as gm

pytest.importorskip("gguf")

BASE = dict(vocab_size=265, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, bos_token_id=None, eos_token_id=None, pad_token_id=None)
MODELS = {
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=48)),
    # llama.cpp always renormalises Qwen3-MoE's top k (as every released Qwen3-MoE config says)
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=6, num_experts_per_tok=3, moe_intermediate_size=32, head_dim=32,
                                         norm_topk_prob=True)),
    # top-1 routing, tied embeddings, MQA, normalised top k via expert_weights_norm (see below)
    "qwen2_moe_top1_tied_mqa": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=1, moe_intermediate_size=32,
                                                       shared_expert_intermediate_size=64, tie_word_embeddings=True,
                                                       num_key_value_heads=1, norm_topk_prob=True)),
}


def _hf(kind: str, **over):
    import transformers as tf

    from parity import tiny_hf_model

    cls, extra = MODELS[kind]
    return tiny_hf_model(getattr(tf, cls)(**{**BASE, **extra, **over}))


def _ids(seed: int = 0):
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", list(MODELS))
def test_moe_gguf_config_and_logits_match_transformers(tmp_path, kind):
    hf = _hf(kind)
    # llama.cpp's qwen2moe never renormalises the top k, unless the file says expert_weights_norm
    norm = {"qwen2moe.expert_weights_norm": True} if kind == "qwen2_moe_top1_tied_mqa" else {}
    path = gm.hf_to_gguf(hf, tmp_path / "m.gguf", extra_meta=norm)
    raw, c = gguf_config(GGUFFile(path)), hf.config
    assert raw.get("norm_topk_prob", True) == getattr(c, "norm_topk_prob", True)  # Mixtral: always
    assert raw["model_type"] == c.model_type
    assert raw["num_local_experts"] == (getattr(c, "num_local_experts", None) or c.num_experts)
    assert raw["num_experts_per_tok"] == c.num_experts_per_tok
    assert raw["moe_intermediate_size"] == getattr(c, "moe_intermediate_size", c.intermediate_size)
    assert raw.get("shared_expert_intermediate_size") == getattr(c, "shared_expert_intermediate_size", None)
    assert raw.get("tie_word_embeddings") == c.tie_word_embeddings
    llm = ember.load(path, dtype=torch.float32, device="cpu")
    assert llm.config.model_type == c.model_type
    with torch.no_grad():
        ref, got = hf(_ids()).logits, llm.model(_ids())
    assert (got - ref).abs().max().item() <= 1e-4
    assert llm.generate([5, 6, 7], max_tokens=6, ignore_eos=True)  # and it decodes through the cache


QUANTISED = {
    # Q8_0 everywhere a row is whole blocks (the routers stay F32, as the converter leaves them)
    "mixtral-Q8_0": ("mixtral", {}, lambda name: ggml.Q8_0),
    "qwen2_moe-Q4_K": ("qwen2_moe", dict(hidden_size=256, moe_intermediate_size=256, shared_expert_intermediate_size=256,
                                         intermediate_size=256), lambda name: ggml.Q4_K),
    # experts in i-quants and MXFP4 (GPT-OSS-style MXFP4 experts), attention in IQ4_XS
    "qwen3_moe-iquants": ("qwen3_moe", dict(hidden_size=256, moe_intermediate_size=256, intermediate_size=256),
                          lambda name: {"ffn_gate_exps": iquants.IQ2_XXS, "ffn_up_exps": iquants.MXFP4,
                                        "ffn_down_exps": iquants.IQ3_S}.get(name.split(".")[-2], iquants.IQ4_XS)),
}


@pytest.mark.parametrize("case", list(QUANTISED))
def test_quantised_moe_gguf_matches_its_weights_dequantised_by_gguf(tmp_path, case, monkeypatch):
    """The reference: the same transformers model holding the file's weights as gguf.quants
    dequantises them. ember: dequantised at load, and kept as blocks on the pure-PyTorch layers
    (each expert three QuantLinears on views of the file's 3-D expert tensors)."""
    from ember import transforms
    from ember.nn.moe import Expert
    from ember.nn.quantized import QuantLinear

    kind, over, qtype = QUANTISED[case]
    hf = _hf(kind, **over)
    path = gm.hf_to_gguf(hf, tmp_path / "m.gguf", qtype=qtype)
    f = GGUFFile(path)
    exps = [t for n, t in f.tensors.items() if n.endswith("_exps.weight")]
    assert exps and all(len(t.shape) == 3 and t.ggml_type not in ggml.FLOAT_TYPES for t in exps)
    ref = gm.with_gguf_weights(hf, path)
    with torch.no_grad():
        want = ref(_ids(1)).logits
        got = ember.load(path, dtype=torch.float32, device="cpu", keep_quantized=False).model(_ids(1))
        assert (got - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())
        monkeypatch.setattr(transforms, "native_kernels", lambda device: False)
        kept = ember.load(path, dtype=torch.float32, device="cpu", keep_quantized=True)
        assert kept._loaded.quantized
        experts = [m for m in kept.model.modules() if isinstance(m, Expert)]
        assert len(experts) == hf.config.num_hidden_layers * exps[0].shape[0]
        assert all(isinstance(p, QuantLinear) for e in experts for p in (e.gate_proj, e.up_proj, e.down_proj))
        assert (kept.model(_ids(1)) - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())


def test_bad_moe_files_are_ember_errors_naming_the_problem(tmp_path):
    hf = _hf("qwen3_moe")
    p = gm.hf_to_gguf(hf, tmp_path / "k.gguf", extra_meta={"qwen3moe.expert_used_count": 7})
    with pytest.raises(ConfigError, match="expert_used_count"):
        ember.load(p)
    p = gm.hf_to_gguf(hf, tmp_path / "n.gguf", extra_meta={"qwen3moe.expert_count": 1 << 30})
    with pytest.raises(ConfigError, match="expert_count"):
        ember.load(p)
    p = gm.hf_to_gguf(hf, tmp_path / "w.gguf", extra_meta={"qwen3moe.expert_feed_forward_length": 48})
    with pytest.raises(ShapeMismatchError, match="ffn_gate_exps|gate_proj"):
        ember.load(p)
    p = gm.hf_to_gguf(hf, tmp_path / "d.gguf", drop=("blk.1.ffn_up_exps.weight",))
    with pytest.raises(TensorNotFoundError, match="up_proj"):
        ember.load(p)
    p = gm.hf_to_gguf(_hf("mixtral"), tmp_path / "m.gguf", extra_meta={"llama.expert_used_count": "two"})
    with pytest.raises(EmberError, match="expert_used_count"):
        ember.load(p)


def test_quantised_experts_stay_blocks_and_run_on_the_native_kernels(tmp_path):
    """The default on a CPU ember's kernels build for: every expert projection stays Q8_0 blocks (views
    on the file, no dense copy) and computes on the native kernel; types the kernels lack (i-quants)
    are dequantised once per expert."""
    from ember.backends import native
    from ember.nn.layers import Linear
    from ember.nn.moe import Expert

    if not native.available():
        pytest.skip("ember's native kernels do not build here")
    hf = _hf("qwen3_moe", hidden_size=256, moe_intermediate_size=256, intermediate_size=256)
    q8 = gm.hf_to_gguf(hf, tmp_path / "q8.gguf", qtype=ggml.Q8_0)
    llm = ember.load(q8, dtype=torch.float32, device="cpu")
    experts = [m for m in llm.model.modules() if isinstance(m, Expert)]
    projs = [p for e in experts for p in (e.gate_proj, e.up_proj, e.down_proj)]
    assert experts and all(isinstance(p, native.NativeQuantLinear) for p in projs)
    assert sum(p.qweight.numel() for p in projs) < 0.3 * sum(p.in_features * p.out_features * 4 for p in projs)
    ref = gm.with_gguf_weights(hf, q8)
    with torch.no_grad():  # int8 activations, as llama.cpp: close, not equal (a router may flip a near-tie)
        got, want = llm.model(_ids(2)), ref(_ids(2)).logits
    cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
    assert cos > 0.98, cos
    iq = gm.hf_to_gguf(hf, tmp_path / "iq.gguf", qtype=iquants.IQ4_XS)
    llm = ember.load(iq, dtype=torch.float32, device="cpu")
    experts = [m for m in llm.model.modules() if isinstance(m, Expert)]
    assert experts and all(isinstance(e.down_proj, Linear) for e in experts)
