"""The `mxfp4` method (GPT-OSS, as transformers reads it: integrations/mxfp4.py): each MoE expert
tensor `X` (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`) is stored as

  X_blocks  uint8 [E, R, G, 16]: per row of R, G blocks of 32 E2M1 codes, two per byte (low nibble
            first: element 2i is byte i's low nibble, 2i+1 its high one)
  X_scales  uint8 [E, R, G]: one E8M0 exponent per block, the block's scale 2^(e-127)

The row is the projection's output and the 32*G columns its input, so the dequantised [E, R, 32G]
is the transpose of the tensor the model stores (gate_up_proj [E, H, 2F], down_proj [E, F, H]).
Everything else (attention, router, embeddings: `modules_to_not_convert`) is plain bf16.

Here the experts are dequantised when loaded, exactly as transformers' `convert_moe_packed_tensors`
does (same values, any dtype): `MXFP4Source` lists each `X` with its model shape and hands out the
dequantised tensor, a transposed view. ember does not keep MXFP4 experts packed yet.
"""
from __future__ import annotations

import torch

from ..errors import CheckpointError
from ..io.iquants import KVALUES_MXFP4, _table, e8m0_half
from .config import MXFP4Config

PARTS = ("_blocks", "_scales")
BLOCK_BYTES = 16  # 32 four-bit codes
NAN_EXPONENT = 255  # E8M0's NaN


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype=torch.float32, chunk: int = 1 << 18) -> torch.Tensor:
    """blocks uint8 [..., G, 16], scales uint8 [..., G] -> [..., 32G] in `dtype`: code * 2^(scale-127),
    elements interleaved low nibble, high nibble per byte (the doubled E2M1 table times half the
    scale), `chunk` blocks at a time so that the index tensors stay small."""
    lut = _table(KVALUES_MXFP4, blocks.device)
    b, s = blocks.reshape(-1, BLOCK_BYTES), scales.reshape(-1, 1)
    out = torch.empty(b.shape[0], 2 * BLOCK_BYTES, dtype=torch.float32, device=blocks.device)
    for i in range(0, b.shape[0], chunk):
        bc, o = b[i:i + chunk], out[i:i + chunk]
        o[:, 0::2] = lut[(bc & 0x0F).long()]
        o[:, 1::2] = lut[(bc >> 4).long()]
        o.mul_(e8m0_half(s[i:i + chunk]))
    return out.reshape(*blocks.shape[:-2], -1).to(dtype)


class MXFP4Source:
    """A TensorSource over a GPT-OSS MXFP4 checkpoint: each `X_blocks`/`X_scales` pair appears as one
    tensor `X` of the model's shape, dequantised when loaded; everything else passes through. Every
    pair is checked (dtypes, shapes from the headers) when the source is made."""

    always_dense = True  # the experts are dequantised at load whatever keep_quantized says

    def __init__(self, inner, cfg: MXFP4Config, where: str):
        self.inner, self.config, self.where = inner, cfg, where
        self.dense = True
        keys = list(inner.keys())
        keyset = set(keys)
        self.packed: dict[str, tuple[str, str, tuple[int, ...]]] = {}
        for k in keys:
            if not k.endswith(PARTS) or len(k) <= len(PARTS[0]):
                continue
            x = k[:-len(PARTS[0])]
            if x in self.packed:
                continue
            bk, sk = x + "_blocks", x + "_scales"
            for a, b in ((bk, sk), (sk, bk)):
                if a in keyset and b not in keyset:
                    raise CheckpointError(f"{where}: tensor {a!r} has no {b.rsplit('_', 1)[1]} beside it ({b!r} is missing)")
            bshape, sshape = tuple(inner.shape(bk)), tuple(inner.shape(sk))
            if inner.dtype(bk) != torch.uint8 or len(bshape) < 3 or bshape[-1] != BLOCK_BYTES or 0 in bshape:
                raise CheckpointError(f"{where}: tensor {bk!r} is {inner.dtype(bk)} {list(bshape)}; MXFP4 blocks are "
                                      f"uint8 [experts, rows, blocks, {BLOCK_BYTES}]")
            if inner.dtype(sk) != torch.uint8 or sshape != bshape[:-1]:
                raise CheckpointError(f"{where}: tensor {sk!r} is {inner.dtype(sk)} {list(sshape)}; for blocks "
                                      f"{list(bshape)} the MXFP4 scales must be uint8 {list(bshape[:-1])}")
            *lead, rows, groups, _ = bshape
            if x in keyset:
                raise CheckpointError(f"{where}: tensor {x!r} is stored both plain and as MXFP4 ({bk!r})")
            self.packed[x] = (bk, sk, (*lead, groups * 2 * BLOCK_BYTES, rows))
        if not self.packed:
            raise CheckpointError(f"{where}: quantization_config says mxfp4, but no tensor is quantised "
                                  f"(no *_blocks / *_scales tensor)")
        hidden = {k for bk, sk, _ in self.packed.values() for k in (bk, sk)}
        self._keys = dict.fromkeys([k for k in keys if k not in hidden] + list(self.packed))

    def keys(self):
        return self._keys.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        p = self.packed.get(key)
        return p[2] if p is not None else self.inner.shape(key)

    def dtype(self, key: str):
        return torch.float32 if key in self.packed else self.inner.dtype(key)

    def load(self, key: str):
        p = self.packed.get(key)
        if p is None:
            return self.inner.load(key)
        bk, sk, _ = p
        scales = self.inner.load(sk)
        if bool((scales == NAN_EXPONENT).any()):
            raise CheckpointError(f"{self.where}: tensor {sk!r} holds the E8M0 exponent 255 (NaN), which no "
                                  f"quantised weight has")
        return dequantize(self.inner.load(bk), scales).transpose(-1, -2)

    def release(self, key: str) -> None:
        if hasattr(self.inner, "release"):
            for k in self.packed[key][:2] if key in self.packed else (key,):
                self.inner.release(k)

    def describe(self) -> str:
        return self.inner.describe()

    def nbytes(self) -> int:
        """Bytes of the MXFP4 blocks and scales in the file."""
        total = 0
        for bk, sk, _ in self.packed.values():
            for k in (bk, sk):
                n = 1
                for d in self.inner.shape(k):
                    n *= d
                total += n
        return total
