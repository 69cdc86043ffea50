"""A KV cache that also holds recurrent state: the convolution window and SSM state of state-space
layers (Mamba, Mamba-2, the Mamba layers of hybrids), beside the keys and values of attention layers.

Each recurrent layer's state is a few tensors of fixed shape per cache row ("slot"), allocated once,
so a decode step over the cache is shape-static (CUDA-graph capturable) like attention's. A layer
without attention has an empty KV layout (0, 0), and an attention layer no state.

Unlike keys and values, a state is not indexed by position: it is the whole past of the row. So
- a row that idles through a batched decode step (its position is the scratch position, see
  kv_cache.py) must keep its state: `write_state` writes only rows whose last position is a real one;
- a slot that takes a new sequence starts from zero state: `reset_rows` (the Generator calls it when
  it admits a request; a `fresh` forward reads no state either);
- a padded row would carry its padding into its state, so rows of different lengths are prefilled
  apart (the Generator does), and the prefix cache, which restores keys and values only, stays off.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .kv_cache import KVCache

# Per layer: the shapes (without the batch dimension) and dtypes (None: the cache's) of its state
# tensors, or None for a layer without recurrent state.
StateSpec = Sequence[tuple[tuple[int, ...], torch.dtype | None]] | None


class StateCache(KVCache):
    recurrent = True  # the Generator resets slots and prefills unequal rows apart (see above)

    def __init__(self, batch: int, max_len: int, layers, states: Sequence[StateSpec], *,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 windows: Sequence[int | None] | None = None):
        super().__init__(batch, max_len, layers, dtype=dtype, device=device, windows=windows)
        states = list(states)
        if len(states) != len(self.k):
            raise ValueError(f"{len(states)} state specs for {len(self.k)} layers")
        self.states: list[tuple[torch.Tensor, ...] | None] = [
            None if spec is None else tuple(torch.zeros(batch, *shape, dtype=dt or dtype, device=device)
                                            for shape, dt in spec)
            for spec in states]

    @property
    def nbytes(self) -> int:
        return super().nbytes + sum(t.numel() * t.element_size() for s in self.states if s for t in s)

    def state(self, layer: int, rows: slice) -> tuple[torch.Tensor, ...]:
        """Layer `layer`'s state tensors for cache rows `rows` (views)."""
        return tuple(t[rows] for t in self.states[layer])

    def write_state(self, layer: int, rows: slice, position_ids: torch.Tensor, *new: torch.Tensor) -> None:
        """Store layer `layer`'s new state for cache rows `rows`, except in rows idling on the scratch
        position (their last position in `position_ids` [B, T]), which keep theirs. Static shapes:
        no host sync."""
        live = position_ids[:, -1] != self.scratch  # [B]
        for dst, src in zip(self.state(layer, rows), new):
            keep = live.view(-1, *([1] * (dst.dim() - 1)))
            dst.copy_(torch.where(keep, src.to(dst.dtype), dst))

    def reset_rows(self, rows: slice) -> None:
        """Zero the recurrent state of cache rows `rows` (a slot taking a new sequence). Keys and
        values need no reset: the attention mask hides columns past a row's length."""
        for s in self.states:
            if s is not None:
                for t in s:
                    t[rows].zero_()
