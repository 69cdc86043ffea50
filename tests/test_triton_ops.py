"""ember.backends.triton_ops: the CUDA kernels, run by Triton's interpreter on CPU tensors and
compared with the pure-PyTorch defaults of ember.nn.ops (what they stand in for on a GPU)."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":  # conftest turns it on where there is no GPU
    pytest.skip("these tests run the kernels under Triton's interpreter (TRITON_INTERPRET=1)",
                allow_module_level=True)

from ember.backends import triton_ops  # noqa: E402
from ember.nn import ops  # noqa: E402

TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _cache(B, KV, S, D, dtype, spare=7, seed=0):
    """k, v [B, KV, S, D] as views on a longer cache (the layout attention gets: column-sliced)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, KV, S + spare, D, generator=g).to(dtype)
    v = torch.randn(B, KV, S + spare, D, generator=g).to(dtype)
    return k[:, :, :S], v[:, :, :S]


def _prefix_mask(B, S, lengths):
    cols = torch.arange(S)
    return (cols[None, :] < torch.tensor(lengths)[:, None]).view(B, 1, 1, S)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,KV,D,S", [(1, 4, 4, 64, 1), (2, 8, 2, 64, 300), (3, 6, 2, 80, 129), (2, 4, 1, 128, 70)])
def test_decode_attention_matches_the_default(dtype, B, H, KV, D, S):
    q = torch.randn(B, H, 1, D, generator=torch.Generator().manual_seed(1)).to(dtype)
    k, v = _cache(B, KV, S, D, dtype)
    lengths = [S - 3 * i if S - 3 * i > 0 else 1 for i in range(B)]
    cols = torch.arange(S)
    masks = [None, _prefix_mask(B, S, lengths),
             (cols >= S // 3).view(1, 1, 1, S),  # one mask for every row
             ((cols % 5) != 1).view(1, S) | (cols == 0)]  # holes, 2-D
    for mask in masks:
        for scale in (None, 0.3):
            got = triton_ops.decode_attention(q, k, v, mask, scale)
            want = ops.default("decode_attention")(q, k, v, mask, scale)
            assert got.shape == want.shape and got.dtype == dtype
            torch.testing.assert_close(got, want, **TOL[dtype])


def test_decode_attention_reads_only_visible_columns():
    """Columns past each row's length hold NaN: the kernel never loads them (a block of invisible
    columns is skipped), so the output is what attention over the live columns gives."""
    B, H, KV, D, S = 3, 4, 2, 64, 400
    q = torch.randn(B, H, 1, D)
    k, v = _cache(B, KV, S, D, torch.float32)
    lengths = [5, 130, 400]
    mask = _prefix_mask(B, S, lengths)
    want = ops.default("decode_attention")(q, k, v, mask)
    for b, n in enumerate(lengths):
        k[b, :, n:] = float("nan")
        v[b, :, n:] = float("nan")
    got = triton_ops.decode_attention(q, k, v, mask)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_decode_attention_leaves_other_forms_to_the_fallback():
    B, H, KV, D, S = 2, 4, 2, 32, 20
    q = torch.randn(B, H, 1, D)
    k, v = _cache(B, KV, S, D, torch.float32)
    calls = []

    def fallback(*args):
        calls.append(args)
        return ops.default("decode_attention")(*args)

    additive = torch.zeros(B, 1, 1, S).masked_fill(torch.arange(S) > 10, float("-inf"))
    per_head = torch.ones(B, H, 1, S, dtype=torch.bool)
    strided = torch.randn(B, H, 1, 2 * D)[..., ::2]
    for args in ((q, k, v, additive, None), (q, k, v, per_head, None), (strided, k, v, None, None),
                 (q.double(), k.double(), v.double(), None, None)):
        triton_ops.decode_attention(*args, fallback=fallback)
    assert len(calls) == 4
    triton_ops.decode_attention(q, k, v, None, fallback=fallback)
    assert len(calls) == 4  # the plain case ran the kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_and_silu_mul_match_the_defaults(dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 200, generator=g).to(dtype)
    delta = torch.randn(3, 5, 200, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(200, generator=g)).to(dtype)
    torch.testing.assert_close(triton_ops.rms_norm(x, w, 1e-6), ops.default("rms_norm")(x, w, 1e-6), **TOL[dtype])
    s, y = triton_ops.add_rms_norm(x, delta, w, 1e-5)
    s0, y0 = ops.default("add_rms_norm")(x, delta, w, 1e-5)
    # (Triton's interpreter truncates float32 -> bf16 casts where GPUs round to nearest: one bf16 ulp)
    torch.testing.assert_close(s, s0, **TOL[dtype])
    torch.testing.assert_close(y, y0, **TOL[dtype])
    gu = torch.randn(2, 3, 2 * 1100, generator=g).to(dtype)  # a fused gate/up projection
    torch.testing.assert_close(triton_ops.silu_mul(gu), ops.default("silu_mul")(gu), **TOL[dtype])
    pair = (gu[..., :1100], gu[..., 1100:].contiguous())
    torch.testing.assert_close(triton_ops.silu_mul(pair), ops.default("silu_mul")(pair), **TOL[dtype])


def test_static_decode_step_through_the_kernels_matches_plain_ops(tiny_chat):
    """A tiny Llama decoding through the engine's static step (the shape the CUDA graph captures:
    attention over the whole cache, masked) gives the same greedy tokens with the Triton ops
    registered in front of the defaults as without them."""
    import ember

    llm = ember.load(tiny_chat, dtype=torch.float32, device="cpu", engine=True)
    prompt = [1, 5, 9, 2, 7]
    before = {n: ops.current(n) for n in ops.DEFAULTS}
    try:
        ops.reset()
        want = llm.generate([prompt, prompt[:3]], max_tokens=6, details=True)
        assert triton_ops.register_ops() == 4
        assert triton_ops.register_ops() == 0  # once per process
        assert "triton_ops" in ops.registered()["decode_attention"]
        got = llm.generate([prompt, prompt[:3]], max_tokens=6, details=True)
    finally:
        for name, fn in before.items():  # whatever the session had registered
            ops.register(name, fn)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]


def test_cuda_models_plan_the_triton_ops():
    from ember import transforms

    assert "triton-ops" in [s.name for s in transforms.plan("causal-lm", torch.bfloat16, torch.device("cuda"))]
    assert "triton-ops" not in [s.name for s in transforms.plan("causal-lm", torch.float32, torch.device("cpu"))]
