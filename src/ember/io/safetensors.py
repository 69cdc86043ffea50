"""Safetensors reader: a validated header, then zero-copy tensor views on a private mmap.

The format: 8 bytes little-endian header length N, N bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`), then the data.
Everything in the header is checked against the file size before any tensor is touched, so a
corrupt or hostile file is refused with a `CheckpointError` naming the file and the field, and
nothing is allocated from numbers the file claims.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError

# The safetensors library refuses headers above 100 MB; so do we.
MAX_HEADER_BYTES = 100_000_000

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("F8_E8M0", "float8_e8m0fnu"),  # power-of-two scales (DeepSeek-V3.1's ue8m0 weight_scale_inv)
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)

DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a file: enough to check its shape without reading it."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _fail(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: not a valid safetensors file: {what}")


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    # Two same-named tensors (or fields) are ambiguous: readers that keep the first and readers that
    # keep the last would load different weights from the same file. Refuse instead of choosing.
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise _DuplicateKey(k)
            seen.add(k)
    return out


def _utf8_ok(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header. Returns (tensors by name, metadata)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _fail(path, f"file is {size} bytes, too short to hold the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise _fail(path, f"header claims {n} bytes but the file has only {size - 8} after the length field (truncated file?)")
            if n > MAX_HEADER_BYTES:
                raise _fail(path, f"header of {n} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError:
        raise _fail(path, "header is not UTF-8") from None
    except _DuplicateKey as e:
        raise _fail(path, f"key {e.args[0]!r} appears twice in one JSON object") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, and ints beyond Python's digit limit
        raise _fail(path, f"header is not valid JSON ({str(e)[:200]})") from None
    if not isinstance(header, dict):
        raise _fail(path, f"header must be a JSON object, got {type(header).__name__}")

    data_start = 8 + n
    data_len = size - data_start
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise _fail(path, "__metadata__ must map strings to strings")
    for s in (*header, *metadata, *metadata.values()):
        if not _utf8_ok(s):
            raise _fail(path, f"name or metadata {s[:40]!r} is not valid UTF-8 (a lone surrogate escape)")

    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise _fail(path, f"tensor {name!r}: entry must be an object")
        dtype_name = entry.get("dtype")
        if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
            raise _fail(path, f"tensor {name!r}: unsupported dtype {dtype_name!r} (supported: {', '.join(DTYPES)})")
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise _fail(path, f"tensor {name!r}: shape must be a list of non-negative integers, got {shape!r:.200}")
        # torch sizes, strides and element counts are int64: even an empty tensor (a zero dim) must fit
        if math.prod(max(d, 1) for d in shape) >= 1 << 63:
            raise _fail(path, f"tensor {name!r}: shape {shape!r:.200} is too large")
        offsets = entry.get("data_offsets")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
        ):
            raise _fail(path, f"tensor {name!r}: data_offsets must be two integers, got {offsets!r:.200}")
        begin, end = offsets
        dtype = DTYPES[dtype_name]
        itemsize = torch.empty((), dtype=dtype).element_size()
        expected = math.prod(shape) * itemsize
        if begin < 0 or end < begin:
            raise _fail(path, f"tensor {name!r}: bad data_offsets [{begin}, {end}]")
        if end - begin != expected:
            raise _fail(path, f"tensor {name!r}: {dtype_name}{shape} needs {expected} bytes but data_offsets span {end - begin}")
        if end > data_len:
            raise _fail(path, f"tensor {name!r}: data_offsets end at {end} but the data section has only {data_len} bytes (truncated file?)")
        tensors[name] = TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)

    # No two tensors may share bytes (zero-size tensors take none).
    spans = sorted((t.begin, t.end, t.name) for t in tensors.values() if t.end > t.begin)
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise _fail(path, f"tensors {n0!r} and {n1!r} overlap")
    return tensors, metadata


class SafetensorsFile:
    """One safetensors file: its validated header and a lazily created private mmap.

    `tensor(name)` returns a view on the mapping (no copy, no read until touched). Pages are
    copy-on-write, so an in-place op on a returned tensor never writes the file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tensors, self.metadata = read_header(self.path)
        self._needed = max((t.end for t in self.tensors.values()), default=0)  # bytes the header vouched for
        self._storage: torch.UntypedStorage | None = None

    def keys(self):
        return self.tensors.keys()

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def _mapped(self) -> torch.UntypedStorage:
        if self._storage is None:
            try:
                size = self.path.stat().st_size
            except OSError as e:
                raise CheckpointError(f"{self.path}: cannot read: {e.strerror or e}") from None
            if size < self._needed:  # a view past the end of the mapping would fault when touched
                raise CheckpointError(f"{self.path}: the file changed size since its header was read "
                                      f"({size} bytes, the header needs {self._needed})")
            # shared=False maps the file MAP_PRIVATE: lazy, zero-copy, writes never reach the file.
            try:
                self._storage = torch.UntypedStorage.from_file(str(self.path), shared=False, nbytes=size)
            except RuntimeError as e:  # torch reports open/mmap failures (permissions, ...) as RuntimeError
                raise CheckpointError(f"{self.path}: cannot map the file: {str(e).splitlines()[0][:200]}") from None
            _MAPPINGS[self._storage.data_ptr()] = size
        return self._storage

    def tensor(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        storage = self._mapped()
        itemsize = torch.empty((), dtype=info.dtype).element_size()
        numel = math.prod(info.shape)
        if numel == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        if info.begin % itemsize == 0:
            t = torch.empty(0, dtype=info.dtype)
            strides = _contiguous_strides(info.shape)
            return t.set_(storage, info.begin // itemsize, info.shape, strides)
        # Misaligned data (allowed by the format, rare in practice): one copy of the bytes.
        raw = torch.empty(0, dtype=torch.uint8).set_(storage, info.begin, (info.nbytes,), (1,))
        return raw.clone().view(info.dtype).reshape(info.shape)

    def release(self, name: str) -> None:
        """Drop the resident pages of a tensor that was copied out (fused, converted): they count in
        RSS while mapped. The mapping is private and those pages were never written, so a later
        read simply faults them in again from the file."""
        if self._storage is None or name not in self.tensors:
            return
        info = self.tensors[name]
        base = self._storage.data_ptr()
        _drop_pages(base + info.begin, base + info.end)

    def close(self) -> None:
        self._storage = None


def _libc_madvise():
    try:
        import ctypes
        import mmap

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        fn.restype = ctypes.c_int
        return fn, mmap.PAGESIZE
    except (OSError, AttributeError):  # not Linux/glibc: releasing pages is only an optimisation
        return None, 4096


_madvise, _PAGE = _libc_madvise()
# base address -> size of every file mapping made here: release_view() acts on these alone, since
# MADV_DONTNEED on ordinary (anonymous) memory would zero it.
_MAPPINGS: dict[int, int] = {}


def _drop_pages(start: int, end: int) -> None:
    start = (start + _PAGE - 1) // _PAGE * _PAGE
    end = end // _PAGE * _PAGE
    if end > start and _madvise is not None:
        _madvise(start, end - start, 4)  # MADV_DONTNEED


def release_view(t: torch.Tensor) -> None:
    """Drop the resident pages behind `t` if it is a view on a checkpoint mapping (after its data
    was copied elsewhere, e.g. prepacked); does nothing for any other tensor."""
    st = t.untyped_storage()
    size = _MAPPINGS.get(st.data_ptr())
    if size is None or not t.is_contiguous():
        return
    _drop_pages(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(strides))


def read_index(path: str | os.PathLike) -> list[Path]:
    """The shard files named by a `model.safetensors.index.json`, in first-use order, checked to exist."""
    from .safefile import MAX_CONFIG_BYTES, bad_file_name, read_text

    path = Path(path)
    text = read_text(path, MAX_CONFIG_BYTES, CheckpointError, "shard index")
    try:
        index = json.loads(text)
    except (ValueError, RecursionError) as e:  # ValueError: UnicodeDecodeError, JSONDecodeError, digit limit
        raise CheckpointError(f"{path}: cannot read the shard index: {str(e)[:200]}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{path}: shard index has no valid 'weight_map' object")
    files: list[Path] = []
    for shard in dict.fromkeys(weight_map.values()):
        why = bad_file_name(shard)
        if why is not None:
            raise CheckpointError(f"{path}: bad shard name {shard[:100]!r}: {why}")
        p = path.parent / shard
        if not p.is_file():
            raise CheckpointError(f"{path}: shard {shard!r} is listed in the index but missing from {path.parent}")
        files.append(p)
    return files


def save_file(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write tensors to a safetensors file (used by tests and conversion tools).

    Written to a temporary file that then replaces `path` (never truncated in place: a model that
    has the old file mapped keeps reading the old bytes instead of dying of SIGBUS)."""
    from .safefile import atomic_write

    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    blobs = []
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        data = t.view(torch.uint8).reshape(-1).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes, as the reference writer does
    with atomic_write(path) as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for b in blobs:
            f.write(b)
