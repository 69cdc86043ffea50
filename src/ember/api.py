"""The one-call API: `ember.load(model)` → an `LLM` (generate, stream, chat) or an embedding model."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Literal, Sequence, Union, cast, overload

import torch

from .errors import ArgumentError, GenerationError, TokenizerError
from .generation.defaults import sampling_defaults
from .generation.loop import Event, Generator, Request
from .generation.results import Chunk, Collector, Completion
from .generation.sampling import SamplingParams
from .loading import Loaded, eos_ids, load_snapshot

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Iterable

    from .generation.speculative import Speculative

    from .embeddings import Embedder
    from .engine import Engine
    from .generation.grammar import Grammar
    from .generation.prefix_cache import PrefixCache
    from .tokenizer import Tokenizer
    from .seq2seq import Seq2SeqLM
    from .speech import Transcriber
    from .vision_embeddings import ImageTextEmbedder


# ember.load's options beyond its named arguments, passed on to the loading pipeline
LOAD_OPTIONS = {
    "keep_quantized": "GGUF and quantised HF checkpoints: keep quantised weights as blocks / packed (True), "
                      "dequantise at load (False), or decide (None)",
    "fuse": "causal LMs: fuse q/k/v and gate/up projections at load (default True)",
    "prepack": "CPU: oneDNN-prepacked weights (bf16: default on where the CPU has native bf16; float32 "
               "encoders: default on)",
    "quantize": "'int8' (Q8_0) or 'int4' (Q4_1) weight-only quantisation at load, on CPU (default None)",
    "mmproj": "a GGUF decoder's llama.cpp multimodal projector file (mmproj-*.gguf: vision tower and projector) "
              "for image+text chat",
    "tp": "tensor parallelism: split the model over this many processes (torchrun's, or a process group "
          "already set up; default 1)",
}
# older names of options, still accepted with a DeprecationWarning
RENAMED_OPTIONS = {"packed": "keep_quantized"}


# what `load(task=...)` may ask for, and the class each returns
TASKS = {"generate": "LLM", "embed": "Embedder", "text2text": "Seq2SeqLM", "transcribe": "Transcriber",
         "image-text": "ImageTextEmbedder"}
# what load returns when task is None
Model = Union["LLM", "Embedder", "Seq2SeqLM", "Transcriber", "ImageTextEmbedder"]
ModelPath = Union[str, "os.PathLike[str]"]
DType = Union["torch.dtype", str, None]
Device = Union[str, "torch.device", int, None]


@overload
def load(model: ModelPath, *, task: Literal["generate"], dtype: DType = None, device: Device = None,
         revision: str | None = None, token: str | bool | None = None, gguf_file: str | None = None,
         engine: bool | None = None, compile: bool | str = False, **model_kw: Any) -> LLM: ...
@overload
def load(model: ModelPath, *, task: Literal["embed"], dtype: DType = None, device: Device = None,
         revision: str | None = None, token: str | bool | None = None, gguf_file: str | None = None,
         engine: bool | None = None, compile: bool | str = False, **model_kw: Any) -> Embedder: ...
@overload
def load(model: ModelPath, *, task: Literal["text2text"], dtype: DType = None, device: Device = None,
         revision: str | None = None, token: str | bool | None = None, gguf_file: str | None = None,
         engine: bool | None = None, compile: bool | str = False, **model_kw: Any) -> Seq2SeqLM: ...
@overload
def load(model: ModelPath, *, task: Literal["transcribe"], dtype: DType = None, device: Device = None,
         revision: str | None = None, token: str | bool | None = None, gguf_file: str | None = None,
         engine: bool | None = None, compile: bool | str = False, **model_kw: Any) -> Transcriber: ...
@overload
def load(model: ModelPath, *, task: Literal["image-text"], dtype: DType = None, device: Device = None,
         revision: str | None = None, token: str | bool | None = None, gguf_file: str | None = None,
         engine: bool | None = None, compile: bool | str = False, **model_kw: Any) -> ImageTextEmbedder: ...
@overload
def load(model: ModelPath, *, task: None = None, dtype: DType = None, device: Device = None,
         revision: str | None = None, token: str | bool | None = None, gguf_file: str | None = None,
         engine: bool | None = None, compile: bool | str = False, **model_kw: Any) -> Model: ...
def load(model: ModelPath, *, task: str | None = None, dtype: DType = None, device: Device = None,
         revision: str | None = None, token: str | bool | None = None, gguf_file: str | None = None,
         engine: bool | None = None, compile: bool | str = False, **model_kw: Any) -> Model:
    """Load a model by Hub id, local folder, .safetensors/.gguf file, or short name (`smollm2`, `minilm`).

    dtype/device default to bf16 on CUDA and, on CPU, the checkpoint's dtype (f32 where this CPU is
    slow at 16-bit floats). Returns an `LLM` for causal LMs, an `Embedder` for text embedding models,
    a `Seq2SeqLM` for T5, a `Transcriber` for Whisper and an `ImageTextEmbedder` for CLIP/SigLIP.
    task: "generate", "embed", "text2text", "transcribe" or "image-text" says which you expect (and
    types the result for type checkers); a model of another kind is an ArgumentError.
    engine: the fast decode engine (CUDA graphs); None = on for CUDA.
    compile: torch.compile the engine's decode step as well (minutes of compiling, faster decoding).
    """
    from . import hub

    if task is not None and task not in TASKS:
        raise ArgumentError(f"task must be one of {', '.join(map(repr, TASKS))} (or None), got {task!r:.60}")

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
    if compile and model_kw.get("tp") not in (None, 1):
        raise ArgumentError("compile=True with tp > 1 is not supported yet: load a split model without compile")
    snap = hub.resolve(model, revision, token=token, gguf_file=gguf_file)
    if compile:
        model_kw.setdefault("prepack", False)  # Inductor (freezing) prepacks the weights itself
    loaded = load_snapshot(snap, dtype, device, **model_kw)
    kind = _task_of(loaded)
    if task is not None and task != kind:
        raise ArgumentError(f"{model}: task={task!r}, but this model is for task={kind!r} ({TASKS[kind]}, "
                            f"model type {loaded.entry.model_type})")
    if kind == "image-text":
        from .vision_embeddings import ImageTextEmbedder

        return ImageTextEmbedder(loaded)
    if kind == "embed":
        from .embeddings import Embedder

        return Embedder(loaded)
    if kind == "transcribe":
        from .speech import Transcriber

        return Transcriber(loaded)
    if kind == "text2text":
        from .seq2seq import Seq2SeqLM

        return Seq2SeqLM(loaded)
    llm = LLM(loaded)
    if engine or (engine is None and (loaded.device.type == "cuda" or compile)):
        llm = llm.with_engine(compile=compile)
    return llm


def _task_of(loaded: Loaded) -> str:
    """The `load(task=...)` a loaded checkpoint answers: its registry entry's task, except that
    encoders, causal LMs packaged as sentence-transformers models (Qwen3-Embedding ...), decoders
    turned bidirectional (EmbeddingGemma) and encoder-only T5 checkpoints (T5EncoderModel) embed."""
    task = loaded.entry.task
    if task == "image-text":  # CLIP, SigLIP
        return task
    if task == "speech-seq2seq":  # Whisper
        return "transcribe"
    if task == "seq2seq":  # T5
        return "text2text" if getattr(loaded.model, "decoder", None) is not None else "embed"
    if (task == "encoder" or loaded.snapshot.file("modules.json") is not None
            or getattr(loaded.model, "bidirectional", False)):
        return "embed"
    return "generate"


# speculative decoding (generation/speculative.py), transformers' names
SPECULATIVE_OPTIONS = ("prompt_lookup_num_tokens", "max_matching_ngram_size", "assistant_model", "num_assistant_tokens")
REQUEST_OPTIONS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "stop",
                   "stop_token_ids", "ignore_eos", "logprobs", "presence_penalty", "frequency_penalty", "logit_bias",
                   "json_schema", "response_format", "grammar", "image_embeds", "rope_positions")


def _unknown_options(unknown: "Iterable[str]", known: Sequence[str]) -> str:
    import difflib

    parts = []
    for k in sorted(unknown):
        close = difflib.get_close_matches(k, known, n=1)
        parts.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return f"unknown generation option(s) {', '.join(parts)}; the options are {', '.join(known)}"


_DTYPE_NAMES = {"float32": torch.float32, "f32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "f16": torch.float16, "fp16": torch.float16}
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _parse_dtype(dtype: object) -> torch.dtype | None:
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


def _parse_device(device: object) -> torch.device | None:
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


def _token_keys(bias: object) -> object:
    """logit_bias with its keys as ints (JSON gives them as strings); anything else is left to validate()."""
    if isinstance(bias, dict):
        out = {}
        for k, v in bias.items():
            if isinstance(k, str) and k.strip().lstrip("-").isdigit() and len(k) < 20:
                k = int(k)
            out[k] = v
        return out
    return bias


def _check_request_args(max_tokens: object, stop: object, stop_token_ids: object, ignore_eos: object,
                        logprobs: object) -> tuple[tuple[str, ...], tuple[int, ...]]:
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


@dataclass
class ChatInputs:
    """A chat ready to generate from (`LLM.chat_inputs`): the prompt, its token ids and, with images,
    the image tokens' features [n, hidden] and (M-RoPE models) the prompt's rotary positions [3, T]:
    `llm.request(ids, image_embeds=..., rope_positions=...)` takes them."""

    prompt: str
    ids: list[int]
    image_embeds: torch.Tensor | None = None
    rope_positions: torch.Tensor | None = None


class LLM:
    """A loaded causal language model with its tokenizer."""

    def __init__(self, loaded: Loaded, engine: "Engine | None" = None) -> None:
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
        self.tp = loaded.tp  # the tensor-parallel group (rank 0 drives generation), or None
        # defaults for the sampling arguments a call omits: the model's generation_config.json (the
        # server uses the same), else greedy
        self.sampling_defaults = sampling_defaults(self.generation_config)
        self.prefix_cache: PrefixCache | None = None  # a PrefixCache every generator of this LLM reuses (enable_prefix_cache)
        # image+text models (models/multimodal.py) with their vision tower: chat takes images
        self.takes_images = bool(getattr(self.model, "takes_images", False))
        self._image_processor: Any = None
        self.speculative: Speculative | None = None  # what every generator of this LLM does (enable_speculative)

    def with_engine(self, **options: Any) -> "LLM":
        """This model with a fast decode engine (ember.engine.Engine options: max_batch, max_len,
        cuda_graphs, compile, buckets): a persistent cache and the static decode step."""
        from .engine import Engine

        return LLM(self._loaded, Engine(self.model, self.tokenizer, self.eos_token_ids, **options))

    def __repr__(self) -> str:
        return (f"LLM({self._loaded.snapshot.source!r}, type={self._loaded.entry.model_type}, "
                f"dtype={self.dtype}, device={self.device})")

    # ---- helpers ------------------------------------------------------------------------------
    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise TokenizerError("this model has no tokenizer; pass token ids to the model directly")
        return self.tokenizer

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return self._need_tokenizer().encode(prompt)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        raise GenerationError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def request(self, prompt: str | Sequence[int], max_tokens: int = 256, *, temperature: float | None = None,
                top_p: float | None = None, top_k: int | None = None, min_p: float | None = None,
                repetition_penalty: float | None = None, seed: int | None = None,
                stop: str | Sequence[str] | None = None, stop_token_ids: Sequence[int] = (), ignore_eos: bool = False,
                logprobs: int | None = None, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                logit_bias: dict[int, float] | None = None, json_schema: dict | str | bool | None = None,
                response_format: dict | None = None, grammar: "str | Grammar | None" = None,
                image_embeds: torch.Tensor | None = None, rope_positions: torch.Tensor | None = None,
                **unknown: Any) -> Request:
        """A generation request (what generate/stream build; the server makes its own). A sampling
        argument left out (None) takes the model's generation_config.json value, else greedy decoding's.

        Structured output (constrained decoding, needs llguidance): `json_schema` (a dict or its JSON
        text; True: any JSON object), `response_format` as OpenAI's ({"type": "json_object"} or
        {"type": "json_schema", "json_schema": {"schema": ...}}), or `grammar` (a Lark grammar in
        llguidance's dialect, or a compiled `ember.generation.grammar.Grammar`).

        Images (image+text models): `image_embeds` [n, hidden], the features of the prompt's n image
        tokens, and for M-RoPE models (Qwen2.5-VL) `rope_positions` [3, T], the prompt's rotary
        positions: what `chat_inputs` gives."""
        if unknown:
            raise ArgumentError(_unknown_options(unknown, REQUEST_OPTIONS))
        stop, stop_token_ids = _check_request_args(max_tokens, stop, stop_token_ids, ignore_eos, logprobs)
        grammar = self.grammar(json_schema=json_schema, response_format=response_format, grammar=grammar)
        d = self.sampling_defaults

        def pick(value: Any, key: str, fallback: Any) -> Any:
            return value if value is not None else d.get(key, fallback)

        sampling = SamplingParams(temperature=pick(temperature, "temperature", 0.0), top_k=pick(top_k, "top_k", 0),
                                  top_p=pick(top_p, "top_p", 1.0), min_p=pick(min_p, "min_p", 0.0),
                                  repetition_penalty=pick(repetition_penalty, "repetition_penalty", 1.0),
                                  seed=seed, presence_penalty=presence_penalty or 0.0,
                                  frequency_penalty=frequency_penalty or 0.0,
                                  logit_bias=cast("dict[int, float] | None", _token_keys(logit_bias))).validate()
        ids = self.encode(prompt)
        if image_embeds is not None:
            self._check_image_embeds(ids, image_embeds)
            if getattr(self.model, "mrope", False) and rope_positions is None:
                raise GenerationError(f"an image prompt of this model ({self._loaded.entry.model_type}) needs its "
                                      f"rotary positions too: rope_positions, as LLM.chat_inputs gives them")
        return Request(ids, max_tokens, sampling, stop, stop_token_ids, ignore_eos, logprobs, grammar,
                       image_embeds=image_embeds, rope_positions=rope_positions)

    # ---- images (image+text models) -------------------------------------------------------------
    def _check_image_embeds(self, ids: list[int], embeds: Any) -> None:
        if not self.takes_images:
            raise GenerationError(f"image_embeds: this model ({self._loaded.entry.model_type}) takes text only")
        m: Any = self.model  # an ImageTextLM (models/multimodal.py)
        want = m.feature_shape(sum(t == m.image_token_id for t in ids))
        if not isinstance(embeds, torch.Tensor) or tuple(embeds.shape) != want:
            got = list(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise GenerationError(f"image_embeds must be a tensor of {list(want)} (one row per image token of the "
                                  f"prompt, as encode_images gives them flattened), got {got}")

    @property
    def image_processor(self) -> Any:
        """The model's image processor (ember.images.ImageProcessor: transformers' pixels; a family
        with its own, e.g. Qwen2.5-VL's, makes it with `make_image_processor`), from the checkpoint's
        preprocessor_config.json over the family's defaults."""
        if not self.takes_images:
            raise GenerationError(f"this model ({self._loaded.entry.model_type}) takes text only, not images")
        if self._image_processor is None:
            from .images import ImageProcessor
            from .errors import ImageError

            path = self._loaded.snapshot.file("preprocessor_config.json")
            model: Any = self.model
            make = getattr(model, "make_image_processor", None)
            if make is not None:
                self._image_processor = make(path)
                return self._image_processor
            if path is not None:
                from .config import load_json

                d = load_json(path)
                for key in ("do_pad", "do_pan_and_scan"):
                    if d.get(key):
                        raise ImageError(f"{path}: {key}=true is not supported by ember's image processor")
            self._image_processor = ImageProcessor.from_file(path, model.processor_defaults())
        return self._image_processor

    def _pixels(self, images: Sequence[Any]) -> Any:
        """The processor's output for `images` on the model's device: a pixel tensor, or a dict of
        tensors (Qwen2.5-VL: pixel_values and image_grid_thw)."""
        pixels = self.image_processor(list(images))
        if isinstance(pixels, dict):
            return {k: v.to(self.device) for k, v in pixels.items()}
        return pixels.to(self.device)

    @torch.inference_mode()
    def encode_images(self, images: Sequence[Any]) -> torch.Tensor:
        """Images (PIL images, paths, encoded bytes) → their features in the decoder's space
        [N, tokens_per_image, hidden] ([n tokens, hidden] for families whose images take different
        numbers of tokens, Qwen2.5-VL): the processor, the vision tower and the projector, once each."""
        model: Any = self.model
        return model.encode_images(self._pixels(images))

    def chat_prompt(self, messages: list[dict], *, tools: list[dict] | None = None, allow_local_images: bool = True,
                    allow_remote_images: bool = False,
                    **template_kwargs: Any) -> tuple[str, list[int], torch.Tensor | None]:
        """(prompt text, token ids, image features or None) of a chat: `chat_inputs` without the
        rotary positions."""
        c = self.chat_inputs(messages, tools=tools, allow_local_images=allow_local_images,
                             allow_remote_images=allow_remote_images, **template_kwargs)
        return c.prompt, c.ids, c.image_embeds

    @torch.inference_mode()
    def chat_inputs(self, messages: list[dict], *, tools: list[dict] | None = None, allow_local_images: bool = True,
                    allow_remote_images: bool = False, **template_kwargs: Any) -> "ChatInputs":
        """What a chat is generated from: the template applied and, for an image+text model, each
        image's placeholder expanded to its tokens, the images encoded (image parts:
        ember.image_chat) and, for M-RoPE models, the prompt's rotary positions."""
        from . import image_chat

        tok = self._need_tokenizer()
        images: list = []
        if image_chat.has_images(messages):
            if not self.takes_images:
                raise GenerationError(f"this model ({self._loaded.entry.model_type}) takes text only; image content "
                                      f"parts need an image+text model (llava, gemma3, qwen2_5_vl, qwen3_vl)")
            messages, images = image_chat.split_images(messages, allow_local=allow_local_images,
                                                       allow_remote=allow_remote_images)
        prompt = tok.apply_chat_template(messages, True, tools=tools, **template_kwargs)
        if not images:
            return ChatInputs(prompt, tok.encode(prompt, add_special_tokens=False))
        model: Any = self.model
        pixels = self._pixels(images)
        placeholder, texts = model.image_texts(tok, pixels)
        prompt = image_chat.expand(prompt, len(images), placeholder, texts)
        ids = tok.encode(prompt, add_special_tokens=False)
        return ChatInputs(prompt, ids, model.image_features(pixels), model.rope_positions(ids, pixels))

    def grammar(self, *, json_schema: dict | str | bool | None = None, response_format: dict | None = None,
                grammar: "str | Grammar | None" = None) -> "Grammar | None":
        """The compiled grammar (ember.generation.grammar.Grammar) of at most one of the three ways to
        ask for structured output (see `request`); None when none is given."""
        from .generation import grammar as g

        given = [k for k, v in (("json_schema", json_schema), ("response_format", response_format),
                                ("grammar", grammar)) if v is not None]
        if not given:
            return None
        if len(given) > 1:
            raise GenerationError(f"give at most one of json_schema, response_format and grammar, got {given}")
        if isinstance(grammar, g.Grammar):
            return grammar
        if response_format is not None:
            spec, what = g.response_format_grammar(response_format)
            if spec is None:
                return None
        elif json_schema is not None:
            spec, what = g.json_schema_grammar(json_schema), "the JSON schema"
        else:
            spec, what = g.lark_grammar(cast(str, grammar)), "the grammar"
        return g.Grammar(spec, self._need_tokenizer(), self.config.vocab_size, self.eos_token_ids, what)

    def generator(self, requests: Sequence[Request] = (), max_batch: int | None = None,
                  max_len: int | None = None, speculative: Speculative | None = None) -> Generator:
        """A Generator for `requests` (sized for the longest) or for `max_batch` rows of `max_len`
        tokens: the engine's when this LLM has one, else a plain one. speculative: a
        `generation.speculative.Speculative` (default: this LLM's, see `enable_speculative`)."""
        # (a Request built by hand with a bad max_tokens is refused by the generator's check)
        if max_len is None:
            max_len = max(len(r.prompt_ids) + (r.max_tokens if isinstance(r.max_tokens, int) else 0)
                          for r in requests) + 1
        max_batch = max_batch or len(requests)
        if self.engine is not None:
            gen = self.engine.generator(max_batch, max_len - 1)
        else:
            gen = Generator(self.model, self.tokenizer, max_batch=max_batch, max_len=max_len,
                            eos_ids=self.eos_token_ids, device=self.device)
        gen.prefix_cache = self.prefix_cache
        speculative = speculative or self.speculative
        if speculative is not None:
            if self.tp is not None:
                raise GenerationError("speculative decoding does not run under tensor parallelism yet")
            gen.speculator = speculative.build(gen)
        return gen

    def enable_speculative(self, *, prompt_lookup_num_tokens: int | None = None, max_matching_ngram_size: int = 3,
                           assistant_model: Any = None, num_assistant_tokens: int = 4) -> Speculative | None:
        """Speculative decoding for every generation of this LLM (the server's too); the same options
        as generate's (see `generate`). With neither prompt_lookup_num_tokens nor assistant_model it
        is turned off. Returns the `Speculative` settings (or None)."""
        from .generation.speculative import Speculative

        if prompt_lookup_num_tokens is None and assistant_model is None:
            self.speculative = None
            return None
        self.speculative = Speculative(prompt_lookup_num_tokens, max_matching_ngram_size, assistant_model,
                                       num_assistant_tokens).validate()
        return self.speculative

    def _speculative(self, kw: dict) -> Speculative | None:
        """The speculative options popped from a call's keywords, as a `Speculative` (None: none given)."""
        given = {k: kw.pop(k) for k in SPECULATIVE_OPTIONS if k in kw}
        if not given or (given.get("prompt_lookup_num_tokens") is None and given.get("assistant_model") is None):
            return None
        from .generation.speculative import Speculative

        return Speculative(**given).validate()

    def enable_prefix_cache(self, max_bytes: int | None = None, *, block: int | None = None) -> PrefixCache | None:
        """Reuse the keys and values of earlier prompts and replies (generation/prefix_cache.py): a
        prompt that begins with tokens an earlier call already ran (a chat's earlier turns, a shared
        system prompt) prefills only the rest. max_bytes: the cache's memory (default 1 GiB, on the
        model's device); max_bytes=0 turns it off. Returns the PrefixCache (its `stats`)."""
        from .generation.prefix_cache import BLOCK, PrefixCache

        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0):
            raise ArgumentError(f"max_bytes must be a non-negative integer, got {max_bytes!r:.60}")
        if max_bytes == 0:
            self.prefix_cache = None
            return None
        self.prefix_cache = PrefixCache(self.model, max_bytes or (1 << 30), block=block or BLOCK)
        return self.prefix_cache

    def events(self, requests: Sequence[Request], speculative: Speculative | None = None) -> Iterator[Event]:
        """Run requests to completion, yielding per-token events (text, finish reasons, logprobs).
        Split over ranks (tp): every rank runs rank 0's requests (under this rank's request ids).
        speculative: a `generation.speculative.Speculative` (default: this LLM's)."""
        if not requests:
            return iter(())
        if self.tp is not None:
            from .distributed.steps import follow_rank0

            requests = [follow_rank0(self.tp, r) for r in requests]
        return self.generator(requests, speculative=speculative).run(requests)

    # ---- public -------------------------------------------------------------------------------
    @overload
    def generate(self, prompt: str | Sequence[int], max_tokens: int = 256, *, details: Literal[False] = False,
                 **kw: Any) -> str: ...
    @overload
    def generate(self, prompt: list[str] | list[list[int]], max_tokens: int = 256, *,
                 details: Literal[False] = False, **kw: Any) -> list[str]: ...
    @overload
    def generate(self, prompt: str | Sequence[int], max_tokens: int = 256, *, details: Literal[True],
                 **kw: Any) -> Completion: ...
    @overload
    def generate(self, prompt: list[str] | list[list[int]], max_tokens: int = 256, *, details: Literal[True],
                 **kw: Any) -> list[Completion]: ...
    @overload
    def generate(self, prompt: str | Sequence[int] | list[str] | list[list[int]], max_tokens: int = 256, *,
                 details: bool, **kw: Any) -> str | list[str] | Completion | list[Completion]: ...
    def generate(self, prompt: str | Sequence[int] | list[str] | list[list[int]], max_tokens: int = 256, *,
                 details: bool = False, **kw: Any) -> str | list[str] | Completion | list[Completion]:
        """The generated text (a list for a list of prompts, generated as one batch).

        Sampling: `temperature`, `top_p`, `top_k`, `min_p`, `repetition_penalty`, `seed`; those left
        out take the model's generation_config.json values, else greedy. `stop`, `stop_token_ids`,
        `ignore_eos`, `logprobs` as in OpenAI/vLLM. details=True returns `Completion`s instead: text,
        token ids, finish reason, usage, logprobs and timing.

        Speculative decoding, with transformers' names (generation/speculative.py): the model checks
        several drafted tokens in one forward. `prompt_lookup_num_tokens=N` drafts N tokens by n-gram
        lookup in the prompt and output (`max_matching_ngram_size`, default 3); `assistant_model=` a
        smaller LLM with the same tokenizer drafts `num_assistant_tokens` (default 4). Greedy output
        is the same as without; sampled output follows the same distribution."""
        if not isinstance(details, bool):
            raise GenerationError(f"details must be True or False, got {details!r:.60}")
        batched = isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(
            isinstance(p, (str, list, tuple)) for p in prompt)
        prompts = list(prompt) if batched else [prompt]
        if isinstance(prompt, (list, tuple)) and not prompt:
            raise GenerationError("no prompts given")
        speculative = self._speculative(kw)
        reqs = [self.request(cast("str | Sequence[int]", p), max_tokens, **kw) for p in prompts]
        runs = {r.id: Collector(r) for r in reqs}
        for ev in self.events(reqs, speculative):
            runs[ev.request.id].add(ev)
        done = [runs[r.id].completion() for r in reqs]
        if not details:
            texts = [c.text for c in done]
            return texts if batched else texts[0]
        return done if batched else done[0]

    @overload
    def stream(self, prompt: str | Sequence[int], max_tokens: int = 256, *, details: Literal[False] = False,
               **kw: Any) -> Iterator[str]: ...
    @overload
    def stream(self, prompt: str | Sequence[int], max_tokens: int = 256, *, details: Literal[True],
               **kw: Any) -> Iterator[Chunk]: ...
    @overload
    def stream(self, prompt: str | Sequence[int], max_tokens: int = 256, *, details: bool,
               **kw: Any) -> Iterator[str] | Iterator[Chunk]: ...
    def stream(self, prompt: str | Sequence[int], max_tokens: int = 256, *, details: bool = False,
               **kw: Any) -> Iterator[str] | Iterator[Chunk]:
        """Text pieces as they are generated (never a split multi-byte character); the options of
        `generate`. details=True yields a `Chunk` per token (text, id, logprobs), the last one with the
        finish reason and the whole `Completion`."""
        if not isinstance(details, bool):
            raise GenerationError(f"details must be True or False, got {details!r:.60}")
        speculative = self._speculative(kw)
        req = self.request(prompt, max_tokens, **kw)
        return self._chunks(req, speculative) if details else self._pieces(req, speculative)

    def _pieces(self, req: Request, speculative: Speculative | None = None) -> Iterator[str]:
        for ev in self.events([req], speculative):
            if ev.text:
                yield ev.text

    def _chunks(self, req: Request, speculative: Speculative | None = None) -> Iterator[Chunk]:
        run = Collector(req)
        for ev in self.events([req], speculative):
            yield run.add(ev)

    @overload
    def chat(self, messages: list[dict], max_tokens: int = 256, *, stream: Literal[False] = False,
             tools: list[dict] | None = None, chat_template_kwargs: dict | None = None,
             details: Literal[False] = False, **kw: Any) -> str: ...
    @overload
    def chat(self, messages: list[dict], max_tokens: int = 256, *, stream: Literal[False] = False,
             tools: list[dict] | None = None, chat_template_kwargs: dict | None = None, details: Literal[True],
             **kw: Any) -> Completion: ...
    @overload
    def chat(self, messages: list[dict], max_tokens: int = 256, *, stream: Literal[True],
             tools: list[dict] | None = None, chat_template_kwargs: dict | None = None,
             details: Literal[False] = False, **kw: Any) -> Iterator[str]: ...
    @overload
    def chat(self, messages: list[dict], max_tokens: int = 256, *, stream: Literal[True],
             tools: list[dict] | None = None, chat_template_kwargs: dict | None = None, details: Literal[True],
             **kw: Any) -> Iterator[Chunk]: ...
    @overload
    def chat(self, messages: list[dict], max_tokens: int = 256, *, stream: bool = False,
             tools: list[dict] | None = None, chat_template_kwargs: dict | None = None, details: bool = False,
             **kw: Any) -> str | Completion | Iterator[str] | Iterator[Chunk]: ...
    def chat(self, messages: list[dict], max_tokens: int = 256, *, stream: bool = False,
             tools: list[dict] | None = None, chat_template_kwargs: dict | None = None, details: bool = False,
             allow_remote_images: bool = False, **kw: Any) -> str | Completion | Iterator[str] | Iterator[Chunk]:
        """Apply the chat template and generate the assistant's reply: a str, pieces with stream=True;
        with details=True a `Completion`, or `Chunk`s when streaming (see `generate`, `stream`).

        Image+text models (llava, gemma3) take images as content parts, OpenAI's
        `{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}` (a data: URL, a
        file path or file: URL; http(s) URLs only with allow_remote_images=True) or
        `{"type": "image", "image": <PIL image | path | bytes>}`; see ember.image_chat."""
        if not isinstance(stream, bool):
            raise GenerationError(f"stream must be True or False, got {stream!r:.60}")
        if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
            raise GenerationError(f"chat_template_kwargs must be a dict, got {type(chat_template_kwargs).__name__}")
        if not isinstance(allow_remote_images, bool):
            raise GenerationError(f"allow_remote_images must be True or False, got {allow_remote_images!r:.60}")
        c = self.chat_inputs(messages, tools=tools, allow_remote_images=allow_remote_images,
                             **(chat_template_kwargs or {}))
        ids = c.ids
        if c.image_embeds is not None:
            kw["image_embeds"] = c.image_embeds
        if c.rope_positions is not None:
            kw["rope_positions"] = c.rope_positions
        if stream:
            return self.stream(ids, max_tokens, details=details, **kw)
        return cast("str | Completion", self.generate(ids, max_tokens, details=details, **kw))

    def __call__(self, prompt: str | Sequence[int] | list[str] | list[list[int]], max_tokens: int = 256,
                 **kw: Any) -> str | list[str] | Completion | list[Completion]:
        """`generate`."""
        return self.generate(prompt, max_tokens, **kw)
