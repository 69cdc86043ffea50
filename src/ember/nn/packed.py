"""Layers over weights kept in a quantised Hugging Face checkpoint's own packed tensors (GPTQ, AWQ,
compressed-tensors, FP8): the pure-PyTorch form every device runs.

A `PackedWeight` is what a quantised checkpoint's source (`ember.hfquant`) hands out for
`vb.get(..., quantized=True)`: the tensors of one linear as the file stores them (mmap views) and a
`dequantize_rows` that turns a slab of output rows back into floats. `PackedLinear` keeps those
tensors as buffers and dequantises a slab of rows at a time inside each forward, so the float
weight never exists whole. The loading pipeline's transforms swap it for a faster form where one
fits (`ember.backends.hfquant`: GGUF blocks for ember's native kernels; `torch._scaled_mm` for FP8
on CUDA).
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Values dequantised per slab in PackedLinear (1 MiB of float32).
SLAB_VALUES = 1 << 18


class PackedWeight:
    """One linear's weight [out, in] as a quantised checkpoint stores it. Subclasses (one per format)
    set `method`/`scheme` and implement `affine_rows`."""

    method = ""  # the quant_method it comes from: "gptq", "awq", "compressed-tensors", "fp8"
    row_align = 1  # slabs start at multiples of this many output rows (packing along the rows)
    bits = 8  # code width
    signed = False  # integer codes in [-2^(bits-1), 2^(bits-1)) rather than [0, 2^bits)

    def __init__(self, name: str, shape: Sequence[int], tensors: dict[str, torch.Tensor], scheme: str = ""):
        self.name = name
        self.shape = torch.Size(shape)
        self.tensors = dict(tensors)  # suffix -> tensor, e.g. {"qweight": ..., "scales": ...}
        self.scheme = scheme  # in words, e.g. "int4 g128 sym act-order"

    def affine_rows(self, t: dict[str, torch.Tensor], start: int, stop: int):
        """Rows [start, stop) of the weight as (codes, scale, zero), each broadcastable to
        [stop - start, in], with W = (codes - zero) * scale; codes are int32 (integer formats) or
        float32 (FP8), from the tensors `t` (the layer's buffers)."""
        raise NotImplementedError

    def dequantize_rows(self, t: dict[str, torch.Tensor], start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows [start, stop) of the float weight."""
        q, s, z = self.affine_rows(t, start, stop)
        return ((q - z).float() * s).to(dtype)

    # ---- what every weight shares -------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.dequantize_rows(self.tensors, 0, self.shape[0], dtype or torch.float32)

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def dim(self) -> int:
        return len(self.shape)

    def to(self, device=None, dtype=None) -> "PackedWeight":
        device = torch.device(device) if device is not None else self.device
        if device == self.device:
            return self
        out = copy.copy(self)
        out.tensors = {k: v.to(device) for k, v in self.tensors.items()}
        return out

    def cat_rows(self, parts: Sequence["PackedWeight"]) -> "PackedGroup":
        """Parts stacked along the output rows (q/k/v, gate/up): kept as parts, computed one by one."""
        return PackedGroup(list(parts))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.method} {self.scheme}, shape={list(self.shape)}, {self.nbytes} bytes)"


class PackedGroup:
    """Row-stacked packed weights (a fused q/k/v over packed parts): its linear runs each part."""

    def __init__(self, parts: list):
        self.parts = [q for p in parts for q in (p.parts if isinstance(p, PackedGroup) else [p])]
        self.shape = torch.Size((sum(p.shape[0] for p in self.parts), *self.parts[0].shape[1:]))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.cat([p.dequantize(dtype) for p in self.parts], dim=0)

    def to(self, device=None, dtype=None) -> "PackedGroup":
        return PackedGroup([p.to(device, dtype) for p in self.parts])

    def cat_rows(self, parts) -> "PackedGroup":
        return PackedGroup(list(parts))


def _buffer(suffix: str) -> str:
    """The buffer holding the checkpoint tensor `suffix`: its own name, but `weight` (FP8/int8 codes,
    not a float weight) is `qweight`, as the quantised weight of every quantised layer is."""
    return "qweight" if suffix == "weight" else suffix


def _param(t):
    return None if t is None else nn.Parameter(t, requires_grad=False)


class PackedLinear(nn.Module):
    """y = x W^T + b with W kept as a quantised checkpoint's packed tensors (see the module docstring)."""

    def __init__(self, weight: PackedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"PackedLinear needs a 2-D weight, got shape {list(weight.shape)}")
        self.packed = weight  # the format (its tensors are this module's buffers)
        self.out_features, self.in_features = weight.shape
        self.bias = _param(bias)
        for k, v in weight.tensors.items():
            self.register_buffer(_buffer(k), v, persistent=False)
        a = weight.row_align
        self.rows_per_slab = max(a, SLAB_VALUES // max(self.in_features, 1) // a * a)

    def buffers_dict(self) -> dict[str, torch.Tensor]:
        """The packed tensors by their checkpoint suffix (as the format reads them)."""
        return {k: getattr(self, _buffer(k)) for k in self.packed.tensors}

    @property
    def weight(self) -> PackedWeight:
        """The packed weight over this module's (possibly moved) buffers."""
        out = copy.copy(self.packed)
        out.tensors = self.buffers_dict()
        return out

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.packed.dequantize_rows(self.buffers_dict(), 0, self.out_features, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, k, step = self.out_features, self.in_features, self.rows_per_slab
        t = self.buffers_dict()
        if n <= step:
            return F.linear(x, self.packed.dequantize_rows(t, 0, n, x.dtype), self.bias)
        out = x.new_empty((*x.shape[:-1], n))
        x2 = x.reshape(-1, k)
        o2 = out.view(-1, n)
        for r in range(0, n, step):
            e = min(n, r + step)
            w = self.packed.dequantize_rows(t, r, e, x.dtype)
            o2[:, r:e] = F.linear(x2, w, None if self.bias is None else self.bias[r:e])
        return out

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
                f"{self.packed.method} {self.packed.scheme}")


class PackedConcatLinear(nn.Module):
    """Linears over packed parts whose outputs are concatenated (a fused projection of packed parts)."""

    def __init__(self, group: PackedGroup, bias: torch.Tensor | None = None):
        super().__init__()
        sizes = [p.shape[0] for p in group.parts]
        biases = bias.split(sizes) if bias is not None else [None] * len(sizes)
        self.parts = nn.ModuleList(PackedLinear(p, b) for p, b in zip(group.parts, biases))
        self.in_features, self.out_features = group.shape[1], sum(sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


def packed_linear(weight: PackedWeight | PackedGroup, bias: torch.Tensor | None = None) -> nn.Module:
    if isinstance(weight, PackedGroup):
        return PackedConcatLinear(weight, bias)
    return PackedLinear(weight, bias)
