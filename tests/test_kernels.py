"""ember.kernels: native GEMV/GEMM on raw ggml blocks against the dequantise + F.linear fallback.

Every type x every ISA path this CPU can run (generic, avx2, avx512, avx512_vnni), on random valid
blocks (random code bytes, finite fp16 scales). Tolerances:
  - generic path: weights dequantised exactly as the reference, float32 dots -> float32 rounding
    only (1e-5 of the output scale).
  - x86 paths quantise each activation block to int8 (scale d = amax/127 per 32 values, or per 256
    for K-quants), so each activation is off by at most d/2 = amax/254 and each output by at most
    sum_k |w_k| * amax(block of k) / 254. That bound (x1.01, plus float32 rounding) is the
    tolerance, element by element; the integer dot products themselves are exact.
The one-time build is skipped (whole module) when no compiler is available.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ember.io import ggml

kernels = pytest.importorskip("ember.kernels")
from ember.kernels.testing import random_blocks  # noqa: E402

SRC = str(Path(__file__).resolve().parents[1] / "src")

pytestmark = pytest.mark.skipif(not kernels.available(),
                                reason=f"native kernels unavailable: {kernels.build_info().get('reason')}")

TYPES = [ggml.Q4_K, ggml.Q6_K, ggml.Q4_1, ggml.Q8_0, ggml.Q4_0, ggml.Q5_0, ggml.Q5_K, ggml.Q5_1]
ISAS = kernels.isas()


@pytest.fixture(autouse=True)
def _reset_isa():
    yield
    kernels.set_isa(None)


def _bound(x: torch.Tensor, w: torch.Tensor, ggml_type: int, isa: str) -> torch.Tensor:
    """Per-element tolerance of the kernel's output (see the module docstring)."""
    x = x.float().reshape(-1, x.shape[-1])
    fp = 1e-5 * (x.abs() @ w.abs().t()) + 1e-6
    if isa == "generic":
        return fp
    blk = 256 if ggml.block_size(ggml_type)[0] == 256 else 32
    amax = x.reshape(x.shape[0], -1, blk).abs().amax(-1, keepdim=True).expand(-1, -1, blk).reshape(x.shape)
    return (amax / 254) @ w.abs().t() * 1.01 + fp


def _int8_activations(x: torch.Tensor, blk: int) -> torch.Tensor:
    """x as the x86 kernels see it: per block, q = round-half-even(x * 127/amax), times amax/127."""
    x = x.float().reshape(x.shape[0], -1, blk)
    amax = x.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))  # true division
    return (torch.round(x * inv) * (amax / 127.0)).reshape(x.shape[0], -1)


def _check(x, data, ggml_type, n, isa):
    kernels.set_isa(isa)
    assert kernels.isa() == isa
    y = kernels.ggml_linear(x, data, ggml_type, n)
    w = ggml.dequantize(data.reshape(-1), ggml_type, (n, x.shape[-1]))
    ref = torch.nn.functional.linear(x.float(), w)
    assert y.shape == (*x.shape[:-1], n) and y.dtype == x.dtype
    bound = _bound(x, w, ggml_type, isa).reshape(ref.shape)
    if x.dtype != torch.float32:  # the result is rounded once to x's dtype (relative 2^-8 / 2^-11)
        bound = bound * 1.01 + ref.abs() * (2 ** -8 if x.dtype == torch.bfloat16 else 2 ** -10)
    err = (y.float() - ref).abs()
    assert (err <= bound).all(), f"max err {err.max():.3g}, worst excess {(err - bound).max():.3g}"
    if isa != "generic" and x.dtype in (torch.float32, torch.bfloat16):
        # tight: the same int8 activations in float32 -> only float rounding differs
        x2 = x.reshape(-1, x.shape[-1])
        xq = _int8_activations(x2, 256 if ggml.block_size(ggml_type)[0] == 256 else 32)
        refq = torch.nn.functional.linear(xq, w).to(x.dtype).float().reshape(ref.shape)
        tight = (2e-5 * (x2.float().abs() @ w.abs().t())).reshape(ref.shape) + 1e-6
        if x.dtype == torch.bfloat16:
            tight = tight + refq.abs() * 2 ** -7
        err = (y.float() - refq).abs()
        assert (err <= tight).all(), f"vs int8 oracle: max err {err.max():.3g}, excess {(err - tight).max():.3g}"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("ggml_type", TYPES, ids=ggml.type_name)
def test_types_isas_shapes(ggml_type, isa):
    g = torch.Generator().manual_seed(1000 * ggml_type + ISAS.index(isa))
    for n, k in ((7, 256), (33, 1536), (261, 512)):
        data = random_blocks(ggml_type, n, k, g)
        for m in (1, 3, 64):
            x = torch.randn(m, k, generator=g)
            _check(x, data, ggml_type, n, isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("ggml_type", [ggml.Q4_K, ggml.Q6_K, ggml.Q4_1, ggml.Q8_0], ids=ggml.type_name)
def test_leading_dims_dtypes_noncontiguous(ggml_type, isa):
    g = torch.Generator().manual_seed(7)
    n, k = 45, 512
    data = random_blocks(ggml_type, n, k, g)
    x = torch.randn(2, 5, k, generator=g)
    _check(x, data, ggml_type, n, isa)                            # [B, T, K]
    _check(x.bfloat16(), data, ggml_type, n, isa)                 # bf16 in, bf16 out
    xt = torch.randn(k, 6, generator=g).t()                       # non-contiguous [6, K]
    assert not xt.is_contiguous()
    _check(xt, data, ggml_type, n, isa)
    _check(torch.randn(4, 2 * k, generator=g)[:, ::2], data, ggml_type, n, isa)  # strided K
    _check(torch.randn(3, k, generator=g).half(), data, ggml_type, n, isa)       # fp16 via float32


def test_outliers_and_zero_rows():
    """Blocks of zeros (scale 0) and one huge activation per block stay within the bound."""
    g = torch.Generator().manual_seed(3)
    for t in TYPES:
        k = 512
        data = random_blocks(t, 9, k, g)
        x = torch.randn(4, k, generator=g)
        x[0] = 0
        x[1, ::37] = 1e4
        for isa in ISAS:
            _check(x, data, t, 9, isa)


def test_isas_agree_bitwise_with_each_other():
    """avx2 / avx512 / vnni compute the same integer sums and the same float order."""
    g = torch.Generator().manual_seed(5)
    x86 = [i for i in ISAS if i != "generic"]
    if len(x86) < 2:
        pytest.skip("one x86 path only")
    for t in TYPES:
        data = random_blocks(t, 19, 768 if t not in (ggml.Q4_K, ggml.Q5_K, ggml.Q6_K) else 1024, g)
        x = torch.randn(9, data.shape[1] // ggml.block_size(t)[1] * ggml.block_size(t)[0], generator=g)
        outs = []
        for isa in x86:
            kernels.set_isa(isa)
            outs.append(kernels.ggml_linear(x, data, t, 19))
        for o in outs[1:]:
            torch.testing.assert_close(o, outs[0], rtol=1e-6, atol=1e-6)


def test_unsupported_type_falls_back():
    g = torch.Generator().manual_seed(0)
    data = torch.randn(5, 256, generator=g).half().view(torch.uint8)
    x = torch.randn(2, 256, generator=g)
    assert not kernels.supported(ggml.F16)
    torch.testing.assert_close(kernels.ggml_linear(x, data, ggml.F16, 5), kernels.reference_linear(x, data, ggml.F16, 5))


def test_override_cannot_raise_isa(monkeypatch):
    monkeypatch.setattr(kernels, "cpu_isa", lambda: "avx2")
    kernels._isa_cache.clear()
    try:
        assert kernels.set_isa("avx512_vnni") == "avx2"
        assert kernels.set_isa("generic") == "generic"
        kernels.set_isa(None)
        monkeypatch.setenv("EMBER_CPU_ISA", "avx512")
        with pytest.warns(RuntimeWarning):
            kernels._env_warned = False
            assert kernels.isa() == "avx2"
        monkeypatch.setenv("EMBER_CPU_ISA", "generic")
        assert kernels.isa() == "generic"
        with kernels.use_isa("avx2") as used:
            assert used == "generic"  # the env already lowered it further
        with pytest.raises(ValueError):
            kernels.set_isa("avx1024")
    finally:
        kernels._isa_cache.clear()


def test_native_op_clamps_isa():
    """The op itself never runs an ISA above the CPU's (asking for more runs the best there is)."""
    g = torch.Generator().manual_seed(2)
    data = random_blocks(ggml.Q4_K, 8, 256, g)
    x = torch.randn(2, 256, generator=g)
    best = kernels.ISAS.index(kernels.cpu_isa())
    torch.testing.assert_close(torch.ops.ember.ggml_mm(x, data, ggml.Q4_K, 8, 99),
                               torch.ops.ember.ggml_mm(x, data, ggml.Q4_K, 8, best), rtol=0, atol=0)


def _run(code: str, **env) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), **env}
    return subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, timeout=120)


FALLBACK_CHECK = """
import warnings, torch
from ember import kernels
from ember.io import ggml
from ember.kernels.testing import random_blocks
with warnings.catch_warnings(record=True) as ws:
    warnings.simplefilter("always")
    assert not kernels.available()
    assert not kernels.available()
    g = torch.Generator().manual_seed(0)
    d = random_blocks(ggml.Q4_K, 5, 256, g)
    x = torch.randn(3, 256, generator=g)
    y = kernels.ggml_linear(x, d, ggml.Q4_K, 5)
assert torch.equal(y, kernels.reference_linear(x, d, ggml.Q4_K, 5))
print(len([w for w in ws if "ember.kernels" in str(w.message)]), kernels.build_info()["reason"])
"""


def test_disabled_by_env_falls_back():
    r = _run(FALLBACK_CHECK, EMBER_KERNELS="0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "0" and "EMBER_KERNELS=0" in r.stdout


def test_failed_build_warns_once_and_falls_back(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    # the cache dir can't be created (EMBER_KERNELS_CACHE, when set, would take precedence)
    r = _run(FALLBACK_CHECK, EMBER_CACHE=str(blocker), EMBER_KERNELS_CACHE=str(blocker / "kernels"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "1", r.stdout


def test_import_ember_does_not_import_torch_or_kernels():
    r = _run("import sys, ember; print('torch' in sys.modules, 'ember.kernels' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False"]


def test_fake_kernel_for_compile():
    from torch._subclasses.fake_tensor import FakeTensorMode

    g = torch.Generator().manual_seed(0)
    data = random_blocks(ggml.Q6_K, 11, 512, g)
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(3, 512))
        w = mode.from_tensor(data)
        y = torch.ops.ember.ggml_mm(x, w, ggml.Q6_K, 11, 1)
        assert y.shape == (3, 11) and y.dtype == torch.float32


@pytest.mark.parametrize("isa", ISAS)
def test_bf16_linear(isa):
    """bf16 weights, float32 sums: only float32 rounding (1e-5 of |x| @ |w|), any K (odd too)."""
    kernels.set_isa(isa)
    g = torch.Generator().manual_seed(11)
    for n, k in ((7, 64), (33, 1536), (261, 1535)):
        w = torch.randn(n, k, generator=g).bfloat16()
        for shape in ((1, k), (3, k), (4, k), (2, 2, k), (9, k)):  # 9 rows: F.linear fallback
            x = torch.randn(*shape, generator=g)
            for xx in (x, x.bfloat16()):
                y = kernels.bf16_linear(xx, w)
                assert y.shape == (*shape[:-1], n) and y.dtype == xx.dtype
                ref = xx.double() @ w.double().t()
                tol = 1e-5 * (xx.double().abs() @ w.double().abs().t()) + 1e-6
                if xx.dtype == torch.bfloat16:
                    tol = tol + ref.abs() * 2 ** -8
                if shape[0] == 9:  # torch's bf16 F.linear: x rounded to bf16 (and maybe partial sums)
                    tol = tol + 2 ** -7 * (xx.double().abs() @ w.double().abs().t())
                assert ((y.double() - ref).abs() <= tol).all()


@pytest.mark.slow  # a torch.compile run (~10-20 s)
def test_torch_compile_fullgraph():
    g = torch.Generator().manual_seed(4)
    w = random_blocks(ggml.Q4_K, 64, 256, g)
    wb = torch.randn(32, 64, generator=g).bfloat16()

    def f(x):
        return kernels.bf16_linear(torch.relu(kernels.ggml_linear(x, w, ggml.Q4_K, 64)), wb)

    cf = torch.compile(f, fullgraph=True)
    for m in (1, 5):
        x = torch.randn(m, 256, generator=g)
        torch.testing.assert_close(cf(x), f(x))


def test_nan_propagates_and_empty_shapes():
    g = torch.Generator().manual_seed(8)
    for t in (ggml.Q4_K, ggml.Q6_K, ggml.Q4_1, ggml.Q8_0):
        data = random_blocks(t, 21, 512, g)
        for isa in ISAS:
            kernels.set_isa(isa)
            for m in (1, 3, 20):  # GEMV, tile and (VNNI) GEMM paths
                x = torch.randn(m, 512, generator=g)
                x[m - 1, 300] = float("nan")
                y = kernels.ggml_linear(x, data, t, 21)
                assert torch.isnan(y[m - 1]).all() and not torch.isnan(y[:m - 1]).any()
            assert kernels.ggml_linear(torch.randn(0, 512), data, t, 21).shape == (0, 21)
            assert kernels.ggml_linear(torch.randn(2, 0, 512), data, t, 21).shape == (2, 0, 21)
