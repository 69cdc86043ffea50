"""Bit unpacking and scale expansion shared by the formats."""
from __future__ import annotations

import torch


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> unsigned codes (int32) along `dim` (0 or 1 of a 2-D tensor): code i of a word
    sits at bits [i*bits, (i+1)*bits), the order GPTQ, AWQ (before its column shuffle) and
    compressed-tensors (for 4 and 8 bits) write. The unpacked dim grows by 32 // bits."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    mask = (1 << bits) - 1
    p = packed.to(torch.int32)
    if dim == 0:
        out = (p.unsqueeze(1) >> shifts.view(1, per, 1)) & mask
        return out.reshape(p.shape[0] * per, p.shape[1])
    out = (p.unsqueeze(2) >> shifts.view(1, 1, per)) & mask
    return out.reshape(p.shape[0], p.shape[1] * per)


def expand_blocks(s: torch.Tensor, rows: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    """A per-block scale [ceil(rows/b0), ceil(cols/b1)] as one value per weight [rows, cols]."""
    b0, b1 = block
    return s.repeat_interleave(b0, 0)[:rows].repeat_interleave(b1, 1)[:, :cols]


def group_index(k: int, group_size: int, g_idx: torch.Tensor | None, device) -> torch.Tensor:
    """The group of each input column: g_idx (act-order) or column // group_size (long)."""
    if g_idx is not None:
        return g_idx.to(device=device, dtype=torch.long)
    return torch.arange(k, device=device) // group_size
