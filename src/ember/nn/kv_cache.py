"""A preallocated KV cache written in place.

Layout per layer: k, v of shape [B, KV_heads, columns, head_dim]. Row b's token at position p lives
in column p, so sequences of different lengths share one batch with no padding in the cache: a
row's write position is its own length. The mask rule in `attention.py` (column <= position)
hides whatever stale values lie beyond a row's length. Position `max_len - 1` is the scratch
position: rows that idle through a batched decode step write there, and no sequence reads it.

Sliding-window layers (window W shorter than the cache) keep a ring of W columns instead, plus a
scratch column: position p lives in column p % W, so the ring always holds a row's last W tokens,
which is all a window of W lets a query see. Each forward over a ring layer is one of three modes
(`KVCache.ring_mode`), decided by the forward's shape alone so that every layer with the same
window agrees, and `Step.mask` builds the matching mask:
- "plain": no position reaches W yet (kv_len <= W), so column = position as in a full layer;
- "decode": one token per row: write at p % W, attend over the W ring columns (column <= position
  hides what a row that has not wrapped yet has not written);
- "concat": a prefill chunk that reaches past W: attend over the ring as it was before the chunk
  (positions recovered from the chunk's start) joined with the chunk's own keys, then keep the
  chunk's last W tokens in the ring. A fresh chunk (from position 0) attends over itself only.
Writes of rows padded past their length would wrap onto their real tokens, so the Generator
prefills rows of different lengths one at a time when a chunk reaches past a ring's window.
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
        windows: Sequence[int | None] | None = None,
    ):
        """`layers` is a list of (kv_heads, head_dim) per layer, or (kv_heads, k_dim, v_dim) where keys and
        values differ in width (MLA keeps its latent as k, its rotated key part as v), or a layer count
        with kv_heads and head_dim given.
        `windows`: each layer's sliding window (None = full attention); a window shorter than the
        cache makes that layer a ring of window + 1 columns."""
        if isinstance(layers, int):
            layers = [(kv_heads, head_dim)] * layers
        layers = list(layers)
        windows = list(windows) if windows is not None else [None] * len(layers)
        if len(windows) != len(layers):
            raise ValueError(f"{len(windows)} windows for {len(layers)} layers")
        self.batch, self.max_len = batch, max_len
        self.dtype, self.device = dtype, torch.device(device)
        self.scratch = max_len - 1
        # a ring only where it saves room: window + scratch column shorter than the full cache
        self.windows = [w if w is not None and w + 1 < max_len else None for w in windows]
        cols = [max_len if w is None else w + 1 for w in self.windows]
        self.k = [torch.zeros(batch, spec[0], n, spec[1], dtype=dtype, device=device) for spec, n in zip(layers, cols)]
        self.v = [torch.zeros(batch, spec[0], n, spec[-1], dtype=dtype, device=device) for spec, n in zip(layers, cols)]
        self._rows = torch.arange(batch, device=device)[:, None]
        self._last_col: tuple | None = None  # (columns tensor, kv_len, its value) within one forward
        self.rope_deltas = RopeDeltas(batch, device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    @staticmethod
    def token_width(spec: Sequence[int]) -> int:
        """Cache elements one token takes in a layer of layout `spec` (kv_heads, head_dim[, v_dim])."""
        return spec[0] * (spec[1] + spec[-1])

    def is_ring(self, window: int | None) -> bool:
        return window is not None and window in self.windows

    @property
    def smallest_ring(self) -> int | None:
        rings = [w for w in self.windows if w is not None]
        return min(rings) if rings else None

    @staticmethod
    def ring_mode(window: int, T: int, kv_len: int) -> str:
        if kv_len <= window:
            return "plain"
        return "decode" if T == 1 else "concat"

    def _columns(self, window: int, position_ids: torch.Tensor) -> torch.Tensor:
        return torch.where(position_ids == self.scratch, window, position_ids % window)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, position_ids: torch.Tensor, kv_len: int,
               rows: slice | None = None, fresh: bool = False):
        """Write k, v [B, KV, T, D] at each row's positions [B, T] into cache rows `rows`
        (default: the first B); return the keys and values to attend over: for a full layer those
        rows' first kv_len columns (a view, no copy); for a ring layer see the module docstring."""
        B, T = position_ids.shape
        rows = rows or slice(0, B)
        kc, vc = self.k[layer][rows], self.v[layer][rows]
        w = self.windows[layer]
        if w is None or self.ring_mode(w, T, kv_len) == "plain":
            cols = position_ids if w is None else self._columns(w, position_ids)
            self._write(kc, vc, k, v, cols, kv_len)
            return kc[:, :, :kv_len], vc[:, :, :kv_len]
        if T == 1:
            self._write(kc, vc, k, v, self._columns(w, position_ids))
            return kc[:, :, :w], vc[:, :, :w]
        # concat: the ring before this chunk joined with the chunk, then the chunk's last w tokens kept
        if fresh:
            keys, values = k, v
        else:
            keys = torch.cat([kc[:, :, :w], k.to(kc.dtype)], dim=2)
            values = torch.cat([vc[:, :, :w], v.to(vc.dtype)], dim=2)
        keep = min(T, w)
        self._write(kc, vc, k[:, :, T - keep:], v[:, :, T - keep:], self._columns(w, position_ids[:, T - keep:]))
        return keys, values

    def begin_forward(self) -> None:
        """A model forward starts: memos of the previous one are void (a static decode step writes
        its next positions into the same tensor in place, under inference mode, where no version
        counter tells)."""
        self._last_col = None

    def _host_column(self, cols: torch.Tensor, kv_len: int) -> int:
        # within one forward every full layer gets the same position tensor: read it to the host once
        last = self._last_col
        if last is not None and last[0] is cols and last[1] == kv_len:
            return last[2]
        p = int(cols[0, 0])
        self._last_col = (cols, kv_len, p)
        return p

    def _write(self, kc, vc, k, v, cols: torch.Tensor, kv_len: int | None = None) -> None:
        B, T = cols.shape
        if B == 1 and T == 1 and not cols.is_cuda and not torch.compiler.is_compiling():
            # Single-token decode on CPU: a narrow copy is cheaper than index_put. The column is read
            # to the host once per step: full layers all get the same position tensor.
            p = self._host_column(cols, kc.shape[2] if kv_len is None else kv_len)
            kc[:, :, p : p + 1].copy_(k)
            vc[:, :, p : p + 1].copy_(v)
        else:
            # Advanced indices on dims 0 and 2 put the indexed dims first: [B, T, KV, D].
            r = self._rows[:B]
            kc[r, :, cols] = k.transpose(1, 2).to(kc.dtype)
            vc[r, :, cols] = v.transpose(1, 2).to(vc.dtype)


class RopeDeltas:
    """Per cache row: rotary position = cache position + delta. M-RoPE models (Qwen2.5-VL ...) give
    an image prompt's tokens 3-D rotary positions whose largest is less than the prompt's length,
    so the tokens after it rotate by cache position + delta (transformers' rope_deltas). The
    Generator sets a row's delta when a request takes the slot (0 for text: plain positions); the
    model adds `values[rows]` in every forward without explicit rotary positions, so the engine's
    static decode step (CUDA graphs) reads it from a fixed address."""

    def __init__(self, batch: int, device):
        self.values = torch.zeros(batch, dtype=torch.long, device=device)
        self._host = [0] * batch  # what values holds: a delta that does not change costs no device write

    def set(self, row: int, delta: int) -> None:
        if self._host[row] != delta:
            self.values[row] = delta
            self._host[row] = delta

    def positions(self, position_ids: torch.Tensor, rows: slice | None) -> torch.Tensor:
        """Rotary positions [B, T] of cache positions `position_ids` [B, T] in cache rows `rows`
        (default: the first B)."""
        return position_ids + self.values[rows if rows is not None else slice(0, position_ids.shape[0])].unsqueeze(-1)


def ring_key_positions(position_ids: torch.Tensor, window: int, fresh: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """For a "concat" forward: the position of every key (ring columns as they were before the
    chunk, then the chunk's tokens) [B, S] and whether it holds a token of this row [B, S]."""
    if fresh:
        return position_ids, torch.ones_like(position_ids, dtype=torch.bool)
    p0 = position_ids[:, :1]  # [B, 1] each row's first position in the chunk
    c = torch.arange(window, device=position_ids.device)
    last = p0 - 1 - torch.remainder(p0 - 1 - c, window)  # the latest position < p0 that lives in column c
    pos = torch.cat([last, position_ids], dim=1)
    valid = torch.cat([last >= 0, torch.ones_like(position_ids, dtype=torch.bool)], dim=1)
    return pos, valid
