"""Greedy decoding for encoder-decoder models (T5, Whisper): encode once, then decode token by token
over the decoder's caches (`ember.nn.seq2seq_cache`).

The model provides `encode(inputs, mask)`, `decode(ids, encoder_hidden, mask, cache)` and
`new_cache(batch, max_len)`. Every row starts from the same decoder prompt (T5: the start token;
Whisper: start, language, task, timestamps tokens) and rows decode in step; a row that has produced
an end token is fed `pad_id` until the others finish, and its output stops at that end token.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import GenerationError


def _check(max_tokens, prompt) -> None:
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise GenerationError(f"max_tokens must be a non-negative integer, got {max_tokens!r:.60}")
    if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
        raise GenerationError(f"the decoder prompt must be a non-empty list of token ids, got {prompt!r:.60}")


@torch.inference_mode()
def greedy(model, inputs: torch.Tensor, attention_mask: torch.Tensor | None, max_tokens: int,
           decoder_prompt: Sequence[int], eos_ids: Sequence[int], pad_id: int = 0, *,
           suppress: Sequence[int] = (), begin_suppress: Sequence[int] = ()) -> list[list[int]]:
    """The greedy continuation of `decoder_prompt` for each row of `inputs` (end token included).

    suppress: token ids never generated; begin_suppress: ids not generated as the first token
    (Whisper's generation_config suppress_tokens / begin_suppress_tokens)."""
    _check(max_tokens, decoder_prompt)
    B = inputs.shape[0]
    device = inputs.device
    out: list[list[int]] = [[] for _ in range(B)]
    if max_tokens == 0:
        return out
    enc = model.encode(inputs, attention_mask)
    cache = model.new_cache(B, len(decoder_prompt) + max_tokens)
    ids = torch.tensor([list(decoder_prompt)] * B, dtype=torch.long, device=device)
    eos = torch.tensor(list(eos_ids) or [-1], device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    vocab = None
    for step in range(max_tokens):
        logits = model.decode(ids, enc, attention_mask, cache)[:, -1]
        if vocab is None:
            vocab = logits.shape[-1]
            never = torch.tensor([t for t in suppress if 0 <= t < vocab], dtype=torch.long, device=device)
            first = torch.tensor([t for t in begin_suppress if 0 <= t < vocab], dtype=torch.long, device=device)
        if never.numel():
            logits[:, never] = float("-inf")
        if step == 0 and first.numel():
            logits[:, first] = float("-inf")
        nxt = logits.argmax(dim=-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        for b, t in enumerate(nxt.tolist()):
            if not done[b]:
                out[b].append(t)
        done |= torch.isin(nxt, eos)
        if bool(done.all()):
            break
        ids = nxt[:, None]
    return out
