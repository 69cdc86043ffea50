"""GPTQ (AutoGPTQ / GPTQModel / optimum layout) and AWQ (AutoAWQ GEMM layout) linears.

GPTQ, per linear `X` with K inputs, N outputs, G groups:
  X.qweight int32 [K*bits/32, N]  codes packed along the inputs (code i of a word at bits i*bits)
  X.qzeros  int32 [G, N*bits/32]  zero points packed along the outputs; the v1 format stores z - 1
  X.scales  float [G, N]
  X.g_idx   int32 [K]             the group of each input (act-order); column // group_size without it
  W[n, k] = scales[g, n] * (q[k, n] - z[g, n]),  g = g_idx[k]

AWQ (GEMM), 4-bit: X.qweight int32 [K, N/8] and X.qzeros int32 [G, N/8], both packed along the
outputs with the columns of each word in the order [0, 2, 4, 6, 1, 3, 5, 7]; X.scales [G, N];
no zero offset, groups of consecutive inputs.
"""
from __future__ import annotations

import math

import torch

from ..errors import CheckpointError
from ..nn.packed import PackedWeight
from .config import AWQConfig, GPTQConfig
from .unpack import group_index, unpack_int32

AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # unpacked position of column j within a word


class GPTQWeight(PackedWeight):
    method = "gptq"

    def __init__(self, name, shape, tensors, cfg: GPTQConfig):
        super().__init__(name, shape, tensors, cfg.describe().removeprefix("gptq "))
        self.bits, self.group_size, self.zero_offset = cfg.bits, cfg.group_size, cfg.zero_offset
        self.row_align = 32 // cfg.bits  # zero points are packed along the outputs

    def affine_rows(self, t, start, stop):
        b, per, k = self.bits, 32 // self.bits, self.shape[1]
        q = unpack_int32(t["qweight"][:, start:stop], b, 0)  # [K, n]
        z = unpack_int32(t["qzeros"][:, start // per:-(-stop // per)], b, 1)[:, :stop - start] + self.zero_offset
        g = group_index(k, self.group_size if self.group_size > 0 else k, t.get("g_idx"), q.device)
        return q.t(), t["scales"][:, start:stop].float()[g].t(), z[g].t()


class AWQWeight(PackedWeight):
    method = "awq"
    row_align = 8
    bits = 4

    def __init__(self, name, shape, tensors, cfg: AWQConfig):
        super().__init__(name, shape, tensors, cfg.describe().removeprefix("awq "))
        self.group_size = cfg.group_size

    @staticmethod
    def _unpack(p: torch.Tensor) -> torch.Tensor:
        u = unpack_int32(p, 4, 1)
        order = torch.tensor(AWQ_REVERSE_ORDER, device=u.device)
        return u.view(u.shape[0], -1, 8).index_select(2, order).reshape(u.shape)

    def affine_rows(self, t, start, stop):
        k = self.shape[1]
        q = self._unpack(t["qweight"][:, start // 8:-(-stop // 8)])[:, :stop - start]
        z = self._unpack(t["qzeros"][:, start // 8:-(-stop // 8)])[:, :stop - start]
        g = group_index(k, self.group_size if self.group_size > 0 else k, None, q.device)
        return q.t(), t["scales"][:, start:stop].float()[g].t(), z[g].t()


def _check(source, key: str, dtypes, shape, where: str, what: str) -> None:
    dt, got = source.dtype(key), tuple(source.shape(key))
    if dt not in dtypes:
        raise CheckpointError(f"{where}: tensor {key!r} is {dt}, a {what} must be {' or '.join(map(str, dtypes))}")
    if got != tuple(shape):
        raise CheckpointError(f"{where}: tensor {key!r} has shape {list(got)}, expected {list(shape)} ({what})")


FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _require(source, keys, key: str, where: str, why: str) -> str:
    if key not in keys:
        raise CheckpointError(f"{where}: {why} but tensor {key!r} is missing")
    return key


def check_g_idx(g: torch.Tensor, key: str, groups: int, where: str) -> None:
    """Every entry of a g_idx tensor names an existing group."""
    if g.numel() and (int(g.min()) < 0 or int(g.max()) >= groups):
        raise CheckpointError(f"{where}: tensor {key!r} holds group indices in [{int(g.min())}, {int(g.max())}], "
                              f"outside [0, {groups}) for this layer's {groups} groups")


def gptq_weight(source, keys, prefix: str, cfg: GPTQConfig, where: str) -> tuple[GPTQWeight, list[str]]:
    """The GPTQ weight of linear `prefix`, its tensors checked against each other from the headers."""
    qw = f"{prefix}.qweight"
    rows, n = _shape2(source, qw, where)
    k = rows * 32 // cfg.bits
    groups = 1 if cfg.group_size == -1 else math.ceil(k / cfg.group_size)
    per = 32 // cfg.bits
    if n % per:
        raise CheckpointError(f"{where}: tensor {qw!r} has {n} output columns, not a multiple of {per} "
                              f"({cfg.bits}-bit zero points pack {per} per int32)")
    _check(source, qw, (torch.int32,), (rows, n), where, "GPTQ qweight")
    names = {"qweight": qw}
    why = f"{qw!r} is a GPTQ weight"
    names["qzeros"] = _require(source, keys, f"{prefix}.qzeros", where, why)
    _check(source, names["qzeros"], (torch.int32,), (groups, n // per), where,
           f"GPTQ qzeros for K={k}, group_size={cfg.group_size}")
    names["scales"] = _require(source, keys, f"{prefix}.scales", where, why)
    _check(source, names["scales"], FLOATS, (groups, n), where, f"GPTQ scales for K={k}, group_size={cfg.group_size}")
    gk = f"{prefix}.g_idx"
    if gk in keys:
        _check(source, gk, (torch.int32, torch.int64), (k,), where, "GPTQ g_idx")
        names["g_idx"] = gk
    elif cfg.desc_act:
        _require(source, keys, gk, where, f"{why} with desc_act (act-order)")
    tensors = {s: source.load(key) for s, key in names.items()}
    if "g_idx" in tensors:
        check_g_idx(tensors["g_idx"], gk, groups, where)
    return GPTQWeight(prefix, (n, k), tensors, cfg), list(names.values())


def awq_weight(source, keys, prefix: str, cfg: AWQConfig, where: str) -> tuple[AWQWeight, list[str]]:
    qw = f"{prefix}.qweight"
    k, cols = _shape2(source, qw, where)
    n = cols * 8
    _check(source, qw, (torch.int32,), (k, cols), where, "AWQ qweight")
    groups = 1 if cfg.group_size == -1 else math.ceil(k / cfg.group_size)
    why = f"{qw!r} is an AWQ weight"
    names = {"qweight": qw, "qzeros": _require(source, keys, f"{prefix}.qzeros", where, why),
             "scales": _require(source, keys, f"{prefix}.scales", where, why)}
    _check(source, names["qzeros"], (torch.int32,), (groups, cols), where, f"AWQ qzeros for K={k}, group_size={cfg.group_size}")
    _check(source, names["scales"], FLOATS, (groups, n), where, f"AWQ scales for K={k}, group_size={cfg.group_size}")
    return AWQWeight(prefix, (n, k), {s: source.load(key) for s, key in names.items()}, cfg), list(names.values())


def _shape2(source, key: str, where: str) -> tuple[int, int]:
    shape = tuple(source.shape(key))
    if len(shape) != 2 or 0 in shape:
        raise CheckpointError(f"{where}: tensor {key!r} has shape {list(shape)}, a packed weight is 2-D and non-empty")
    return shape
