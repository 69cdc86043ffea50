"""CTranslate2 `model.bin` files: the header parsed and checked, tensors as zero-copy views on an mmap.

The layout (ctranslate2/specs/model_spec.py, `_serialize`), little-endian:

    u32 version (≥ 4)   str spec_name   u32 spec_revision
    u32 n_variables     n × (str name, u8 rank, rank × u32 shape, u8 dtype, u32 nbytes, nbytes of data)
    u32 n_aliases       n × (str alias, str name)
    str = u16 length (with the trailing NUL) + bytes

Every count, length and shape is checked against the file's size before anything is allocated or
read; an inconsistent file is a `CheckpointError` naming the file and the field.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CheckpointError

# ctranslate2's DataType enum
DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
MAX_RANK = 8


@dataclass
class Variable:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int
    nbytes: int


class CT2File:
    """A CTranslate2 model.bin: `spec`, `revision`, `variables` (name → Variable), `aliases`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:  # ValueError: an empty file cannot be mapped
            raise CheckpointError(f"{self.path}: cannot read: {e}") from None
        self._pos = 0
        self.version = self._u("<I", "version")
        if not 4 <= self.version <= 16:
            raise CheckpointError(f"{self.path}: not a CTranslate2 model (format version {self.version})")
        self.spec = self._str("spec name")
        self.revision = self._u("<I", "spec revision")
        n = self._u("<I", "variable count")
        if n > len(self._mm) // 8:
            raise CheckpointError(f"{self.path}: claims {n} variables, more than its size allows")
        self.variables: dict[str, Variable] = {}
        for i in range(n):
            name = self._str(f"variable {i} name")
            rank = self._u("<B", f"{name} rank")
            if rank > MAX_RANK:
                raise CheckpointError(f"{self.path}: {name} has rank {rank}")
            shape = tuple(self._u("<I", f"{name} shape") for _ in range(rank))
            code = self._u("<B", f"{name} dtype")
            if code not in DTYPES:
                raise CheckpointError(f"{self.path}: {name} has data type {code}; ember reads "
                                      f"{', '.join(np.dtype(t).name for t in DTYPES.values())}")
            dtype = np.dtype(DTYPES[code])
            nbytes = self._u("<I", f"{name} size")
            if nbytes != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
                raise CheckpointError(f"{self.path}: {name} holds {nbytes} bytes, its shape {list(shape)} of "
                                      f"{dtype.name} needs {int(np.prod(shape, dtype=np.int64)) * dtype.itemsize}")
            self._need(nbytes, f"{name} data")
            self.variables[name] = Variable(name, shape, dtype, self._pos, nbytes)
            self._pos += nbytes
        self.aliases: dict[str, str] = {}
        if self._pos < len(self._mm):
            for i in range(self._u("<I", "alias count")):
                alias, target = self._str(f"alias {i}"), self._str(f"alias {i} target")
                if target not in self.variables:
                    raise CheckpointError(f"{self.path}: alias {alias!r} names {target!r}, which is not a variable")
                self.aliases[alias] = target

    def _need(self, n: int, what: str) -> None:
        if self._pos + n > len(self._mm):
            raise CheckpointError(f"{self.path}: truncated: {what} runs past the end of the file")

    def _u(self, fmt: str, what: str) -> int:
        size = struct.calcsize(fmt)
        self._need(size, what)
        (v,) = struct.unpack_from(fmt, self._mm, self._pos)
        self._pos += size
        return v

    def _str(self, what: str) -> str:
        n = self._u("<H", what)
        self._need(n, what)
        raw = bytes(self._mm[self._pos:self._pos + n])
        self._pos += n
        try:
            return raw.rstrip(b"\0").decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.path}: {what} is not UTF-8 text") from None

    def __contains__(self, name: str) -> bool:
        return name in self.variables or name in self.aliases

    def array(self, name: str) -> np.ndarray:
        """The variable `name` (or an alias of one) as a read-only view on the file."""
        v = self.variables.get(self.aliases.get(name, name))
        if v is None:
            raise CheckpointError(f"{self.path}: no variable {name!r}")
        return np.frombuffer(self._mm, dtype=v.dtype, count=v.nbytes // v.dtype.itemsize,
                             offset=v.offset).reshape(v.shape)

    def scalar(self, name: str) -> int:
        a = self.array(name)
        if a.size != 1:
            raise CheckpointError(f"{self.path}: {name} should be a scalar, has shape {list(a.shape)}")
        return int(a.reshape(()))
