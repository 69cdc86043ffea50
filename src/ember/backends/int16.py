"""float32 encoder Linears on 16-bit integer codes: the `int16-f32` transform's backend, for CPUs whose
kernels run AVX2 without AVX-512 (issue 14).

Such a CPU has no bf16 arithmetic and its float32 FMA tops out at 16 multiply-adds a cycle, which is
what MKL reaches on MiniLM's Linears (~90% of an embedding's time). `vpmaddwd` on 16-bit integers
gives 24 a cycle on Intel (ports 0/1, with the adds on port 5) and up to 32 on AMD Zen 3:
ember.kernels.int16_linear quantises each weight row to 12 bits once and each activation row to 14
bits per call, and sums the products exactly in int32 (csrc/int16_gemm.cpp). The embeddings stay
within cosine 0.99999 of float32 (all-MiniLM-L6-v2 over 321 real sentences: min 0.999994), tighter
than the bf16 matmuls that AVX-512 machines use by default.

The conversion waits for a Linear's first call of >= onednn.LAZY_ROWS rows (a first short embedding
runs F.linear on the checkpoint's weight and loads no kernel library); from then on the int16 codes
are the only copy (the checkpoint pages of the float32 weight are released). Where the native
library cannot be built, the Linear stays on F.linear; while it is being built for the first time
(~10 s, on a background thread: a first large embedding, or a server's first request, does not
wait for the compiler) the Linears run F.linear and convert at their next large call after it.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.layers import Linear
from .onednn import LAZY_ROWS


def enabled() -> bool:
    """Whether float32 encoders go to the int16 kernel here: ember's kernel ISA is avx2 (no AVX-512,
    or capped by EMBER_CPU_ISA=avx2), on x86, with the native kernels not turned off (EMBER_KERNELS=0)
    nor this path (EMBER_INT16=0). Does not build or load the library."""
    if os.environ.get("EMBER_KERNELS", "1") == "0" or os.environ.get("EMBER_INT16", "1") == "0":
        return False
    from .. import kernels

    return kernels.isa() == "avx2"


class Int16Linear(nn.Module):
    """A float32 Linear computed by ember.kernels.int16_linear (12-bit weight codes per output row,
    14-bit activations per row, int32 sums), converted at its first call of >= lazy_rows rows;
    gelu=True: followed by the exact GELU (fused into the kernel's output pass)."""

    def __init__(self, lin: Linear, gelu: bool = False, lazy_rows: int = LAZY_ROWS):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self._plain: torch.Tensor | None = lin.weight.detach()
        self.w16 = None  # kernels.Int16Weight once converted
        self.bias = lin.bias
        self.lazy_rows = lazy_rows
        self.gelu = gelu

    def _convert(self):
        w = self._plain
        if w is None:  # another thread converted it meanwhile
            return self.w16
        from .. import kernels

        ready = kernels.available_now()
        if ready is None:  # a first build of the library, on a background thread: F.linear meanwhile
            return None
        if not ready:
            self.lazy_rows = 1 << 62  # F.linear on the plain weight for good
            return None
        self.w16 = kernels.int16_pack(w)
        self._plain = None  # after w16 is set: a reader that finds _plain None finds w16
        from ..io.safetensors import release_view

        release_view(w)
        return self.w16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._plain
        if w is None:
            w16 = self.w16
        elif x.numel() >= self.lazy_rows * self.in_features:
            w16 = self._convert()
            if w16 is None:
                return self._plain_linear(x, w)
        else:
            return self._plain_linear(x, w)
        from .. import kernels

        return kernels.int16_linear(x, w16, self.bias, self.gelu)

    def _plain_linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, w, self.bias)
        return F.gelu(y) if self.gelu else y

    def extra_repr(self) -> str:
        state = "int16 codes" if self._plain is None else f"converted at the first call of >= {self.lazy_rows} rows"
        return f"in={self.in_features}, out={self.out_features}, gelu={self.gelu}, {state}"


def _convertible(m) -> bool:
    return isinstance(m, Linear) and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"


def use_int16(model: nn.Module) -> int:
    """Replace every float32 CPU Linear of `model` by an Int16Linear, the GELU fused where a module
    allows it (as onednn.prepack_all does). Returns how many."""
    from . import replace_fusing_gelu

    return replace_fusing_gelu(model, _convertible, lambda m, gelu: Int16Linear(m, gelu=gelu))
