"""The decode step a `Generator` is given when it is made.

A step runs one decode forward for the first `n` cache rows and returns `(logits [n, vocab],
greedy tokens [n] or None)`. `EagerStep` is the plain forward. A step with `feedback = True`
(the engine's `StaticDecoder`) also writes its greedy tokens and the next positions back into its
own input buffers, so while every running row decodes greedily the Generator only calls
`replay(n)` (or `launch(n)`, which returns before the tokens are ready) and reads the tokens.
"""
from __future__ import annotations

from typing import Protocol

import torch


class Tokens(Protocol):
    def result(self) -> list[int]: ...


class DecodeStep:
    """The interface; `EagerStep` and the engine's `StaticDecoder` implement it."""

    feedback: bool = False  # True: the step feeds itself (replay/launch below)

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decode `ids` [n, 1] at positions `pos` [n, 1] over cache columns [0, kv_len)."""
        raise NotImplementedError

    def replay(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Feedback steps: step again from the inputs the previous step left in the buffers."""
        raise NotImplementedError

    def launch(self, n: int) -> Tokens:
        """Feedback steps: `replay(n)` without waiting; the tokens come back through `result()`."""
        raise NotImplementedError


class EagerStep(DecodeStep):
    """The model's plain forward over the Generator's cache."""

    def __init__(self, model, cache):
        self.model, self.cache = model, cache

    def __call__(self, ids, pos, kv_len):
        n = ids.shape[0]
        logits = self.model(ids, position_ids=pos, cache=self.cache, kv_len=kv_len, cache_rows=slice(0, n))[:, 0]
        return logits, None
