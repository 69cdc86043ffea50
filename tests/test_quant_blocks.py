"""The fused decode blocks on GGUF-block weights (ops.swiglu_mlp, ops.rope_cache_attention_block,
ops.decoder_layer on ember's native kernels) against the separate ops they chain and against the pure-PyTorch fallback
(QuantLinear's dequantise + F.linear and the default ops), on every ISA this machine runs.

Against the separate native ops the result is bit-identical (the same kernels in the same order);
against the fallback it differs by the int8 rounding of the activations that the kernels share with
llama.cpp: a relative error of the output's norm below 2% (1e-3 scale for bf16 rounding on top)."""
import pytest
import torch

from decoder_layer_case import rel as _rel, run_decoder_layer
from ember.io import ggml
from ember.io.ggml_weight import GGMLWeight
from ember.nn import ops
from ember.nn.quantized import QuantLinear
from ember.quantize import QUANTIZERS, quantize

native = pytest.importorskip("ember.backends.native")
kernels = pytest.importorskip("ember.kernels")
from ember.kernels.testing import random_blocks  # noqa: E402

pytestmark = [pytest.mark.skipif(not native.available(), reason="native kernels unavailable"),
              pytest.mark.usefixtures("native_ops")]

ISAS = kernels.isas() if native.available() else []
DTYPES = [torch.float32, torch.bfloat16]
TYPES = [ggml.Q4_1, ggml.Q8_0, ggml.Q4_K]


def _linears(ggml_type, n, k, g):
    """(the fallback QuantLinear, its NativeQuantLinear) over the same blocks: a zero-mean weight
    quantised as ember.load(quantize=) does (Q4_1, Q8_0), or random valid blocks (Q4_K)."""
    if ggml_type in QUANTIZERS:
        blocks = quantize(torch.randn(n, k, generator=g) * 0.05, ggml_type)
    else:
        blocks = random_blocks(ggml_type, n, k, g, scale=0.05)
    q = QuantLinear(GGMLWeight(blocks, ggml_type, (n, k)))
    return q, native.NativeQuantLinear(q)


def _tol(isa, dtype, ggml_type):
    """int8 activations (x86 paths; random K-quant blocks have a nonzero mean, so their rounding
    errors add up more), bf16 rounding of each op's output."""
    base = 1e-4 if isa == "generic" else (0.02 if ggml_type in QUANTIZERS else 0.05)
    return base + (1e-2 if dtype == torch.bfloat16 else 0)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("ggml_type", [ggml.Q4_1, ggml.Q4_K], ids=ggml.type_name)
def test_prefill_mlp_runs_in_row_chunks(isa, ggml_type, monkeypatch):
    """A prefill's MLP over more rows than MLP_CHUNK_BYTES of gate/up output allows runs in equal
    row chunks (each on the many-row kernels): the values of one call over all the rows."""
    g = torch.Generator().manual_seed(7)
    E, F_ = 256, 512
    with kernels.use_isa(isa):
        _, gu = _linears(ggml_type, 2 * F_, E, g)
        _, down = _linears(ggml_type, E, F_, g)
    x = torch.randn(2, 50, E, generator=g)
    calls = []
    op = torch.ops.ember.quant_swiglu.default
    monkeypatch.setattr(native.torch.ops.ember, "quant_swiglu", type("Op", (), {
        "default": staticmethod(lambda x, *a: calls.append(x.shape[0]) or op(x, *a))}))
    with kernels.use_isa(isa):
        whole = ops.swiglu_mlp(x, gu, down)
        monkeypatch.setattr(native, "MLP_CHUNK_BYTES", 4 * 2 * F_ * 40)  # 40 rows a chunk
        got = ops.swiglu_mlp(x, gu, down)
    assert calls == [2, 33, 33, 34]  # the whole x [2, 50, E] in one call, then its 100 rows in three
    assert got.shape == whole.shape and torch.equal(got, whole)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ggml_type", TYPES, ids=ggml.type_name)
def test_swiglu_mlp(isa, dtype, ggml_type):
    g = torch.Generator().manual_seed(ggml_type)
    E, F_ = 256, 512
    with kernels.use_isa(isa):
        gu_ref, gu = _linears(ggml_type, 2 * F_, E, g)
        down_ref, down = _linears(ggml_type, E, F_, g)
    for shape in ((1, 1, E), (3, 5, E), (E,)):
        x = torch.randn(*shape, generator=g).to(dtype)
        with kernels.use_isa(isa):
            got = ops.swiglu_mlp(x, gu, down)
            separate = down(ops.silu_mul(gu(x)))
        assert got.shape == (*shape[:-1], E) and got.dtype == dtype
        assert torch.equal(got, separate)
        with ops.using({name: None for name in ops.DEFAULTS}):
            want = ops.swiglu_mlp(x, gu_ref, down_ref)
        assert _rel(got, want) <= _tol(isa, dtype, ggml_type)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ggml_type", TYPES, ids=ggml.type_name)
def test_rope_cache_attention_block(isa, dtype, ggml_type):
    g = torch.Generator().manual_seed(10 + ggml_type)
    E, H, KV, D, pos = 256, 4, 2, 64, 9
    with kernels.use_isa(isa):
        qkv_ref, qkv = _linears(ggml_type, (H + 2 * KV) * D, E, g)
        o_ref, o = _linears(ggml_type, E, H * D, g)
    x = torch.randn(1, 1, E, generator=g).to(dtype)
    ang = torch.rand(1, 1, D // 2, generator=g) * 6.3
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)
    caches = [torch.randn(1, KV, 32, D, generator=g).to(dtype) for _ in range(2)]
    fused, separate, ref = ([c.clone() for c in caches] for _ in range(3))
    with kernels.use_isa(isa):
        got = ops.rope_cache_attention_block(x, qkv, o, cos, sin, *fused, pos, H, None)
        sep = o(ops.rope_cache_attention(qkv(x), cos, sin, *separate, pos, H, None))
    assert got.shape == (1, 1, E) and got.dtype == dtype
    assert torch.equal(got, sep) and torch.equal(fused[0], separate[0]) and torch.equal(fused[1], separate[1])
    assert not torch.equal(fused[0][:, :, pos], caches[0][:, :, pos])  # the token's k was written
    with ops.using({name: None for name in ops.DEFAULTS}):
        want = ops.rope_cache_attention_block(x, qkv_ref, o_ref, cos, sin, *ref, pos, H, None)
    assert _rel(got, want) <= _tol(isa, dtype, ggml_type)
    assert _rel(fused[0], ref[0]) <= _tol(isa, dtype, ggml_type)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decoder_layer(isa, dtype):
    """A whole layer's decode token in one call: the same residual stream, MLP output and cache
    bit for bit as the ops it chains, and close to the pure-PyTorch fallback."""
    g = torch.Generator().manual_seed(21)
    E, t = 128, ggml.Q4_1
    r = run_decoder_layer(isa, dtype, lambda n, k: _linears(t, n, k, g), g, E, H=4, KV=2, D=32, F_=192, pos=5)
    got, sep, want, fused, ref = r.got, r.sep, r.want, r.fused, r.ref
    assert all(a.shape == (1, 1, E) and a.dtype == dtype for a in got)
    assert torch.equal(got[0], sep[0]) and torch.equal(got[1], sep[1]) and torch.equal(fused[0], r.separate[0])
    assert _rel(got[0], want[0]) <= _tol(isa, dtype, t) and _rel(got[1], want[1]) <= _tol(isa, dtype, t)
    assert _rel(fused[1], ref[1]) <= _tol(isa, dtype, t)


def test_blocks_fall_back_where_the_native_calls_do_not_apply():
    """A bias, a plain Linear, another device or dtype: the default chain, same result as by hand."""
    g = torch.Generator().manual_seed(3)
    ref, gu = _linears(ggml.Q4_1, 64, 64, g)  # gate/up: 64 -> 2 x 32
    down_ref, down = _linears(ggml.Q4_1, 64, 32, g)
    biased = native.NativeQuantLinear(QuantLinear(GGMLWeight(random_blocks(ggml.Q4_1, 64, 32, g), ggml.Q4_1, (64, 32)),
                                                  torch.randn(64, generator=g)))
    x = torch.randn(1, 1, 64, generator=g)
    for a, b in ((gu, biased), (ref, down), (gu, down_ref)):
        assert torch.equal(ops.swiglu_mlp(x, a, b), b(ops.silu_mul(a(x))))
    assert torch.equal(ops.swiglu_mlp(x.half(), gu, down), down(ops.silu_mul(gu(x.half()))))


def test_tiny_llama_decodes_the_same_through_the_blocks(tmp_path):
    """A tiny Llama quantised at load (int8 and int4): cached decode logits bit-identical and the
    same greedy tokens with the fused layer as with the separate ops, and the fused layer was used."""
    import ember
    from transformers import LlamaConfig

    from parity import ember_greedy, save, tiny_hf_model

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, bos_token_id=None, eos_token_id=None,
                      pad_token_id=None, tie_word_embeddings=False)
    folder = save(tiny_hf_model(cfg, init=0.02), tmp_path)
    for mode in ("int8", "int4"):
        llm = ember.load(folder, quantize=mode)
        calls = []
        counted = {"decoder_layer": (lambda f: lambda *a: calls.append(1) or f(*a))(ops.current("decoder_layer"))}

        def run():
            with torch.no_grad():
                cache = llm.model.new_cache(1, 64)
                llm.model(torch.arange(1, 11)[None], position_ids=torch.arange(10)[None], cache=cache, kv_len=10)
                steps = [llm.model(torch.tensor([[t]]), position_ids=torch.tensor([[10 + i]]), cache=cache,
                                   kv_len=11 + i) for i, t in enumerate([3, 17, 99, 4])]
            return torch.cat(steps, 1), ember_greedy(llm, [[5, 6, 7, 8]], 12)

        with ops.using(counted):
            got = run()
        assert len(calls) >= 4  # layer 1 (layer 0 has no pending residual add) x 4 decode steps
        with ops.using({"decoder_layer": None, "swiglu_mlp": None, "rope_cache_attention_block": None}):
            want = run()
        assert torch.equal(got[0], want[0]) and got[1] == want[1]
