"""torch's CPU int4 kernel (`aten._weight_int4pack_mm_for_cpu`, group size 32) behind GGUF linears:
the `int4` transform's backend, for CPUs with native bf16 when ember's own kernels are unavailable.

Types whose codes split into 4-bit planes with one scale and zero per 32 values: Q4_0, Q4_1, Q4_K as
one plane; Q5_0, Q5_1, Q5_K (low nibble + high bit) and Q8_0 (high + low nibble) as two. The bf16
scales differ from the file's fp16 ones by bf16 rounding. Q6_K, Q2_K and Q3_K (scales per 16
values) have no int4 form.
"""
from __future__ import annotations

import torch
from torch import nn

from ..io import ggml
from ..nn.quantized import QuantLinear
from . import replace_modules

INT4_CHUNK_VALUES = 1 << 20
INT4_TYPES = (ggml.Q4_0, ggml.Q4_1, ggml.Q4_K, ggml.Q5_0, ggml.Q5_1, ggml.Q5_K, ggml.Q8_0)


def int4_kernel_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def int4able(m: nn.Module) -> bool:
    return (isinstance(m, QuantLinear) and m.ggml_type in INT4_TYPES and m.qweight.device.type == "cpu"
            and m.in_features % 32 == 0 and m.out_features % 16 == 0)


class Int4Linear(nn.Module):
    """A QuantLinear's weight as int4 planes with bf16 scale and zero per 32 values (bf16 compute)."""

    def __init__(self, q: QuantLinear):
        super().__init__()
        self.ggml_type, self.out_features, self.in_features = q.ggml_type, q.out_features, q.in_features
        self.bias = q.bias
        # A chunk of rows at a time, read from the file and packed straight into the final buffers: the
        # peak stays at the int4 form plus one chunk (a whole-tensor copy of the blocks and per-chunk
        # lists joined at the end tripled it, +465 MB for a 151936 x 896 Q8_0 head).
        n, k = self.out_features, self.in_features
        step = max(64, INT4_CHUNK_VALUES // k // 64 * 64)  # rows at a time (the packing tiles 64 rows)
        planes: list[torch.Tensor] = []
        scales: list[torch.Tensor] = []
        src = q.weight
        for r in range(0, n, step):
            e = min(n, r + step)
            for i, (codes, scale, zero) in enumerate(int4_terms(src.owned_rows(r, e), self.ggml_type, e - r, k)):
                if i == len(planes):
                    planes.append(torch.empty((n, k // 2), dtype=torch.uint8))
                    scales.append(torch.empty((k // 32, n, 2), dtype=torch.bfloat16))
                planes[i][r:e] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
                scales[i][:, r:e] = torch.stack((scale.t(), zero.t()), dim=-1)  # [K/32, rows, 2]
        for i in range(len(planes)):
            self.register_buffer(f"int4_weight{i}", planes[i], persistent=False)
            self.register_buffer(f"int4_scales{i}", scales[i], persistent=False)
        self.int4_terms = len(planes)

    def _mm(self, x2: torch.Tensor) -> torch.Tensor:
        xb = x2.to(torch.bfloat16)
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        y = mm(xb, self.int4_weight0, 32, self.int4_scales0)
        if self.int4_terms == 1:
            return y
        y = y.float()
        for i in range(1, self.int4_terms):
            y += mm(xb, getattr(self, f"int4_weight{i}"), 32, getattr(self, f"int4_scales{i}"))
        return y

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        eye = torch.eye(self.in_features, dtype=torch.bfloat16, device=self.int4_weight0.device)
        return self._mm(eye).t().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self._mm(x.reshape(-1, shape[-1])).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
                f"{ggml.type_name(self.ggml_type)} as {self.int4_terms}x int4pack")


def to_int4(model: nn.Module) -> int:
    """Every QuantLinear of an int4-able type becomes an Int4Linear. Returns how many."""
    return replace_modules(model, int4able, Int4Linear)


def _f16_field(b: torch.Tensor, at: int, n: int, groups: int) -> torch.Tensor:
    return b[:, at:at + 2].contiguous().view(torch.float16).float().reshape(n, groups)


def _nib(qs: torch.Tensor) -> torch.Tensor:
    """Bytes [..., m] -> [..., 2, m] low then high nibbles (ggml's order within a 32-value group)."""
    return torch.stack((qs & 0xF, qs >> 4), dim=-2)


def int4_terms(data: torch.Tensor, ggml_type: int, n: int, k: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The weight as a sum of int4 planes: [(codes int32 [n, k] in 0..15, scale [n, k/32], zero [n, k/32])],
    each plane being (code - 8) * scale + zero per group of 32 (float32 arithmetic)."""
    g = k // 32
    if ggml_type in (ggml.Q4_0, ggml.Q4_1):
        bs = 18 if ggml_type == ggml.Q4_0 else 20
        b = data.reshape(-1, bs)
        d = _f16_field(b, 0, n, g)
        q = _nib(b[:, bs - 16:bs]).reshape(n, k).to(torch.int32)
        zero = torch.zeros_like(d) if ggml_type == ggml.Q4_0 else _f16_field(b, 2, n, g) + 8 * d
        return [(q, d, zero)]
    if ggml_type in (ggml.Q5_0, ggml.Q5_1):
        bs = 22 if ggml_type == ggml.Q5_0 else 24
        b = data.reshape(-1, bs)
        d = _f16_field(b, 0, n, g)
        lo = _nib(b[:, bs - 16:bs]).reshape(n, k).to(torch.int32)
        hb = ggml._bits32(b[:, bs - 20:bs - 16]).reshape(n, k).to(torch.int32)
        if ggml_type == ggml.Q5_0:  # d * (lo + 16 hb - 16) = d (lo - 8) + [16 d (hb + 8 - 8) - 8 d]
            return [(lo, d, torch.zeros_like(d)), (hb + 8, 16 * d, -8 * d)]
        m = _f16_field(b, 2, n, g)  # d * (lo + 16 hb) + m
        return [(lo, d, 8 * d + m), (hb + 8, 16 * d, torch.zeros_like(d))]
    if ggml_type == ggml.Q8_0:  # q + 128 = 16 h + l: d q = 16 d (h - 8) + d (l - 8) + 8 d
        b = data.reshape(-1, 34)
        d = _f16_field(b, 0, n, g)
        u = (b[:, 2:34].view(torch.int8).to(torch.int32) + 128).reshape(n, k)
        return [(u >> 4, 16 * d, torch.zeros_like(d)), (u & 0xF, d, 8 * d)]
    if ggml_type in (ggml.Q4_K, ggml.Q5_K):
        bs = 144 if ggml_type == ggml.Q4_K else 176
        b = data.reshape(-1, bs)
        nb = b.shape[0]
        d = b[:, 0:2].contiguous().view(torch.float16).float()
        dmin = b[:, 2:4].contiguous().view(torch.float16).float()
        sc, mn = ggml._k_scale_min(b[:, 4:16])
        scale = (d * sc.float()).reshape(n, g)
        mins = (dmin * mn.float()).reshape(n, g)
        lo = _nib(b[:, bs - 128:bs].reshape(nb, 4, 32)).reshape(n, k).to(torch.int32)
        if ggml_type == ggml.Q4_K:  # scale q - min
            return [(lo, scale, 8 * scale - mins)]
        sh = torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)
        hb = ((b[:, 16:48].reshape(nb, 1, 32) >> sh) & 1).reshape(n, k).to(torch.int32)
        return [(lo, scale, 8 * scale - mins), (hb + 8, 16 * scale, torch.zeros_like(scale))]
    raise ValueError(f"no int4 form for {ggml.type_name(ggml_type)}")


