"""The caches of an encoder-decoder's decoder (T5, Whisper): self-attention keys/values written in
place, and cross-attention keys/values computed once from the encoder's output.

Every row of a batch decodes in step (the decoder prompt is the same length for all of them), so
one write position serves the whole batch: a forward of T tokens writes columns
[length, length + T) of each layer and `advance(T)` moves on once every layer has written. Memory
follows the tokens decoded, not the `max_len` asked for (a generation may stop long before it).
"""
from __future__ import annotations

import torch


class Seq2SeqCache:
    """Self-attention k/v per layer [B, H, columns, D], grown (doubling) up to `max_len` columns as
    tokens arrive, so a large `max_len` costs nothing until it is used; cross-attention (k, v) per layer."""

    START = 256  # columns allocated at first

    def __init__(self, layers: int, batch: int, heads: int, head_dim: int, max_len: int, *,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        cols = min(max_len, self.START)
        shape = (batch, heads, cols, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.cross: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * layers
        self.length = 0
        self.max_len = max_len

    def _grow(self, layer: int, end: int) -> None:
        cols = min(self.max_len, max(end, 2 * self.k[layer].shape[2]))
        for store in (self.k, self.v):
            old = store[layer]
            new = old.new_zeros(old.shape[0], old.shape[1], cols, old.shape[3])
            new[:, :, :self.length] = old[:, :, :self.length]
            store[layer] = new

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this forward's k, v [B, H, T, D] at the current position; the keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"the decoder cache holds {self.max_len} tokens; this forward reaches {end}")
        if end > self.k[layer].shape[2]:
            self._grow(layer, end)
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n
