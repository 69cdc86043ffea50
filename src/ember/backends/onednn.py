"""oneDNN-prepacked Linears: the `prepack` transform's backend (bf16 on CPUs with native bf16) and
`prepack-f32`'s (float32 encoders on any CPU: the bias, an exact GELU and the residual add fused
into the matmul, where F.linear copies the bias into its output first and the rest are separate
passes over the activations).

`F.linear` on bf16 CPU tensors reorders the weight into oneDNN's blocked layout on every call; a
weight reordered once at load streams faster (measured on this project's Zen 5 CPU: the SmolLM2
layer matmuls of one decode step 18.8 → 11.8 ms, a 512-token prefill 343 → 305 ms; BENCHMARKS.md).
The reorder is a copy: the mapped checkpoint pages of the original are released.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.layers import Linear
from . import replace_fusing_gelu, replace_modules


def bf16_native() -> bool:
    """Whether this CPU has native bf16 matmuls (AVX512-BF16/AMX), as oneDNN sees it. A capped ISA
    (EMBER_CPU_ISA=avx2/avx512/generic, or ONEDNN_MAX_CPU_ISA below AVX512_CORE_BF16) says no, so the
    AVX2 paths can be run and measured on any machine."""
    if os.environ.get("EMBER_CPU_ISA", "").strip().lower() in ("generic", "avx2", "avx512"):
        return False
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if cap and not (cap.startswith("AVX512_CORE_BF16") or cap.startswith("AVX512_CORE_AMX") or cap.startswith("AVX10")
                    or cap in ("ALL", "DEFAULT")):
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def prepack_enabled(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether prepacking `dtype` is on and oneDNN has the ops for it (bf16: the CPU has native
    bf16; float32: any CPU oneDNN runs on), without running them. EMBER_PREPACK=0 (or the older
    EMBER_PACK_LINEAR=0) turns prepacking off."""
    if os.environ.get("EMBER_PREPACK", os.environ.get("EMBER_PACK_LINEAR", "1")) == "0":
        return False
    try:
        if not torch.backends.mkldnn.is_available() or dtype not in (torch.bfloat16, torch.float32):
            return False
        return dtype != torch.bfloat16 or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@functools.lru_cache(maxsize=None)
def can_prepack(dtype: torch.dtype = torch.bfloat16) -> bool:
    """prepack_enabled(dtype), and the ops agree with F.linear on a small check, fused GELU and
    residual add included (~7 ms the first time: oneDNN generates its kernels)."""
    if not prepack_enabled(dtype):
        return False
    try:
        g = torch.Generator().manual_seed(0)
        w, b = torch.randn(24, 16, generator=g).to(dtype), torch.randn(24, generator=g).to(dtype)
        x, r = torch.randn(2, 3, 16, generator=g).to(dtype), torch.randn(2, 3, 24, generator=g).to(dtype)
        p = torch.ops.mkldnn._reorder_linear_weight(w, 6)
        y = torch.ops.mkldnn._linear_pointwise(x, p, b, "none", [], "")
        yg = torch.ops.mkldnn._linear_pointwise(x, p, b, "gelu", [], "none")
        ya = torch.ops.mkldnn._linear_pointwise.binary(x, r, p, b, "add")
        ref = F.linear(x.float(), w.float(), b.float())
        tol = dict(atol=0.1, rtol=0.02) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
        return bool(torch.allclose(y.float(), ref, **tol) and torch.allclose(yg.float(), F.gelu(ref), **tol)
                    and torch.allclose(ya.float(), ref + r.float(), **tol))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


# A float32 encoder reorders a weight on the first call with at least this many rows (tokens): a
# one-off short query (a first embedding) runs F.linear on the checkpoint's weight and skips the
# reorders, which were ~50 ms of CPU at 1 thread (~0.2 s at 2 busy threads) of a ~0.17 s first
# embedding in ember, for a 2.5% faster matmul (AVX2; measured under contention).
LAZY_ROWS = 64


class PrepackedLinear(nn.Module):
    """A bf16 or float32 Linear whose weight is prepacked once into oneDNN's blocked layout (CPU),
    with an optional fused exact GELU acting on the float32 accumulator, and `linear_add` (the
    Linear plus a residual in one op).

    lazy_rows > 0: the reorder waits for the first call with at least that many rows; calls before
    it compute F.linear (+ GELU, + residual) on the original weight. release=False keeps the
    checkpoint's pages of the weight (a caller that still reads the plain weight, e.g. a decode GEMV)."""

    def __init__(self, lin: Linear, gelu: bool = False, rows_hint: int = 1024, lazy_rows: int = 0,
                 release: bool = True):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.dtype = lin.weight.dtype
        self.rows_hint, self.lazy_rows = rows_hint, lazy_rows
        self._plain: torch.Tensor | None = lin.weight.detach()
        self.register_buffer("prepacked", None, persistent=False)
        self.bias = lin.bias
        self.attr, self.algorithm = ("gelu", "none") if gelu else ("none", "")
        self.release = release
        if not lazy_rows:
            self._pack()

    def _pack(self) -> torch.Tensor | None:
        w = self._plain
        if w is None:  # another thread packed it meanwhile
            return self.prepacked
        if self.lazy_rows and not can_prepack(self.dtype):  # the check a lazy prepack_all deferred
            self.lazy_rows = 1 << 62  # the plain weight for good
            return None
        p = torch.ops.mkldnn._reorder_linear_weight(w, self.rows_hint)
        self.prepacked, self._plain = p, None
        if self.release:  # the checkpoint pages the reorder just read are no longer needed
            from ..io.safetensors import release_view

            release_view(w)
        return p

    def _packed_for(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(packed weight, None), packing it now when x has enough rows, or (None, plain weight).
        Safe against another thread packing meanwhile: _pack sets `prepacked` before it clears
        `_plain`, so a plain weight read here stays usable and a cleared one means a packed one."""
        w = self._plain
        if w is None:
            return self.prepacked, None
        if x.numel() >= self.lazy_rows * self.in_features:
            p = self._pack()
            if p is not None:
                return p, None
        return None, w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, w = self._packed_for(x)
        if p is None:
            y = F.linear(x, w, self.bias)
            return F.gelu(y) if self.attr == "gelu" else y
        return torch.ops.mkldnn._linear_pointwise(x, p, self.bias, self.attr, [], self.algorithm)

    def linear_add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + self(x) as one oneDNN op (a post-op add: no separate pass over the output).
        `residual` must have this Linear's dtype and the output's shape; a fused GELU is not allowed."""
        if self.attr != "none" or residual.dtype != self.dtype:
            return residual + self(x)
        p, w = self._packed_for(x)
        if p is None:
            return F.linear(x, w, self.bias).add_(residual)
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, p, self.bias, "add")

    def extra_repr(self) -> str:
        packed = "" if self.prepacked is not None else f", packed at the first call of >= {self.lazy_rows} rows"
        return f"in={self.in_features}, out={self.out_features}, dtype={self.dtype}, fused={self.attr}{packed}"

    def weight_dense(self) -> torch.Tensor:
        """The weight [out, in] as a plain tensor (oneDNN reorders a packed one back)."""
        w = self._plain
        return w if w is not None else self.prepacked.to_dense()

    def unpack(self) -> nn.Module:
        """The plain Linear again, e.g. for torch.compile, which prepacks weights itself and cannot
        lower an already prepacked one."""
        lin = Linear(self.weight_dense(), self.bias)
        return nn.Sequential(lin, nn.GELU()) if self.attr == "gelu" else lin


def prepackable(m, dtype: torch.dtype = torch.bfloat16) -> bool:
    return isinstance(m, Linear) and m.weight.dtype == dtype and m.weight.device.type == "cpu"


def prepack_all(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Replace every CPU Linear of `dtype` (bf16, or float32) in `model` by a PrepackedLinear (no-op
    where `can_prepack(dtype)` is false). A module that applies an exact GELU to one of its Linears'
    outputs can say so with `fusable_gelu() -> attribute name` and `gelu_fused()`: that Linear then
    computes the GELU on its float32 accumulator. float32 weights are reordered lazily (LAZY_ROWS,
    after can_prepack's check; they stay plain if it fails); bf16 ones now (F.linear on bf16 would
    reorder on every call). Returns how many Linears were prepacked."""
    lazy = LAZY_ROWS if dtype == torch.float32 else 0
    if not (prepack_enabled(dtype) if lazy else can_prepack(dtype)):  # lazy: checked at the first reorder
        return 0
    return replace_fusing_gelu(model, lambda m: prepackable(m, dtype),
                               lambda m, gelu: PrepackedLinear(m, gelu=gelu, lazy_rows=lazy))


def unprepack_all(model: nn.Module) -> int:
    """Undo prepack_all: every PrepackedLinear in `model` becomes a plain Linear (followed by its
    GELU where one was fused). Returns how many."""
    return replace_modules(model, lambda m: isinstance(m, PrepackedLinear), lambda m: m.unpack())
