"""Text-to-text generation with an encoder-decoder (T5, mT5): `ember.load(model)` returns a Seq2SeqLM.

    t5 = ember.load("google-t5/t5-small")
    t5.generate("translate English to German: The house is wonderful.", max_tokens=32)   # -> str
    t5.generate([text1, text2], max_tokens=32)                                            # -> list[str]
    ids = t5.generate_ids([[13, 8, 1]], max_tokens=8)                                    # token ids

Greedy decoding (ember.generation.seq2seq): the input is encoded once, the decoder runs token by
token over its own self- and cross-attention caches, and stops at the end token or `max_tokens`.
"""
from __future__ import annotations

from typing import Any, Sequence, cast

import torch

from .errors import GenerationError, TokenizerError
from .generation.seq2seq import greedy
from .loading import Loaded, eos_ids


class Seq2SeqLM:
    def __init__(self, loaded: Loaded) -> None:
        self._loaded = loaded
        self.config = loaded.config
        self.model: Any = cast(Any, loaded.model)  # models/t5.py's model
        self.tokenizer = loaded.tokenizer
        self.generation_config = loaded.generation_config
        self.device = loaded.device
        self.dtype = loaded.dtype
        gc = self.generation_config
        self.eos_token_ids = eos_ids(gc.get("eos_token_id"), *self.model.eos_token_ids)
        start = gc.get("decoder_start_token_id")
        self.decoder_start_token_id = start if isinstance(start, int) else self.model.decoder_start_token_id
        self.pad_token_id = self.model.pad_token_id

    def __repr__(self) -> str:
        return (f"Seq2SeqLM({self._loaded.snapshot.source!r}, type={self._loaded.entry.model_type}, "
                f"dtype={self.dtype}, device={self.device})")

    def _encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise TokenizerError("this model has no tokenizer; pass token ids")
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                                and t >= 0 for t in prompt):
            return list(prompt)
        raise GenerationError(f"a prompt must be a string or a non-empty list of token ids, got {prompt!r:.60}")

    def generate_ids(self, prompts: Sequence[str | Sequence[int]], max_tokens: int = 256) -> list[list[int]]:
        """Greedy output ids (end token included) for each prompt, run as one right-padded batch."""
        rows = [self._encode(p) for p in prompts]
        if not rows:
            raise GenerationError("no prompts given")
        vocab = self.config.vocab_size
        for r in rows:
            if max(r) >= vocab:
                raise GenerationError(f"token id {max(r)} is outside the vocabulary [0, {vocab})")
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        m = None if bool(mask.all()) else mask.to(self.device)
        return greedy(self.model, ids.to(self.device), m, max_tokens, [self.decoder_start_token_id],
                      self.eos_token_ids, self.pad_token_id)

    def generate(self, prompt: str | Sequence[int] | Sequence[str], max_tokens: int = 256) -> str | list[str]:
        """Greedy text for a prompt (str or ids), or for a list of them (a batch → list[str])."""
        batched = isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(
            isinstance(p, (str, list, tuple)) for p in prompt)
        prompts = cast("list[str | Sequence[int]]", list(prompt) if batched else [prompt])
        out = self.generate_ids(prompts, max_tokens)
        if self.tokenizer is None:
            raise TokenizerError("this model has no tokenizer; use generate_ids")
        texts = [self.tokenizer.decode(o) for o in out]
        return texts if batched else texts[0]

    __call__ = generate
