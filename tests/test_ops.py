"""ember.nn.ops: the native implementations (ember.backends.native, kernels/csrc/ops.cpp) against the
pure-PyTorch defaults, on every ISA this machine runs, and a whole model with and without them.

Tolerances: float32 norms / SiLU agree to float32 rounding (summation order differs: 1e-5
relative); bfloat16 norms and SiLU * up are bit-identical (float32 math, the same bf16 rounding
points as torch); attention agrees to 1e-5 in float32 and to 2 bf16 ulps of the output's scale
in bfloat16 (torch's flash kernel rounds the probabilities to bf16 before P V, the native kernel
keeps them in float32)."""
import pytest
import torch

from ember.nn import ops

native = pytest.importorskip("ember.backends.native")
kernels = pytest.importorskip("ember.kernels")

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels unavailable")

ISAS = kernels.isas() if native.available() else []
DTYPES = [torch.float32, torch.bfloat16]


def _close(got, want, dtype, rel=1e-5):
    assert got.dtype == want.dtype and got.shape == want.shape
    if dtype == torch.bfloat16:
        assert torch.equal(got, want), (got.float() - want.float()).abs().max()
    else:
        tol = rel * want.abs().max().item() + 1e-6
        assert (got - want).abs().max().item() <= tol


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 576), (3, 7, 64), (2, 5, 37), (1, 1, 1536), (4, 3)])
def test_rms_norm_and_add_rms_norm(isa, dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    d = torch.randn(shape, generator=g).to(dtype)
    D = shape[-1]
    with kernels.use_isa(isa):
        for wdtype in (dtype, torch.float32):  # a float32 weight on a bf16 x promotes to float32
            w = (torch.randn(D, generator=g) * 0.5 + 1).to(wdtype)
            out_bf16 = dtype == torch.bfloat16 and wdtype == torch.bfloat16
            mode = torch.bfloat16 if out_bf16 else torch.float32
            if dtype == torch.bfloat16 and not out_bf16:
                mode = torch.bfloat16  # rounding points are the same: still bit-identical
            _close(native._native_rms_norm(x, w, 1e-5), ops.default("rms_norm")(x, w, 1e-5), mode)
            s1, n1 = native._native_add_rms_norm(x, d, w, 1e-6)
            s2, n2 = ops.default("add_rms_norm")(x, d, w, 1e-6)
            assert torch.equal(s1, s2)
            _close(n1, n2, mode)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1536), (2, 9, 96), (3, 37)])
def test_silu_mul_fused_and_pair(isa, dtype, shape):
    g = torch.Generator().manual_seed(shape[-1])
    gu = (torch.randn(*shape[:-1], 2 * shape[-1], generator=g) * 4).to(dtype)
    gu[..., :3] = torch.tensor([-100.0, 100.0, 0.0]).to(dtype)  # exp's range ends
    with kernels.use_isa(isa):
        _close(native._native_silu_mul(gu), ops.default("silu_mul")(gu), dtype, rel=2e-6)
        pair = tuple(gu.chunk(2, dim=-1))
        _close(native._native_silu_mul(pair), ops.default("silu_mul")(pair), dtype, rel=2e-6)


def _attention_case(B, H, KV, S, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 1, H, D, generator=g).to(dtype).transpose(1, 2)  # a strided view, as the model has
    cache = torch.randn(2, B, KV, S + 9, D, generator=g).to(dtype)  # a cache longer than what is attended
    k, v = cache[0][:, :, :S], cache[1][:, :, :S]
    return q, k, v


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,KV,S,D", [(1, 9, 3, 70, 64), (2, 12, 2, 700, 128), (3, 4, 4, 33, 80), (2, 8, 1, 5, 32),
                                         (1, 2, 2, 4000, 16)])
def test_decode_attention(isa, dtype, B, H, KV, S, D):
    q, k, v = _attention_case(B, H, KV, S, D, dtype, seed=S + H)
    lens = torch.arange(B) * 7 % S + 1  # rows padded to different lengths
    keep = torch.arange(S)[None, :] < lens[:, None]
    masks = [None, keep[:, None, None, :], keep[:1, None, None, :],  # per row, broadcast over rows
             torch.where(keep, 0.0, float("-inf"))[:, None, None, :].to(dtype),
             (torch.randn(B, 1, 1, S) * 0.5).to(dtype)]  # a general additive bias
    with kernels.use_isa(isa):
        for mask in masks:
            for scale in (None, 0.3):
                got = native._native_decode_attention(q, k, v, mask, scale)
                want = ops.default("decode_attention")(q, k, v, mask, scale)
                assert got.shape == want.shape == (B, H, 1, D) and got.dtype == dtype
                d = (got.float() - want.float()).abs().max().item()
                tol = 1e-5 if dtype == torch.float32 else 2 * 2 ** -8 * want.float().abs().max().item()
                assert d <= tol, (mask is None or mask.dtype, scale, d)


def test_decode_attention_threads_split_keys():
    """With several threads the keys are split into parts whose softmax states are merged."""
    q, k, v = _attention_case(1, 4, 1, 3000, 64, torch.float32, seed=1)
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(native._native_decode_attention(q, k, v, None, None))
    finally:
        torch.set_num_threads(before)
    want = ops.default("decode_attention")(q, k, v, None, None)
    for o in outs:
        assert (o - want).abs().max().item() <= 1e-5


def test_unsupported_inputs_fall_back():
    x = torch.randn(2, 8, dtype=torch.float16)
    w = torch.ones(8, dtype=torch.float16)
    assert torch.equal(native._native_rms_norm(x, w, 1e-6), ops.default("rms_norm")(x, w, 1e-6))
    q, k, v = _attention_case(1, 4, 2, 10, 16, torch.float32, seed=0)
    per_head = torch.ones(1, 4, 1, 10, dtype=torch.bool)  # a per-head mask: the default handles it
    assert torch.equal(native._native_decode_attention(q, k, v, per_head, None),
                       ops.default("decode_attention")(q, k, v, per_head, None))


def test_registry_register_reset_using():
    assert ops.current("rms_norm") in (ops.default("rms_norm"), native._native_rms_norm)
    with ops.using({name: None for name in ops.DEFAULTS}):
        assert all(v == "default" for v in ops.registered().values())
        with ops.using({"silu_mul": native._native_silu_mul}):
            assert ops.silu_mul is native._native_silu_mul
        assert ops.silu_mul is ops.default("silu_mul")
    with pytest.raises(KeyError):
        ops.register("nope", None)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_tiny_llama_same_logits_and_tokens_with_native_ops(tmp_path, kv_heads):
    """A tiny transformers Llama through ember: logits (prefill, padded batch, cached decode) within
    1e-4 and identical greedy tokens with the native ops registered and with the defaults."""
    import ember
    from transformers import LlamaConfig

    from parity import ember_greedy, padded, save, tiny_hf_model

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=kv_heads, max_position_embeddings=128, bos_token_id=None, eos_token_id=None,
                      pad_token_id=None)
    hf = tiny_hf_model(cfg)
    llm = ember.load(save(hf, tmp_path), dtype=torch.float32, device="cpu")
    ids, mask, _ = padded(3, 20, cfg.vocab_size, [0, 4, 9], "left")
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]

    def run():
        with torch.no_grad():
            logits = llm.model(ids, attention_mask=mask)
            cache = llm.model.new_cache(1, 64)
            one = ids[:1]
            llm.model(one, position_ids=torch.arange(20)[None], cache=cache, kv_len=20)
            steps = [llm.model(torch.tensor([[t]]), position_ids=torch.tensor([[20 + i]]), cache=cache, kv_len=21 + i)
                     for i, t in enumerate([3, 17, 99, 4])]
        return logits, torch.cat(steps, 1), ember_greedy(llm, prompts, 24)

    native.register_ops()
    with ops.using(native.NATIVE_OPS):
        got = run()
    with ops.using({name: None for name in ops.DEFAULTS}):
        want = run()
    m = mask.bool()
    assert (got[0][m] - want[0][m]).abs().max().item() <= 1e-4
    assert (got[1] - want[1]).abs().max().item() <= 1e-4
    assert got[2] == want[2]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,KV,D,R,pos", [(9, 3, 64, 64, 0), (4, 4, 32, 16, 37), (8, 2, 128, 128, 63), (6, 1, 80, 40, 5)])
def test_rope_cache_attention(isa, dtype, H, KV, D, R, pos):
    """The fused decode block against the default (rotary, cache write, decode_attention as separate
    ops): the same cache contents bit for bit, the output within decode_attention's tolerance."""
    g = torch.Generator().manual_seed(H * D + pos)
    qkv = torch.randn(1, 1, (H + 2 * KV) * D, generator=g).to(dtype)
    ang = torch.rand(1, 1, R // 2, generator=g) * 6.3
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)
    caches = [torch.randn(1, KV, 64, D, generator=g).to(dtype) for _ in range(2)]
    mine, ref = [c.clone() for c in caches], [c.clone() for c in caches]
    with kernels.use_isa(isa):
        for scale in (None, 0.3):
            got = native._native_rope_cache_attention(qkv, cos, sin, *mine, pos, H, scale)
            want = ops.default("rope_cache_attention")(qkv, cos, sin, *ref, pos, H, scale)
            assert got.shape == want.shape == (1, 1, H * D) and got.dtype == dtype
            assert torch.equal(mine[0], ref[0]) and torch.equal(mine[1], ref[1])
            assert not torch.equal(mine[0], caches[0])  # column pos was written
            d = (got.float() - want.float()).abs().max().item()
            tol = 1e-5 if dtype == torch.float32 else 2 * 2 ** -8 * want.float().abs().max().item()
            assert d <= tol


def test_rope_cache_attention_checks_its_inputs():
    qkv, cos = torch.randn(1, 1, 6 * 16), torch.ones(1, 1, 16)
    k, v = torch.zeros(1, 2, 8, 16), torch.zeros(1, 2, 8, 16)
    with pytest.raises(RuntimeError, match="outside the cache"):
        torch.ops.ember.rope_cache_attention(qkv, cos, cos, k, v, 8, 2, 0.25, 0)
    with pytest.raises(RuntimeError, match="needs"):
        torch.ops.ember.rope_cache_attention(qkv[..., :-1], cos, cos, k, v, 0, 2, 0.25, 0)
    with pytest.raises(RuntimeError, match="heads"):
        torch.ops.ember.rope_cache_attention(qkv, cos, cos, k, v, 0, 3, 0.25, 0)


@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_fused_decode_block_matches_the_separate_ops(tmp_path, partial, monkeypatch):
    """A Llama-shaped model (full and partial rotary, GQA) decoding one row: logits with the fused
    rotary + cache write + attention op equal those of the separate ops, and so do greedy tokens."""
    import ember
    from transformers import LlamaConfig

    from ember.models import base
    from parity import ember_greedy, save, tiny_hf_model

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, bos_token_id=None, eos_token_id=None,
                      pad_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                          "partial_rotary_factor": partial})
    llm = ember.load(save(tiny_hf_model(cfg), tmp_path), dtype=torch.float32, device="cpu")
    calls = []
    fused = ops.current("rope_cache_attention")
    monkeypatch.setattr(ops, "rope_cache_attention", lambda *a: calls.append(1) or fused(*a))

    def run():
        with torch.no_grad():
            cache = llm.model.new_cache(1, 64)
            llm.model(torch.arange(1, 11)[None], position_ids=torch.arange(10)[None], cache=cache, kv_len=10)
            steps = [llm.model(torch.tensor([[t]]), position_ids=torch.tensor([[10 + i]]), cache=cache, kv_len=11 + i)
                     for i, t in enumerate([3, 17, 99, 4])]
        return torch.cat(steps, 1), ember_greedy(llm, [[5, 6, 7, 8]], 16)

    got = run()
    assert len(calls) >= 8  # 2 layers x 4 decode steps went through the fused op
    monkeypatch.setattr(base.Step, "decode_slot", lambda *a: None)
    want = run()
    assert (got[0] - want[0]).abs().max().item() <= 1e-5
    assert got[1] == want[1]
