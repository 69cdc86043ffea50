"""The errors ember raises for bad input. Every one derives from `EmberError`.

Messages say what is wrong and what to do about it; callers can catch `EmberError` to handle any
bad model, file, config or request without catching programming errors.
"""
from __future__ import annotations


class EmberError(Exception):
    """Base class of every error ember raises for bad input (files, configs, requests)."""


class CheckpointError(EmberError):
    """A weight file is corrupt, truncated or inconsistent. Names the file and the offending field."""


class TensorNotFoundError(CheckpointError, KeyError):
    """A tensor the model needs is not in the checkpoint. Names the key and the nearest keys."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ShapeMismatchError(CheckpointError):
    """A tensor's shape in the checkpoint differs from what the model expects."""


class ConfigError(EmberError):
    """config.json (or GGUF metadata) is missing a field, has a wrong type or an impossible value."""


class UnsupportedModelError(EmberError):
    """The architecture is not implemented; the message lists what is supported."""


class ModelNotFoundError(EmberError):
    """A model id or path could not be resolved; the message says where ember looked."""


class TokenizerError(EmberError):
    """The tokenizer files are missing or unreadable."""


class TemplateError(EmberError):
    """A chat template failed to render, or tried something the sandbox forbids."""


class GenerationError(EmberError):
    """Bad generation arguments (negative max_tokens, prompt longer than the context, ...)."""


class GrammarError(GenerationError):
    """A JSON schema or grammar for constrained decoding that cannot be compiled (the message names the
    part refused), or structured output asked for without the grammar library installed."""


class EmbeddingError(EmberError):
    """Bad embedding input (no texts, a non-string item, a bad batch size) or sentence-transformers files."""


class ImageError(EmbeddingError):
    """An image that cannot be read or used (corrupt or truncated, an unsupported format, more pixels
    than ember decodes, a URL ember may not fetch). An EmbeddingError too, as image embedding
    raised before chat took images."""


class AudioError(EmberError):
    """Audio that cannot be read or used (a corrupt or empty file, too long, non-finite samples)."""


class ArgumentError(EmberError, ValueError):
    """A bad argument to `ember.load` (an unknown or unavailable device, a dtype ember cannot compute
    in). Also a ValueError, as Python code expects of a bad argument value. (Bad arguments to
    generate/stream/chat are GenerationErrors, to embed EmbeddingErrors.)"""


class DistributedError(EmberError):
    """Tensor parallelism failed: a rank stopped or timed out, the process group is missing or of the
    wrong size, or a model/weight layout cannot be split over the ranks. Says which and what to do."""


__all__ = [
    "EmberError",
    "CheckpointError",
    "TensorNotFoundError",
    "ShapeMismatchError",
    "ConfigError",
    "UnsupportedModelError",
    "ModelNotFoundError",
    "TokenizerError",
    "TemplateError",
    "GenerationError",
    "GrammarError",
    "EmbeddingError",
    "ArgumentError",
    "AudioError",
    "ImageError",
    "DistributedError",
]
