"""Weight-only quantisation at load: `ember.load(..., quantize="int8" | "int4")` for any checkpoint.

Weights are quantised into GGUF block layouts, so the same kernels that run GGUF files run them
(`ember.backends.native` on CPU) and any GGUF tool can read the bytes:

- "int8": Q8_0, a float16 scale per 32 weights (8.5 bits per weight; finer than per-channel int8,
  the same format as llama.cpp's Q8_0).
- "int4": Q4_1, a float16 scale and minimum per 32 weights (5 bits per weight, group-wise
  asymmetric int4). The LM head stays int8, as llama.cpp's 4-bit presets keep the output layer
  at higher precision.

The quantiser is vectorised torch, a block of rows at a time, so a weight never needs a float32
copy of itself whole. Round-to-nearest, as llama.cpp's reference quantisers.
"""
from __future__ import annotations

import torch

from .io import ggml

MODES = {"int8": ggml.Q8_0, "int4": ggml.Q4_1}
ROWS_PER_CHUNK = 256


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float values [..., 1] -> their float16 bytes [..., 2]."""
    return x.to(torch.float16).contiguous().view(torch.uint8)


def quantize_q8_0(w: torch.Tensor) -> torch.Tensor:
    """[N, K] float -> Q8_0 blocks uint8 [N, K/32 * 34] (d as f16, then 32 int8)."""
    n, k = w.shape
    x = w.float().reshape(n, k // 32, 32)
    amax = x.abs().amax(-1, keepdim=True)
    d = amax / 127
    d16 = d.to(torch.float16).float()  # quantise against the scale the file stores, as ggml does
    inv = torch.where(d16 > 0, 1.0 / d16, torch.zeros_like(d16))
    q = torch.round(x * inv).clamp(-127, 127).to(torch.int8)
    out = torch.cat([_f16_bytes(d16), q.view(torch.uint8)], dim=-1)
    return out.reshape(n, -1)


def quantize_q4_1(w: torch.Tensor) -> torch.Tensor:
    """[N, K] float -> Q4_1 blocks uint8 [N, K/32 * 20] (d, m as f16, then 16 bytes of nibbles:
    value j in the low nibble of byte j, value j + 16 in its high nibble)."""
    n, k = w.shape
    x = w.float().reshape(n, k // 32, 32)
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    d = (hi - lo) / 15
    d16, m16 = d.to(torch.float16).float(), lo.to(torch.float16).float()
    inv = torch.where(d16 > 0, 1.0 / d16, torch.zeros_like(d16))
    q = torch.round((x - m16) * inv).clamp(0, 15).to(torch.uint8)
    packed = q[..., :16] | (q[..., 16:] << 4)
    out = torch.cat([_f16_bytes(d16), _f16_bytes(m16), packed], dim=-1)
    return out.reshape(n, -1)


QUANTIZERS = {ggml.Q8_0: quantize_q8_0, ggml.Q4_1: quantize_q4_1}


def quantize(w: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """A weight [N, K] (K a multiple of 32) as blocks of `ggml_type`, ROWS_PER_CHUNK rows at a time."""
    fn = QUANTIZERS[ggml_type]
    n, k = w.shape
    _, row_bytes = ggml.block_size(ggml_type)
    out = torch.empty((n, k // 32 * row_bytes), dtype=torch.uint8)
    for r in range(0, n, ROWS_PER_CHUNK):
        out[r:r + ROWS_PER_CHUNK] = fn(w[r:r + ROWS_PER_CHUNK])
    return out


def quantizable(m: torch.nn.Module) -> bool:
    from .nn.layers import Linear

    return isinstance(m, Linear) and m.weight.dim() == 2 and m.in_features % 32 == 0 and m.weight.is_floating_point()


def quantize_linears(model: torch.nn.Module, mode: str) -> int:
    """Every Linear of `model` (K a multiple of 32) becomes a QuantLinear over blocks of `mode`'s type
    (the LM head of an "int4" model: int8). Returns how many; a transform runs after this one picks
    the kernel (`native-quant`)."""
    from .io.ggml_weight import GGMLWeight
    from .io.safetensors import release_view
    from .nn.quantized import QuantLinear

    n = 0
    head = getattr(model, "lm_head", None)
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if not quantizable(child):
                continue
            qtype = ggml.Q8_0 if child is head else MODES[mode]
            w = child.weight.detach()
            blocks = quantize(w, qtype)
            q = QuantLinear(GGMLWeight(blocks, qtype, tuple(w.shape), dtype=w.dtype), child.bias)
            setattr(mod, name, q)
            release_view(child.weight)  # a tied head shares the embedding's storage: released only if unshared
            n += 1
    return n
