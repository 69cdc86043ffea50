"""GGUF: dequantisers, packed layers, the reader's validation, metadata/tensor mapping per family,
and the tokenizer, on synthetic files (fast; the real files are in test_gguf_real.py)."""
import numpy as np
import pytest
import torch

import ember
from ember.errors import CheckpointError, ConfigError, EmberError, UnsupportedModelError
from ember.io import ggml
from ember import registry
from ember.gguf_source import GGUFSource, architecture
from ember.io.gguf import GGUFFile
from ember.loading import describe_gguf, gguf_config as config_dict


def family_for(f):
    arch = architecture(f)
    return arch, registry.lookup_gguf(arch).gguf_mapping(arch)

import ggufmake as gm

gguf = pytest.importorskip("gguf")

# byte offsets of the fp16 fields of each block type (random bytes there could be NaN/inf)
F16_FIELDS = {ggml.Q4_0: [0], ggml.Q4_1: [0, 2], ggml.Q5_0: [0], ggml.Q5_1: [0, 2], ggml.Q8_0: [0],
              ggml.Q2_K: [80, 82], ggml.Q3_K: [108], ggml.Q4_K: [0, 2], ggml.Q5_K: [0, 2], ggml.Q6_K: [208]}


def random_blocks(qtype: int, rows: int, blocks_per_row: int, seed: int = 0) -> np.ndarray:
    """Random raw blocks with finite fp16 scales (every other bit pattern is valid)."""
    rng = np.random.default_rng(seed)
    n, nb = ggml.block_size(qtype)
    raw = rng.integers(0, 256, size=(rows, blocks_per_row * nb), dtype=np.uint8)
    blocks = raw.reshape(-1, nb)
    for at in F16_FIELDS[qtype]:
        blocks[:, at:at + 2] = (rng.standard_normal(blocks.shape[0]) * 0.05).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw


# ---- dequantisation -----------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", ggml.QUANT_TYPES, ids=ggml.type_name)
def test_dequantize_random_blocks_equals_reference(qtype):
    n, _ = ggml.block_size(qtype)
    raw = random_blocks(qtype, 24, 3)
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(qtype))
    got = ggml.dequantize(torch.from_numpy(raw), qtype, (24, 3 * n)).numpy()
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert np.array_equal(got, ref)


@pytest.mark.parametrize("qtype", [ggml.Q4_0, ggml.Q4_1, ggml.Q5_0, ggml.Q5_1, ggml.Q8_0], ids=ggml.type_name)
def test_dequantize_quantized_values_equals_reference(qtype):
    values = np.random.default_rng(1).standard_normal((16, 256)).astype(np.float32)
    raw = gguf.quants.quantize(values, gguf.GGMLQuantizationType(qtype))
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(qtype))
    got = ggml.dequantize(torch.from_numpy(raw), qtype, values.shape).numpy()
    assert np.array_equal(got, ref)
    assert np.abs(got - values).max() < 0.5  # it is a quantisation of the values


@pytest.mark.parametrize("qtype", [ggml.F32, ggml.F16, ggml.BF16], ids=ggml.type_name)
def test_float_types_equal_reference(qtype):
    values = np.random.default_rng(2).standard_normal((4, 64)).astype(np.float32)
    if qtype == ggml.BF16:
        raw = gguf.quants.quantize(values, gguf.GGMLQuantizationType.BF16)
        ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.BF16)
    else:
        raw = values.astype(np.float32 if qtype == ggml.F32 else np.float16)
        ref = raw.astype(np.float32)
    got = ggml.dequantize(torch.from_numpy(raw.view(np.uint8)), qtype, values.shape).numpy()
    assert np.array_equal(got, ref)


def test_dequantize_large_tensor_in_chunks_and_to_bf16():
    raw = random_blocks(ggml.Q6_K, 64, 40, seed=3)  # 2560 blocks: several chunks
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q6_K)
    old = ggml.CHUNK_BLOCKS
    ggml.CHUNK_BLOCKS = 64
    try:
        got = ggml.dequantize(torch.from_numpy(raw), ggml.Q6_K, ref.shape)
        bf = ggml.dequantize(torch.from_numpy(raw), ggml.Q6_K, ref.shape, torch.bfloat16)
    finally:
        ggml.CHUNK_BLOCKS = old
    assert np.array_equal(got.numpy(), ref)
    assert torch.equal(bf, torch.from_numpy(ref).bfloat16())


# ---- packed layers ------------------------------------------------------------------------------
def _packed(qtype, rows=40, blocks=3, seed=0, dtype=None):
    from ember.io.ggml_weight import GGMLWeight

    n, _ = ggml.block_size(qtype)
    raw = torch.from_numpy(random_blocks(qtype, rows, blocks, seed))
    return GGMLWeight(raw, qtype, (rows, blocks * n), dtype=dtype)


@pytest.mark.parametrize("qtype", ggml.QUANT_TYPES, ids=ggml.type_name)
def test_quant_linear_equals_dense_linear(qtype, monkeypatch):
    import ember.nn.quantized as q

    w = _packed(qtype)
    bias = torch.randn(w.shape[0])
    dense = w.dequantize(torch.float32)
    monkeypatch.setattr(q, "SLAB_VALUES", 8 * w.shape[1])  # several slabs of rows
    lin = q.quantized_linear(w, bias)
    x = torch.randn(2, 5, w.shape[1])
    # slabs of rows are separate matmuls: equal up to the BLAS summation order
    ref = torch.nn.functional.linear(x, dense, bias)
    torch.testing.assert_close(lin(x), ref, rtol=0, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("qtype", [ggml.Q4_0, ggml.Q4_1, ggml.Q4_K, ggml.Q5_0, ggml.Q5_1, ggml.Q5_K, ggml.Q8_0],
                         ids=ggml.type_name)
def test_int4_kernel_path_close_to_dense_in_bf16(qtype):
    from ember.backends import int4
    from ember.nn.quantized import QuantLinear

    # the int4 planes rebuild the reference weights (float32 arithmetic)
    w = _packed(qtype, rows=208, blocks=2, dtype=torch.bfloat16)  # 3 x 64 rows + a 16-row tail
    rebuilt = sum((codes.float() - 8).view(w.shape[0], -1, 32) * scale[..., None] + zero[..., None]
                  for codes, scale, zero in int4.int4_terms(w.data, qtype, *w.shape))
    ref_w = w.dequantize(torch.float32)
    torch.testing.assert_close(rebuilt.view(w.shape), ref_w, rtol=1e-5, atol=1e-5 * ref_w.abs().max().item())
    if not int4.int4_kernel_available():
        pytest.skip("this torch has no CPU int4 kernel")
    old, int4.INT4_CHUNK_VALUES = int4.INT4_CHUNK_VALUES, 64 * w.shape[1]  # converted in chunks of 64 rows
    try:
        model = torch.nn.Sequential(QuantLinear(w, None))
        assert int4.to_int4(model) == 1
        lin = model[0]
    finally:
        int4.INT4_CHUNK_VALUES = old
    assert isinstance(lin, int4.Int4Linear) and lin.int4_terms > 0
    x = torch.randn(3, w.shape[1]).bfloat16()
    ref = torch.nn.functional.linear(x.float(), ref_w)
    got = lin(x).float()
    assert (got - ref).abs().max() <= 0.02 * ref.abs().max()


@pytest.mark.parametrize("qtype", ggml.QUANT_TYPES, ids=ggml.type_name)
def test_native_quant_transform_matches_the_reference_layer(qtype):
    """The native-quant transform swaps QuantLinear for ember's kernel where the type has one; the
    output stays within the int8-activation error of the pure-PyTorch layer it replaced."""
    from ember import transforms
    from ember.backends import native
    from ember.nn.quantized import QuantLinear

    w = _packed(qtype, rows=48, blocks=2)
    model = torch.nn.Sequential(QuantLinear(w, torch.randn(48)))
    x = torch.randn(3, w.shape[1])
    ref = model(x)
    changed = transforms.apply(model, [transforms.NATIVE_QUANT])
    if not native.available():
        assert changed == [] and isinstance(model[0], QuantLinear)
        return
    from ember import kernels

    assert (changed == ["native-quant"]) == kernels.supported(qtype)
    got = model(x)
    assert (got - ref).abs().max() <= 0.03 * ref.abs().max() + 1e-3


def test_quant_embedding_and_mixed_type_fusion():
    from ember.io.ggml_weight import GGMLWeightGroup
    from ember.nn.quantized import ConcatLinear, QuantEmbedding, quantized_linear

    w = _packed(ggml.Q8_0, rows=50)
    emb = QuantEmbedding(w, torch.float32)
    ids = torch.tensor([[0, 7, 49], [3, 3, 1]])
    assert torch.equal(emb(ids), torch.nn.functional.embedding(ids, w.dequantize()))
    a, b = _packed(ggml.Q5_0, rows=8), _packed(ggml.Q8_0, rows=4, seed=1)
    group = a.cat_rows([a, b])
    assert isinstance(group, GGMLWeightGroup) and tuple(group.shape) == (12, a.shape[1])
    lin = quantized_linear(group, torch.randn(12))
    assert isinstance(lin, ConcatLinear)
    x = torch.randn(2, a.shape[1])
    bias = torch.cat([p.bias for p in lin.parts])
    torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, group.dequantize(), bias), rtol=0, atol=1e-4)
    same = a.cat_rows([a, _packed(ggml.Q5_0, rows=4, seed=2)])
    assert same.data.shape[0] == 12 and same.ggml_type == ggml.Q5_0


# ---- tiny models of each family, converted as llama.cpp does ------------------------------------
BASE = dict(vocab_size=265, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def _hf_model(kind: str):
    import transformers as tf

    from parity import tiny_hf_model

    cfgs = {
        "llama": lambda: tf.LlamaConfig(**{**BASE, "num_key_value_heads": 2, "rms_norm_eps": 1e-5}),
        "llama_mqa_tied": lambda: tf.LlamaConfig(**{**BASE, "num_key_value_heads": 1, "tie_word_embeddings": True}),
        "qwen2": lambda: tf.Qwen2Config(**{**BASE, "num_key_value_heads": 2, "rope_theta": 1e6}),
        "qwen3": lambda: tf.Qwen3Config(**{**BASE, "num_key_value_heads": 2, "head_dim": 32}),
        "gemma2": lambda: tf.Gemma2Config(**{**BASE, "num_key_value_heads": 2, "head_dim": 16, "sliding_window": 8}),
        "gemma3": lambda: tf.Gemma3TextConfig(**{**BASE, "num_key_value_heads": 1, "head_dim": 32, "sliding_window": 8,
                                                 "num_hidden_layers": 6}),
        "phi3": lambda: tf.Phi3Config(**{**BASE, "num_key_value_heads": 4}),
        "gpt2": lambda: tf.GPT2Config(vocab_size=265, n_embd=64, n_layer=2, n_head=4, n_positions=128),
    }
    return tiny_hf_model(cfgs[kind]())


def _registered(raw: dict) -> bool:
    try:
        e = ember.registry.lookup(raw)
        e.load()
        return True
    except (UnsupportedModelError, ImportError):
        return False


FAMILIES = ["llama", "llama_mqa_tied", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2"]


@pytest.mark.parametrize("kind", FAMILIES)
def test_family_mapping_matches_transformers_names_and_values(tmp_path, kind):
    hf = _hf_model(kind)
    path = gm.hf_to_gguf(hf, tmp_path / "m.gguf")
    f = GGUFFile(path)
    raw = config_dict(f)
    c = hf.config
    if kind != "gpt2":
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "max_position_embeddings", "vocab_size"):
            assert raw[key] == getattr(c, key), key
        assert raw["rms_norm_eps"] == pytest.approx(c.rms_norm_eps)
        assert raw["tie_word_embeddings"] == bool(c.tie_word_embeddings)
        if kind in ("qwen3", "gemma2", "gemma3"):
            assert raw["head_dim"] == c.head_dim
        if kind in ("gemma2", "gemma3"):
            assert raw["sliding_window"] == c.sliding_window
        if kind == "gemma3":
            assert raw["model_type"] == "gemma3_text" and raw["layer_types"] == list(c.layer_types)
    else:
        for key in ("n_embd", "n_layer", "n_head", "n_positions", "vocab_size"):
            assert raw[key] == getattr(c, key), key
    _, fam = family_for(f)
    src = GGUFSource(f, fam, raw, quantized=False, dtype=torch.float32)
    sd = {k: v for k, v in hf.state_dict().items() if "rotary_emb" not in k and not k.endswith((".attn.bias", "masked_bias"))}
    if raw.get("tie_word_embeddings"):
        sd.pop("lm_head.weight", None)
    assert set(src.keys()) == set(sd), set(src.keys()) ^ set(sd)
    for k, v in sd.items():
        got = src.load(k)
        assert tuple(src.shape(k)) == tuple(v.shape), k
        torch.testing.assert_close(got.float(), v.float(), rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize("kind", FAMILIES)
def test_family_logits_match_transformers(tmp_path, kind):
    hf = _hf_model(kind)
    path = gm.hf_to_gguf(hf, tmp_path / "m.gguf")
    raw = config_dict(GGUFFile(path))
    if not _registered(raw):
        pytest.skip(f"model_type {raw['model_type']!r} is not implemented on this branch")
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
        for packed in (False, True):
            llm = ember.load(path, dtype=torch.float32, device="cpu", keep_quantized=packed)
            got = llm.model(ids)
            assert (got - ref).abs().max().item() <= 1e-4, packed


@pytest.mark.parametrize("qtype", [ggml.Q8_0, ggml.Q4_0, ggml.Q5_1], ids=ggml.type_name)
def test_quantized_llama_kept_quantised_equals_dequantized_and_transformers(tmp_path, qtype, monkeypatch):
    """Dequantised at load, and kept as blocks on the pure-PyTorch layer: the same numbers as
    transformers' dequantised model. On ember's native kernels (activations quantised to int8
    blocks, as llama.cpp computes): logits within that rounding (cosine > 0.995 per position, the
    same top token at 90% of positions of this random model, whose logits have near-ties)."""
    from transformers import AutoModelForCausalLM, GgufConfig

    from ember import transforms
    from ember.nn.quantized import QuantLinear

    hf = _hf_model("llama")
    path = gm.hf_to_gguf(hf, tmp_path / "m.gguf", qtype=qtype)
    a = ember.load(path, dtype=torch.float32, keep_quantized=False)
    native = ember.load(path, dtype=torch.float32, keep_quantized=True)
    monkeypatch.setattr(transforms, "native_kernels", lambda device: False)
    b = ember.load(path, dtype=torch.float32, keep_quantized=True)
    assert b._loaded.quantized and not a._loaded.quantized
    assert any(isinstance(m, QuantLinear) for m in b.model.modules())
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", quantization_config=GgufConfig(dequantize=True),
                                               dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        la, lb, lr, ln = a.model(ids), b.model(ids), ref(ids).logits, native.model(ids)
    assert (la - lb).abs().max().item() <= 1e-5
    assert (la - lr).abs().max().item() <= 1e-4
    if "native-quant" in native._loaded.transforms:
        cos = torch.nn.functional.cosine_similarity(ln[0], la[0], dim=-1)
        assert cos.min().item() > 0.995, cos
        assert (ln.argmax(-1) == la.argmax(-1)).float().mean().item() >= 0.9


def test_tokenizer_and_chat_template_match_transformers(tmp_path):
    from transformers import AutoTokenizer

    hf = _hf_model("llama")
    path = gm.hf_to_gguf(hf, tmp_path / "m.gguf")
    llm = ember.load(path, dtype=torch.float32)
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    tok = llm.tokenizer
    for text in ["the theory in a thin tin", " leading", "<|im_start|>user\nhé 😀<|im_end|>", "<think>x</think>", "", "\n\n 12"]:
        for special in (True, False):
            assert tok.encode(text, add_special_tokens=special) == ref.encode(text, add_special_tokens=special), text
        ids = ref.encode(text, add_special_tokens=False)
        assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "?"}]
    assert tok.apply_chat_template(msgs) == ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert llm.eos_token_ids[0] == tok.token_to_id("<|im_end|>")
    assert tok.token_to_id("<|endoftext|>") in llm.eos_token_ids  # llama.cpp's end-of-generation texts


def _tokenizer_with_pre(pre, merges=("1 2", "Ġ t", "h e")):
    """A byte-level tokenizer from metadata alone, with `tokenizer.ggml.pre` = pre (None: absent)."""
    from ember.gguf_tokenizer import tokenizer_from_gguf

    meta = {k: v[0] if isinstance(v, tuple) else v for k, v in gm.tokenizer_meta().items()}
    meta["tokenizer.ggml.tokens"] = meta["tokenizer.ggml.tokens"] + ["12"]
    meta["tokenizer.ggml.token_type"] = meta["tokenizer.ggml.token_type"] + [1]
    meta["tokenizer.ggml.merges"] = list(merges)
    if pre is None:
        del meta["tokenizer.ggml.pre"]
    else:
        meta["tokenizer.ggml.pre"] = pre
    return tokenizer_from_gguf(meta, path="x.gguf")


@pytest.mark.parametrize("pre", ["no-such-pre", None])
def test_unknown_or_missing_pre_tokenizer_is_warned_about_by_name(pre, caplog):
    with caplog.at_level("WARNING", logger="ember"):
        tok = _tokenizer_with_pre(pre)
    msg = caplog.text
    assert "x.gguf" in msg and ("'no-such-pre' is unknown" if pre else "no tokenizer.ggml.pre") in msg
    assert "GPT-2's regex" in msg and "qwen2" in msg  # says what it does instead, and what it knows
    assert tok.encode("a 12", add_special_tokens=False)  # and still tokenises


@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe", "gpt-2", "smollm", "stablelm2", "olmo"])
def test_known_pre_tokenizers_load_without_a_warning(pre, caplog):
    with caplog.at_level("WARNING", logger="ember"):
        _tokenizer_with_pre(pre)
    assert caplog.text == ""


def test_pre_tokenizers_split_as_llama_cpp_does():
    """gpt-2: GPT-2's regex keeps a digit run whole (so the "1 2" merge applies); smollm first splits
    every digit (llama.cpp's `\\p{N}` pass; SmolLM2's tokenizer.json: Digits(individual_digits));
    stablelm2 is Qwen2's regex in llama.cpp."""
    text = "x 12 the"
    gpt2, smollm = _tokenizer_with_pre("gpt-2"), _tokenizer_with_pre("smollm")
    twelve = gpt2.token_to_id("12")
    assert twelve in gpt2.encode(text, add_special_tokens=False)
    assert twelve not in smollm.encode(text, add_special_tokens=False)
    assert smollm.decode(smollm.encode(text, add_special_tokens=False)) == text
    for t in ["Hello world's 1234 \n\n  x", "it'S  fine\r\n"]:
        assert _tokenizer_with_pre("stablelm2").encode(t) == _tokenizer_with_pre("qwen2").encode(t)
    assert _tokenizer_with_pre("qwen2").encode("x 12") != gpt2.encode("x 12")  # the choice is visible


def test_describe_gguf(tmp_path):
    path = gm.hf_to_gguf(_hf_model("qwen2"), tmp_path / "m.gguf", qtype=ggml.Q8_0)
    d = describe_gguf(path)
    assert d["architecture"] == "qwen2" and d["format"] == "GGUF v3" and d["file_size"] == path.stat().st_size
    assert {"Q8_0", "F32"} <= set(d["types"])
    names = {t["name"]: t for t in d["tensors"]}
    assert names["blk.0.attn_q.weight"]["type"] == "Q8_0" and names["blk.0.attn_q.weight"]["shape"] == [64, 64]
    assert d["metadata"]["tokenizer.ggml.tokens"].startswith("[265 x string")
    assert d["parameters"] == sum(t["shape"][0] * (t["shape"][1] if len(t["shape"]) > 1 else 1) for t in d["tensors"])
    # what `ember inspect` summarises: the derived config and the tokenizer
    assert d["model_type"] == "qwen2" and d["supported"] == "yes"
    assert d["config"]["num_hidden_layers"] == 2 and d["config"]["vocab_size"] == 265
    tok = d["tokenizer"]
    assert (tok["model"], tok["kind"], tok["pre"], tok["vocab_size"]) == ("gpt2", "byte-level BPE", "qwen2", 265)
    assert tok["eos"] == {"id": 263, "token": "<|im_end|>"} and tok["chat_template_chars"] == len(gm.CHAT_TEMPLATE)


def test_describe_gguf_of_an_architecture_ember_does_not_run(tmp_path):
    path = gm.write(tmp_path / "m.gguf", "mamba", {}, {"x.weight": (np.zeros((4, 32), np.float32), None)})
    d = describe_gguf(path)
    assert d["architecture"] == "mamba" and d["config"] is None and d["tokenizer"] is None
    assert d["supported"].startswith("no (") and "'mamba' is not supported" in d["supported"]


def test_llama3_rope_freqs_divide_the_frequencies(tmp_path):
    hf = _hf_model("llama")
    factors = np.linspace(1.0, 8.0, 8).astype(np.float32)  # head_dim 16 -> 8 frequencies
    path = gm.hf_to_gguf(hf, tmp_path / "m.gguf")
    # rewrite with an extra rope_freqs tensor
    f = GGUFFile(path)
    meta = {k: v for k, v in f.metadata.items() if k != "general.architecture"}
    meta["tokenizer.ggml.token_type"] = (meta["tokenizer.ggml.token_type"], gm.ARR)
    tensors = {n: (ggml.dequantize(f.raw(n), t.ggml_type, t.shape).numpy(), None) for n, t in f.tensors.items()}
    tensors["rope_freqs.weight"] = (factors, None)
    path2 = gm.write(tmp_path / "r.gguf", "llama", meta, tensors)
    a = ember.load(path, dtype=torch.float32)
    b = ember.load(path2, dtype=torch.float32)
    torch.testing.assert_close(b.model.model.rotary.inv_freq, a.model.model.rotary.inv_freq / torch.from_numpy(factors))


# ---- bad files ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    return gm.hf_to_gguf(_hf_model("llama"), d / "good.gguf", qtype=ggml.Q8_0)


def _load_error(path, exc=EmberError):
    with pytest.raises(exc) as e:
        ember.load(str(path))
    assert str(path) in str(e.value) or path.name in str(e.value)
    return str(e.value)


def test_truncated_files_are_refused(tmp_path, good_file):
    data = good_file.read_bytes()
    for cut, words in ((len(data) - 1000, "truncated"), (len(data) // 3, "truncated"), (40, "truncated"), (10, "too short")):
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(data[:cut])
        msg = _load_error(p, CheckpointError)
        assert words in msg, msg


def test_flipped_magic_and_bad_version(tmp_path, good_file):
    data = bytearray(good_file.read_bytes())
    data[0] ^= 0xFF
    p = tmp_path / "magic.gguf"
    p.write_bytes(bytes(data))
    assert "not a GGUF file" in _load_error(p, CheckpointError)
    data = bytearray(good_file.read_bytes())
    data[4:8] = (1).to_bytes(4, "little")
    p.write_bytes(bytes(data))
    assert "version 1" in _load_error(p, UnsupportedModelError)


def test_absurd_counts_and_lengths_are_refused_before_allocation(tmp_path):
    arch = gm.raw_kv("general.architecture", gm.STR, gm.gguf_string("llama"))
    cases = {
        "tensors": gm.raw_file(tmp_path / "t.gguf", [arch], [], n_tensors=1 << 62),
        "metadata entries": gm.raw_file(tmp_path / "k.gguf", [arch], [], n_kv=1 << 60),
        "metadata key": gm.raw_file(tmp_path / "s.gguf", [struct_len(1 << 50)], [], n_kv=1, data=b"\0" * 64),
        "array elements": gm.raw_file(tmp_path / "a.gguf", [arch, gm.raw_kv("x", gm.ARR, (gm.U32).to_bytes(4, "little")
                                                                         + (1 << 61).to_bytes(8, "little"))], []),
        "string 0": gm.raw_file(tmp_path / "as.gguf", [arch, gm.raw_kv("x", gm.ARR, (gm.STR).to_bytes(4, "little")
                                                                         + (2).to_bytes(8, "little")
                                                                         + (1 << 40).to_bytes(8, "little"))], []),
        "needs bytes": gm.raw_file(tmp_path / "d.gguf", [arch], [gm.raw_tensor_info("w", [1 << 20, 1 << 20], 0, 0)]),
        "elements": gm.raw_file(tmp_path / "e.gguf", [arch], [gm.raw_tensor_info("w", [1 << 40, 1 << 40], 0, 0)]),
        "dimensions": gm.raw_file(tmp_path / "n.gguf", [arch], [gm.raw_tensor_info("w", [1] * 9, 0, 0)]),
        "unknown value type": gm.raw_file(tmp_path / "v.gguf", [arch, gm.raw_kv("x", 77, b"\0" * 8)], []),
    }
    for words, path in cases.items():
        msg = _load_error(path, CheckpointError)
        assert words in msg, (words, msg)


def struct_len(n: int) -> bytes:
    return n.to_bytes(8, "little")


def test_unknown_architecture_and_unsupported_types(tmp_path, good_file):
    f = GGUFFile(good_file)
    meta = {k: v for k, v in f.metadata.items() if k != "general.architecture"}
    meta["tokenizer.ggml.token_type"] = (meta["tokenizer.ggml.token_type"], gm.ARR)
    p = gm.write(tmp_path / "mamba.gguf", "mamba9", meta, {"token_embd.weight": (np.zeros((4, 32), np.float32), None)})
    msg = _load_error(p, UnsupportedModelError)
    assert "'mamba9' is not supported" in msg and "llama" in msg
    # a tensor in a type ember cannot dequantise (Q8_K, llama.cpp's intermediate), and one with a type
    # id nobody knows
    arch = gm.raw_kv("general.architecture", gm.STR, gm.gguf_string("llama"))
    p = gm.raw_file(tmp_path / "q8k.gguf", [arch], [gm.raw_tensor_info("token_embd.weight", [256, 4], 15, 0)],
                    data=b"\0" * 292 * 4)
    msg = _load_error(p, UnsupportedModelError)
    assert "Q8_K" in msg and "token_embd.weight" in msg
    p = gm.raw_file(tmp_path / "t99.gguf", [arch], [gm.raw_tensor_info("token_embd.weight", [32, 4], 99, 0)], data=b"\0" * 512)
    msg = _load_error(p, UnsupportedModelError)
    assert "type99" in msg


def test_random_garbage_only_raises_ember_errors(tmp_path, good_file):
    data = good_file.read_bytes()
    rng = np.random.default_rng(0)
    for i in range(40):
        b = bytearray(data[:4096])
        for _ in range(8):
            b[rng.integers(4, len(b))] = rng.integers(0, 256)
        p = tmp_path / f"fuzz{i}.gguf"
        p.write_bytes(bytes(b) + data[4096:4096 + int(rng.integers(0, 2000))])
        try:
            GGUFFile(p)
        except EmberError:
            pass


def test_bad_metadata_is_a_config_error_naming_the_key(tmp_path):
    hf = _hf_model("llama")
    p = gm.hf_to_gguf(hf, tmp_path / "s.gguf", extra_meta={"llama.block_count": "two"})
    msg = _load_error(p, ember.ConfigError)
    assert "llama.block_count" in msg
    f = GGUFFile(gm.hf_to_gguf(hf, tmp_path / "ok.gguf"))
    meta = {k: v for k, v in f.metadata.items() if k not in ("general.architecture", "llama.embedding_length")}
    meta["tokenizer.ggml.token_type"] = (meta["tokenizer.ggml.token_type"], gm.ARR)
    tensors = {n: (ggml.dequantize(f.raw(n), t.ggml_type, t.shape).numpy(), None) for n, t in f.tensors.items()}
    msg = _load_error(gm.write(tmp_path / "m.gguf", "llama", meta, tensors), ember.ConfigError)
    assert "llama.embedding_length" in msg


def _rewrite(path, out, **meta_changes):
    """The GGUF at `path` rewritten with some `llama.*` metadata changed."""
    f = GGUFFile(path)
    meta = {k: v for k, v in f.metadata.items() if k != "general.architecture"}
    meta["tokenizer.ggml.token_type"] = (meta["tokenizer.ggml.token_type"], gm.ARR)
    meta.update({f"llama.{k}": v for k, v in meta_changes.items()})
    tensors = {n: (ggml.dequantize(f.raw(n), t.ggml_type, t.shape).numpy(), None) for n, t in f.tensors.items()}
    return gm.write(out, "llama", meta, tensors)


@pytest.mark.parametrize("change, msg", [
    ({"block_count": 10**9}, "block_count is 1000000000; a model has 1 to"),
    ({"block_count": 0}, "block_count is 0"),
    ({"attention.head_count": 0}, "head_count is 0; it must be between 1 and the embedding length"),
    ({"attention.head_count": 10**6}, "head_count is 1000000; it must be between 1"),
])
def test_claimed_counts_are_checked_before_anything_is_sized_by_them(tmp_path, change, msg):
    """A block_count of 1e9 built a per-layer list first (MemoryError after 40 s; inspect hung);
    head_count 0 divided by zero."""
    path = _rewrite(gm.hf_to_gguf(_hf_model("llama"), tmp_path / "m.gguf"), tmp_path / "bad.gguf", **change)
    with pytest.raises(ConfigError, match=msg):
        ember.load(path)
    assert describe_gguf(path)["supported"].startswith("no (")
