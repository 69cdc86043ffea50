"""ember: Hugging Face models on native PyTorch implementations, loaded straight from checkpoints.

    import ember
    llm = ember.load("HuggingFaceTB/SmolLM2-135M-Instruct")
    llm.generate("The capital of France is", max_tokens=32)

Heavy modules (torch, the models, tokenizers) load on first use, so `import ember` stays cheap.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    ArgumentError,
    AudioError,
    CheckpointError,
    ConfigError,
    DistributedError,
    EmberError,
    EmbeddingError,
    GenerationError,
    GrammarError,
    ImageError,
    ModelNotFoundError,
    ShapeMismatchError,
    TemplateError,
    TensorNotFoundError,
    TokenizerError,
    UnsupportedModelError,
)

__version__ = "0.1.0"

_LAZY = {
    "load": ("ember.api", "load"),
    "LLM": ("ember.api", "LLM"),
    "Embedder": ("ember.embeddings", "Embedder"),
    "Seq2SeqLM": ("ember.seq2seq", "Seq2SeqLM"),
    "Transcriber": ("ember.speech", "Transcriber"),
    "ImageTextEmbedder": ("ember.vision_embeddings", "ImageTextEmbedder"),
    "VarBuilder": ("ember.varbuilder", "VarBuilder"),
    "Tokenizer": ("ember.tokenizer", "Tokenizer"),
    "hub": ("ember.hub", None),
    "registry": ("ember.registry", None),
    "models": ("ember.models", None),
    "nn": ("ember.nn", None),
}

if TYPE_CHECKING:  # pragma: no cover
    from . import hub, models, nn, registry  # noqa: F401
    from .api import LLM, load  # noqa: F401
    from .embeddings import Embedder  # noqa: F401
    from .seq2seq import Seq2SeqLM  # noqa: F401
    from .speech import Transcriber  # noqa: F401
    from .tokenizer import Tokenizer  # noqa: F401
    from .varbuilder import VarBuilder  # noqa: F401
    from .vision_embeddings import ImageTextEmbedder  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        mod = importlib.import_module(module)
        value = mod if attr is None else getattr(mod, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ember' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))


__all__ = [
    "load", "LLM", "Embedder", "Seq2SeqLM", "Transcriber", "ImageTextEmbedder", "VarBuilder", "Tokenizer", "hub", "registry", "EmberError", "CheckpointError",
    "TensorNotFoundError", "ShapeMismatchError", "ConfigError", "UnsupportedModelError", "ModelNotFoundError",
    "TokenizerError", "TemplateError", "GenerationError", "GrammarError", "EmbeddingError", "ArgumentError",
    "AudioError",
    "ImageError",
    "DistributedError",
]
