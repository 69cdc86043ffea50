"""The one-call API: `ember.load(model)` → an `LLM` (generate, stream, chat) or an embedding model."""
from __future__ import annotations

import os
from typing import Iterator, Sequence

import torch

from .errors import EmberError, GenerationError, TokenizerError
from .generation.loop import Event, Generator, Request
from .generation.sampling import SamplingParams
from .loading import Loaded, eos_ids, load_snapshot


def load(model: str | os.PathLike, *, dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
         revision: str | None = None, token=None, gguf_file: str | None = None, engine: bool | None = None,
         compile: bool | str = False, **model_kw):
    """Load a model by Hub id, local folder, or .safetensors/.gguf file.

    dtype/device default to bf16 on CUDA and, on CPU, the checkpoint's dtype (f32 where this CPU is
    slow at 16-bit floats). Returns an `LLM` for causal LMs and an `Embedder` for encoders.
    engine: the fast decode engine (CUDA graphs); None = on for CUDA. compile: torch.compile the
    engine's decode step as well (minutes of compiling, faster decoding).
    """
    from . import hub

    if isinstance(dtype, str):
        dtype = _parse_dtype(dtype)
    snap = hub.resolve(model, revision, token=token, gguf_file=gguf_file)
    if compile:
        model_kw.setdefault("prepack", False)  # Inductor (freezing) packs the weights itself
    loaded = load_snapshot(snap, dtype, device, **model_kw)
    # encoders, and causal LMs packaged as sentence-transformers models (Qwen3-Embedding ...), embed
    if loaded.entry.task == "encoder" or snap.file("modules.json") is not None:
        from .embeddings import Embedder

        return Embedder(loaded)
    llm = LLM(loaded)
    if engine or (engine is None and (loaded.device.type == "cuda" or compile)):
        from . import engine as _engine

        _engine.enable(llm, compile=compile)
    return llm


def _parse_dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "f32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "f16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise EmberError(f"unknown dtype {name!r}; use one of {', '.join(table)}")
    return table[name]


class LLM:
    """A loaded causal language model with its tokenizer."""

    def __init__(self, loaded: Loaded):
        self._loaded = loaded
        self.config = loaded.config
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.generation_config = loaded.generation_config
        self.device = loaded.device
        self.dtype = loaded.dtype
        tok = self.tokenizer
        self.eos_token_ids = eos_ids(
            self.generation_config.get("eos_token_id"),
            getattr(self.config, "eos_token_id", None),
            tok.eos_token_id if tok is not None else None,
        )
        self.engine = None  # set by ember.engine when the fast path is enabled

    def __repr__(self) -> str:
        return (f"LLM({self._loaded.snapshot.source!r}, type={self._loaded.entry.model_type}, "
                f"dtype={self.dtype}, device={self.device})")

    # ---- helpers ------------------------------------------------------------------------------
    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise TokenizerError("this model has no tokenizer; pass token ids to the model directly")
        return self.tokenizer

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return self._need_tokenizer().encode(prompt)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        raise GenerationError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def request(self, prompt, max_tokens: int = 256, *, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int | None = None,
                stop: str | Sequence[str] | None = None, stop_token_ids: Sequence[int] = (), ignore_eos: bool = False,
                logprobs: int | None = None) -> Request:
        """A generation request (what generate/stream build; the server makes its own)."""
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None and not all(isinstance(s, str) for s in stop):
            raise GenerationError("stop must be a string or a list of strings")
        sampling = SamplingParams(temperature=temperature if temperature is not None else 0.0, top_k=top_k or 0,
                                  top_p=1.0 if top_p is None else top_p, min_p=min_p or 0.0,
                                  repetition_penalty=repetition_penalty or 1.0, seed=seed).validate()
        return Request(self.encode(prompt), max_tokens, sampling, tuple(stop or ()), tuple(stop_token_ids),
                       ignore_eos, logprobs)

    def generator(self, requests: Sequence[Request], max_batch: int | None = None) -> Generator:
        longest = max(len(r.prompt_ids) + r.max_tokens for r in requests)
        if self.engine is not None:
            return self.engine.generator(max_batch or len(requests), longest)
        return Generator(self.model, self.tokenizer, max_batch=max_batch or len(requests), max_len=longest + 1,
                         eos_ids=self.eos_token_ids, device=self.device)

    def events(self, requests: Sequence[Request]) -> Iterator[Event]:
        """Run requests to completion, yielding per-token events (text, finish reasons, logprobs)."""
        if not requests:
            return iter(())
        return self.generator(requests).run(requests)

    # ---- public -------------------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[int] | Sequence[str], max_tokens: int = 256, **kw) -> str | list[str]:
        """Greedy by default; `temperature`, `top_p`, `top_k`, `min_p`, `repetition_penalty`, `seed`,
        `stop`, `ignore_eos` as in transformers/OpenAI. A list of prompts is generated as one batch."""
        batched = isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(
            isinstance(p, (str, list, tuple)) for p in prompt)
        prompts = list(prompt) if batched else [prompt]
        if isinstance(prompt, (list, tuple)) and not prompt:
            raise GenerationError("no prompts given")
        reqs = [self.request(p, max_tokens, **kw) for p in prompts]
        texts = {r.id: [] for r in reqs}
        for ev in self.events(reqs):
            texts[ev.request.id].append(ev.text)
        out = ["".join(texts[r.id]) for r in reqs]
        return out if batched else out[0]

    def stream(self, prompt: str | Sequence[int], max_tokens: int = 256, **kw) -> Iterator[str]:
        """Text pieces as they are generated (never a split multi-byte character)."""
        req = self.request(prompt, max_tokens, **kw)
        for ev in self.events([req]):
            if ev.text:
                yield ev.text

    def chat(self, messages: list[dict], max_tokens: int = 256, *, stream: bool = False, tools=None,
             chat_template_kwargs: dict | None = None, **kw):
        """Apply the chat template and generate the assistant's reply (a str, or pieces with stream=True)."""
        ids = self._need_tokenizer().encode_chat(messages, add_generation_prompt=True, tools=tools,
                                                 **(chat_template_kwargs or {}))
        if stream:
            return self.stream(ids, max_tokens, **kw)
        return self.generate(ids, max_tokens, **kw)

    def __call__(self, prompt, max_tokens: int = 256, **kw):
        return self.generate(prompt, max_tokens, **kw)
