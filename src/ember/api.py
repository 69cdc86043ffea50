"""The one-call API: `ember.load(model)` → an `LLM` (generate, stream, chat) or an embedding model."""
from __future__ import annotations

import os
from typing import Iterator, Sequence

import torch

from .errors import ArgumentError, GenerationError, TokenizerError
from .generation.loop import Event, Generator, Request
from .generation.sampling import SamplingParams
from .loading import Loaded, eos_ids, load_snapshot


# ember.load's options beyond its named arguments, passed on to the loading pipeline
LOAD_OPTIONS = {
    "keep_quantized": "GGUF and quantised HF checkpoints: keep quantised weights as blocks / packed (True), "
                      "dequantise at load (False), or decide (None)",
    "fuse": "causal LMs: fuse q/k/v and gate/up projections at load (default True)",
    "prepack": "CPU bf16: oneDNN-prepacked weights (default on where the CPU has native bf16)",
    "quantize": "'int8' (Q8_0) or 'int4' (Q4_1) weight-only quantisation at load, on CPU (default None)",
}
# older names of options, still accepted with a DeprecationWarning
RENAMED_OPTIONS = {"packed": "keep_quantized"}


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

    for old, new in RENAMED_OPTIONS.items():
        if old in model_kw:
            import warnings

            warnings.warn(f"ember.load({old}=...) is now {new}=...", DeprecationWarning, stacklevel=2)
            model_kw.setdefault(new, model_kw.pop(old))
    unknown = sorted(set(model_kw) - set(LOAD_OPTIONS))
    if unknown:
        raise ArgumentError(f"ember.load() got unknown option(s) {', '.join(map(repr, unknown))}; it takes dtype, "
                            f"device, revision, token, gguf_file, engine, compile and "
                            f"{', '.join(f'{k} ({v})' for k, v in LOAD_OPTIONS.items())}")
    dtype = _parse_dtype(dtype)
    device = _parse_device(device)
    snap = hub.resolve(model, revision, token=token, gguf_file=gguf_file)
    if compile:
        model_kw.setdefault("prepack", False)  # Inductor (freezing) prepacks the weights itself
    loaded = load_snapshot(snap, dtype, device, **model_kw)
    # encoders, causal LMs packaged as sentence-transformers models (Qwen3-Embedding ...) and decoders
    # turned bidirectional (EmbeddingGemma) embed
    bidirectional = bool(getattr(loaded.model, "bidirectional", False))
    if loaded.entry.task == "encoder" or snap.file("modules.json") is not None or bidirectional:
        from .embeddings import Embedder

        return Embedder(loaded)
    llm = LLM(loaded)
    if engine or (engine is None and (loaded.device.type == "cuda" or compile)):
        llm = llm.with_engine(compile=compile)
    return llm


REQUEST_OPTIONS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "stop",
                   "stop_token_ids", "ignore_eos", "logprobs")


def _unknown_options(unknown, known) -> str:
    import difflib

    parts = []
    for k in sorted(unknown):
        close = difflib.get_close_matches(k, known, n=1)
        parts.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return f"unknown generation option(s) {', '.join(parts)}; the options are {', '.join(known)}"


_DTYPE_NAMES = {"float32": torch.float32, "f32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "f16": torch.float16, "fp16": torch.float16}
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _parse_dtype(dtype) -> torch.dtype | None:
    """None, a floating torch.dtype ember computes in, or one of its names ("float32", "bf16" ...)."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in _DTYPE_NAMES:
            raise ArgumentError(f"unknown dtype {dtype!r:.60}; use one of {', '.join(_DTYPE_NAMES)}")
        return _DTYPE_NAMES[dtype]
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES:
            raise ArgumentError(f"dtype {dtype} is not one ember computes in; use torch.float32, torch.bfloat16 "
                                f"or torch.float16")
        return dtype
    raise ArgumentError(f"dtype must be a torch.dtype or a name such as 'float32' or 'bf16', "
                        f"got {type(dtype).__name__} ({dtype!r:.40})")


def _parse_device(device) -> torch.device | None:
    """None, or a device that exists here: cpu, cuda / cuda:N (CUDA available, N in range), mps."""
    if device is None:
        return None
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise ArgumentError(f"device must be a string such as 'cpu', 'cuda' or 'cuda:1' (or a torch.device), "
                            f"got {type(device).__name__} ({device!r:.40})")
    try:
        d = torch.device(f"cuda:{device}" if isinstance(device, int) else device)  # an int is a CUDA index
    except (RuntimeError, ValueError, TypeError):
        raise ArgumentError(f"unknown device {device!r:.60}; use 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            why = "this PyTorch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ArgumentError(f"device {device!r:.60}: CUDA is not available ({why}); use device='cpu'")
        n = torch.cuda.device_count()
        if d.index is not None and d.index >= n:
            raise ArgumentError(f"device {device!r:.60}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
    elif d.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ArgumentError(f"device {device!r:.60}: MPS is not available on this machine; use device='cpu'")
    elif d.type != "cpu":
        raise ArgumentError(f"device {device!r:.60}: ember runs models on 'cpu', 'cuda', 'cuda:N' or 'mps'")
    return d


def _check_request_args(max_tokens, stop, stop_token_ids, ignore_eos, logprobs) -> tuple[tuple, tuple]:
    """Type checks of a request's arguments, before anything uses them; (stop, stop_token_ids) as tuples.
    Messages start with the argument's name (the server reports it as the error's `param`)."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise GenerationError(f"max_tokens must be a non-negative integer, got {max_tokens!r:.60}")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, (list, tuple, set, frozenset)) and all(isinstance(s, str) for s in stop):
        stop = tuple(stop)
    else:
        raise GenerationError(f"stop must be a string or a list of strings, got {stop!r:.60}")
    if stop_token_ids is None:
        stop_token_ids = ()
    if not isinstance(stop_token_ids, (list, tuple, set, frozenset)) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in stop_token_ids):
        raise GenerationError(f"stop_token_ids must be a list of non-negative integer token ids, "
                              f"got {stop_token_ids!r:.60}")
    if not isinstance(ignore_eos, bool):
        raise GenerationError(f"ignore_eos must be True or False, got {ignore_eos!r:.60}")
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int) or logprobs < 0):
        raise GenerationError(f"logprobs must be None or a non-negative integer (the top alternatives to report "
                              f"per token), got {logprobs!r:.60}")
    return stop, tuple(stop_token_ids)


class LLM:
    """A loaded causal language model with its tokenizer."""

    def __init__(self, loaded: Loaded, engine=None):
        """engine: an `ember.engine.Engine` over this model that generation runs through (see
        `with_engine`); None: the plain generator, sized per call."""
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
        self.engine = engine

    def with_engine(self, **options) -> "LLM":
        """This model with a fast decode engine (ember.engine.Engine options: max_batch, max_len,
        cuda_graphs, compile, buckets): a persistent cache and the static decode step."""
        from .engine import Engine

        return LLM(self._loaded, Engine(self.model, self.tokenizer, self.eos_token_ids, **options))

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
                logprobs: int | None = None, **unknown) -> Request:
        """A generation request (what generate/stream build; the server makes its own)."""
        if unknown:
            raise ArgumentError(_unknown_options(unknown, REQUEST_OPTIONS))
        stop, stop_token_ids = _check_request_args(max_tokens, stop, stop_token_ids, ignore_eos, logprobs)
        sampling = SamplingParams(temperature=temperature if temperature is not None else 0.0, top_k=top_k or 0,
                                  top_p=1.0 if top_p is None else top_p, min_p=min_p or 0.0,
                                  repetition_penalty=repetition_penalty or 1.0, seed=seed).validate()
        return Request(self.encode(prompt), max_tokens, sampling, stop, stop_token_ids, ignore_eos, logprobs)

    def generator(self, requests: Sequence[Request] = (), max_batch: int | None = None,
                  max_len: int | None = None) -> Generator:
        """A Generator for `requests` (sized for the longest) or for `max_batch` rows of `max_len`
        tokens: the engine's when this LLM has one, else a plain one."""
        # (a Request built by hand with a bad max_tokens is refused by the generator's check)
        if max_len is None:
            max_len = max(len(r.prompt_ids) + (r.max_tokens if isinstance(r.max_tokens, int) else 0)
                          for r in requests) + 1
        max_batch = max_batch or len(requests)
        if self.engine is not None:
            return self.engine.generator(max_batch, max_len - 1)
        return Generator(self.model, self.tokenizer, max_batch=max_batch, max_len=max_len,
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
        if not isinstance(stream, bool):
            raise GenerationError(f"stream must be True or False, got {stream!r:.60}")
        if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
            raise GenerationError(f"chat_template_kwargs must be a dict, got {type(chat_template_kwargs).__name__}")
        ids = self._need_tokenizer().encode_chat(messages, add_generation_prompt=True, tools=tools,
                                                 **(chat_template_kwargs or {}))
        if stream:
            return self.stream(ids, max_tokens, **kw)
        return self.generate(ids, max_tokens, **kw)

    def __call__(self, prompt, max_tokens: int = 256, **kw):
        return self.generate(prompt, max_tokens, **kw)
