"""ggml tensor types: sizes, and dequantisation of their blocks with vectorised torch ops.

A quantised GGUF tensor is a sequence of fixed-size blocks along each row (the input dimension of a
weight): `block_elems` values stored in `block_bytes` bytes. Every function here works on a whole
`[n_blocks, block_bytes]` uint8 tensor at once (no per-block Python), and reproduces the float32
arithmetic of the reference dequantisers (`gguf.quants`, itself a port of ggml-quants.c) operation
for operation, so results are bit-identical to them.
"""
from __future__ import annotations

import math

import torch

from ..errors import CheckpointError
from . import iquants

QK_K = 256

# ggml type id -> (name, elements per block, bytes per block). All ids of ggml.h, so a file's
# tensor table can be sized and described; SUPPORTED says which ones ember can dequantise.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}

F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, BF16 = 0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 30
FLOAT_TYPES = {F32: torch.float32, F16: torch.float16, BF16: torch.bfloat16}
QUANT_TYPES = (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)  # legacy and K-quants
IQUANT_TYPES = tuple(iquants.DEQUANT)  # i-quants, TQ1_0/TQ2_0, MXFP4 (ember.io.iquants)
BLOCK_TYPES = QUANT_TYPES + IQUANT_TYPES  # every block type ember dequantises
SUPPORTED = tuple(FLOAT_TYPES) + BLOCK_TYPES


def type_name(ggml_type: int) -> str:
    t = GGML_TYPES.get(ggml_type)
    return t[0] if t else f"type{ggml_type}"


def supported_names() -> str:
    return ", ".join(type_name(t) for t in SUPPORTED)


def block_size(ggml_type: int) -> tuple[int, int]:
    """(elements, bytes) of one block."""
    _, n, b = GGML_TYPES[ggml_type]
    return n, b


def row_bytes(ggml_type: int, row_elems: int) -> int:
    n, b = block_size(ggml_type)
    return row_elems // n * b


def tensor_bytes(ggml_type: int, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of `shape` (torch order: the last dimension is the blocked one)."""
    n, b = block_size(ggml_type)
    return math.prod(shape) // n * b


# ---- dequantisers: [n_blocks, block_bytes] uint8 -> [n_blocks, block_elems] float32 ------------
# Each writes into `o` (float32 [nb, block_elems]) with as few passes and temporaries as it can:
# the bit fields are assembled in uint8/int8 scratch, and the one float pass is a mixed-type
# multiply (float(q) * scale, exactly the reference's product) straight into the output.
def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 scalar at byte `at` of each block, as float32 [nb, 1]."""
    return blocks[:, at:at + 2].contiguous().view(torch.float16).float()


_SHIFT_CACHE: dict[tuple, torch.Tensor] = {}


def _shifts(values: tuple[int, ...], shape: tuple[int, ...], device) -> torch.Tensor:
    key = (values, shape, device)
    t = _SHIFT_CACHE.get(key)
    if t is None:
        t = _SHIFT_CACHE[key] = torch.tensor(values, dtype=torch.uint8, device=device).reshape(shape)
    return t


def _nibbles_into(q: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """q[..., 0, :] = low nibbles of qs, q[..., 1, :] = high nibbles (q: uint8 [..., 2, n])."""
    torch.bitwise_and(qs, 0x0F, out=q.select(-2, 0))
    torch.bitwise_right_shift(qs, 4, out=q.select(-2, 1))
    return q


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    """4 bytes [nb, 4] read as a little-endian uint32 -> its 32 bits [nb, 32] (bit j at index j)."""
    return ((qh.unsqueeze(-1) >> _shifts(tuple(range(8)), (1, 1, 8), qh.device)) & 1).reshape(qh.shape[0], 32)


def _dq_q4_0(b: torch.Tensor, o: torch.Tensor) -> None:
    nb = b.shape[0]
    q = _nibbles_into(torch.empty((nb, 2, 16), dtype=torch.uint8, device=b.device), b[:, 2:18])
    q = q.view(torch.int8).sub_(8).view(nb, 32)
    torch.mul(q, _f16(b, 0), out=o)


def _dq_q4_1(b: torch.Tensor, o: torch.Tensor) -> None:
    nb = b.shape[0]
    q = _nibbles_into(torch.empty((nb, 2, 16), dtype=torch.uint8, device=b.device), b[:, 4:20]).view(nb, 32)
    torch.mul(q, _f16(b, 0), out=o)
    o.add_(_f16(b, 2))


def _q5(b: torch.Tensor, qh_at: int, qs_at: int) -> torch.Tensor:
    """The 5-bit codes (uint8 [nb, 32]) of Q5_0/Q5_1 blocks."""
    q = _bits32(b[:, qh_at:qh_at + 4]).bitwise_left_shift_(4)
    lo = torch.empty((b.shape[0], 2, 16), dtype=torch.uint8, device=b.device)
    _nibbles_into(lo, b[:, qs_at:qs_at + 16])
    return q.bitwise_or_(lo.view(b.shape[0], 32))


def _dq_q5_0(b: torch.Tensor, o: torch.Tensor) -> None:
    q = _q5(b, 2, 6).view(torch.int8).sub_(16)
    torch.mul(q, _f16(b, 0), out=o)


def _dq_q5_1(b: torch.Tensor, o: torch.Tensor) -> None:
    torch.mul(_q5(b, 4, 8), _f16(b, 0), out=o)
    o.add_(_f16(b, 2))


def _dq_q8_0(b: torch.Tensor, o: torch.Tensor) -> None:
    torch.mul(b[:, 2:34].view(torch.int8), _f16(b, 0), out=o)


def _dq_q2_k(b: torch.Tensor, o: torch.Tensor) -> None:
    nb = b.shape[0]
    scales = b[:, 0:16]
    d, dmin = _f16(b, 80), _f16(b, 82)
    dl = (d * (scales & 0xF).float()).reshape(nb, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(nb, 16, 1)
    q = ((b[:, 16:80].reshape(nb, 2, 1, 32) >> _shifts((0, 2, 4, 6), (1, 1, 4, 1), b.device)) & 3).reshape(nb, 16, 16)
    o3 = o.view(nb, 16, 16)
    torch.mul(q, dl, out=o3)
    o3.sub_(ml)


def _dq_q3_k(b: torch.Tensor, o: torch.Tensor) -> None:
    nb = b.shape[0]
    hmask, qs, sc = b[:, 0:32], b[:, 32:96], b[:, 96:108]
    d = _f16(b, 108)
    lsc = (sc[:, :8].reshape(nb, 1, 8) >> _shifts((0, 4), (1, 2, 1), b.device)).reshape(nb, 16)
    hsc = (sc[:, 8:].reshape(nb, 1, 4) >> _shifts((0, 2, 4, 6), (1, 4, 1), b.device)).reshape(nb, 16)
    scales = ((lsc & 0x0F) | ((hsc & 0x03) << 4)).to(torch.int8) - 32
    dl = (d * scales.float()).reshape(nb, 16, 1)
    ql = ((qs.reshape(nb, 2, 1, 32) >> _shifts((0, 2, 4, 6), (1, 1, 4, 1), b.device)) & 3).reshape(nb, 16, 16)
    qh = ((hmask.reshape(nb, 1, 1, 32) >> _shifts(tuple(range(8)), (1, 1, 8, 1), b.device)) & 1).reshape(nb, 16, 16)
    # the high bit subtracts 4 where the mask bit is clear: q = ql - 4 * (1 - bit)
    q = ql.view(torch.int8).sub_(qh.bitwise_xor_(1).bitwise_left_shift_(2).view(torch.int8))
    torch.mul(q, dl, out=o.view(nb, 16, 16))


def _k_scale_min(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and mins of a Q4_K/Q5_K block, from its 12 scale bytes."""
    d, m, md = sc[:, 0:4], sc[:, 4:8], sc[:, 8:12]
    scale = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mins = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return scale, mins


def _dq_q4_k(b: torch.Tensor, o: torch.Tensor) -> None:
    nb = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scale_min(b[:, 4:16])
    dl = (d * sc.float()).reshape(nb, 8, 1)
    ml = (dmin * mn.float()).reshape(nb, 8, 1)
    q = _nibbles_into(torch.empty((nb, 4, 2, 32), dtype=torch.uint8, device=b.device), b[:, 16:144].reshape(nb, 4, 32))
    o3 = o.view(nb, 8, 32)
    torch.mul(q.view(nb, 8, 32), dl, out=o3)
    o3.sub_(ml)


def _dq_q5_k(b: torch.Tensor, o: torch.Tensor) -> None:
    nb = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scale_min(b[:, 4:16])
    dl = (d * sc.float()).reshape(nb, 8, 1)
    ml = (dmin * mn.float()).reshape(nb, 8, 1)
    q = ((b[:, 16:48].reshape(nb, 1, 32) >> _shifts(tuple(range(8)), (1, 8, 1), b.device)) & 1).bitwise_left_shift_(4)
    lo = _nibbles_into(torch.empty((nb, 4, 2, 32), dtype=torch.uint8, device=b.device), b[:, 48:176].reshape(nb, 4, 32))
    q.bitwise_or_(lo.view(nb, 8, 32))
    o3 = o.view(nb, 8, 32)
    torch.mul(q, dl, out=o3)
    o3.sub_(ml)


def _dq_q6_k(b: torch.Tensor, o: torch.Tensor) -> None:
    nb = b.shape[0]
    ql, qh, sc = b[:, 0:128], b[:, 128:192], b[:, 192:208]
    d = _f16(b, 208)
    dl = (d * sc.view(torch.int8).float()).reshape(nb, 16, 1)
    q = ((qh.reshape(nb, 2, 1, 32) >> _shifts((0, 2, 4, 6), (1, 1, 4, 1), b.device)) & 3).bitwise_left_shift_(4)
    lo = _nibbles_into(torch.empty((nb, 2, 2, 64), dtype=torch.uint8, device=b.device), ql.reshape(nb, 2, 64))
    q = q.view(nb, 8, 32).bitwise_or_(lo.view(nb, 8, 32)).view(torch.int8).sub_(32)
    torch.mul(q.view(nb, 16, 16), dl, out=o.view(nb, 16, 16))


DEQUANT = {
    Q4_0: _dq_q4_0, Q4_1: _dq_q4_1, Q5_0: _dq_q5_0, Q5_1: _dq_q5_1, Q8_0: _dq_q8_0,
    Q2_K: _dq_q2_k, Q3_K: _dq_q3_k, Q4_K: _dq_q4_k, Q5_K: _dq_q5_k, Q6_K: _dq_q6_k,
    **iquants.DEQUANT,
}

# Dequantise this many blocks at a time: keeps the float32 temporaries small (cache-friendly, and
# a large tensor never needs several float copies of itself at once).
CHUNK_BLOCKS = 8192


def dequantize(data: torch.Tensor, ggml_type: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Raw bytes of a tensor (uint8, any shape, contiguous in memory order) -> values of `shape`,
    bit-identical to the reference dequantisers (then rounded once to `dtype`). Data whose size does
    not make a whole `shape` of blocks is a CheckpointError."""
    if ggml_type in GGML_TYPES:
        n, _ = block_size(ggml_type)
        if (shape[-1] if shape else 1) % n:
            raise CheckpointError(f"a {type_name(ggml_type)} tensor of shape {list(shape)}: its rows are not whole "
                                  f"{n}-value blocks")
        if data.numel() != tensor_bytes(ggml_type, shape):
            raise CheckpointError(f"a {type_name(ggml_type)} tensor of shape {list(shape)} takes "
                                  f"{tensor_bytes(ggml_type, shape)} bytes, got {data.numel()}")
    if ggml_type in FLOAT_TYPES:
        t = data.reshape(-1).contiguous().view(FLOAT_TYPES[ggml_type]).reshape(shape) if data.numel() else \
            torch.empty(shape, dtype=FLOAT_TYPES[ggml_type], device=data.device)
        return t.to(dtype) if out is None else out.copy_(t)
    fn = DEQUANT.get(ggml_type)
    if fn is None:
        raise NotImplementedError(f"no dequantiser for ggml type {type_name(ggml_type)}")
    n, nbytes = block_size(ggml_type)
    blocks = data.reshape(-1, nbytes)
    nb = blocks.shape[0]
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=data.device)
    flat = out.view(nb, n)
    step = max(1, CHUNK_BLOCKS * 32 // n)
    scratch = None if out.dtype == torch.float32 else torch.empty((min(nb, step), n), device=data.device)
    for s in range(0, nb, step):
        e = min(nb, s + step)
        if scratch is None:
            fn(blocks[s:e], flat[s:e])
        else:
            fn(blocks[s:e], scratch[:e - s])
            flat[s:e] = scratch[:e - s]
    return out
