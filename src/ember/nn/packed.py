"""bf16 Linears with oneDNN-prepacked weights, for CPUs with native bf16.

`F.linear` on bf16 CPU tensors reorders the weight into oneDNN's blocked layout on every call; a
weight reordered once at load streams faster (measured on this project's Zen 5 CPU: the SmolLM2
layer matmuls of one decode step 18.8 → 11.8 ms, a 512-token prefill 343 → 305 ms; BENCHMARKS.md).
The reorder is a copy: the mapped checkpoint pages of the original are released.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Linear


@functools.lru_cache(maxsize=None)
def can_pack() -> bool:
    """Whether the ops exist, the CPU has native bf16, and they agree with F.linear on a small check.
    EMBER_PACK_LINEAR=0 turns packing off."""
    if os.environ.get("EMBER_PACK_LINEAR", "1") == "0":
        return False
    try:
        if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return False
        g = torch.Generator().manual_seed(0)
        w, b = torch.randn(24, 16, generator=g).bfloat16(), torch.randn(24, generator=g).bfloat16()
        x = torch.randn(2, 3, 16, generator=g).bfloat16()
        p = torch.ops.mkldnn._reorder_linear_weight(w, 6)
        y = torch.ops.mkldnn._linear_pointwise(x, p, b, "none", [], "")
        yg = torch.ops.mkldnn._linear_pointwise(x, p, b, "gelu", [], "none")
        ref = F.linear(x.float(), w.float(), b.float())
        return bool(torch.allclose(y.float(), ref, atol=0.1, rtol=0.02)
                    and torch.allclose(yg.float(), F.gelu(ref), atol=0.1, rtol=0.02))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


class PackedLinear(nn.Module):
    """A bf16 Linear whose weight is prepacked once into oneDNN's blocked layout (CPU), with an
    optional fused exact GELU acting on the float32 accumulator."""

    def __init__(self, lin: Linear, gelu: bool = False, rows_hint: int = 1024):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.dtype = lin.weight.dtype
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(lin.weight.detach(), rows_hint),
                             persistent=False)
        self.bias = lin.bias
        self.attr, self.algorithm = ("gelu", "none") if gelu else ("none", "")
        from ..io.safetensors import release_view

        release_view(lin.weight)  # the checkpoint pages the reorder just read are no longer needed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, self.attr, [], self.algorithm)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, dtype={self.dtype}, fused={self.attr}"

    def unpack(self) -> nn.Module:
        """The plain Linear again (oneDNN reorders the blocked weight back), e.g. for torch.compile,
        which packs weights itself and cannot lower an already packed one."""
        lin = Linear(self.packed.to_dense(), self.bias)
        return nn.Sequential(lin, nn.GELU()) if self.attr == "gelu" else lin


def packable(m) -> bool:
    return isinstance(m, Linear) and m.weight.dtype == torch.bfloat16 and m.weight.device.type == "cpu"


def pack_all(model: nn.Module) -> int:
    """Replace every bf16 CPU Linear in `model` by a PackedLinear (no-op where `can_pack()` is
    false). Returns how many were packed."""
    if not can_pack():
        return 0
    n = 0
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if packable(child):
                setattr(mod, name, PackedLinear(child))
                n += 1
    return n


def unpack_all(model: nn.Module) -> int:
    """Undo pack_all: every PackedLinear in `model` becomes a plain Linear. Returns how many."""
    n = 0
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, PackedLinear):
                setattr(mod, name, child.unpack())
                n += 1
    return n


_scope = threading.local()


@contextlib.contextmanager
def packing(enabled: bool = True):
    """Within this block, Linears built by ember.nn are prepacked as they are made (so a load never
    holds the plain and the packed copy of every weight at once)."""
    prev = getattr(_scope, "on", False)
    _scope.on = enabled and can_pack()
    try:
        yield
    finally:
        _scope.on = prev


def maybe_pack(lin: nn.Module) -> nn.Module:
    return PackedLinear(lin) if getattr(_scope, "on", False) and packable(lin) else lin
