"""oneDNN-prepacked bf16 Linears, for CPUs with native bf16: the `prepack` transform's backend.

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
from . import replace_modules


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


@functools.lru_cache(maxsize=None)
def can_prepack() -> bool:
    """Whether the ops exist, the CPU has native bf16, and they agree with F.linear on a small check.
    EMBER_PREPACK=0 (or the older EMBER_PACK_LINEAR=0) turns prepacking off."""
    if os.environ.get("EMBER_PREPACK", os.environ.get("EMBER_PACK_LINEAR", "1")) == "0":
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


class PrepackedLinear(nn.Module):
    """A bf16 Linear whose weight is prepacked once into oneDNN's blocked layout (CPU), with an
    optional fused exact GELU acting on the float32 accumulator."""

    def __init__(self, lin: Linear, gelu: bool = False, rows_hint: int = 1024):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.dtype = lin.weight.dtype
        self.register_buffer("prepacked", torch.ops.mkldnn._reorder_linear_weight(lin.weight.detach(), rows_hint),
                             persistent=False)
        self.bias = lin.bias
        self.attr, self.algorithm = ("gelu", "none") if gelu else ("none", "")
        from ..io.safetensors import release_view

        release_view(lin.weight)  # the checkpoint pages the reorder just read are no longer needed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.prepacked, self.bias, self.attr, [], self.algorithm)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, dtype={self.dtype}, fused={self.attr}"

    def unpack(self) -> nn.Module:
        """The plain Linear again (oneDNN reorders the blocked weight back), e.g. for torch.compile,
        which prepacks weights itself and cannot lower an already prepacked one."""
        lin = Linear(self.prepacked.to_dense(), self.bias)
        return nn.Sequential(lin, nn.GELU()) if self.attr == "gelu" else lin


def prepackable(m) -> bool:
    return isinstance(m, Linear) and m.weight.dtype == torch.bfloat16 and m.weight.device.type == "cpu"


def prepack_all(model: nn.Module) -> int:
    """Replace every bf16 CPU Linear in `model` by a PrepackedLinear (no-op where `can_prepack()` is
    false). A module that applies an exact GELU to one of its Linears' outputs can say so with
    `fusable_gelu() -> attribute name` and `gelu_fused()`: that Linear then computes the GELU on its
    float32 accumulator. Returns how many Linears were prepacked."""
    if not can_prepack():
        return 0
    n = 0
    for mod in list(model.modules()):
        fusable = getattr(mod, "fusable_gelu", None)
        name = fusable() if fusable is not None else None
        if name is not None and prepackable(getattr(mod, name)):
            setattr(mod, name, PrepackedLinear(getattr(mod, name), gelu=True))
            mod.gelu_fused()
            n += 1
        for child_name, child in list(mod.named_children()):
            if prepackable(child):
                setattr(mod, child_name, PrepackedLinear(child))
                n += 1
    return n


def unprepack_all(model: nn.Module) -> int:
    """Undo prepack_all: every PrepackedLinear in `model` becomes a plain Linear (followed by its
    GELU where one was fused). Returns how many."""
    return replace_modules(model, lambda m: isinstance(m, PrepackedLinear), lambda m: m.unpack())
