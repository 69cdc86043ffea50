"""Faster forms for the linears of quantised Hugging Face checkpoints (`ember.nn.packed.PackedLinear`),
put in place by transforms:

- `repack` (CPU, where ember's native kernels or torch's int4 kernel run): an integer weight whose
  scale and zero point are constant over each 32 consecutive inputs (GPTQ/AWQ/compressed-tensors
  without act-order, group sizes a multiple of 32, or per channel) becomes GGUF blocks, which the
  `native-quant` / `int4` steps then run: codes of up to 4 bits as Q4_1 (W = d q + m with d the
  scale and m = -scale * zero, both float16), 8-bit codes within int8 of their zero point as Q8_0
  (W = d q). The codes are copied exactly; the scales round to float16 (a weight whose scales
  float16 cannot hold within 2^-10 stays packed). An act-order weight (g_idx) has its input
  columns sorted by group first and its input permuted to match in each forward. FP8 stays packed.
- `fp8-scaled-mm` (CUDA, compute capability 8.9+): an FP8 weight with one scale per tensor or per
  output channel runs through `torch._scaled_mm`, activations quantised to FP8 per token (or with
  the checkpoint's static input_scale).
"""
from __future__ import annotations

import torch
from torch import nn

from ..io import ggml
from ..io.ggml_weight import GGMLWeight
from ..nn.packed import PackedConcatLinear, PackedLinear
from ..nn.quantized import QuantLinear
from . import replace_modules

ROWS_PER_CHUNK = 256
FP8_MAX = 448.0


def _per_block(x, n: int, k: int) -> torch.Tensor | None:
    """A per-weight [n, k] (or broadcastable) tensor as one value per 32 inputs [n, k/32], or None
    when it varies within a block."""
    b = torch.as_tensor(x).expand(n, k).reshape(n, k // 32, 32)
    first = b[..., :1]
    return first.squeeze(-1) if bool((b == first).all()) else None


def _f16(x: torch.Tensor) -> torch.Tensor | None:
    """x as float16 bytes-to-be, or None when float16 cannot hold it within 2^-10 (relative)."""
    h = x.to(torch.float16)
    err = (h.float() - x).abs()
    return h if bool(torch.isfinite(h).all()) and bool((err <= x.abs() * 2 ** -10 + 1e-30).all()) else None


def _permuted(x, perm: torch.Tensor | None, k: int):
    """The input columns of a per-weight tensor in `perm` order (those broadcast over them as they are)."""
    if perm is None or not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[-1] != k:
        return x
    return x.index_select(-1, perm)


def _blocks(packed, t, start: int, stop: int, perm: torch.Tensor | None = None) -> tuple[int, torch.Tensor] | None:
    """Rows [start, stop) as (ggml type, uint8 blocks [rows, row_bytes]), or None if they don't fit.
    With `perm`, the blocks hold the input columns in that order."""
    n, k = stop - start, packed.shape[1]
    q, s, z = (_permuted(x, perm, k) for x in packed.affine_rows(t, start, stop))
    if q.is_floating_point():
        return None
    s32, z32 = _per_block(s, n, k), _per_block(z, n, k)
    if s32 is None or z32 is None:
        return None
    if packed.bits <= 4:
        lo = -(1 << (packed.bits - 1)) if packed.signed else 0
        d, m = _f16(s32), _f16(s32 * (lo - z32.float()))
        if d is None or m is None:
            return None
        u = (q - lo).to(torch.uint8).reshape(n, k // 32, 32)
        nib = u[..., :16] | (u[..., 16:] << 4)
        out = torch.cat([d.unsqueeze(-1).view(torch.uint8), m.unsqueeze(-1).view(torch.uint8), nib], dim=-1)
        return ggml.Q4_1, out.reshape(n, -1)
    v = q - torch.as_tensor(z)
    if int(v.min()) < -128 or int(v.max()) > 127:
        return None
    d = _f16(s32)
    if d is None:
        return None
    out = torch.cat([d.unsqueeze(-1).view(torch.uint8), v.to(torch.int8).view(torch.uint8).reshape(n, k // 32, 32)], dim=-1)
    return ggml.Q8_0, out.reshape(n, -1)


def repackable(m: nn.Module) -> bool:
    return (isinstance(m, PackedLinear) and m.in_features % 32 == 0 and m.packed.bits <= 8
            and next(iter(m.buffers_dict().values())).device.type == "cpu")


class InputPermuted(nn.Module):
    """linear(x[..., perm]): an act-order weight whose input columns were sorted by group, so that
    each group is contiguous (and fits GGUF blocks)."""

    def __init__(self, perm: torch.Tensor, linear: nn.Module):
        super().__init__()
        self.register_buffer("perm", perm, persistent=False)
        self.linear = linear
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.index_select(-1, self.perm))


def to_blocks(m: PackedLinear) -> nn.Module:
    """The PackedLinear as a QuantLinear over GGUF blocks (behind its input permutation for an
    act-order weight), or itself when its weight does not fit."""
    n, k = m.out_features, m.in_features
    t = m.buffers_dict()
    g_idx = t.get("g_idx", t.get("weight_g_idx"))
    perm = None
    if g_idx is not None and not bool((g_idx.long()[1:] >= g_idx.long()[:-1]).all()):
        perm = torch.sort(g_idx.long(), stable=True).indices
    step = max(m.packed.row_align, ROWS_PER_CHUNK // m.packed.row_align * m.packed.row_align)
    out, qtype = None, None
    for r in range(0, n, step):
        e = min(n, r + step)
        got = _blocks(m.packed, t, r, e, perm)
        if got is None or (qtype is not None and got[0] != qtype):
            return m
        qtype = got[0]
        if out is None:
            out = torch.empty((n, got[1].shape[1]), dtype=torch.uint8)
        out[r:e] = got[1]
    q = QuantLinear(GGMLWeight(out, qtype, (n, k)), m.bias)
    return q if perm is None else InputPermuted(perm, q)


def _fused(m: PackedConcatLinear) -> nn.Module | None:
    """The packed parts of a fused projection (q/k/v, gate/up) repacked: one QuantLinear over their
    stacked blocks when every part has the same block type and no input permutation; else None,
    with each part that fits repacked in place."""
    parts = [to_blocks(p) if repackable(p) else p for p in m.parts]
    if all(isinstance(p, QuantLinear) for p in parts) and len({p.ggml_type for p in parts}) == 1:
        w = parts[0].weight.cat_rows([p.weight for p in parts])
        biases = [p.bias for p in parts]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b.detach() if b is not None else torch.zeros(p.out_features) for b, p in zip(biases, parts)])
        return QuantLinear(w, bias)
    for i, p in enumerate(parts):
        m.parts[i] = p
    return None


def repack(model: nn.Module) -> int:
    """Every PackedLinear that fits GGUF blocks becomes a QuantLinear over them (the packed parts of
    a fused projection one QuantLinear). Returns how many modules changed."""
    n = 0
    fused_parts = set()  # the part lists of fused projections, handled with their projection
    for mod in list(model.modules()):
        if id(mod) in fused_parts:
            continue
        for name, child in list(mod.named_children()):
            if isinstance(child, PackedConcatLinear):
                fused_parts.add(id(child.parts))
                before = list(child.parts)
                new = _fused(child)
                if new is not None:
                    setattr(mod, name, new)
                n += new is not None or any(a is not b for a, b in zip(before, child.parts))
            elif repackable(child):
                new = to_blocks(child)
                if new is not child:
                    setattr(mod, name, new)
                    n += 1
    return n


# ---- FP8 on torch._scaled_mm -------------------------------------------------------------------
def scaled_mm_available(device: torch.device) -> bool:
    """torch._scaled_mm with FP8 inputs runs on this CUDA device (compute capability 8.9+)."""
    return (device.type == "cuda" and hasattr(torch, "_scaled_mm") and torch.cuda.is_available()
            and torch.cuda.get_device_capability(device) >= (8, 9))


def scaled_mm_able(m: nn.Module) -> bool:
    p = getattr(m, "packed", None)
    return (isinstance(m, PackedLinear) and getattr(p, "values", None) == "fp8" and p.layout in ("tensor", "channel")
            and m.in_features % 16 == 0 and m.out_features % 16 == 0)


class ScaledMMLinear(nn.Module):
    """y = x W^T + b for an FP8 weight with per-tensor or per-channel scales, on torch._scaled_mm:
    x quantised to FP8 with one scale per row (dynamic) or the checkpoint's static input_scale."""

    def __init__(self, m: PackedLinear):
        super().__init__()
        self.out_features, self.in_features = m.out_features, m.in_features
        t = m.buffers_dict()
        p = m.packed
        self.register_buffer("qweight", t["weight"], persistent=False)  # [N, K] row-major: .t() is column-major
        s = t[p.scale_key].float().reshape(-1)
        self.register_buffer("weight_scale", s.expand(self.out_features).reshape(1, -1).contiguous(), persistent=False)
        inp = t.get("input_scale")
        self.register_buffer("input_scale", None if inp is None else inp.float().reshape(()), persistent=False)
        self.bias = m.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.input_scale is not None:  # static: per-tensor, used as the per-row scale of every row
            a = self.input_scale.expand(x2.shape[0], 1).contiguous()
        else:
            a = (x2.abs().amax(-1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
        xq = (x2.float() / a).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32
        y = torch._scaled_mm(xq, self.qweight.t(), scale_a=a, scale_b=self.weight_scale, out_dtype=out_dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


def to_scaled_mm(model: nn.Module) -> int:
    return replace_modules(model, scaled_mm_able, ScaledMMLinear)

