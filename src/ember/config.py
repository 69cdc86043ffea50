"""config.json → typed dataclasses.

Each family declares a dataclass whose field names are the config.json names themselves, with
transformers' defaults. `from_dict` keeps the declared fields (unknown keys cost nothing but stay
available in `.raw`), checks each value's type, and the family's `validate()` checks the numbers,
so a bad config fails with a `ConfigError` that names the field instead of deep inside a layer.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import types
from pathlib import Path
from typing import Any, ClassVar, Union, get_args, get_origin, get_type_hints

from .errors import ConfigError


# The most layers a config may claim (real models have a few hundred at most).
MAX_LAYERS = 1 << 16
LAYER_COUNT_FIELDS = ("num_hidden_layers", "n_layer", "num_layers")


def _type_ok(value: Any, tp: Any) -> bool:
    if tp is Any:
        return True
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, a) for a in get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, list):
            return False
        args = get_args(tp)
        return not args or all(_type_ok(v, args[0]) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    return True


def _non_finite(value: Any) -> bool:
    """NaN or ±inf (JSON's NaN/Infinity literals parse to these), also inside a list."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, list):
        return any(isinstance(v, float) and not math.isfinite(v) for v in value)
    return False


def _type_name(tp: Any) -> str:
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


@dataclasses.dataclass
class ModelConfig:
    """Base of every family's config dataclass."""

    model_type: str = ""
    architectures: list | None = None
    torch_dtype: str | None = None
    dtype: str | None = None
    # The whole config.json, for the rare key a family reads without declaring it.
    raw: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    _hints_cache: ClassVar[dict] = {}

    @classmethod
    def _hints(cls) -> dict[str, Any]:
        if cls not in ModelConfig._hints_cache:
            ModelConfig._hints_cache[cls] = get_type_hints(cls)
        return ModelConfig._hints_cache[cls]

    @classmethod
    def from_dict(cls, d: dict, **overrides):
        """Build from a config.json dict; unknown keys are ignored, known ones type-checked."""
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        d = {**d, **overrides}
        hints = cls._hints()
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name == "raw" or f.name not in d:
                continue
            value = d[f.name]
            tp = hints.get(f.name, Any)
            if isinstance(value, float) and value.is_integer() and _type_ok(1, tp) and not _type_ok(value, tp):
                value = int(value)  # 4096.0 where an int is meant: harmless, accept it
            if not _type_ok(value, tp):
                raise ConfigError(
                    f"config field {f.name!r} should be {_type_name(tp)}, got {type(value).__name__} {value!r:.80}"
                )
            if _non_finite(value):
                raise ConfigError(f"config field {f.name!r} is {value!r:.80}: numbers must be finite")
            kwargs[f.name] = value
        for name in LAYER_COUNT_FIELDS:
            v = kwargs.get(name)
            if isinstance(v, int) and v > MAX_LAYERS:
                # per-layer lists (windows, layer types) are built from this count before any weight is
                # checked against it: refuse absurd counts before allocating them
                raise ConfigError(f"config field {name!r} is {v!r:.40}: more than {MAX_LAYERS} layers is not a real model")
        try:
            cfg = cls(**kwargs, raw=d)
        except (TypeError, ValueError, ZeroDivisionError) as e:
            raise ConfigError(f"invalid {cls.__module__.rsplit('.', 1)[-1]} config: {e}") from None
        cfg.validate()
        return cfg

    @classmethod
    def from_file(cls, path: str | os.PathLike):
        return cls.from_dict(load_json(path))

    def validate(self) -> None:
        """Check the numbers; families override and call `self._positive(...)`."""

    def _positive(self, *names: str, allow_zero: bool = False) -> None:
        for n in names:
            v = getattr(self, n)
            if v is None:
                continue
            if v < 0 or (v == 0 and not allow_zero):
                raise ConfigError(f"config field {n!r} must be {'non-negative' if allow_zero else 'positive'}, got {v}")

    def _require(self, cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "raw"}
        return out


def load_json(path: str | os.PathLike, limit: int | None = None) -> dict:
    """Read a JSON config file, turning every failure into a ConfigError naming the file.

    Files over `limit` bytes (default `safefile.MAX_CONFIG_BYTES`, 64 MiB) are refused before they
    are read; malformed JSON, integers past Python's 4300-digit limit and absurd nesting are
    ConfigErrors too."""
    from .io.safefile import MAX_CONFIG_BYTES, read_text

    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise ConfigError(f"{path}: file not found")
    text = read_text(path, MAX_CONFIG_BYTES if limit is None else limit, ConfigError, "JSON config file")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, ints over the 4300-digit limit
        raise ConfigError(f"{path}: not valid JSON: {str(e)[:200]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


@dataclasses.dataclass
class DecoderConfig(ModelConfig):
    """The attention shape every decoder family's config declares (config.json names) and what ember's
    shared attention (`ember.models.llama.Attention`) reads, with the checks they all need.

    A family whose config.json spells a flag differently maps it onto these fields in its registry
    entry (`prepare`), so no family fakes another's fields.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: as many as attention heads
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    attention_bias: bool = False  # bias on q, k, v and o
    qkv_bias: bool = False  # bias on q, k, v only (Qwen2, StableLM)
    qk_norm: bool = False  # RMSNorm over each head of q and k (Qwen3)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads:
            self.head_dim = self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        self._positive("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "head_dim", "max_position_embeddings")
        self._require(self.num_attention_heads % self.num_key_value_heads == 0,
                      f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                      f"num_key_value_heads ({self.num_key_value_heads})")

    def _head_dim_divides_hidden(self) -> None:
        """For families whose head_dim is always hidden_size / heads."""
        self._require(self.hidden_size % self.num_attention_heads == 0,
                      f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                      f"({self.num_attention_heads})")
