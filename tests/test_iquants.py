"""GGUF i-quants, TQ1_0/TQ2_0 and MXFP4: ember's dequantisers (ember.io.iquants) against the `gguf`
package's independent ones, bit for bit; bad sizes refused; and a GGUF model whose weights are in
these types, loaded by ember, against transformers' reading of the same file."""
import numpy as np
import pytest
import torch

import ember
from ember.errors import CheckpointError
from ember.io import ggml, iquant_grids, iquants

import ggufmake as gm

gguf = pytest.importorskip("gguf")

TYPES = ggml.IQUANT_TYPES
GRIDS = {"IQ2XXS": gguf.quants.IQ2_XXS, "IQ2XS": gguf.quants.IQ2_XS, "IQ2S": gguf.quants.IQ2_S,
         "IQ3XXS": gguf.quants.IQ3_XXS, "IQ3S": gguf.quants.IQ3_S, "IQ1S": gguf.quants.IQ1_S}


def reference(raw: np.ndarray, qtype: int) -> np.ndarray:
    with np.errstate(all="ignore"):  # random scale bits: inf/NaN products are part of the check
        return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(qtype))


def ours(raw: np.ndarray, qtype: int, dtype=torch.float32) -> np.ndarray:
    n, nb = ggml.block_size(qtype)
    shape = (*raw.shape[:-1], raw.shape[-1] // nb * n)
    return ggml.dequantize(torch.from_numpy(np.ascontiguousarray(raw)), qtype, shape, dtype)


def assert_bit_identical(got: np.ndarray, ref: np.ndarray) -> None:
    """Same bits everywhere (-0.0 included), NaN where the reference has NaN (its payload aside)."""
    assert got.dtype == np.float32 and got.shape == ref.shape
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), ref[~nan].view(np.uint32))


def test_every_type_of_the_issue_is_supported():
    names = {ggml.type_name(t) for t in TYPES}
    assert names == {"IQ4_NL", "IQ4_XS", "IQ3_XXS", "IQ3_S", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M",
                     "TQ1_0", "TQ2_0", "MXFP4"}
    assert set(TYPES) <= set(ggml.SUPPORTED)


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_grids_equal_the_reference_tables(name):
    ref = GRIDS[name]
    ref.init_grid()
    got = iquants.grid(getattr(iquant_grids, name))
    assert np.array_equal(got.numpy(), ref.grid.reshape(ref.grid_shape))


@pytest.mark.parametrize("qtype", TYPES, ids=ggml.type_name)
def test_random_bytes_equal_reference_bit_for_bit(qtype):
    """Every bit pattern, scales included (NaN and inf where the reference has them)."""
    _, nb = ggml.block_size(qtype)
    raw = np.random.default_rng(qtype).integers(0, 256, size=(96, 3 * nb), dtype=np.uint8)
    assert_bit_identical(ours(raw, qtype).numpy(), reference(raw, qtype))


@pytest.mark.parametrize("qtype", TYPES, ids=ggml.type_name)
def test_realistic_blocks_equal_reference_and_bf16_rounds_once(qtype):
    raw = gm.random_blocks(qtype, 40, 2, seed=qtype, scale=0.05)
    ref = reference(raw, qtype)
    assert np.isfinite(ref).all() and 0.01 < np.abs(ref).mean() < 0.2
    assert np.array_equal(ours(raw, qtype).numpy(), ref)
    assert torch.equal(ours(raw, qtype, torch.bfloat16), torch.from_numpy(ref).bfloat16())


def _edge_blocks(qtype: int) -> np.ndarray:
    """All-zero and all-ones bytes, and random codes under extreme scales: ±0, the smallest
    subnormal, the largest finite fp16, inf, NaN (MXFP4: exponents 0, 1, 2, 127, 254, 255)."""
    _, nb = ggml.block_size(qtype)
    rng = np.random.default_rng(7)
    rows = [np.zeros(nb, np.uint8), np.full(nb, 255, np.uint8)]
    if qtype == iquants.MXFP4:
        for e in (0, 1, 2, 127, 254, 255):
            b = rng.integers(0, 256, nb, dtype=np.uint8)
            b[0] = e
            rows.append(b)
        return np.stack(rows)
    scales = np.array([0.0, -0.0, 2 ** -24, 65504.0, -65504.0, np.inf, np.nan, 1.0], np.float32)
    blocks = rng.integers(0, 256, (len(scales), nb), dtype=np.uint8)
    gm.set_block_scales(blocks, qtype, scales)
    return np.concatenate([np.stack(rows), blocks])


@pytest.mark.parametrize("qtype", TYPES, ids=ggml.type_name)
def test_edge_values_equal_reference(qtype):
    raw = _edge_blocks(qtype)
    assert_bit_identical(ours(raw, qtype).numpy(), reference(raw, qtype))


@pytest.mark.parametrize("qtype", [iquants.TQ1_0, iquants.TQ2_0, iquants.MXFP4], ids=ggml.type_name)
def test_values_quantised_by_the_reference_come_back(qtype):
    """The types gguf.quants can also quantise: real values round-trip to the reference's numbers."""
    values = np.random.default_rng(3).standard_normal((8, 512)).astype(np.float32)
    if qtype != iquants.MXFP4:
        values = np.sign(values) * (np.abs(values) > 0.5)  # ternary weights (BitNet-style)
    raw = gguf.quants.quantize(values, gguf.GGMLQuantizationType(qtype))
    got = ours(raw, qtype).numpy()
    assert np.array_equal(got, reference(raw, qtype))
    scale = np.abs(values).max(axis=-1, keepdims=True)
    assert np.abs(got - values).max() <= (0 if qtype != iquants.MXFP4 else 0.25 * scale.max()) + 1e-3


@pytest.mark.parametrize("qtype", [iquants.IQ4_XS, iquants.IQ2_XXS, iquants.MXFP4, iquants.TQ1_0], ids=ggml.type_name)
def test_truncated_and_odd_sized_data_are_checkpoint_errors(qtype):
    n, nb = ggml.block_size(qtype)
    raw = torch.from_numpy(gm.random_blocks(qtype, 4, 2))
    for data, shape in ((raw.reshape(-1)[:-1], (4, 2 * n)),       # one byte short
                        (raw.reshape(-1)[:nb * 7], (4, 2 * n)),    # a block short
                        (raw, (4, 2 * n + 1)),                     # a row not of whole blocks
                        (raw, (5, 2 * n)),                          # more rows than bytes
                        (raw.reshape(-1)[:0], (0, n + 1))):
        with pytest.raises(CheckpointError, match=ggml.type_name(qtype)):
            ggml.dequantize(data, qtype, shape)


def test_an_iquant_tensor_whose_rows_are_not_whole_blocks_is_refused_when_read(tmp_path):
    arch = gm.raw_kv("general.architecture", gm.STR, gm.gguf_string("llama"))
    p = gm.raw_file(tmp_path / "odd.gguf", [arch], [gm.raw_tensor_info("token_embd.weight", [128, 4], iquants.IQ4_XS, 0)],
                    data=b"\0" * 136 * 4)
    with pytest.raises(CheckpointError, match="IQ4_XS block size 256"):
        ember.load(p)
    p = gm.raw_file(tmp_path / "short.gguf", [arch], [gm.raw_tensor_info("token_embd.weight", [256, 4], iquants.IQ2_S, 0)],
                    data=b"\0" * 82 * 3)
    with pytest.raises(CheckpointError, match="truncated"):
        ember.load(p)


@pytest.mark.parametrize("qtype", TYPES, ids=ggml.type_name)
def test_quant_linear_over_iquant_blocks_falls_back_cleanly(qtype):
    """No native kernel has these types: the native-quant transform leaves their layers alone, and
    `dequantize` (the default's dense fallback) turns them into dense Linears of the same numbers."""
    from ember import transforms
    from ember.io.ggml_weight import GGMLWeight
    from ember.nn.layers import Linear
    from ember.nn.quantized import QuantLinear

    n, _ = ggml.block_size(qtype)
    raw = torch.from_numpy(gm.random_blocks(qtype, 24, 2, seed=1))
    w = GGMLWeight(raw, qtype, (24, 2 * n), dense_fallback=True)
    dense = w.dequantize(torch.float32)
    model = torch.nn.Sequential(QuantLinear(w, None))
    x = torch.randn(3, 2 * n)
    ref = torch.nn.functional.linear(x, dense)
    torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-5 * ref.abs().max().item())
    assert transforms.apply(model, [transforms.NATIVE_QUANT]) == [] and isinstance(model[0], QuantLinear)
    assert transforms.apply(model, [transforms.DEQUANTIZE]) == ["dequantize"] and isinstance(model[0], Linear)
    assert torch.equal(model[0].weight, dense)


# ---- a model stored in these types ----------------------------------------------------------------
MIXED = {"attn_q": iquants.IQ2_XXS, "attn_k": iquants.IQ2_XS, "attn_v": iquants.IQ3_XXS, "attn_output": iquants.IQ3_S,
         "ffn_gate": iquants.IQ2_S, "ffn_up": iquants.IQ1_S, "ffn_down": iquants.IQ1_M, "token_embd": iquants.IQ4_XS,
         "output": iquants.IQ4_NL}
LAYER1 = {"attn_q": iquants.TQ1_0, "attn_k": iquants.TQ2_0, "ffn_gate": iquants.MXFP4}


def _qtype(gname: str) -> int:
    leaf = gname.split(".")[-2]
    return (LAYER1 if gname.startswith("blk.1.") else {}).get(leaf, MIXED.get(leaf, 0))


@pytest.fixture(scope="module")
def iquant_llama(tmp_path_factory):
    import transformers as tf

    from parity import tiny_hf_model

    cfg = tf.LlamaConfig(vocab_size=265, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    d = tmp_path_factory.mktemp("iq")
    path = gm.hf_to_gguf(tiny_hf_model(cfg), d / "m.gguf", qtype=_qtype)
    return d, path


def test_llama_in_iquants_matches_transformers_reading_the_same_file(iquant_llama):
    """transformers dequantises the file with gguf.quants (and undoes llama.cpp's q/k permutation);
    ember with its own dequantisers, at load or kept as blocks on the pure-PyTorch layers."""
    from transformers import AutoModelForCausalLM, GgufConfig

    from ember.io.gguf import GGUFFile

    d, path = iquant_llama
    types = {ggml.type_name(t.ggml_type) for t in GGUFFile(path).tensors.values()}
    assert {ggml.type_name(t) for t in TYPES} <= types
    ref = AutoModelForCausalLM.from_pretrained(d, gguf_file=path.name, quantization_config=GgufConfig(dequantize=True),
                                               dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).logits
        assert want.abs().max() > 0.1
        for keep in (False, True, None):
            got = ember.load(path, dtype=torch.float32, device="cpu", keep_quantized=keep).model(ids)
            assert (got - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item()), keep
