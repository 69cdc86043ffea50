"""ember.kernels.int16_linear: the AVX2 vpmaddwd kernel against int16_reference (the same arithmetic
in PyTorch), bit for bit, on shapes that are not multiples of the 6x16 tile, the 128-k chunk or the
4-k padding; and the float32 encoder path built on it (backends.int16) against float32."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

kernels = pytest.importorskip("ember.kernels")

native = pytest.mark.skipif(not (kernels.available() and "avx2" in kernels.isas()),
                            reason="needs the native kernels on an AVX2 CPU")


def _case(M, K, N, seed=0, outliers=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    if outliers and K > 4:
        x[:, :3] *= 12  # LayerNorm outputs carry a few large channels
    w = torch.randn(N, K, generator=g) * 0.05
    b = torch.randn(N, generator=g)
    return x, w, b


def test_pack_round_trips_codes_and_scales():
    x, w, b = _case(3, 37, 21)
    p = kernels.int16_pack(w)
    codes = kernels.int16_codes(p)
    assert p.packed.shape == (2, 20, 16, 2) and codes.dtype == torch.int16
    assert codes.abs().max().item() == kernels.INT16_W_MAX
    assert torch.allclose(codes.float() * p.scale[:, None], w, atol=0, rtol=0) is False  # quantised, not equal
    assert ((codes.float() * p.scale[:, None] - w).abs() <= p.scale[:, None] / 2 * 1.0001).all()
    assert p.packed.reshape(-1).count_nonzero() == codes.count_nonzero()  # padding is zero


@pytest.mark.parametrize("M,K,N", [(1, 384, 384), (5, 37, 21), (7, 130, 17), (13, 256, 48), (50, 1536, 40),
                                   (6, 4, 16), (31, 257, 33)])
@native
def test_kernel_matches_reference_bit_for_bit(M, K, N):
    x, w, b = _case(M, K, N, seed=M * 1000 + K + N)
    p = kernels.int16_pack(w)
    with kernels.use_isa("avx2"):
        y = kernels.int16_linear(x, p, b)
        y_nobias = kernels.int16_linear(x.view(1, M, K), p)
    ref = kernels.int16_reference(x, p, b)
    assert torch.equal(y, ref)
    assert y_nobias.shape == (1, M, N) and torch.equal(y_nobias[0], kernels.int16_reference(x, p))
    # and close to float32: 14-bit activations x 12-bit weights
    f32 = F.linear(x.double(), w.double(), b.double())
    assert ((y.double() - f32).norm() / f32.norm()).item() < 2e-3


@native
def test_kernel_edge_rows_threads_and_zero_rows():
    x, w, b = _case(100, 200, 70, seed=3)
    x[4] = 0  # a zero row: zeros times the weights, plus the bias
    p = kernels.int16_pack(w)
    ref = kernels.int16_reference(x, p, b)
    before = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            assert torch.equal(kernels.int16_linear(x, p, b), ref)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(ref[4], b)
    assert kernels.int16_linear(x[:0], p, b).shape == (0, 70)


@native
def test_fused_gelu_is_within_1e_6_of_torch_gelu():
    x, w, b = _case(40, 96, 50, seed=7)
    x *= 3  # GELU's inputs over its whole curve, both tails included
    p = kernels.int16_pack(w)
    y = kernels.int16_linear(x, p, b, gelu=True)
    pre = kernels.int16_reference(x, p, b)
    ref = kernels.int16_reference(x, p, b, gelu=True)
    assert torch.equal(ref, F.gelu(pre))
    assert pre.abs().max() > 8 and (pre < -4).any()
    assert torch.allclose(y, ref, atol=1e-6, rtol=1e-6)


def test_generic_isa_uses_the_reference():
    x, w, b = _case(9, 40, 20, seed=5)
    p = kernels.int16_pack(w)
    with kernels.use_isa("generic"):
        assert torch.equal(kernels.int16_linear(x, p, b), kernels.int16_reference(x, p, b))
