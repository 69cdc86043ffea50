"""Layers built straight from checkpoint tensors: no random init, no state-dict round trip."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..varbuilder import VarBuilder
from . import ops


def _param(t: torch.Tensor | None) -> nn.Parameter | None:
    if t is None or isinstance(t, nn.Parameter):
        return t
    return nn.Parameter(t, requires_grad=False)


class Linear(nn.Module):
    """y = x W^T + b with W as stored in the checkpoint ([out, in])."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = _param(weight)
        self.bias = _param(bias)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, dtype={self.weight.dtype}"


def linear(in_features: int, out_features: int, vb: VarBuilder, bias: bool | None = False) -> nn.Module:
    """A Linear from `vb` (`weight`, and `bias` when asked; bias=None means "if present").

    A quantised checkpoint may hand back a weight that stays quantised: the layer is then one that
    computes with its blocks (GGUF: `ember.nn.quantized`) or packed tensors (GPTQ, AWQ, FP8...:
    `ember.nn.packed`).
    """
    w = vb.get((out_features, in_features), "weight", quantized=True)
    return linear_from_weight(w, _bias(vb, out_features, bias))


def linear_from_weight(weight, bias: torch.Tensor | None = None) -> nn.Module:
    """A Linear around an already loaded weight (a plain tensor, or one kept quantised)."""
    if not isinstance(weight, torch.Tensor):
        from .packed import PackedGroup, PackedWeight, packed_linear

        if isinstance(weight, (PackedWeight, PackedGroup)):  # a quantised HF checkpoint's tensors
            return packed_linear(weight, bias)
        from .quantized import quantized_linear

        return quantized_linear(weight, bias)
    return Linear(weight, bias)


class Embedding(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = _param(weight)

    @classmethod
    def from_vb(cls, num: int, dim: int, vb: VarBuilder) -> nn.Module:
        """An Embedding, or for a table kept quantised (GGUF) one that dequantises only the rows it
        looks up (`ember.nn.quantized.QuantEmbedding`); `.weight` is then the quantised table."""
        w = vb.get((num, dim), "weight", quantized=True)
        if not isinstance(w, torch.Tensor):
            from .packed import PackedWeight
            from .quantized import QuantEmbedding

            if isinstance(w, PackedWeight):  # a quantised HF checkpoint's table: dense once
                return cls(w.dequantize(vb.dtype))

            return QuantEmbedding(w, vb.dtype)
        return cls(w)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class RMSNorm(nn.Module):
    """RMSNorm as transformers computes it: normalise in float32, cast back, then scale.

    `offset=1.0` gives Gemma's (1 + w) scaling, which Gemma applies before the cast back.
    """

    def __init__(self, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0, scale_in_float: bool = False):
        super().__init__()
        self.weight = _param(weight)
        self.eps = eps
        self.offset = offset
        self.scale_in_float = scale_in_float or offset != 0.0

    @classmethod
    def from_vb(cls, dim: int, eps: float, vb: VarBuilder, offset: float = 0.0, name: str = "weight", **kw) -> "RMSNorm":
        return cls(vb.get((dim,), name), eps, offset, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.scale_in_float:  # the plain form (offset 0): the registered op
            return ops.rms_norm(x, self.weight, self.eps)
        if x.dtype == torch.float32 and self.offset == 0.0:
            return F.rms_norm(x, (x.shape[-1],), self.weight.float() if self.weight.dtype != x.dtype else self.weight, self.eps)
        h = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps)
        if self.scale_in_float:
            return (h * (self.offset + self.weight.float())).to(x.dtype)
        return self.weight * h.to(x.dtype)

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, self(s)) for s = x + delta (the residual add of a pre-norm block and the next norm,
        fused by the registered op where this norm is the plain form); delta None: (x, self(x))."""
        if delta is None:
            return x, self(x)
        if not self.scale_in_float:
            return ops.add_rms_norm(x, delta, self.weight, self.eps)
        s = x + delta
        return s, self(s)


class LayerNorm(nn.Module):
    def __init__(self, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-5):
        super().__init__()
        self.weight = _param(weight)
        self.bias = _param(bias)
        self.eps = eps

    @classmethod
    def from_vb(cls, dim: int, eps: float, vb: VarBuilder, bias: bool | None = True, weight_name="weight", bias_name="bias") -> "LayerNorm":
        w = vb.get((dim,), weight_name)
        if bias is None:
            b = vb.get_optional((dim,), bias_name)
        else:
            b = vb.get((dim,), bias_name) if bias else None
        return cls(w, b, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, self(s)) for s = x + delta (delta None: s = x), as `RMSNorm.add_forward`."""
        s = x if delta is None else x + delta
        return s, self(s)



class FusedLinears(nn.Module):
    """Several checkpoint Linears applied to the same input (q/k/v, gate/up), computed as one
    matmul: the weights are concatenated once at load (the only copy kept). Returns the parts'
    outputs as a tuple. With fuse=False, or quantised weights mixed with plain ones, the parts
    stay separate modules named as in the checkpoint."""

    def __init__(self, in_features: int, parts: dict[str, tuple[int, VarBuilder]], bias: bool | None = False, fuse: bool = True):
        super().__init__()
        self.fused: nn.Module | None = None
        self.parts = nn.ModuleDict()
        weights = [vb.get((out, in_features), "weight", quantized=True) for out, vb in parts.values()]
        biases = [_bias(vb, out, bias) for out, vb in parts.values()]
        self.sizes = [w.shape[0] for w in weights]  # (a tensor-parallel rank's rows when `vb` is sharded)
        plain = all(isinstance(w, torch.Tensor) for w in weights)
        quantized_cat = not plain and not any(isinstance(w, torch.Tensor) for w in weights)
        if fuse and len(parts) > 1 and (plain or quantized_cat):
            b = None
            if any(x is not None for x in biases):
                ref = next(x for x in biases if x is not None)
                b = torch.cat([x if x is not None else ref.new_zeros(n) for x, n in zip(biases, self.sizes)])
            w = torch.cat(weights, dim=0) if plain else weights[0].cat_rows(weights)
            self.fused = linear_from_weight(w, b)
            for _, vb in parts.values():  # the parts were copied into w: let their pages go
                vb.release("weight")
        else:
            for (name, _), w, b in zip(parts.items(), weights, biases):
                self.parts[name] = linear_from_weight(w, b)

    @classmethod
    def from_fused(cls, in_features: int, sizes: list[int], vb: VarBuilder, bias: bool | None = False,
                   split: list[int] | None = None) -> "FusedLinears":
        """Parts the checkpoint already stores as one Linear (Phi-3's qkv_proj, gate_up_proj): `vb`'s
        weight [sum(sizes), in_features] is used as is and its output split into `sizes` (into
        `split` when `vb` is sharded: a tensor-parallel rank's rows of each part)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.sizes = list(split if split is not None else sizes)
        self.fused = linear(in_features, sum(sizes), vb, bias=bias)
        self.parts = nn.ModuleDict()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.fused is not None:
            return self.fused(x).split(self.sizes, dim=-1)
        return tuple(m(x) for m in self.parts.values())


def _bias(vb: VarBuilder, out: int, bias: bool | None):
    if bias is None:
        return vb.get_optional((out,), "bias")
    return vb.get((out,), "bias") if bias else None
