"""Native CPU kernels for ggml-quantised weights (raw GGUF blocks), with a pure-PyTorch fallback.

    from ember import kernels
    y = kernels.ggml_linear(x, data, ggml_type, out_features)   # x [..., K] -> y [..., N]
    y = kernels.bf16_linear(x, w_bf16)                          # decode GEMV for bf16 weights
    w16 = kernels.int16_pack(w_f32)                             # float32 weights as int16 codes
    y = kernels.int16_linear(x, w16, bias)                      # ... on AVX2's vpmaddwd (encoders)

`data` is a uint8 tensor `[N, row_bytes]` holding the weight's blocks exactly as in the GGUF file
(one row of blocks per output feature; a flat uint8 tensor of the right size works too). Types:
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K (`supported()`); any other falls back to
`reference_linear` (dequantise + F.linear). Activations are quantised to int8 blocks (scale
amax/127 per 32 values for the 32-blocks, per 256 for the K-quants, as llama.cpp does) and dotted
with the weight codes in integer arithmetic; sums are float32, returned in x's dtype (float32 or
bfloat16; other float dtypes go through float32). Each output is within
sum_k |w_k| * amax(block of k) / 254 of the float32 result (tests/test_kernels.py checks that
bound, and an exact int8 oracle).

Paths (picked per call from `isa()`):
  - M = 1..15 rows (decode): one weight row at a time against a tile of up to 4 (AVX2) or 8
    (AVX-512) activation rows, 256-bit vpmaddubsw/vpmaddwd (vpdpbusd for the 32-blocks with VNNI),
    software prefetch ahead of the weight stream; threads split the output features.
  - M >= 16 with AVX-512 VNNI: a GEMM on 16-row transposed activations (one vpdpbusd = 4 K x 16
    rows) with weight tiles unpacked once to code bytes. Without VNNI, the K-quants unpack weight
    tiles once too (codes + int16 scale vectors: vpmaddubsw + vpmaddwd per 32 values and row);
    the 32-blocks keep the GEMV tiles above.
  - generic: dequantise each weight row (the ggml formulas) and float dots, no int8 rounding.
Threads: torch's pool (at::parallel_for, torch.set_num_threads). Under torch.compile the ops have
fake kernels; the ISA and availability are read once at trace time.

The library (one C++ file) is compiled on first use (~10 s) and cached under
${EMBER_CACHE:-~/.cache/ember}/kernels/ (loading the cached library takes a few ms). ISA: the best
of avx512_vnni / avx512 / avx2 / generic this CPU has, lowered (never raised) by `EMBER_CPU_ISA`
or `set_isa()` / `use_isa()`; `EMBER_KERNELS=0` turns the native kernels off (fallback only).
This package is not imported by `import ember`.
"""
from __future__ import annotations

import contextlib
import os
import platform
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ember.io import ggml

from . import _build

ISAS = ("generic", "avx2", "avx512", "avx512_vnni")
TYPES = (ggml.Q4_0, ggml.Q4_1, ggml.Q5_0, ggml.Q5_1, ggml.Q8_0, ggml.Q4_K, ggml.Q5_K, ggml.Q6_K)

_override: str | None = None
_env_warned = False


def _cpuinfo_isa() -> str:
    """The best ISA from the OS's view of the CPU (no compiled code needed)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "generic"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
            else:
                return "generic"
    except OSError:
        return "generic"
    if not {"avx2", "fma", "f16c"} <= flags:
        return "generic"
    if not {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "avx2"
    return "avx512_vnni" if "avx512_vnni" in flags else "avx512"


def cpu_isa() -> str:
    """The best ISA the CPU supports (the compiled library's own check when it is loaded)."""
    best = _cpuinfo_isa()
    if _build.info()["loaded"]:
        best = ISAS[min(ISAS.index(best), int(torch.ops.ember.cpu_isa()))]
    return best


def _validate(name: str) -> str:
    if name not in ISAS:
        raise ValueError(f"unknown ISA {name!r}; expected one of {', '.join(ISAS)}")
    return name


_isa_cache: dict = {}


def isa() -> str:
    """The ISA the kernels use: the CPU's best, lowered by EMBER_CPU_ISA, then by set_isa()."""
    env = os.environ.get("EMBER_CPU_ISA")
    key = (env, _override, _build._state["loaded"])
    hit = _isa_cache.get(key)
    if hit is None:
        hit = _isa_cache[key] = _resolve_isa(env)
    return hit


def _resolve_isa(env: str | None) -> str:
    global _env_warned
    level = ISAS.index(cpu_isa())
    if env:
        env = env.strip().lower()
        if env in ISAS:
            if ISAS.index(env) > level and not _env_warned:
                _env_warned = True
                warnings.warn(f"EMBER_CPU_ISA={env} is above what this CPU supports; using {ISAS[level]}",
                              RuntimeWarning, stacklevel=2)
            level = min(level, ISAS.index(env))
        elif not _env_warned:
            _env_warned = True
            warnings.warn(f"EMBER_CPU_ISA={env!r} is not one of {', '.join(ISAS)}; ignored", RuntimeWarning,
                          stacklevel=2)
    if _override is not None:
        level = min(level, ISAS.index(_override))
    return ISAS[level]


def isas() -> list[str]:
    """Every ISA this machine can run (generic first)."""
    return list(ISAS[:ISAS.index(cpu_isa()) + 1])


def set_isa(name: str | None) -> str:
    """Lower the ISA for this process (None: back to the default). An ISA above what the CPU
    supports is clamped to the CPU's best: an override can only lower it. Returns the ISA in use."""
    global _override
    _override = None if name is None else _validate(name)
    _isa_cache.clear()
    return isa()


@contextlib.contextmanager
def use_isa(name: str | None):
    """Context manager form of set_isa()."""
    global _override
    before = _override
    try:
        set_isa(name)
        yield isa()
    finally:
        _override = before


def available() -> bool:
    """Whether the compiled kernels are usable (builds them on first call)."""
    ok = _build.load()
    _resolved[1] = ok
    return ok


def available_now() -> bool | None:
    """available() without waiting for a first build: True or False as available() says when the
    library is loaded, cached, turned off or failed; None while it is built on a background thread
    (started by this call), for a caller that has a fallback to run meanwhile."""
    if _build._state["loaded"] is not None or os.environ.get("EMBER_KERNELS", "1") == "0" or _build.cached():
        return available()
    _build.load_in_background()
    return None


def supported(ggml_type: int) -> bool:
    """Whether ggml_linear has a native kernel for this type (it falls back for any other)."""
    return ggml_type in TYPES


def build_info() -> dict:
    return _build.info()


# Eager calls resolve the ISA and the library's availability and remember them here; under
# torch.compile the remembered values are read (dynamo guards on them: constants in the graph, no
# tracing of /proc/cpuinfo, env vars or the build lock). torch.compiler.assume_constant_result would
# do the same but imports torch._dynamo (~1 s) when this module is imported.
_resolved: list = [None, None]  # [isa index, native library ready]


_index_memo: list = [None, None, None]  # (env, override, index): the eager fast path of _isa_index
# os.environ.get costs ~0.5 us (key encoding, Mapping.get) and _isa_index runs on every native op
# call (~100 a decode token): read the environment's own dict where CPython has one
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey("EMBER_CPU_ISA") if _ENV_DATA is not None and hasattr(os.environ, "encodekey") else None


def _env_isa():
    if _ENV_KEY is not None:
        return _ENV_DATA.get(_ENV_KEY)
    return os.environ.get("EMBER_CPU_ISA")


def _isa_index() -> int:
    if torch.compiler.is_compiling():
        return _resolved[0] if _resolved[0] is not None else ISAS.index(_cpuinfo_isa())
    env = _env_isa()
    memo = _index_memo
    if memo[2] is not None and memo[0] == env and memo[1] == _override and _build._state["loaded"]:
        return memo[2]
    _resolved[0] = ISAS.index(isa())
    memo[0], memo[1], memo[2] = env, _override, _resolved[0]
    return _resolved[0]


def _native_ready() -> bool:
    if torch.compiler.is_compiling():
        return bool(_resolved[1])
    _resolved[1] = bool(_build._state["loaded"] or available())
    return _resolved[1]


def reference_linear(x: torch.Tensor, data: torch.Tensor, ggml_type: int, out_features: int) -> torch.Tensor:
    """The fallback: dequantise the weight and F.linear in float32 (result in x's dtype)."""
    K = x.shape[-1]
    w = ggml.dequantize(data.reshape(-1), ggml_type, (out_features, K))
    return F.linear(x.float(), w).to(x.dtype)


def ggml_linear(x: torch.Tensor, data: torch.Tensor, ggml_type: int, out_features: int) -> torch.Tensor:
    """y = x @ W^T for W kept as raw ggml blocks `data` (uint8 [N, row_bytes]); x: [..., K] float32
    or bfloat16 (other float dtypes go through float32); returns [..., N] in x's dtype."""
    if not (ggml_type in TYPES and x.device.type == "cpu" and _native_ready()):
        return reference_linear(x, data, ggml_type, out_features)
    dtype = x.dtype
    x2 = x if dtype is torch.float32 or dtype is torch.bfloat16 else x.float()
    if data.dim() != 2 or not data.is_contiguous():
        data = data.reshape(out_features, -1).contiguous()
    y = torch.ops.ember.ggml_mm.default(x2, data, ggml_type, out_features, _isa_index())  # [..., K] -> [..., N]
    return y if y.dtype is dtype else y.to(dtype)


# bf16_linear takes the native GEMV up to this many rows (torch's GEMM is better beyond)
BF16_MAX_ROWS = 4


def bf16_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y = x @ w^T for a bfloat16 weight [N, K], summed in float32; x: [..., K] float32 or
    bfloat16; returns [..., N] in x's dtype. Up to BF16_MAX_ROWS rows (decode) it streams the
    weight with the native kernel (csrc/bf16_gemv.h: widen + FMA on AVX2 / AVX-512; at the
    avx512_vnni level on a CPU with AVX512-BF16 and a bf16 x, vdpbf16ps), torch's threads splitting the
    output rows; otherwise, or without the kernels, torch's bf16 F.linear (x rounded to bfloat16
    first, as a bf16 model computes)."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if (x2.shape[0] > BF16_MAX_ROWS or w.dtype != torch.bfloat16 or x.device.type != "cpu" or w.dim() != 2
            or not _native_ready()):
        return F.linear(x.to(w.dtype), w).to(x.dtype)
    if x2.dtype is not torch.float32 and x2.dtype is not torch.bfloat16:
        x2 = x2.float()
    y = torch.ops.ember.bf16_mm.default(x2.contiguous(), w.contiguous(), _isa_index())
    return y.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])


# int16_linear's weight and activation code ranges (12 and 14 bits) and the k pairs summed in int32
# before a float32 flush: 2 * 64 * 8191 * 2047 < 2^31 (csrc/int16_gemm.cpp)
INT16_W_MAX, INT16_A_MAX, INT16_CHUNK_PAIRS = 2047, 8191, 64


class Int16Weight(NamedTuple):
    """A float32 weight [N, K] as int16 codes (|code| <= 2047, per output row scale), packed for the
    kernel: [ceil(N/16)][K2][16][2], K2 = K rounded up to a multiple of 4, halved (zero padding)."""
    packed: torch.Tensor
    scale: torch.Tensor
    out_features: int
    in_features: int


def int16_pack(w: torch.Tensor) -> Int16Weight:
    """Quantise a float weight [N, K] per output row to int16 codes rint(w * 2047 / amax(row)) and pack them."""
    w = w.detach().float()
    N, K = w.shape
    amax = w.abs().amax(1)
    scale = amax / INT16_W_MAX
    inv = torch.where(amax > 0, INT16_W_MAX / amax, torch.zeros_like(amax))
    codes = torch.round(w * inv[:, None]).to(torch.int16)
    NP, K2 = -(-N // 16), -(-K // 4) * 2
    padded = codes.new_zeros((NP * 16, 2 * K2))
    padded[:N, :K] = codes
    packed = padded.view(NP, 16, K2, 2).permute(0, 2, 1, 3).contiguous()
    return Int16Weight(packed, scale.contiguous(), N, K)


def int16_codes(w: Int16Weight) -> torch.Tensor:
    """The int16 codes [N, K] of a packed weight (unpacked)."""
    NP, K2 = w.packed.shape[:2]
    return w.packed.permute(0, 2, 1, 3).reshape(NP * 16, 2 * K2)[:w.out_features, :w.in_features]


def int16_reference(x: torch.Tensor, w: Int16Weight, bias: torch.Tensor | None = None,
                    gelu: bool = False) -> torch.Tensor:
    """int16_linear in PyTorch, the same arithmetic: x quantised per row to rint(x * 8191 / amax), the
    code products summed exactly per 128 k, each chunk's sum rounded to float32 and added in order, then
    (sum * x_scale) * w_scale + bias (gelu: F.gelu of that); a row holding a NaN or an infinity gives
    NaNs. x float32 [..., K] -> [..., N] float32."""
    K, N = w.in_features, w.out_features
    x2 = x.reshape(-1, K).float()
    amax = x2.abs().amax(1) if K else x2.new_zeros(x2.shape[0])
    finite = amax.isfinite()  # a row holding a NaN or an infinity gives NaNs (the kernel: codes 0, scale NaN)
    xs = torch.where(finite, amax / INT16_A_MAX, torch.full_like(amax, float("nan")))
    inv = torch.where(finite & (amax > 0), INT16_A_MAX / amax, torch.zeros_like(amax))
    xq = torch.round(x2 * inv[:, None]).double()
    wq = int16_codes(w).double()
    acc = x2.new_zeros((x2.shape[0], N))
    step = 2 * INT16_CHUNK_PAIRS
    for k0 in range(0, K, step):  # float64 sums of integers < 2^31 are exact
        acc = acc + (xq[:, k0:k0 + step] @ wq[:, k0:k0 + step].t()).float()
    y = acc * xs[:, None] * w.scale[None, :]
    if bias is not None:
        y = y + bias.float()
    if gelu:
        y = F.gelu(y)
    return y.reshape(*x.shape[:-1], N)


def int16_linear(x: torch.Tensor, w: Int16Weight, bias: torch.Tensor | None = None, gelu: bool = False) -> torch.Tensor:
    """y = x @ W^T + bias for W from int16_pack, x float32 [..., K], and its exact GELU with gelu=True:
    the AVX2 kernel (csrc/int16_gemm.cpp) where the ISA is avx2 or above and the library is built,
    else int16_reference (the same arithmetic; the kernel's GELU is within 1e-7 of F.gelu's)."""
    if not (x.device.type == "cpu" and x.dtype is torch.float32 and x.shape[-1] and _native_ready()
            and _isa_index() >= 1):
        return int16_reference(x, w, bias, gelu)
    return torch.ops.ember.int16_mm.default(x, w.packed, w.scale, bias, w.out_features, gelu, _isa_index())


__all__ = ["BF16_MAX_ROWS", "ISAS", "TYPES", "available", "available_now", "bf16_linear", "build_info", "cpu_isa", "ggml_linear", "int16_codes", "int16_linear", "int16_pack",
           "int16_reference", "Int16Weight", "isa", "isas",
           "reference_linear", "set_isa", "supported", "use_isa"]
