"""The caches of an encoder-decoder's decoder (T5, Whisper): self-attention keys/values written in
place, and cross-attention keys/values computed once from the encoder's output.

Every row of a batch decodes in step (the decoder prompt is the same length for all of them), so
one write position serves the whole batch: a forward of T tokens writes columns
[length, length + T) of each layer and `advance(T)` moves on once every layer has written.
"""
from __future__ import annotations

import torch


class Seq2SeqCache:
    def __init__(self, layers: int, batch: int, heads: int, head_dim: int, max_len: int, *,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        shape = (batch, heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.cross: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * layers
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this forward's k, v [B, H, T, D] at the current position; the keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"the decoder cache holds {self.max_len} tokens; this forward reaches {end}")
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n
