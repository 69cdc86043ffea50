"""Triton kernels for ember.nn.ops on CUDA: decode attention over the live tokens only, and fused
RMSNorm (+ residual) and SiLU·up.

Decode attention (flash-decoding): the engine's captured step attends over the whole preallocated
cache (a static shape), with the columns past each row's position masked. SDPA reads every column
anyway, so a batch of 4096-column slots holding ~600 live tokens each streams ~7× the K/V it needs.
Here the columns are split into blocks spread over `splits` programs per (row, KV head); a program
reads a block's slice of the boolean mask first (S bytes per row: nothing beside K/V) and skips the
block's keys and values when no column of it is visible. A second kernel merges the splits' partial
softmax sums. Grouped queries share their KV head's loads (one program serves the H/KV query heads).
The grid depends only on shapes, so the kernel runs inside CUDA graphs; what it reads follows the
mask's contents.

Every kernel here also runs under Triton's interpreter (TRITON_INTERPRET=1, on CPU tensors): that
is how tests/test_triton_ops.py checks them against the pure-PyTorch defaults on machines without
a GPU. Outside the interpreter they take CUDA tensors only; anything else they do not cover (a
float additive mask, a dtype, an odd layout) goes to the implementation registered before them.
"""
from __future__ import annotations

import functools
import os
from typing import Callable

import torch

from ..nn import ops

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Triton imports (and EMBER_TRITON is not 0)."""
    if os.environ.get("EMBER_TRITON", "1") == "0":
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install is the same as none
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _runs_here(*ts: torch.Tensor) -> bool:
    """The tensors live where the kernels run: CUDA, or anywhere under the interpreter."""
    return all(t.is_cuda for t in ts) or (interpreting() and all(t.device.type == "cpu" for t in ts))


@functools.lru_cache(maxsize=1)
def _kernels():
    """Compile-on-first-use kernel definitions (importing triton only when a kernel is needed)."""
    import triton
    import triton.language as tl

    @triton.jit
    def split_attention(q_ptr, k_ptr, v_ptr, m_ptr, o_part, m_part, l_part,
                        sq_b, sq_h, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sm_b, sm_s,
                        H, KV, S, D, scale, blocks_per_split,
                        REP: tl.constexpr, REP_P: tl.constexpr, D_P: tl.constexpr, BLOCK_N: tl.constexpr,
                        HAS_MASK: tl.constexpr, SPLITS: tl.constexpr, PRECISION: tl.constexpr,
                        UPCAST: tl.constexpr):
        pid = tl.program_id(0)
        split = tl.program_id(1)
        b = pid // KV
        g = pid % KV
        rows = tl.arange(0, REP_P)
        dims = tl.arange(0, D_P)
        row_ok = rows < REP
        dim_ok = dims < D
        heads = g * REP + rows
        q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + dims[None, :],
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        m_i = tl.full((REP_P,), float("-inf"), tl.float32)
        l_i = tl.zeros((REP_P,), tl.float32)
        acc = tl.zeros((REP_P, D_P), tl.float32)
        first = split * blocks_per_split * BLOCK_N
        for i in range(0, blocks_per_split):
            cols = first + i * BLOCK_N + tl.arange(0, BLOCK_N)
            valid = cols < S
            if HAS_MASK:
                seen = tl.load(m_ptr + b * sm_b + cols * sm_s, mask=valid, other=0)
                valid = valid & (seen != 0)
            if tl.max(valid.to(tl.int32), axis=0) > 0:  # a block nobody sees is never read
                kv_ok = valid[:, None] & dim_ok[None, :]
                k = tl.load(k_ptr + b * sk_b + g * sk_h + cols[:, None] * sk_s + dims[None, :],
                            mask=kv_ok, other=0.0)
                if UPCAST:
                    scores = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision=PRECISION)
                else:
                    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)
                scores = scores * scale  # [REP_P, BLOCK_N], float32
                scores = tl.where(valid[None, :], scores, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(scores, axis=1))
                alpha = tl.exp(m_i - m_new)
                p = tl.exp(scores - m_new[:, None])
                v = tl.load(v_ptr + b * sv_b + g * sv_h + cols[:, None] * sv_s + dims[None, :],
                            mask=kv_ok, other=0.0)
                if UPCAST:
                    pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision=PRECISION)
                else:
                    pv = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
                acc = acc * alpha[:, None] + pv
                l_i = l_i * alpha + tl.sum(p, axis=1)
                m_i = m_new
        base = (b * H + heads) * SPLITS + split
        tl.store(m_part + base, m_i, mask=row_ok)
        tl.store(l_part + base, l_i, mask=row_ok)
        tl.store(o_part + base[:, None] * D + dims[None, :], acc, mask=row_ok[:, None] & dim_ok[None, :])

    @triton.jit
    def merge_splits(o_part, m_part, l_part, out_ptr, so_b, so_h, H, D,
                     SPLITS: tl.constexpr, SPLITS_P: tl.constexpr, D_P: tl.constexpr):
        bh = tl.program_id(0)
        b = bh // H
        h = bh % H
        s = tl.arange(0, SPLITS_P)
        dims = tl.arange(0, D_P)
        s_ok = s < SPLITS
        m = tl.load(m_part + bh * SPLITS + s, mask=s_ok, other=float("-inf"))
        l = tl.load(l_part + bh * SPLITS + s, mask=s_ok, other=0.0)
        o = tl.load(o_part + (bh * SPLITS + s)[:, None] * D + dims[None, :],
                    mask=s_ok[:, None] & (dims < D)[None, :], other=0.0)
        top = tl.max(m, axis=0)
        w = tl.where(m > float("-inf"), tl.exp(m - top), 0.0)
        total = tl.sum(w * l, axis=0)
        out = tl.sum(w[:, None] * o, axis=0) / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + b * so_b + h * so_h + dims, out.to(out_ptr.dtype.element_ty), mask=dims < D)

    @triton.jit
    def rms_norm(x_ptr, d_ptr, w_ptr, s_ptr, y_ptr, N, eps, HAS_DELTA: tl.constexpr, F32: tl.constexpr,
                 BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        ok = cols < N
        x = tl.load(x_ptr + row * N + cols, mask=ok, other=0.0)
        if HAS_DELTA:
            d = tl.load(d_ptr + row * N + cols, mask=ok, other=0.0)
            x = (x.to(tl.float32) + d.to(tl.float32)).to(x.dtype)  # rounded to x's dtype, as torch adds
            tl.store(s_ptr + row * N + cols, x, mask=ok)
        xf = x.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / N + eps)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        if F32:
            y = xf * inv * w
        else:  # transformers: normalise in float32, cast to x's dtype, then scale (rounded again)
            y = (xf * inv).to(x.dtype).to(tl.float32) * w
        tl.store(y_ptr + row * N + cols, y.to(y_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def silu_mul(g_ptr, u_ptr, o_ptr, F, sg, su, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < F
        g = tl.load(g_ptr + row * sg + cols, mask=ok, other=0.0)
        u = tl.load(u_ptr + row * su + cols, mask=ok, other=0.0)
        gf = g.to(tl.float32)
        act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)  # silu rounded to the input dtype, as torch does
        tl.store(o_ptr + row * F + cols, (act.to(tl.float32) * u.to(tl.float32)).to(o_ptr.dtype.element_ty),
                 mask=ok)

    return split_attention, merge_splits, rms_norm, silu_mul


def _pow2(n: int, least: int = 1) -> int:
    return max(least, 1 << max(0, (n - 1).bit_length()))


def _split_count(S: int, block: int, programs: int) -> int:
    """How many programs share one row's columns: enough to keep ~4 programs per SM busy on long
    caches, never more than the column blocks."""
    blocks = -(-S // block)
    want = max(1, -(-512 // max(programs, 1)))  # ~512 programs in all
    return max(1, min(blocks, want, 64))


def _mask_rows(mask: torch.Tensor | None, B: int, S: int) -> tuple[torch.Tensor | None, int, int] | None:
    """A boolean mask broadcastable to [B, 1, 1, S] as (tensor, row stride, column stride); None
    when the mask is of a form the kernel does not take (additive, per head, per query)."""
    if mask is None:
        return None, 0, 0
    if mask.dtype != torch.bool or mask.dim() > 4 or mask.shape[-1] != S:
        return None
    lead = mask.shape[:-1]
    if any(n != 1 for n in lead[1:]) or (len(lead) and lead[0] not in (1, B)):
        return None
    m = mask.reshape(lead[0] if len(lead) else 1, S)
    return m, (m.stride(0) if m.shape[0] == B and B > 1 else 0), m.stride(1)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float | None = None, *, fallback: Callable | None = None) -> torch.Tensor:
    """ops.decode_attention over the visible columns only (see the module docstring)."""
    fallback = fallback or ops.default("decode_attention")
    B, H, T, D = q.shape
    KV, S = k.shape[1], k.shape[2]
    m = _mask_rows(mask, B, S) if T == 1 else None
    if (m is None or q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype or v.shape[-1] != D
            or H % KV or S == 0 or q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1
            or not _runs_here(q, k, v) or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad))):
        return fallback(q, k, v, mask, scale)
    split_attention, merge_splits, _, _ = _kernels()
    mt, sm_b, sm_s = m
    rep = H // KV
    block = 64 if D <= 128 else 32
    splits = _split_count(S, block, B * KV)
    blocks_per_split = -(-(-(-S // block)) // splits)
    part = torch.empty(B, H, splits, D, dtype=torch.float32, device=q.device)
    m_part = torch.empty(B, H, splits, dtype=torch.float32, device=q.device)
    l_part = torch.empty(B, H, splits, dtype=torch.float32, device=q.device)
    split_attention[(B * KV, splits)](
        q, k, v, mt if mt is not None else q, part, m_part, l_part,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        sm_b, sm_s, H, KV, S, D, D ** -0.5 if scale is None else float(scale), blocks_per_split,
        REP=rep, REP_P=_pow2(rep, 16), D_P=_pow2(D, 16), BLOCK_N=block, HAS_MASK=mt is not None, SPLITS=splits,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=q.dtype == torch.bfloat16 and interpreting())  # the interpreter's dot has no bf16
    out = torch.empty(B, H, 1, D, dtype=q.dtype, device=q.device)
    merge_splits[(B * H,)](part, m_part, l_part, out, out.stride(0), out.stride(1), H, D,
                           SPLITS=splits, SPLITS_P=_pow2(splits), D_P=_pow2(D, 16))
    return out


def _norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float):
    _, _, rms_norm, _ = _kernels()
    N = x.shape[-1]
    xs = x.contiguous()
    s = torch.empty_like(xs) if delta is not None else xs
    y = torch.empty_like(xs)
    rows = xs.numel() // N
    rms_norm[(rows,)](xs, delta.contiguous() if delta is not None else xs, weight, s, y, N, float(eps),
                      HAS_DELTA=delta is not None, F32=x.dtype == torch.float32, BLOCK=_pow2(N, 16))
    return s, y


def _norm_ok(x: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor | None = None) -> bool:
    return (x.dtype in _DTYPES and weight.dtype == x.dtype and weight.dim() == 1 and weight.shape[0] == x.shape[-1]
            and weight.is_contiguous() and x.shape[-1] <= 16384 and x.numel() > 0
            and (delta is None or (delta.dtype == x.dtype and delta.shape == x.shape))
            and _runs_here(x, weight, *(() if delta is None else (delta,)))
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, fallback: Callable | None = None) -> torch.Tensor:
    if not _norm_ok(x, weight):
        return (fallback or ops.default("rms_norm"))(x, weight, eps)
    return _norm(x, None, weight, eps)[1]


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, *,
                 fallback: Callable | None = None):
    if not _norm_ok(x, weight, delta):
        return (fallback or ops.default("add_rms_norm"))(x, delta, weight, eps)
    return _norm(x, delta, weight, eps)


def silu_mul(gu, *, fallback: Callable | None = None) -> torch.Tensor:
    g, u = gu.chunk(2, dim=-1) if isinstance(gu, torch.Tensor) else gu
    F = g.shape[-1]
    rows = _as_rows(g), _as_rows(u)
    if (g.dtype not in _DTYPES or u.dtype != g.dtype or u.shape != g.shape or g.numel() == 0
            or rows[0] is None or rows[1] is None or not _runs_here(g, u)
            or (torch.is_grad_enabled() and (g.requires_grad or u.requires_grad))):
        return (fallback or ops.default("silu_mul"))(gu)
    g2, u2 = rows
    _, _, _, kernel = _kernels()
    out = torch.empty(*g.shape, dtype=g.dtype, device=g.device)
    block = min(1024, _pow2(F, 16))
    kernel[(g2.shape[0], -(-F // block))](g2, u2, out, F, g2.stride(0), u2.stride(0), BLOCK=block)
    return out


def _as_rows(t: torch.Tensor) -> torch.Tensor | None:
    """t as [rows, F] without a copy (the halves of a fused [..., 2F] projection are such views), or
    None when its layout does not allow it."""
    try:
        r = t.view(-1, t.shape[-1])
    except RuntimeError:
        return None
    return r if r.stride(-1) == 1 else None


_IMPLS = {"decode_attention": decode_attention, "rms_norm": rms_norm, "add_rms_norm": add_rms_norm,
          "silu_mul": silu_mul}


def register_ops() -> int:
    """Put the Triton kernels in front of whatever implements each op now (the native CPU kernels or
    the defaults stay the fallback for what they do not take). Once per process; 0 without Triton."""
    if not available():
        return 0
    n = 0
    for name, fn in _IMPLS.items():
        current = ops.current(name)
        if getattr(current, "_ember_triton", False):
            continue
        ops.register(name, _in_front_of(fn, current))
        n += 1
    return n


def _in_front_of(fn: Callable, fallback: Callable) -> Callable:
    @functools.wraps(fn)
    def op(*args, **kwargs):
        return fn(*args, fallback=fallback, **kwargs)

    op._ember_triton = True  # type: ignore[attr-defined]
    return op
