"""VarBuilder: the bridge from checkpoint tensors to layers, after Candle's `VarBuilder`.

A layer is built from `(config, vb)` and pulls its own tensors:

    attn = Attention(cfg, vb.pp("model.layers.0.self_attn"))   # inside: vb.get((out, in), "q_proj.weight")

`get` checks the shape from the checkpoint header before any data is read, converts floating
tensors to the builder's dtype and device (one copy, or none when they already match: tensors from
a safetensors file are then views on its mmap), and records which checkpoint tensors were used so
a load can report the ones nobody consumed.
"""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, Protocol, Sequence, Union, overload

import torch

from .errors import CheckpointError, ShapeMismatchError, TensorNotFoundError

Shape = Union[int, Sequence[int]]


class TensorSource(Protocol):
    """Where tensors come from: a set of safetensors files, a GGUF file, a dict."""

    def keys(self) -> Iterable[str]: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def load(self, key: str) -> torch.Tensor: ...

    def describe(self) -> str: ...


class SafetensorsSource:
    """Tensors from one or more safetensors files (the shards of one checkpoint)."""

    def __init__(self, files: Sequence[str | os.PathLike]):
        from .io.safetensors import SafetensorsFile

        if isinstance(files, (str, os.PathLike)):
            files = [files]
        if not files:
            raise CheckpointError("no safetensors files given")
        self.files = [SafetensorsFile(f) for f in files]
        self._where: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for k in f.keys():
                if k in self._where:
                    raise CheckpointError(f"tensor {k!r} appears in both {self._where[k].path.name} and {f.path.name}")
                self._where[k] = f

    def keys(self) -> Iterable[str]:
        return self._where.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].info(key).shape

    def dtype(self, key: str) -> torch.dtype:
        return self._where[key].info(key).dtype

    def load(self, key: str) -> torch.Tensor:
        return self._where[key].tensor(key)

    def release(self, key: str) -> None:
        self._where[key].release(key)

    def describe(self) -> str:
        names = [f.path.name for f in self.files]
        where = self.files[0].path.parent
        return f"{', '.join(names[:3])}{' ...' if len(names) > 3 else ''} in {where}"

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.files[0].metadata)


class DictSource:
    """Tensors from an in-memory mapping (tests, conversions)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], name: str = "tensors"):
        self.tensors = dict(tensors)
        self.name = name

    def keys(self) -> Iterable[str]:
        return self.tensors.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].dtype

    def load(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def describe(self) -> str:
        return self.name


@dataclass
class _Shared:
    """State shared by a builder and every builder derived from it with pp()/rename()."""

    source: TensorSource
    used: set[str] = field(default_factory=set)
    _keys: list[str] | None = None
    tp: object | None = None  # the tensor-parallel group the model is split over (ember.distributed)

    def all_keys(self) -> list[str]:
        if self._keys is None:
            self._keys = list(self.source.keys())
        return self._keys


KeyMap = Union[Callable[[str], Union[str, None]], Mapping[str, str]]


class VarBuilder:
    """Hands out checkpoint tensors by name under a prefix; see the module docstring."""

    def __init__(
        self,
        source: TensorSource,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        prefix: str = "",
        *,
        renames: Sequence[Callable[[str], str | None]] = (),
        tp: Any = None,
        _shared: _Shared | None = None,
        _shard: tuple[int, tuple[tuple[int, int], ...]] | None = None,
    ) -> None:
        self.source = source
        self.dtype = dtype
        self.device = torch.device(device)
        self.prefix = prefix
        self._renames = tuple(renames)
        self._shared = _shared or _Shared(source, tp=tp)
        self._shard = _shard  # (dim, ranges): this builder hands out only those parts (see sharded())

    @property
    def tp(self) -> Any:
        """The tensor-parallel group (`ember.distributed.TensorParallel`) the model is being split
        over, or None for a model built whole. Model files ask it how to split their layers."""
        return self._shared.tp

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_mmaped_safetensors(
        cls, files: str | os.PathLike | Sequence[str | os.PathLike], dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu"
    ) -> "VarBuilder":
        """A builder over safetensors files (the shards of one checkpoint), memory-mapped."""
        return cls(SafetensorsSource([files] if isinstance(files, (str, os.PathLike)) else files), dtype, device)

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None,
                     device: str | torch.device = "cpu") -> "VarBuilder":
        return cls(DictSource(tensors), dtype, device)

    def _derive(self, prefix: str | None = None, renames: Sequence[Callable[[str], str | None]] | None = None,
                dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                shard: tuple[int, tuple[tuple[int, int], ...]] | None | Literal[False] = False) -> "VarBuilder":
        return VarBuilder(
            self.source,
            dtype if dtype is not None else self.dtype,
            device if device is not None else self.device,
            self.prefix if prefix is None else prefix,
            renames=self._renames if renames is None else renames,
            _shared=self._shared,
            _shard=self._shard if shard is False else shard,
        )

    def sharded(self, dim: int, ranges: Sequence[tuple[int, int]]) -> "VarBuilder":
        """A builder whose tensors are only the index ranges `ranges` of dimension `dim`, concatenated
        (one rank's part of a tensor-parallel layer: `[(start, stop)]`, or several ranges for a fused
        q/k/v). `get` still checks the checkpoint's whole shape; tensors with fewer dimensions
        (a row-parallel layer's bias) come whole. Only those ranges are read from the file."""
        ranges = tuple((int(a), int(b)) for a, b in ranges)
        if not ranges or any(not 0 <= a <= b for a, b in ranges):
            raise ValueError(f"bad shard ranges {ranges!r}")
        return self._derive(shard=(dim, ranges))

    def pp(self, name: str | int) -> "VarBuilder":
        """Push a prefix: `vb.pp("model").pp("layers").pp(0)` reads `model.layers.0.*`."""
        return self._derive(prefix=self._join(str(name)))

    push_prefix = pp

    def pp_first(self, prefixes: Sequence[str], probe: str) -> "VarBuilder":
        """The builder under the first of `prefixes` ("" = here) whose checkpoint holds `probe`.

        For checkpoints saved with or without a wrapper's prefix (`BertModel` vs `bert.` inside
        `BertForMaskedLM`): `vb.pp_first(["", "bert"], "embeddings.word_embeddings.weight")`.
        """
        for p in prefixes:
            vb = self.pp(p) if p else self
            if vb.contains(probe):
                return vb
        tried = ", ".join(repr(self._join(f"{p}.{probe}" if p else probe)) for p in prefixes)
        near = difflib.get_close_matches(self._join(probe), self._shared.all_keys(), n=5, cutoff=0.6)
        hint = f"; nearest keys: {', '.join(near)}" if near else ""
        raise TensorNotFoundError(f"none of {tried} is in {self._shared.source.describe()}{hint}")

    def root(self) -> "VarBuilder":
        return self._derive(prefix="")

    def to(self, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> "VarBuilder":
        return self._derive(dtype=dtype, device=device)

    def rename(self, mapping: KeyMap) -> "VarBuilder":
        """A builder that looks keys up through `mapping` first (full model key -> checkpoint key).

        `mapping` is a callable returning the checkpoint key (or None to leave the key as is), or a
        dict of prefixes `{model_prefix: checkpoint_prefix}` where the longest matching one applies.
        """
        if callable(mapping):
            fn = mapping
        else:
            pairs = sorted(mapping.items(), key=lambda kv: -len(kv[0]))

            def fn(key: str, pairs: list[tuple[str, str]] = pairs) -> str | None:
                for a, b in pairs:
                    if key == a or key.startswith(a) and (a == "" or a.endswith(".") or key[len(a)] == "."):
                        return b + key[len(a):]
                return None

        return self._derive(renames=self._renames + (fn,))

    # ---- lookups ------------------------------------------------------------------------------
    def _join(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix and name else (self.prefix or name)

    def _lookup(self, name: str) -> str | None:
        full = self._join(name)
        keys = self._shared.source.keys()
        for fn in reversed(self._renames):
            mapped = fn(full)
            if mapped is not None and mapped in keys:
                return mapped
        return full if full in keys else None

    def contains(self, name: str) -> bool:
        """Whether the checkpoint has `name` under the current prefix."""
        return self._lookup(name) is not None

    contains_tensor = contains

    def keys(self) -> list[str]:
        """Checkpoint keys under the current prefix (relative to it)."""
        p = self.prefix + "." if self.prefix else ""
        return [k[len(p):] for k in self._shared.all_keys() if k.startswith(p)]

    def shape_of(self, name: str) -> tuple[int, ...]:
        return tuple(self._shared.source.shape(self._require(name)))

    def _require(self, name: str) -> str:
        key = self._lookup(name)
        if key is None:
            full = self._join(name)
            near = nearest_keys(full, self._shared.all_keys())
            hint = f"; nearest keys: {', '.join(near)}" if near else ""
            raise TensorNotFoundError(f"tensor {full!r} not found in {self._shared.source.describe()}{hint}")
        return key

    @overload
    def get(self, shape: Shape | None, name: str, dtype: torch.dtype | None = None, *,
            quantized: Literal[False] = False) -> torch.Tensor: ...
    @overload
    def get(self, shape: Shape | None, name: str, dtype: torch.dtype | None = None, *, quantized: bool) -> Any: ...
    def get(self, shape: Shape | None, name: str, dtype: torch.dtype | None = None, *, quantized: bool = False) -> Any:
        """The tensor `name` under the prefix, checked against `shape` before its data is read.

        Floating tensors are converted to `dtype` (default: the builder's). An integer or bool tensor
        where a floating builder reads weights is a CheckpointError (a quantised checkpoint's packed
        values); `get_unchecked` hands integer tensors back as they are.
        With `quantized=True` a quantised tensor (GGUF blocks) is returned as is instead of dequantised.
        """
        key = self._require(name)
        if shape is not None:
            want = (shape,) if isinstance(shape, int) else tuple(shape)
            found = tuple(self._shared.source.shape(key))
            if want != found:
                raise ShapeMismatchError(
                    f"tensor {key!r} in {self._shared.source.describe()} has shape {list(found)}, "
                    f"the model expects {list(want)} (does config.json match the weights?)"
                )
        return self._load(key, dtype, quantized, floating=True)

    def get_sharded(self, shape: Shape | None, name: str, dim: int, rank: int, world: int,
                    dtype: torch.dtype | None = None, *, quantized: bool = False) -> Any:
        """Rank `rank`'s equal part (of `world`) along `dim` of the tensor `name`, whose whole shape
        is checked against `shape` first; only that part is read."""
        n = self.shape_of(name)[dim]
        if n % world:
            raise ShapeMismatchError(f"tensor {self._join(name)!r}: dimension {dim} ({n}) does not split into "
                                     f"{world} equal parts")
        step = n // world
        return self.sharded(dim, [(rank * step, (rank + 1) * step)]).get(shape, name, dtype, quantized=quantized)

    def get_unchecked(self, name: str, dtype: torch.dtype | None = None, *, quantized: bool = False) -> Any:
        """The tensor `name` with whatever shape the checkpoint has."""
        return self._load(self._require(name), dtype, quantized)

    def get_optional(self, shape: Shape | None, name: str, dtype: torch.dtype | None = None, *,
                     quantized: bool = False) -> Any:
        """Like `get`, but None when the checkpoint has no such tensor (optional biases...)."""
        return self.get(shape, name, dtype, quantized=quantized) if self.contains(name) else None

    def _load(self, key: str, dtype: torch.dtype | None, quantized: bool, floating: bool = False) -> Any:
        raw = self._shared.source.load(key)
        self._shared.used.add(key)
        if self._shard is not None and len(self._shared.source.shape(key)) > self._shard[0]:
            raw = self._slice(key, raw)
        if not isinstance(raw, torch.Tensor):  # a tensor kept quantised (GGUF blocks)
            if quantized:
                return raw.to(self.device)
            return raw.dequantize(dtype or self.dtype or torch.float32).to(self.device)
        if floating and dtype is None and self.dtype is not None and self.dtype.is_floating_point \
                and not raw.is_floating_point():
            # integer/bool data where a layer reads float weights: a quantised checkpoint's packed
            # values, which computing with (or casting) would silently give wrong answers
            raise CheckpointError(f"tensor {key!r} in {self._shared.source.describe()} is stored as {raw.dtype}, "
                                  f"where the model reads floating-point weights (a quantised checkpoint? ember "
                                  f"reads unquantised safetensors and GGUF files)")
        out = self._convert(raw, dtype)
        if out.numel() and out.untyped_storage().data_ptr() != raw.untyped_storage().data_ptr():
            self._release(key)  # a converted copy: the file's pages are not needed in memory
        return out

    def _slice(self, key: str, raw: Any) -> Any:
        """The ranges of this builder's shard of `raw` (views on the file where they can be)."""
        assert self._shard is not None
        dim, ranges = self._shard
        n = self._shared.source.shape(key)[dim]
        if any(b > n for _, b in ranges):
            raise ShapeMismatchError(f"tensor {key!r} in {self._shared.source.describe()}: shard ranges "
                                     f"{list(ranges)} exceed its dimension {dim} of {n}")
        if not isinstance(raw, torch.Tensor):
            from .io.ggml_weight import slice_blocks

            try:
                return slice_blocks(raw, dim, ranges)
            except ValueError as e:
                from .errors import DistributedError

                raise DistributedError(f"tensor {key!r} in {self._shared.source.describe()} cannot be split for "
                                       f"tensor parallelism: {e}") from None
        parts = [raw.narrow(dim, a, b - a) for a, b in ranges]
        if len(parts) == 1 and parts[0].is_contiguous():
            return parts[0]  # a view on the file: only these pages are ever read
        out = torch.cat(parts, dim) if len(parts) > 1 else parts[0].contiguous()
        self._release(key)  # copied: the mapped pages are not needed in memory
        return out

    def release(self, name: str) -> None:
        """Tell the source that `name`'s data was copied and its mapped pages can be dropped."""
        key = self._lookup(name)
        if key is not None:
            self._release(key)

    def _release(self, key: str) -> None:
        fn = getattr(self._shared.source, "release", None)
        if fn is not None:
            fn(key)

    def _convert(self, t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        dtype = dtype or self.dtype
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            return t.to(device=self.device, dtype=dtype)
        return t.to(self.device)  # no copy when already there

    # ---- bookkeeping --------------------------------------------------------------------------
    def unused(self) -> list[str]:
        """Checkpoint keys no layer has consumed yet."""
        used = self._shared.used
        return [k for k in self._shared.all_keys() if k not in used]

    def __repr__(self) -> str:
        return f"VarBuilder(prefix={self.prefix!r}, dtype={self.dtype}, device={self.device}, source={self._shared.source.describe()})"


def nearest_keys(key: str, keys: list[str], n: int = 5) -> list[str]:
    """Keys most like `key`: the same name in other layers first (model.layers.#.x), then by spelling."""
    pattern = re.sub(r"\d+", "#", key)
    same = [k for k in keys if re.sub(r"\d+", "#", k) == pattern][:3]
    close = difflib.get_close_matches(key, keys, n=n, cutoff=0.6)
    return list(dict.fromkeys(same + close))[:n]


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint folder: the index's shards, or `*.safetensors`."""
    from .io.safetensors import read_index

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return read_index(index)
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    return sorted(folder.glob("*.safetensors"))
