"""A weight stored as codes times a scale (and minus a zero point): what compressed-tensors
(pack-quantized, int-quantized, float-quantized) and the block-wise `fp8` method write.

  values: "packed" (int32 words of 4/8-bit codes along the inputs, offset by 2^(bits-1)),
          "int8" or "fp8" (one code per weight, [N, K])
  scale:  "tensor" (one value), "channel" ([N, 1]), "group" ([N, G], groups of consecutive inputs
          or g_idx), "block" ([ceil(N/b0), ceil(K/b1)])
  W = (q - zero) * scale
"""
from __future__ import annotations

import torch

from ..nn.packed import PackedWeight
from .unpack import expand_blocks, group_index, unpack_int32


class ScaledWeight(PackedWeight):
    def __init__(self, name, shape, tensors, *, method: str, scheme: str, values: str, bits: int, layout: str,
                 group_size: int | None = None, block: tuple[int, int] | None = None, scale_key: str = "weight_scale",
                 zero: str | None = None):
        super().__init__(name, shape, tensors, scheme)
        self.method, self.values, self.bits, self.layout = method, values, bits, layout
        self.group_size, self.block, self.scale_key, self.zero = group_size, block, scale_key, zero
        self.signed = values != "fp8"  # compressed-tensors' integer codes are signed
        if layout == "block":
            self.row_align = block[0]
        elif zero == "packed":
            self.row_align = 32 // bits

    @property
    def fp8(self) -> bool:
        return self.values == "fp8"

    def codes(self, t, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the codes (int32 for integers, float32 for FP8), zero point not applied."""
        if self.values == "packed":
            k = self.shape[1]
            return unpack_int32(t["weight_packed"][start:stop], self.bits, 1)[:, :k] - (1 << (self.bits - 1))
        w = t["weight"][start:stop]
        return w.float() if self.fp8 else w.to(torch.int32)

    def _per_weight(self, s: torch.Tensor, start: int, stop: int, g: torch.Tensor | None) -> torch.Tensor:
        """A scale-shaped tensor (scale or zero point) broadcast over rows [start, stop)."""
        if self.layout == "tensor":
            return s.reshape(())
        if self.layout == "channel":
            return s.reshape(-1, 1)[start:stop]
        if self.layout == "group":
            return s[start:stop].index_select(1, g)
        b0 = self.block[0]
        return expand_blocks(s[start // b0:-(-stop // b0)], stop - start, self.shape[1], self.block)

    def dequantize_rows(self, t, start, stop, dtype):
        if not self.fp8:
            return super().dequantize_rows(t, start, stop, dtype)
        # FP8: two passes in the compute dtype (codes widened, then scaled in place), the fewest a
        # per-forward dequantisation can take; each FP8 value is exact in bf16/f16/f32
        w = t["weight"][start:stop].to(dtype)
        s = t[self.scale_key]
        if self.layout == "block" and (stop - start) % self.block[0] == 0 and self.shape[1] % self.block[1] == 0:
            b0, b1 = self.block
            blocks = s[start // b0:stop // b0].to(dtype)[:, None, :, None]
            w.view((stop - start) // b0, b0, self.shape[1] // b1, b1).mul_(blocks)
            return w
        g = group_index(self.shape[1], self.group_size, t.get("weight_g_idx"), w.device) if self.layout == "group" else None
        return w.mul_(self._per_weight(s.to(dtype), start, stop, g))

    def affine_rows(self, t, start, stop):
        q = self.codes(t, start, stop)
        g = None
        if self.layout == "group":
            g = group_index(self.shape[1], self.group_size, t.get("weight_g_idx"), q.device)
        z = 0
        if self.zero == "dense":
            z = self._per_weight(t["weight_zero_point"].to(torch.int32), start, stop, g)
        elif self.zero == "packed":  # channel or group: packed along the outputs, [ceil(N*bits/32), G]
            per = 32 // self.bits
            zp = unpack_int32(t["weight_zero_point"][start // per:-(-stop // per)], self.bits, 0)
            z = self._per_weight(zp - (1 << (self.bits - 1)), 0, stop - start, g)
        return q, self._per_weight(t[self.scale_key].float(), start, stop, g), z
