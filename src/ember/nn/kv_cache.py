"""A preallocated KV cache written in place.

Layout per layer: k, v of shape [B, KV_heads, max_len, head_dim]. Row b's token at position p lives
in column p, so sequences of different lengths share one batch with no padding in the cache: a
row's write position is its own length. The mask rule in `attention.py` (column <= position)
hides whatever stale values lie beyond a row's length.
"""
from __future__ import annotations

from typing import Sequence

import torch


class KVCache:
    def __init__(
        self,
        batch: int,
        max_len: int,
        layers: Sequence[tuple[int, int]] | int,
        kv_heads: int | None = None,
        head_dim: int | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ):
        """`layers` is a list of (kv_heads, head_dim) per layer, or a layer count with both given."""
        if isinstance(layers, int):
            layers = [(kv_heads, head_dim)] * layers
        self.batch, self.max_len = batch, max_len
        self.dtype, self.device = dtype, torch.device(device)
        self.k = [torch.zeros(batch, h, max_len, d, dtype=dtype, device=device) for h, d in layers]
        self.v = [torch.zeros(batch, h, max_len, d, dtype=dtype, device=device) for h, d in layers]
        self._rows = torch.arange(batch, device=device)[:, None]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, position_ids: torch.Tensor, kv_len: int,
               rows: slice | None = None):
        """Write k, v [B, KV, T, D] at each row's positions [B, T] into cache rows `rows`
        (default: the first B); return those rows' first kv_len columns (a view, no copy)."""
        B, T = position_ids.shape
        rows = rows or slice(0, B)
        kc, vc = self.k[layer][rows], self.v[layer][rows]
        if B == 1 and T == 1 and not position_ids.is_cuda and not torch.compiler.is_compiling():
            # Single-token decode on CPU: a narrow copy is cheaper than index_put.
            p = int(position_ids[0, 0])
            kc[:, :, p : p + 1].copy_(k)
            vc[:, :, p : p + 1].copy_(v)
        else:
            # Advanced indices on dims 0 and 2 put the indexed dims first: [B, T, KV, D].
            r = self._rows[:B]
            kc[r, :, position_ids] = k.transpose(1, 2).to(kc.dtype)
            vc[r, :, position_ids] = v.transpose(1, 2).to(vc.dtype)
        return kc[:, :, :kv_len], vc[:, :, :kv_len]
