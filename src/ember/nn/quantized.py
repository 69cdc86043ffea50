"""Layers over weights kept as GGUF blocks: the pure-PyTorch forms every device can run.

The weights are `ember.io.ggml_weight.GGMLWeight`s, what a GGUF source hands out for
`vb.get(..., quantized=True)`; `ember.nn.linear`/`Embedding.from_vb` turn them into these layers.

`QuantLinear.forward` dequantises its weight a slab of rows at a time (so the float copy never
exists whole and each slab is still in cache when the matmul reads it) and multiplies with
`F.linear`: the numbers are those of a model dequantised at load (up to the matmul's summation
order). It is the reference and the fallback: the loading pipeline's transforms
(`ember.transforms`) swap it for a faster form where the machine has one — ember's native CPU
kernels on the blocks (`ember.backends.native`), torch's int4 kernel (`ember.backends.int4`), or a
dense weight dequantised once.

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
        self.rows_per_slab = max(1, SLAB_VALUES // max(self.in_features, 1))
        # as a Linear with no faster form, dequantise once instead of on every forward (a transform does it)
        self.dense_fallback = weight.dense_fallback
        self.source = weight  # reads rows from the file without touching the mapping (for transforms)

    @property
    def weight(self) -> GGMLWeight:
        """The quantised weight (a tied head or a transform can reuse it)."""
        return GGMLWeight(self.qweight, self.ggml_type, (self.out_features, self.in_features), dtype=self.compute_dtype,
                          reader=self.source.reader if self.source.data is self.qweight else None,
                          dense_fallback=self.dense_fallback)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        data = self.source.owned_data() if self.source.data is self.qweight else self.qweight
        return ggml.dequantize(data, self.ggml_type, (self.out_features, self.in_features), dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
        return (f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
                f"{ggml.type_name(self.ggml_type)}")


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


def quantized_nbytes(module: nn.Module) -> int:
    """Bytes held by the quantised weights of a model (GGUF blocks, and the int4 forms a transform made)."""
    total = 0
    for m in module.modules():
        for name, t in m._buffers.items():
            if t is not None and (name == "qweight" or name.startswith("int4_")):
                total += t.numel() * t.element_size()
    return total


__all__ = ["ConcatLinear", "QuantLinear", "QuantEmbedding", "quantized_linear", "quantized_nbytes"]


def quantized_linear(weight: GGMLWeight | GGMLWeightGroup, bias: torch.Tensor | None = None) -> nn.Module:
    """The layer for a weight kept quantised: one block type, or row-stacked parts of several."""
    if isinstance(weight, GGMLWeightGroup):
        return ConcatLinear(weight.parts, bias)
    return QuantLinear(weight, bias)
