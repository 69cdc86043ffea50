"""GGUF files of the families ember gained in 2026 (llama.cpp's deepseek2, gpt-oss, glm4, glm4moe,
smollm3, olmo2 (OLMo 2 and 3), exaone4, ernie4_5, ernie4_5-moe, hunyuan-dense, seed_oss, command-r,
cohere2, granitemoe, olmoe, minimax-m2, bloom, falcon, starcoder), written from tiny transformers
models as convert_hf_to_gguf.py writes them (tests/ggufconvert.py), against transformers; with
EMBER_LLAMA_CPP set to a llama.cpp tree, also written by that converter itself."""
import os

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


def _dequantised_twin(path, out):
    """The same GGUF file with every tensor dequantised to F32 by gguf.quants (same names, same metadata)."""
    import gguf
    import numpy as np

    import ggufmake as gm

    r = gguf.GGUFReader(str(path))
    meta = {}
    for field in r.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        vt = field.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            meta[field.name] = (list(field.contents()), gm.ARR)
        else:
            meta[field.name] = (field.contents(), int(vt))
    tensors = {t.name: (np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(
        tuple(reversed([int(d) for d in t.shape]))), None) for t in r.tensors}
    return gm.write(out, r.fields["general.architecture"].contents(), meta, tensors)


# quantised files keep their blocks through the row orders (Bloom's QKV, the Q/K permutation) and the
# group-limited MoE's experts, and dequantise the parts of Derived tensors (DeepSeek's k_b/v_b,
# GPT-OSS's and GraniteMoE's experts)
@pytest.mark.parametrize("kind", ["bloom", "granitemoe", "deepseek_v3", "gpt_oss"])
def test_quantised_family_gguf_matches_its_dequantised_twin(tmp_path, kind, monkeypatch):
    from ember import transforms
    from ember.io import ggml, iquants

    hf = _hf(kind, hidden_size=128, intermediate_size=64) if kind != "bloom" else _hf(kind, hidden_size=128)
    # GPT-OSS's experts in MXFP4, as llama.cpp writes them; the rest Q8_0
    qtype = (lambda name: iquants.MXFP4 if "_exps." in name else ggml.Q8_0) if kind == "gpt_oss" else ggml.Q8_0
    path = gc.convert(hf, tmp_path / "q.gguf", qtype=qtype)
    assert any(t.ggml_type == ggml.Q8_0 for t in GGUFFile(path).tensors.values())
    twin = _dequantised_twin(path, tmp_path / "f.gguf")
    monkeypatch.setattr(transforms, "native_kernels", lambda device: False)
    with torch.no_grad():
        want = ember.load(twin, dtype=torch.float32, device="cpu").model(_ids(2))
        kept = ember.load(path, dtype=torch.float32, device="cpu", keep_quantized=True)
        assert kept._loaded.quantized
        assert (kept.model(_ids(2)) - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())


def test_deepseek2_gguf_with_unsplit_kv_b(tmp_path):
    """Files written before llama.cpp split kv_b (attn_kv_b, key/value lengths without _mla) load too."""
    hf = _hf("deepseek_v2")
    c = hf.config
    old = {k: v for k, v in gc.metadata(c, "deepseek2").items() if "_mla" not in k}
    old["deepseek2.attention.key_length"] = c.qk_nope_head_dim + c.qk_rope_head_dim
    old["deepseek2.attention.value_length"] = c.v_head_dim
    tensors = {}
    for name, w in gc.gguf_tensors(hf):
        if ".attn_v_b." in name:
            continue
        if ".attn_k_b." in name:
            i = name.split(".")[1]
            name, w = f"blk.{i}.attn_kv_b.weight", hf.state_dict()[f"model.layers.{i}.self_attn.kv_b_proj.weight"].numpy()
        tensors[name] = (w, None)
    import ggufmake as gm

    path = gm.write(tmp_path / "old.gguf", "deepseek2", {**old, **gm.tokenizer_meta()}, tensors)
    with torch.no_grad():
        got = ember.load(path, dtype=torch.float32, device="cpu").model(_ids())
        assert (got - hf(_ids()).logits).abs().max().item() <= 1e-4


def test_bad_family_files_are_ember_errors_naming_the_problem(tmp_path):
    from ember.errors import CheckpointError, ConfigError, EmberError

    hf = _hf("deepseek_v2")
    # half of the split kv_b: the missing tensor is named
    p = gc.convert(hf, tmp_path / "half.gguf", drop=("blk.1.attn_v_b.weight",))
    with pytest.raises(EmberError, match="kv_b_proj"):
        ember.load(p, dtype=torch.float32)
    # k_b and v_b that do not combine
    p = gc.convert(hf, tmp_path / "k.gguf", extra_meta={"deepseek2.attention.key_length_mla": 20})
    with pytest.raises(EmberError, match="kv_b|attn_k_b|shape"):
        ember.load(p, dtype=torch.float32)
    p = gc.convert(_hf("falcon"), tmp_path / "f.gguf", extra_meta={"falcon.attention.head_count_kv": 3})
    with pytest.raises(ConfigError, match="head_count_kv"):
        ember.load(p)
    for heads in (5, 7):  # heads that do not split the hidden size (nor the fused QKV rows)
        p = gc.convert(_hf("bloom"), tmp_path / f"b{heads}.gguf", extra_meta={"bloom.attention.head_count": heads})
        with pytest.raises((CheckpointError, ConfigError), match="rows|head"):
            ember.load(p, dtype=torch.float32)


def test_glm4moe_gguf_with_its_multi_token_prediction_layer(tmp_path):
    """GLM-4.5 files count the MTP layer the converter appends in block_count (nextn_predict_layers);
    it is left unused."""
    import numpy as np

    import ggufmake as gm

    hf = _hf("glm4_moe")
    c = hf.config
    tensors = {n: (w, None) for n, w in gc.gguf_tensors(hf)}
    last = c.num_hidden_layers - 1
    for n, w in list(tensors.items()):
        if n.startswith(f"blk.{last}."):
            tensors[n.replace(f"blk.{last}.", f"blk.{last + 1}.")] = w
    tensors[f"blk.{last + 1}.nextn.eh_proj.weight"] = (np.zeros((c.hidden_size, 2 * c.hidden_size), np.float32), None)
    meta = {**gc.metadata(c, "glm4moe"), "glm4moe.block_count": c.num_hidden_layers + 1,
            "glm4moe.nextn_predict_layers": 1, **gm.tokenizer_meta()}
    path = gm.write(tmp_path / "mtp.gguf", "glm4moe", meta, tensors)
    assert gguf_config(GGUFFile(path))["num_hidden_layers"] == c.num_hidden_layers
    with torch.no_grad():
        got = ember.load(path, dtype=torch.float32, device="cpu").model(_ids())
        assert (got - hf(_ids()).logits).abs().max().item() <= 1e-4


LLAMA_CPP = os.environ.get("EMBER_LLAMA_CPP", "")
# transformers' config.json lacks what the Hub's have and the converter reads
HUB_FIELDS = {"deepseek_v3": {"scoring_func": "sigmoid"}, "cohere2": {"rotary_pct": 1.0}}


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(os.path.join(LLAMA_CPP, "convert_hf_to_gguf.py")),
                    reason="EMBER_LLAMA_CPP names no llama.cpp source tree")
@pytest.mark.parametrize("kind", [k for k in MODELS if k != "falcon_7b"])
def test_files_of_llama_cpps_own_converter_match_transformers(tmp_path, kind):
    """The same tiny models converted by llama.cpp's convert_hf_to_gguf.py itself (EMBER_LLAMA_CPP: a
    llama.cpp tree, e.g. llama-cpp-python's sdist's vendor/llama.cpp): a check on tests/ggufconvert.py.
    (Falcon-7B's shape is left out: transformers writes num_kv_heads into its config.json, which the
    converter then reads as KV groups.)"""
    import subprocess
    import sys

    hf = _hf(kind)
    for k, v in HUB_FIELDS.get(kind, {}).items():
        setattr(hf.config, k, v)
    hf.save_pretrained(tmp_path / "hf")
    out = tmp_path / "m.gguf"
    subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "llamacpp_convert.py"), LLAMA_CPP,
                    str(tmp_path / "hf"), str(out)], check=True, capture_output=True, timeout=300)
    with torch.no_grad():
        got = ember.load(out, dtype=torch.float32, device="cpu").model(_ids())
        assert (got - hf(_ids()).logits).abs().max().item() <= 1e-4
