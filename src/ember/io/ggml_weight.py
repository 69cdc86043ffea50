"""Quantised tensors kept as their GGUF blocks: what a GGUF source hands out for a weight that stays
quantised (`vb.get(..., quantized=True)`). Data only: `ember.nn.quantized` builds the layers that
compute with them.

`GGMLWeight` holds one tensor's blocks (uint8 [rows, row_bytes], a view on the file's mmap or a
private copy); `GGMLWeightGroup` row-stacks weights of different block types (a fused q/k/v whose
parts were quantised differently).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from . import ggml


class GGMLWeight:
    """A quantised tensor as its GGUF blocks: uint8 `data` of [rows, row_bytes], `shape` in torch order.

    `data` may be a view on the file's mmap (zero-copy; pages are read when first used). `reader`,
    when given, returns a private copy of the same bytes without touching that mapping (pread), for
    operations that copy anyway (fusing, permuting, repacking), so the mapped pages of a weight that
    is copied never count in the process's resident memory: `reader()` gives all rows,
    `reader((start, stop))` a range of them.
    """

    def __init__(self, data: torch.Tensor, ggml_type: int, shape: Sequence[int], *,
                 dtype: torch.dtype | None = None, reader: Callable[..., torch.Tensor] | None = None,
                 name: str = "", dense_fallback: bool = False):
        self.data = data
        # as a Linear with no int4 form: dequantise once into a dense weight instead of on every forward
        self.dense_fallback = dense_fallback
        self.ggml_type = ggml_type
        self.shape = torch.Size(shape)
        self.dtype = dtype  # the compute dtype the model was loaded with (None: float32)
        self.reader = reader
        self.name = name

    # ---- protocol -----------------------------------------------------------------------------
    @property
    def type_name(self) -> str:
        return ggml.type_name(self.ggml_type)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def dim(self) -> int:
        return len(self.shape)

    def owned_data(self) -> torch.Tensor:
        """A private copy of the bytes (read from the file when possible)."""
        if self.reader is not None and self.data.device.type == "cpu":
            return self.reader()
        return self.data.clone()

    def owned_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the bytes, read from the file when possible (the mapping untouched),
        else a view on `data`."""
        if self.reader is not None and self.data.device.type == "cpu":
            return self.reader((start, stop))
        return self.data[start:stop]

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return ggml.dequantize(self.data, self.ggml_type, tuple(self.shape), dtype or self.dtype or torch.float32)

    def to(self, device=None, dtype: torch.dtype | None = None) -> "GGMLWeight":
        device = torch.device(device) if device is not None else self.data.device
        if device == self.data.device and (dtype is None or dtype == self.dtype):
            return self
        data = self.data if device == self.data.device else self.data.to(device)
        return GGMLWeight(data, self.ggml_type, self.shape, dtype=dtype or self.dtype,
                          reader=self.reader if data is self.data else None, name=self.name,
                          dense_fallback=self.dense_fallback)

    def select(self, i: int) -> "GGMLWeight":
        """Entry i along the first dimension of a 3-D weight (one expert of stacked MoE experts), as a
        2-D weight whose bytes are a view on this one's (blocks never span rows)."""
        if len(self.shape) != 3 or not 0 <= i < self.shape[0]:
            raise ValueError(f"select({i}) needs a 3-D weight with more than {i} entries, got shape {list(self.shape)}")
        rows = self.shape[1]
        lo = i * rows
        parent = self.reader

        def rows_of_expert(span=None):
            a, b = span if span is not None else (0, rows)
            return parent((lo + a, lo + b))
        return GGMLWeight(self.data[lo:lo + rows], self.ggml_type, self.shape[1:], dtype=self.dtype,
                          reader=rows_of_expert if parent is not None else None, name=f"{self.name}[{i}]",
                          dense_fallback=self.dense_fallback)

    def cat_rows(self, parts: Sequence["GGMLWeight"]) -> "GGMLWeight":
        """The parts stacked along dim 0 (q/k/v, gate/up): blocks never span rows, so this is a byte copy."""
        first = parts[0]
        if any(tuple(p.shape[1:]) != tuple(first.shape[1:]) for p in parts):
            raise ValueError("cat_rows needs parts of one row length")
        if any(p.ggml_type != first.ggml_type for p in parts):  # e.g. Q8_0 v beside Q5_0 q/k
            return GGMLWeightGroup(list(parts))
        rows = sum(p.data.shape[0] for p in parts)
        out = torch.empty((rows, first.data.shape[1]), dtype=torch.uint8, device=first.data.device)
        r = 0
        for p in parts:
            n = p.data.shape[0]
            out[r:r + n] = p.owned_data() if p.reader is not None else p.data
            r += n
        shape = (sum(p.shape[0] for p in parts), *first.shape[1:])
        return GGMLWeight(out, first.ggml_type, shape, dtype=first.dtype, name="+".join(p.name for p in parts),
                          dense_fallback=first.dense_fallback)

    def permute_rows(self, perm: torch.Tensor) -> "GGMLWeight":
        data = self.owned_data()[perm.to(self.data.device)]
        return GGMLWeight(data, self.ggml_type, self.shape, dtype=self.dtype, name=self.name,
                          dense_fallback=self.dense_fallback)

    def __repr__(self) -> str:
        return f"GGMLWeight({self.type_name}, shape={list(self.shape)}, {self.nbytes} bytes, device={self.device})"


class GGMLWeightGroup:
    """Row-stacked packed weights of different ggml types (what `cat_rows` gives for mixed parts):
    its linear runs each part and concatenates the outputs."""

    def __init__(self, parts: list):
        self.parts = parts
        self.shape = torch.Size((sum(p.shape[0] for p in parts), *parts[0].shape[1:]))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.cat([p.dequantize(dtype) for p in self.parts], dim=0)

    def to(self, device=None, dtype=None) -> "GGMLWeightGroup":
        return GGMLWeightGroup([p.to(device, dtype) for p in self.parts])

    def cat_rows(self, parts):
        return GGMLWeightGroup([q for p in parts for q in (p.parts if isinstance(p, GGMLWeightGroup) else [p])])


def slice_blocks(w, dim: int, ranges: Sequence[tuple[int, int]]) -> GGMLWeight:
    """The index ranges `ranges` of dimension `dim` of a 2-D quantised weight, concatenated (one
    tensor-parallel rank's part), without dequantising: whole rows (dim 0) always split, since blocks
    never span rows; columns (dim 1) only at block boundaries. ValueError when the layout does not allow it."""
    if not isinstance(w, GGMLWeight) or w.dim() != 2 or w.data.dim() != 2:
        raise ValueError(f"only 2-D quantised weights of one block type split ({w!r:.80})")
    if dim == 0:
        data = torch.cat([w.owned_rows(a, b) for a, b in ranges]) if len(ranges) > 1 else w.owned_rows(*ranges[0])
        shape = (sum(b - a for a, b in ranges), w.shape[1])
    elif dim == 1:
        n, nbytes = ggml.block_size(w.ggml_type)
        if any(a % n or b % n for a, b in ranges):
            raise ValueError(f"its {w.type_name} blocks hold {n} values of a row, and the split at columns "
                             f"{[list(r) for r in ranges]} cuts through them (split fewer ways, or dequantise: "
                             f"keep_quantized=False)")
        cols = [w.data[:, a // n * nbytes: b // n * nbytes] for a, b in ranges]
        data = torch.cat(cols, dim=1) if len(cols) > 1 else cols[0].contiguous()
        shape = (w.shape[0], sum(b - a for a, b in ranges))
    else:
        raise ValueError(f"dimension {dim} of a 2-D weight")
    return GGMLWeight(data, w.ggml_type, shape, dtype=w.dtype, name=w.name, dense_fallback=w.dense_fallback)
