"""Weights kept as GGUF blocks in memory, dequantised inside the layer on the fly.

The weights are `ember.io.ggml_weight.GGMLWeight`s, what a GGUF source hands out for
`vb.get(..., quantized=True)`; `ember.nn.linear`/`Embedding.from_vb` turn them into these layers.

`QuantLinear.forward` dequantises its weight a slab of rows at a time (so the float copy never
exists whole and each slab is still in cache when the matmul reads it) and multiplies with
`F.linear`: the numbers are those of a model dequantised at load (up to the matmul's summation
order). With bf16 activations on CPU, types whose codes split into 4-bit planes with one scale and
zero per 32 values use torch's int4 kernel (`aten._weight_int4pack_mm_for_cpu`, group size 32)
instead, which is faster than a dense bf16 matmul at decode: Q4_0, Q4_1, Q4_K as one plane; Q5_0,
Q5_1, Q5_K (low nibble + high bit) and Q8_0 (high + low nibble) as two. Its bf16 scales differ from
the file's fp16 ones by bf16 rounding. Q6_K, Q2_K and Q3_K (scales per 16 values) always take the
dequantising path.

`QuantEmbedding` dequantises only the rows it looks up.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..io import ggml
from ..io.ggml_weight import GGMLWeight, GGMLWeightGroup

# Rows dequantised per slab in QuantLinear: about this many values (1 MiB of float32).
SLAB_VALUES = 1 << 18
INT4_CHUNK_VALUES = 1 << 20
INT4_TYPES = (ggml.Q4_0, ggml.Q4_1, ggml.Q4_K, ggml.Q5_0, ggml.Q5_1, ggml.Q5_K, ggml.Q8_0)


def int4_kernel_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


class ConcatLinear(nn.Module):
    """Linears over the same input whose outputs are concatenated (mixed-type fused projections)."""

    def __init__(self, parts: list, bias: torch.Tensor | None = None):
        super().__init__()
        sizes = [p.shape[0] for p in parts]
        biases = bias.split(sizes) if bias is not None else [None] * len(parts)
        self.parts = nn.ModuleList(QuantLinear(p, b) for p, b in zip(parts, biases))
        self.in_features, self.out_features = parts[0].shape[1], sum(sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


def _param(t):
    return None if t is None else nn.Parameter(t, requires_grad=False)


class QuantLinear(nn.Module):
    """y = x W^T + b with W kept as GGUF blocks (see the module docstring)."""

    def __init__(self, weight: GGMLWeight, bias: torch.Tensor | None = None):
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"QuantLinear needs a 2-D weight, got shape {list(weight.shape)}")
        self.ggml_type = weight.ggml_type
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = weight.dtype or torch.float32
        self.bias = _param(bias)
        self.register_buffer("qweight", weight.data, persistent=False)
        self.int4_terms = 0  # planes in the int4 form (0: none, the blocks are dequantised instead)
        rows_per_slab = max(1, SLAB_VALUES // max(self.in_features, 1))
        self.rows_per_slab = rows_per_slab
        self.register_buffer("dense", None, persistent=False)
        if (self.compute_dtype == torch.bfloat16 and weight.ggml_type in INT4_TYPES and weight.device.type == "cpu"
                and self.in_features % 32 == 0 and self.out_features % 16 == 0 and int4_kernel_available()):
            self._prepare_int4(weight)
        elif weight.dense_fallback:
            data = weight.owned_data() if weight.reader is not None else weight.data
            self.dense = ggml.dequantize(data, weight.ggml_type, tuple(weight.shape), self.compute_dtype)
            self.qweight = None

    @property
    def weight(self):
        """The packed weight (a tied head or a conversion can reuse it)."""
        if self.qweight is None:
            return self.dense if self.dense is not None else self.dequantized_weight()
        return GGMLWeight(self.qweight, self.ggml_type, (self.out_features, self.in_features), dtype=self.compute_dtype)

    def _prepare_int4(self, weight: GGMLWeight) -> None:
        # A chunk of rows at a time, read from the file and packed straight into the final buffers: the
        # load's peak stays at the int4 form plus one chunk (a whole-tensor copy of the blocks and
        # per-chunk lists joined at the end tripled it, +465 MB for a 151936 x 896 Q8_0 head).
        n, k = self.out_features, self.in_features
        step = max(64, INT4_CHUNK_VALUES // k // 64 * 64)  # rows at a time (the packing tiles 64 rows)
        planes: list[torch.Tensor] = []
        scales: list[torch.Tensor] = []
        for r in range(0, n, step):
            e = min(n, r + step)
            for i, (q, scale, zero) in enumerate(int4_terms(weight.owned_rows(r, e), weight.ggml_type, e - r, k)):
                if i == len(planes):
                    planes.append(torch.empty((n, k // 2), dtype=torch.uint8))
                    scales.append(torch.empty((k // 32, n, 2), dtype=torch.bfloat16))
                planes[i][r:e] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
                scales[i][:, r:e] = torch.stack((scale.t(), zero.t()), dim=-1)  # [K/32, rows, 2]
        for i in range(len(planes)):
            self.register_buffer(f"int4_weight{i}", planes[i], persistent=False)
            self.register_buffer(f"int4_scales{i}", scales[i], persistent=False)
        self.int4_terms = len(planes)
        self.qweight = None  # the int4 form replaces the blocks

    def _int4_mm(self, x2: torch.Tensor) -> torch.Tensor:
        xb = x2.to(torch.bfloat16)
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        y = mm(xb, self.int4_weight0, 32, self.int4_scales0)
        if self.int4_terms == 1:
            return y
        y = y.float()
        for i in range(1, self.int4_terms):
            y += mm(xb, getattr(self, f"int4_weight{i}"), 32, getattr(self, f"int4_scales{i}"))
        return y

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.compute_dtype
        if self.dense is not None:
            return self.dense.to(dtype)
        if self.qweight is None:  # int4 form: multiply the identity
            eye = torch.eye(self.in_features, dtype=torch.bfloat16, device=self.int4_weight0.device)
            return self._int4_mm(eye).t().to(dtype)
        return ggml.dequantize(self.qweight, self.ggml_type, (self.out_features, self.in_features), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            return F.linear(x, self.dense.to(x.dtype), self.bias)
        if self.int4_terms and x.device.type == "cpu":
            shape = x.shape
            y = self._int4_mm(x.reshape(-1, shape[-1])).to(x.dtype)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
            return y.reshape(*shape[:-1], self.out_features)
        n, k, step = self.out_features, self.in_features, self.rows_per_slab
        if n <= step:
            w = ggml.dequantize(self.qweight, self.ggml_type, (n, k), x.dtype)
            return F.linear(x, w, self.bias)
        out = x.new_empty((*x.shape[:-1], n))
        x2 = x.reshape(-1, k)
        o2 = out.view(-1, n)
        for r in range(0, n, step):
            e = min(n, r + step)
            w = ggml.dequantize(self.qweight[r:e], self.ggml_type, (e - r, k), x.dtype)
            o2[:, r:e] = F.linear(x2, w, None if self.bias is None else self.bias[r:e])
        return out

    def extra_repr(self) -> str:
        kind = ggml.type_name(self.ggml_type) + (f" as {self.int4_terms}x int4pack" if self.int4_terms else
                                                 " dequantised" if self.dense is not None else "")
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, {kind}"


class QuantEmbedding(nn.Module):
    """Embedding lookup from GGUF blocks: only the looked-up rows are dequantised."""

    def __init__(self, weight: GGMLWeight, dtype: torch.dtype | None = None):
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"QuantEmbedding needs a 2-D weight, got shape {list(weight.shape)}")
        self.ggml_type = weight.ggml_type
        self.num_embeddings, self.embedding_dim = weight.shape
        self.compute_dtype = dtype or weight.dtype or torch.float32
        self.dense_fallback = weight.dense_fallback
        self.register_buffer("qweight", weight.data, persistent=False)

    @property
    def weight(self) -> GGMLWeight:
        """The packed table, e.g. for a head tied to the embeddings (`linear_from_weight`)."""
        return GGMLWeight(self.qweight, self.ggml_type, (self.num_embeddings, self.embedding_dim), dtype=self.compute_dtype,
                          dense_fallback=self.dense_fallback)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.qweight.index_select(0, ids.reshape(-1))
        out = ggml.dequantize(rows, self.ggml_type, (rows.shape[0], self.embedding_dim), self.compute_dtype)
        return out.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {ggml.type_name(self.ggml_type)}"


# ---- int4 planes for the CPU int4 kernel ---------------------------------------------------------
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


def packed_nbytes(module: nn.Module) -> int:
    """Bytes held by the packed weights of a model (blocks and int4 forms)."""
    total = 0
    for m in module.modules():
        for name, t in m._buffers.items():
            if t is not None and (name == "qweight" or name.startswith("int4_")):
                total += t.numel() * t.element_size()
    return total


__all__ = ["GGMLWeight", "QuantLinear", "QuantEmbedding", "int4_terms", "packed_nbytes", "int4_kernel_available"]


def quantized_linear(weight: GGMLWeight | GGMLWeightGroup, bias: torch.Tensor | None = None) -> nn.Module:
    """The layer for a weight kept quantised: one block type, or row-stacked parts of several."""
    if isinstance(weight, GGMLWeightGroup):
        return ConcatLinear(weight.parts, bias)
    return QuantLinear(weight, bias)
