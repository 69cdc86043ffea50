"""GGUF reader: a validated header, metadata, and zero-copy tensor views on a private mmap.

The format (v2/v3, little-endian): magic `GGUF`, u32 version, u64 tensor count, u64 metadata count,
the metadata key/values (`u64 length + bytes` strings, typed scalars, typed arrays), the tensor table
(name, dims fastest-first, ggml type, offset into the data section), padding to `general.alignment`,
then the tensor data.

Every count and length is checked against the bytes the file actually has before anything is built
from it, so a truncated, corrupt or hostile file is refused with a `CheckpointError` naming the file
and the field, never a raw struct/numpy exception nor an allocation sized by a number the file
claims. Unknown tensor types are an `UnsupportedModelError` when the tensor is loaded.

This parser is ember's own (stdlib `struct` over `mmap`): `gguf.GGUFReader` builds a numpy view per
value, which takes ~3.5 s on a 49k-token vocabulary, and it does not bound counts against the file
size. The `gguf` package stays the reference in the tests.
"""
from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, EmberError, UnsupportedModelError
from . import ggml

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 4

# metadata value types: id -> (name, struct format or None for string/array)
VALUE_TYPES: dict[int, tuple[str, str | None]] = {
    0: ("uint8", "<B"), 1: ("int8", "<b"), 2: ("uint16", "<H"), 3: ("int16", "<h"), 4: ("uint32", "<I"),
    5: ("int32", "<i"), 6: ("float32", "<f"), 7: ("bool", "<?"), 8: ("string", None), 9: ("array", None),
    10: ("uint64", "<Q"), 11: ("int64", "<q"), 12: ("float64", "<d"),
}
STRING, ARRAY = 8, 9
# Numeric metadata arrays come back as Python lists (what readers of the metadata expect), which cost
# 8 bytes a reference plus the number objects: up to ~17x the file's bytes for a u8/bool array, ~10x for
# f32. Past this many list elements in one file (real files: a few hundred thousand, e.g. a 262k
# vocabulary's scores and token types), further numeric arrays come back as compact `array.array`s
# (the file's own size), which code expecting a list refuses as a wrong type.
MAX_LIST_ELEMENTS = 1 << 22
_ARRAY_CODES = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "B", 10: "Q", 11: "q", 12: "d"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: int
    shape: tuple[int, ...]  # torch order (the file stores dims fastest-moving first)
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return ggml.type_name(self.ggml_type)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class _Cursor:
    """Bounds-checked little-endian reads over the mapped header."""

    def __init__(self, buf, size: int, path: Path):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0
        self.list_budget = MAX_LIST_ELEMENTS  # numeric array elements still allowed as Python lists

    def fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: not a valid GGUF file: {what}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} needs {n} bytes at offset {self.pos} but the file has only {self.size} "
                            f"(truncated or corrupt file?)")

    def unpack(self, fmt: str, n: int, what: str):
        self.need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def u32(self, what: str) -> int:
        return self.unpack("<I", 4, what)[0]

    def u64(self, what: str) -> int:
        return self.unpack("<Q", 8, what)[0]

    def string(self, what: str, max_len: int | None = None) -> str:
        n = self.u64(f"length of {what}")
        if max_len is not None and n > max_len:
            raise self.fail(f"{what} claims {n} bytes (limit {max_len})")
        self.need(n, what)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None

    def remaining(self) -> int:
        return self.size - self.pos


def _read_value(c: _Cursor, vtype: int, key: str, depth: int = 0) -> Any:
    spec = VALUE_TYPES.get(vtype)
    if spec is None:
        raise c.fail(f"metadata {key!r} has unknown value type {vtype}")
    name, fmt = spec
    if fmt is not None:
        return c.unpack(fmt, struct.calcsize(fmt), f"metadata {key!r}")[0]
    if vtype == STRING:
        return c.string(f"metadata {key!r}")
    # array: u32 element type, u64 count, elements
    if depth >= MAX_ARRAY_DEPTH:
        raise c.fail(f"metadata {key!r}: arrays nested deeper than {MAX_ARRAY_DEPTH}")
    etype = c.u32(f"element type of metadata {key!r}")
    count = c.u64(f"length of metadata {key!r}")
    espec = VALUE_TYPES.get(etype)
    if espec is None:
        raise c.fail(f"metadata {key!r} is an array of unknown value type {etype}")
    efmt = espec[1]
    min_size = struct.calcsize(efmt) if efmt else (8 if etype == STRING else 12)
    if count * min_size > c.remaining():
        raise c.fail(f"metadata {key!r} claims {count} array elements ({count * min_size}+ bytes) but only "
                     f"{c.remaining()} bytes remain in the file (truncated or corrupt file?)")
    if efmt is not None:
        size = struct.calcsize(efmt)
        if count > c.list_budget:
            return _compact_array(c, etype, count, size)
        c.list_budget -= count
        vals = list(struct.unpack_from(f"<{count}{efmt[1]}", c.buf, c.pos)) if count else []
        c.pos += count * size
        return vals
    if etype == STRING:
        return _read_strings(c, count, key)
    return [_read_value(c, ARRAY, key, depth + 1) for _ in range(count)]


def _compact_array(c: _Cursor, etype: int, count: int, size: int):
    """A numeric array as an `array.array` over a copy of its bytes (see MAX_LIST_ELEMENTS)."""
    import array
    import sys

    out = array.array(_ARRAY_CODES[etype])
    if out.itemsize != size:  # (no platform ember runs on has other C sizes for these codes)
        raise c.fail(f"cannot hold a {VALUE_TYPES[etype][0]} array compactly on this platform")
    mv = memoryview(c.buf)  # (no intermediate copy of the bytes; views released before the map closes)
    try:
        part = mv[c.pos:c.pos + count * size]
        try:
            out.frombytes(part)
        finally:
            part.release()
    finally:
        mv.release()
    if sys.byteorder != "little":
        out.byteswap()
    c.pos += count * size
    return out


def _read_strings(c: _Cursor, count: int, key: str) -> list[str]:
    """A string array (vocabularies: ~10^5 entries), in a tight loop."""
    buf, pos, size = c.buf, c.pos, c.size
    unpack = struct.unpack_from
    out = []
    append = out.append
    try:
        for i in range(count):
            if pos + 8 > size:
                raise c.fail(f"metadata {key!r}: string {i} of {count} runs past the end of the file (truncated?)")
            (n,) = unpack("<Q", buf, pos)
            pos += 8
            end = pos + n
            if end > size:
                raise c.fail(f"metadata {key!r}: string {i} claims {n} bytes but the file ends first (truncated?)")
            append(buf[pos:end].decode("utf-8"))
            pos = end
    except UnicodeDecodeError:
        raise c.fail(f"metadata {key!r}: string {len(out)} is not valid UTF-8") from None
    c.pos = pos
    return out


class GGUFFile:
    """One GGUF file: validated metadata and tensor table, tensors as views on a private mmap."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.metadata: dict[str, Any] = {}
        self.value_types: dict[str, int | tuple[int, int]] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._storage: torch.UntypedStorage | None = None
        self._parse()

    # ---- parsing ------------------------------------------------------------------------------
    def _parse(self) -> None:
        path = self.path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(4)
                if head != MAGIC:
                    raise CheckpointError(f"{path}: not a GGUF file (magic {head!r}, expected b'GGUF')")
                if size < 24:
                    raise CheckpointError(f"{path}: not a valid GGUF file: {size} bytes is too short for the "
                                          f"24-byte header (truncated file?)")
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
        try:
            self._parse_header(mm, size)
        finally:
            mm.close()

    def _parse_header(self, mm, size: int) -> None:
        path = self.path
        if mm[:4] != MAGIC:
            raise CheckpointError(f"{path}: not a GGUF file (magic {bytes(mm[:4])!r}, expected b'GGUF')")
        c = _Cursor(mm, size, path)
        c.pos = 4
        version = c.u32("version")
        if version not in VERSIONS:
            if version & 0xFFFF == 0 and (version >> 16) in VERSIONS:
                raise UnsupportedModelError(f"{path}: big-endian GGUF files are not supported")
            raise UnsupportedModelError(f"{path}: GGUF version {version} is not supported (ember reads v2 and v3)")
        self.version = version
        n_tensors = c.u64("tensor count")
        n_kv = c.u64("metadata count")
        # smallest possible entries: a key/value is 8 (key length) + 1 + 4 (type) + 1; a tensor is
        # 8 (name length) + 4 (dims) + 8 (one dim) + 4 (type) + 8 (offset)
        if n_kv * 14 > c.remaining():
            raise c.fail(f"header claims {n_kv} metadata entries but the file has only {c.remaining()} bytes after the header")
        if n_tensors * 32 > c.remaining():
            raise c.fail(f"header claims {n_tensors} tensors but the file has only {c.remaining()} bytes after the header")

        for _ in range(n_kv):
            key = c.string("metadata key", max_len=65535)
            vtype = c.u32(f"type of metadata {key!r}")
            start = c.pos
            value = _read_value(c, vtype, key)
            if key in self.metadata:
                raise c.fail(f"metadata key {key!r} appears twice")
            self.metadata[key] = value
            if vtype == ARRAY:
                self.value_types[key] = (ARRAY, struct.unpack_from("<I", mm, start)[0])
            else:
                self.value_types[key] = vtype

        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
            raise c.fail(f"general.alignment must be a positive power of two, got {alignment!r}")
        self.alignment = alignment

        table = []
        for i in range(n_tensors):
            name = c.string(f"name of tensor {i}", max_len=4096)
            n_dims = c.u32(f"dimension count of tensor {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise c.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
            dims = c.unpack(f"<{n_dims}Q", 8 * n_dims, f"dimensions of tensor {name!r}")
            gtype, offset = c.unpack("<IQ", 12, f"type and offset of tensor {name!r}")
            table.append((name, dims, gtype, offset))
        data_start = -(-c.pos // alignment) * alignment
        self.data_start = data_start
        data_len = size - data_start
        if data_len < 0:
            raise c.fail(f"the data section would start at {data_start}, past the end of the {size}-byte file (truncated?)")

        for name, dims, gtype, offset in table:
            if name in self.tensors:
                raise c.fail(f"tensor {name!r} appears twice")
            numel = 1
            for d in dims:
                numel *= d
            if numel > 1 << 48:
                raise c.fail(f"tensor {name!r} claims {list(dims)} = {numel} elements")
            shape = tuple(reversed(dims))
            if gtype in ggml.GGML_TYPES:
                n, b = ggml.block_size(gtype)
                if dims[0] % n:
                    raise c.fail(f"tensor {name!r}: row length {dims[0]} is not a multiple of the "
                                 f"{ggml.type_name(gtype)} block size {n}")
                nbytes = numel // n * b
                if offset % alignment:
                    raise c.fail(f"tensor {name!r}: data offset {offset} is not aligned to {alignment}")
                if offset + nbytes > data_len:
                    raise c.fail(f"tensor {name!r} ({ggml.type_name(gtype)}{list(shape)}) needs bytes {offset}..{offset + nbytes} "
                                 f"of the data section but the file holds only {data_len} (truncated file?)")
            else:
                nbytes = -1  # unknown type: refused when loaded
            self.tensors[name] = TensorInfo(name, gtype, shape, data_start + offset, nbytes)

        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in self.tensors.values() if t.nbytes > 0)
        for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise c.fail(f"tensors {n0!r} and {n1!r} overlap")
        self.size = size

    # ---- access -------------------------------------------------------------------------------
    @property
    def architecture(self) -> str | None:
        a = self.metadata.get("general.architecture")
        return a if isinstance(a, str) else None

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def check_supported(self, name: str) -> TensorInfo:
        t = self.tensors[name]
        if t.ggml_type not in ggml.SUPPORTED:
            raise UnsupportedModelError(
                f"{self.path}: tensor {name!r} is stored as ggml type {ggml.type_name(t.ggml_type)}, which ember "
                f"cannot dequantise (supported: {ggml.supported_names()}); use a file with a supported quantisation")
        return t

    def _mapped(self) -> torch.UntypedStorage:
        if self._storage is None:
            # shared=False maps the file MAP_PRIVATE: lazy, zero-copy, writes never reach the file.
            self._storage = torch.UntypedStorage.from_file(str(self.path), shared=False, nbytes=self.size)
        return self._storage

    def raw(self, name: str) -> torch.Tensor:
        """The tensor's bytes as a uint8 [rows, row_bytes] view on the mmap (no copy, no read yet).

        Float tensors whose offset is not a multiple of their element size (legal with a
        general.alignment of 1 or 2) come back as a private copy instead: callers view these bytes as
        floats, which torch cannot do on a misaligned view."""
        t = self.check_supported(name)
        dtype = ggml.FLOAT_TYPES.get(t.ggml_type)
        if dtype is not None and t.offset % dtype.itemsize:
            return self.read(name)
        rows, rb = _byte_shape(t)
        return torch.empty(0, dtype=torch.uint8).set_(self._mapped(), t.offset, (rows, rb), (rb, 1))

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """A private copy of the tensor's bytes as uint8 [rows, row_bytes] (all rows, or rows
        [start, stop)), read with pread: the pages go through the page cache without being mapped
        into this process (so they do not count in its resident memory, unlike a copy taken from
        the mmap)."""
        t = self.check_supported(name)
        n_rows, rb = _byte_shape(t)
        start, stop = (0, n_rows) if rows is None else rows
        if not 0 <= start <= stop <= n_rows:
            raise ValueError(f"rows {rows} out of range for {name!r} ({n_rows} rows)")
        out = torch.empty((stop - start, rb), dtype=torch.uint8)
        view = memoryview(out.numpy()).cast("B")
        want = (stop - start) * rb
        try:
            with open(self.path, "rb", buffering=0) as f:
                f.seek(t.offset + start * rb)
                got = 0
                while got < want:
                    n = f.readinto(view[got:])
                    if not n:
                        break
                    got += n
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read tensor {name!r}: {e.strerror or e}") from None
        if got != want:
            raise CheckpointError(f"{self.path}: tensor {name!r} is cut short (file truncated while reading?)")
        return out

    def close(self) -> None:
        self._storage = None


def _byte_shape(t: TensorInfo) -> tuple[int, int]:
    rows = math.prod(t.shape[:-1]) if len(t.shape) > 1 else 1
    return rows, t.nbytes // max(rows, 1) if rows else 0


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    return GGUFFile(path)


_TOKENIZER_KINDS = {"gpt2": "byte-level BPE", "llama": "SentencePiece BPE", "bert": "WordPiece", "t5": "Unigram",
                    "rwkv": "RWKV"}


def _tokenizer_summary(m: dict) -> dict | None:
    """The tokenizer the metadata describes: kind, vocabulary size, BOS/EOS, chat template."""
    tokens = m.get("tokenizer.ggml.tokens")
    model = m.get("tokenizer.ggml.model")
    if not isinstance(tokens, list) and model is None:
        return None
    out: dict[str, Any] = {"model": model, "kind": _TOKENIZER_KINDS.get(model) if isinstance(model, str) else None,
                           "pre": m.get("tokenizer.ggml.pre"), "vocab_size": len(tokens) if isinstance(tokens, list) else None}
    for key in ("bos", "eos"):
        i = m.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(i, int) and not isinstance(i, bool):
            tok = tokens[i] if isinstance(tokens, list) and 0 <= i < len(tokens) else None
            out[key] = {"id": i, "token": tok if isinstance(tok, str) else None}
    add_bos = m.get("tokenizer.ggml.add_bos_token")
    if isinstance(add_bos, bool):
        out["add_bos"] = add_bos
    template = m.get("tokenizer.chat_template")
    out["chat_template_chars"] = len(template) if isinstance(template, str) else 0
    return out


# general.file_type: the quantisation a file was made with, as llama.cpp's llama-quantize names it
# (llama.h's LLAMA_FTYPE_*: "mostly" that type, 1-D tensors in F32)
FILE_TYPES = dict(enumerate((
    "F32", "F16", "Q4_0", "Q4_1", None, None, None, "Q8_0", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L",
    "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "IQ2_XXS", "IQ2_XS", "Q2_K_S", "IQ3_XS", "IQ3_XXS", "IQ1_S",
    "IQ4_NL", "IQ3_S", "IQ3_M", "IQ2_S", "IQ2_M", "IQ4_XS", "IQ1_M", "BF16", None, None, None, "TQ1_0", "TQ2_0",
    "MXFP4_MOE", "NVFP4", "Q1_0", "Q2_0")))


def file_type_name(m: dict) -> str | None:
    """'Q4_K_M' for a file whose general.file_type is 15; None when absent, 'file type N' when unknown."""
    v = m.get("general.file_type")
    if not isinstance(v, int) or isinstance(v, bool):
        return None
    return FILE_TYPES.get(v) or f"file type {v}"


def describe_gguf(path: str | os.PathLike, config_of=None) -> dict:
    """What `ember inspect FILE` prints: architecture, metadata summary, tensors, sizes."""
    f = GGUFFile(path)
    meta: dict[str, Any] = {}
    import array

    for k, v in f.metadata.items():
        if isinstance(v, (list, array.array)):
            vt = f.value_types.get(k)
            et = VALUE_TYPES.get(vt[1], ("?",))[0] if isinstance(vt, tuple) else "?"
            meta[k] = f"[{len(v)} x {et}]" if len(v) > 8 else list(v)
        elif isinstance(v, str) and len(v) > 200:
            meta[k] = v[:200] + f"... ({len(v)} chars)"
        else:
            meta[k] = v
    tensors = [
        {"name": t.name, "type": t.type_name, "shape": list(t.shape), "nbytes": t.nbytes,
         "supported": t.ggml_type in ggml.SUPPORTED}
        for t in sorted(f.tensors.values(), key=lambda t: t.offset)
    ]
    by_type: dict[str, dict] = {}
    for t in f.tensors.values():
        e = by_type.setdefault(t.type_name, {"tensors": 0, "nbytes": 0, "params": 0})
        e["tensors"] += 1
        e["nbytes"] += max(t.nbytes, 0)
        e["params"] += t.numel
    # the config ember derives from the metadata (what config.json would say), if ember reads this
    # architecture: `config_of(f)` (ember.loading.gguf_config) says
    config, supported = None, "unknown"
    if config_of is not None:
        try:
            config, supported = config_of(f), "yes"
        except EmberError as e:
            config, supported = None, f"no ({e})"
    return {
        "path": str(f.path),
        "format": f"GGUF v{f.version}",
        "architecture": f.architecture,
        "model_type": (config or {}).get("model_type"),
        "supported": supported,
        "name": f.metadata.get("general.name"),
        "file_size": f.size,
        "tensor_count": len(f.tensors),
        "parameters": sum(t.numel for t in f.tensors.values()),
        "tensor_bytes": sum(max(t.nbytes, 0) for t in f.tensors.values()),
        "types": by_type,
        "quantization": file_type_name(f.metadata),
        "config": config,
        "tokenizer": _tokenizer_summary(f.metadata),
        "metadata": meta,
        "tensors": tensors,
    }
