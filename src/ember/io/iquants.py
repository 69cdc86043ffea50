"""Dequantisers for the GGUF i-quants (IQ1_S ... IQ4_XS), the ternary TQ1_0/TQ2_0 and MXFP4, in
vectorised torch: each turns a whole `[n_blocks, block_bytes]` uint8 tensor into float32 values at
once, with the float32 operations of the reference dequantisers (llama.cpp's ggml-quants.c, and
`gguf.quants` which ports it) in the same order, so the results are bit-identical to them.

The block layouts (ggml-common.h), in bytes:
  IQ2_XXS  d:f16 | 8 x (4 grid indices, u32: 4 x 7-bit sign indices + 4-bit scale)
  IQ2_XS   d:f16 | 32 x u16 (9-bit grid index, 7-bit sign index) | 8 scale bytes (two 4-bit each)
  IQ2_S    d:f16 | 32 grid index low bytes | 32 sign bytes | 8 bytes of 2-bit index highs | 8 scale bytes
  IQ3_XXS  d:f16 | 64 grid indices | 8 x u32 (4 x 7-bit sign indices + 4-bit scale)
  IQ3_S    d:f16 | 64 grid index low bytes | 8 bytes of index high bits | 32 sign bytes | 4 scale bytes
  IQ1_S    d:f16 | 32 grid index low bytes | 8 x u16 (4 x 3-bit index highs, 3-bit scale, delta sign)
  IQ1_M    32 grid index low bytes | 16 bytes (per nibble: 3-bit index high, delta sign) |
           4 x u16 (4 x 3-bit scales; their top nibbles together: d as f16)
  IQ4_NL   d:f16 | 16 bytes of 4-bit indices into a 16-value table (low nibbles first)
  IQ4_XS   d:f16 | u16 scale highs | 4 bytes scale lows | 128 bytes of 4-bit table indices
  TQ1_0    48 bytes of five base-3 digits each | 4 bytes of four | d:f16
  TQ2_0    64 bytes of four 2-bit values each | d:f16
  MXFP4    e:E8M0 | 16 bytes of 4-bit E2M1 codes (low nibbles first)
A sign index (7 bits) picks 8 signs from `ksigns`: the 7 bits plus an 8th making the count even.
"""
from __future__ import annotations

import torch

from . import iquant_grids

# ggml type ids
IQ2_XXS, IQ2_XS, IQ3_XXS, IQ1_S, IQ4_NL, IQ3_S, IQ2_S, IQ4_XS, IQ1_M = 16, 17, 18, 19, 20, 21, 22, 23, 29
TQ1_0, TQ2_0, MXFP4 = 34, 35, 39

KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
KVALUES_MXFP4 = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # E2M1 values, doubled
IQ1_DELTA = 0.125

_CACHE: dict[tuple, torch.Tensor] = {}


def _cached(key: tuple, make) -> torch.Tensor:
    t = _CACHE.get(key)
    if t is None:
        t = _CACHE[key] = make()
    return t


def grid(table: tuple, device=None) -> torch.Tensor:
    """An `iquant_grids` table as float32 [entries, values per entry]."""
    def make():
        n, width, values, hexes = table
        packed = torch.frombuffer(bytearray(bytes.fromhex("".join(hexes))), dtype=torch.uint8)
        bits = 2 if len(values) <= 4 else 4
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
        idx = ((packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(n, width).long()
        return torch.tensor(values, dtype=torch.float32)[idx].to(device)
    return _cached(("grid", id(table), device), make)


def _table(values: tuple, device, dtype=torch.float32) -> torch.Tensor:
    """A small constant tensor (a value table, or shift amounts), made once per device."""
    return _cached(("table", values, dtype, device), lambda: torch.tensor(values, dtype=dtype, device=device))


def _ksigns(device) -> torch.Tensor:
    """ksigns_iq2xs as uint8 [128]: the 7 bits and an even-parity 8th."""
    def make():
        i = torch.arange(128)
        parity = sum((i >> k) & 1 for k in range(7)) & 1
        return (i | (parity << 7)).to(torch.uint8).to(device)
    return _cached(("ksigns", device), make)


# ---- fields -------------------------------------------------------------------------------------
def _f16(b: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 at byte `at` of each block, as float32 [nb, 1]."""
    return b[:, at:at + 2].contiguous().view(torch.float16).float()


def _u16(b: torch.Tensor, at: int, n: int) -> torch.Tensor:
    """n little-endian uint16 from byte `at`, as int32 [nb, n]."""
    return b[:, at:at + 2 * n].contiguous().view(torch.int16).int() & 0xFFFF


def _u32(b: torch.Tensor, at: int, n: int) -> torch.Tensor:
    """n little-endian uint32 from byte `at`, as int64 [nb, n]."""
    return b[:, at:at + 4 * n].contiguous().view(torch.int32).long() & 0xFFFFFFFF


def _bits(x: torch.Tensor) -> torch.Tensor:
    """The 8 bits of each byte of x (uint8 [...]), lowest first, as bool [..., 8]."""
    return ((x.unsqueeze(-1) >> _table(tuple(range(8)), x.device, torch.uint8)) & 1).bool()


def _nibbles(x: torch.Tensor) -> torch.Tensor:
    """x uint8 [..., n] -> [..., 2, n]: the low nibbles, then the high ones."""
    return (x.unsqueeze(-2) >> _table((0, 4), x.device, torch.uint8).view(2, 1)) & 0x0F


def _signed(v: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """v times -1 where `negative`, else 1: a multiply, as the reference does (a negation would flip
    the sign of a NaN, which a multiply by -1 leaves alone)."""
    return v.mul_(1 - 2 * negative.to(v.dtype))


def _sign_bits(w: torch.Tensor, device) -> torch.Tensor:
    """u32 words [nb, g] holding four 7-bit sign indices each -> bool [nb, g, 4, 8]."""
    idx = (w.unsqueeze(-1) >> _table((0, 7, 14, 21), device, torch.int64)) & 127
    return _bits(_ksigns(device)[idx])


# ---- dequantisers: [nb, block_bytes] uint8 -> o float32 [nb, block_elems] -----------------------
def _dq_iq2_xxs(b: torch.Tensor, o: torch.Tensor) -> None:
    nb, dev = b.shape[0], b.device
    q = b[:, 2:66].reshape(nb, 8, 8)
    w = _u32(q[:, :, 4:8].reshape(nb, 32), 0, 8)
    db = (_f16(b, 0) * (0.5 + (w >> 28).float()) * 0.25).reshape(nb, 8, 1, 1)
    g = grid(iquant_grids.IQ2XXS, dev)[q[:, :, :4].long()]  # [nb, 8, 4, 8]
    o.view(nb, 8, 4, 8).copy_(_signed(db * g, _sign_bits(w, dev)))


def _dq_iq2_xs(b: torch.Tensor, o: torch.Tensor) -> None:
    nb, dev = b.shape[0], b.device
    qs = _u16(b, 2, 32)
    sc = _nibbles(b[:, 66:74]).transpose(1, 2).reshape(nb, 16)
    db = (_f16(b, 0) * (0.5 + sc.float()) * 0.25).reshape(nb, 16, 1, 1)
    g = grid(iquant_grids.IQ2XS, dev)[(qs & 511).long()].reshape(nb, 16, 2, 8)
    neg = _bits(_ksigns(dev)[(qs >> 9).long()]).reshape(nb, 16, 2, 8)
    o.view(nb, 16, 2, 8).copy_(_signed(db * g, neg))


def _dq_iq2_s(b: torch.Tensor, o: torch.Tensor) -> None:
    nb, dev = b.shape[0], b.device
    high = ((b[:, 66:74].unsqueeze(-1) >> _table((0, 2, 4, 6), dev, torch.uint8)) & 3).reshape(nb, 32)
    idx = b[:, 2:34].long() | (high.long() << 8)
    sc = _nibbles(b[:, 74:82]).transpose(1, 2).reshape(nb, 16)
    db = (_f16(b, 0) * (0.5 + sc.float()) * 0.25).reshape(nb, 16, 1, 1)
    g = grid(iquant_grids.IQ2S, dev)[idx].reshape(nb, 16, 2, 8)
    neg = _bits(b[:, 34:66]).reshape(nb, 16, 2, 8)
    o.view(nb, 16, 2, 8).copy_(_signed(db * g, neg))


def _dq_iq3_xxs(b: torch.Tensor, o: torch.Tensor) -> None:
    nb, dev = b.shape[0], b.device
    w = _u32(b, 66, 8)
    db = (_f16(b, 0) * (0.5 + (w >> 28).float()) * 0.5).reshape(nb, 8, 1, 1)
    g = grid(iquant_grids.IQ3XXS, dev)[b[:, 2:66].long()].reshape(nb, 8, 4, 8)
    o.view(nb, 8, 4, 8).copy_(_signed(db * g, _sign_bits(w, dev)))


def _dq_iq3_s(b: torch.Tensor, o: torch.Tensor) -> None:
    nb, dev = b.shape[0], b.device
    idx = b[:, 2:66].long() | (_bits(b[:, 66:74]).reshape(nb, 64).long() << 8)
    sc = _nibbles(b[:, 106:110]).transpose(1, 2).reshape(nb, 8)
    db = (_f16(b, 0) * (1 + 2 * sc.int()).float()).reshape(nb, 8, 1, 1)
    g = grid(iquant_grids.IQ3S, dev)[idx].reshape(nb, 8, 4, 8)
    neg = _bits(b[:, 74:106]).reshape(nb, 8, 4, 8)
    o.view(nb, 8, 4, 8).copy_(_signed(db * g, neg))


def _dq_iq1_s(b: torch.Tensor, o: torch.Tensor) -> None:
    nb, dev = b.shape[0], b.device
    qh = _u16(b, 34, 8)
    dl = (_f16(b, 0) * (2 * ((qh >> 12) & 7) + 1).float()).reshape(nb, 8, 1, 1)
    delta = torch.where((qh & 0x8000) != 0, -IQ1_DELTA, IQ1_DELTA).float().reshape(nb, 8, 1, 1)
    high = (qh.unsqueeze(-1) >> _table((0, 3, 6, 9), dev, torch.int32)) & 7
    idx = b[:, 2:34].long() | (high.reshape(nb, 32).long() << 8)
    g = grid(iquant_grids.IQ1S, dev)[idx].reshape(nb, 8, 4, 8)
    torch.mul(dl, g + delta, out=o.view(nb, 8, 4, 8))


def _dq_iq1_m(b: torch.Tensor, o: torch.Tensor) -> None:
    nb, dev = b.shape[0], b.device
    sc = _u16(b, 48, 4)
    # the block's f16 scale is the top nibbles of the four scale words
    d16 = (sc[:, 0] >> 12) | ((sc[:, 1] >> 8) & 0x00F0) | ((sc[:, 2] >> 4) & 0x0F00) | (sc[:, 3] & 0xF000)
    d = torch.where(d16 >= 0x8000, d16 - 0x10000, d16).to(torch.int16).view(torch.float16).float().reshape(nb, 1)
    s = ((sc.unsqueeze(-1) >> _table((0, 3, 6, 9), dev, torch.int32)) & 7).reshape(nb, 16)
    dl = (d * (2 * s + 1).float()).reshape(nb, 8, 2, 1, 1)
    nib = _nibbles(b[:, 32:48]).transpose(1, 2).reshape(nb, 32)
    idx = b[:, 0:32].long() | ((nib & 7).long() << 8)
    delta = torch.where((nib & 8) != 0, -IQ1_DELTA, IQ1_DELTA).float().reshape(nb, 8, 2, 2, 1)
    g = grid(iquant_grids.IQ1S, dev)[idx].reshape(nb, 8, 2, 2, 8)
    torch.mul(dl, g + delta, out=o.view(nb, 8, 2, 2, 8))


def _dq_iq4_nl(b: torch.Tensor, o: torch.Tensor) -> None:
    nb = b.shape[0]
    k = _table(KVALUES_IQ4NL, b.device)[_nibbles(b[:, 2:18]).reshape(nb, 32).long()]
    torch.mul(_f16(b, 0), k, out=o)


def _dq_iq4_xs(b: torch.Tensor, o: torch.Tensor) -> None:
    nb, dev = b.shape[0], b.device
    sh = (_u16(b, 2, 1) >> _table(tuple(range(0, 16, 2)), dev, torch.int32)) & 3  # [nb, 8]
    sl = _nibbles(b[:, 4:8]).transpose(1, 2).reshape(nb, 8)
    scale = (sl.int() | (sh << 4)) - 32
    dl = (_f16(b, 0) * scale.float()).reshape(nb, 8, 1)
    k = _table(KVALUES_IQ4NL, dev)[_nibbles(b[:, 8:136].reshape(nb, 8, 16)).reshape(nb, 8, 32).long()]
    torch.mul(dl, k, out=o.view(nb, 8, 32))


def _dq_tq1_0(b: torch.Tensor, o: torch.Tensor) -> None:
    nb, dev = b.shape[0], b.device
    # each byte holds base-3 digits as a fixed-point fraction: digit k is the top of (byte * 3^k) * 3 / 256
    # (the uint8 products wrap, as the reference's do)
    pow5, pow4 = _table((1, 3, 9, 27, 81), dev, torch.uint8).view(5, 1), _table((1, 3, 9, 27), dev, torch.uint8).view(4, 1)
    q = torch.cat(((b[:, 0:32].unsqueeze(1) * pow5).reshape(nb, 160),
                   (b[:, 32:48].unsqueeze(1) * pow5).reshape(nb, 80),
                   (b[:, 48:52].unsqueeze(1) * pow4).reshape(nb, 16)), dim=1)
    q = (((q.to(torch.int16) * 3) >> 8).to(torch.int8) - 1)
    torch.mul(_f16(b, 52), q, out=o)


def _dq_tq2_0(b: torch.Tensor, o: torch.Tensor) -> None:
    nb = b.shape[0]
    q = (b[:, 0:64].reshape(nb, 2, 1, 32) >> _table((0, 2, 4, 6), b.device, torch.uint8).view(4, 1)) & 3
    torch.mul(_f16(b, 64), q.view(torch.int8).sub_(1).reshape(nb, 256), out=o)  # float(q - 1) * d


def e8m0_half(e: torch.Tensor) -> torch.Tensor:
    """E8M0 exponent bytes -> 2^(e-128) as float32 (ggml_e8m0_to_fp32_half: half the MX scale,
    since the E2M1 table is doubled)."""
    e = e.int()
    bits = torch.where(e < 2, 0x00200000 << e, (e - 1) << 23)
    return bits.view(torch.float32)


def _dq_mxfp4(b: torch.Tensor, o: torch.Tensor) -> None:
    nb = b.shape[0]
    k = _table(KVALUES_MXFP4, b.device)[_nibbles(b[:, 1:17]).reshape(nb, 32).long()]
    torch.mul(e8m0_half(b[:, 0:1]), k, out=o)


DEQUANT = {
    IQ2_XXS: _dq_iq2_xxs, IQ2_XS: _dq_iq2_xs, IQ2_S: _dq_iq2_s, IQ3_XXS: _dq_iq3_xxs, IQ3_S: _dq_iq3_s,
    IQ1_S: _dq_iq1_s, IQ1_M: _dq_iq1_m, IQ4_NL: _dq_iq4_nl, IQ4_XS: _dq_iq4_xs,
    TQ1_0: _dq_tq1_0, TQ2_0: _dq_tq2_0, MXFP4: _dq_mxfp4,
}
