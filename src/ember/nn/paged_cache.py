"""A paged KV cache: memory follows the tokens held, not rows × max_len.

Per layer, keys and values live in a pool of fixed-size blocks [blocks, KV_heads, block, head_dim].
Each row (a sequence slot) has a block table: its position p lives in block table[row, p // block]
at offset p % block. Blocks come from a free list as a row's positions grow (`reserve`) and go back
when the row is freed (`release`), so a pool sized for the tokens actually held serves many rows of
different lengths. Block 0 is never handed out: table entries not backed by a block point at it, and
writes to the scratch position (max_len - 1, where idle rows of a batched step write, as in
`KVCache`) land there; nothing reads it unmasked.

It keeps `KVCache.update`'s contract, so the model code is unchanged: a forward writes each row's
new keys at its positions and attends over the row's first kv_len columns, gathered from its blocks
(the pure-PyTorch gather path; kv_len is the longest live row in the step, not max_len). Keys at
columns past a row's position are hidden by the same column <= position mask. Sliding-window rings
and the prefix cache's row copies are not supported here.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import GenerationError
from .kv_cache import RopeDeltas

BLOCK = 16


class PagedKVCache:
    def __init__(self, batch: int, max_len: int, layers: Sequence[tuple[int, ...]], *, block: int = BLOCK,
                 num_blocks: int | None = None, dtype: torch.dtype = torch.float32, device="cpu"):
        """layers: (kv_heads, head_dim) or (kv_heads, k_dim, v_dim) per layer, as KVCache's.
        num_blocks: the pool's size (default: enough for every row at max_len)."""
        if block < 1 or max_len < 2 or batch < 1:
            raise ValueError(f"bad paged cache shape: batch {batch}, max_len {max_len}, block {block}")
        self.batch, self.max_len, self.block = batch, max_len, block
        self.dtype, self.device = dtype, torch.device(device)
        self.scratch = max_len - 1
        self.per_row = -(-max_len // block)  # table width
        n = batch * self.per_row if num_blocks is None else num_blocks
        layers = list(layers)
        self.windows = [None] * len(layers)
        self.k = [torch.zeros(n + 1, s[0], block, s[1], dtype=dtype, device=device) for s in layers]
        self.v = [torch.zeros(n + 1, s[0], block, s[-1], dtype=dtype, device=device) for s in layers]
        self.table = torch.zeros(batch, self.per_row, dtype=torch.long, device=device)
        self._free = list(range(n, 0, -1))  # block ids, popped from the end
        self._held: list[list[int]] = [[] for _ in range(batch)]
        self.rope_deltas = RopeDeltas(batch, device)  # as KVCache's

    @classmethod
    def for_model(cls, model, batch: int, max_len: int, *, block: int = BLOCK, num_blocks: int | None = None,
                  dtype: torch.dtype | None = None, device=None) -> "PagedKVCache":
        """A paged cache laid out for a causal LM (one without sliding-window layers)."""
        if any(w is not None for w in model.cache_windows()):
            raise GenerationError("the paged KV cache does not support sliding-window layers yet")
        if any(st is not None for st in getattr(model, "state_layout", lambda: [])()):
            raise GenerationError("the paged KV cache does not support layers with recurrent state yet")
        p = next(iter(model.parameters()))
        dtype = dtype or (p.dtype if p.is_floating_point() else torch.float32)
        return cls(batch, max_len, model.cache_layout(), block=block, num_blocks=num_blocks, dtype=dtype,
                   device=device or p.device)

    # ---- the pool ------------------------------------------------------------------------------
    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return sum(map(len, self._held))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def reserve(self, row: int, length: int) -> None:
        """Back positions [0, length) of `row` with blocks (taken from the free pool as needed)."""
        need = -(-min(length, self.max_len - 1) // self.block) - len(self._held[row])
        if need <= 0:
            return
        if need > len(self._free):
            raise GenerationError(f"the paged KV cache is full ({self.used_blocks} blocks of {self.block} tokens "
                                  f"held); give it more blocks or fewer concurrent sequences")
        new = [self._free.pop() for _ in range(need)]
        start = len(self._held[row])
        self._held[row] += new
        self.table[row, start:start + need] = torch.tensor(new, dtype=torch.long)

    def release(self, row: int) -> None:
        """Give a row's blocks back to the pool (its sequence ended)."""
        self._free += reversed(self._held[row])
        self._held[row] = []
        self.table[row].zero_()

    # ---- KVCache's interface ---------------------------------------------------------------------
    def is_ring(self, window) -> bool:
        return False

    smallest_ring = None

    def begin_forward(self) -> None:
        pass

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, position_ids: torch.Tensor, kv_len: int,
               rows: slice | None = None, fresh: bool = False):
        """Write k, v [B, KV, T, D] at each row's positions [B, T]; return the rows' first kv_len
        columns [B, KV, kv_len, D] gathered from their blocks."""
        B, T = position_ids.shape
        rows = rows or slice(0, B)
        table = self.table[rows]
        pos = position_ids.clamp(0, self.max_len - 1)
        blk = table.gather(1, pos // self.block)
        blk = torch.where(position_ids == self.scratch, 0, blk)  # idle rows' writes go to block 0
        off = pos % self.block
        kp, vp = self.k[layer], self.v[layer]
        # advanced indices on dims 0 and 2 put them first: [B, T, KV, D]
        kp[blk, :, off] = k.transpose(1, 2).to(kp.dtype)
        vp[blk, :, off] = v.transpose(1, 2).to(vp.dtype)
        cols = torch.arange(kv_len, device=table.device)
        cb = table[:, cols // self.block]  # [B, S]
        co = (cols % self.block).expand_as(cb)
        return kp[cb, :, co].transpose(1, 2), vp[cb, :, co].transpose(1, 2)
