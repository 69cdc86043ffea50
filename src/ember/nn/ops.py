"""The small ops the layers call, behind names a backend may re-register.

Layers call ops, not backends: `ops.rms_norm(x, w, eps)`, `ops.add_rms_norm(...)`,
`ops.silu_mul(...)`, `ops.decode_attention(...)`. Each name starts as the pure-PyTorch default
below (the numerics ember's layers have always had); a backend swaps in a faster implementation
once per process with `register(name, fn)` (ember.backends.native registers ember's native CPU
kernels). An implementation must accept every input the default does; where it does not cover a
case (a device, a dtype, a layout) it calls the default itself (`default(name)`).

    ops.rms_norm(x, weight, eps) -> y
        RMSNorm as transformers computes it: normalise in float32, cast back to x's dtype, scale
        by weight (a float32 x: F.rms_norm with the weight in float32).
    ops.add_rms_norm(x, delta, weight, eps) -> (s, rms_norm(s, weight, eps))   with s = x + delta
        the residual add and the next norm of a pre-norm decoder, in one pass.
    ops.silu_mul(gu) -> silu(g) * u
        gu: a tuple (g, u), or one tensor [..., 2F] holding g then u (a fused gate/up projection).
    ops.decode_attention(q, k, v, mask, scale) -> o [B, H, 1, D]
        softmax(q k^T * scale [+ mask]) v for ONE query per row: q [B, H, 1, D], k/v [B, KV, S, D]
        (H a multiple of KV: grouped queries), mask None or boolean (True = attend) / additive,
        broadcastable to [B, 1, 1, S]; scale None = D ** -0.5.
    ops.rope_cache_attention(qkv, cos, sin, k_cache, v_cache, pos, heads, scale) -> o [1, 1, heads * D]
        one decode token of one row, from its fused q/k/v projection [1, 1, (heads + 2 KV) * D] to
        the attention output: q and k rotated with cos/sin [1, 1, R] (R <= D: the leading R dims),
        k and v written at column `pos` of k_cache/v_cache [1, KV, S, D] (in place), then
        decode_attention of q over columns 0..pos. The whole attention block of a plain decoder
        layer between its projections, in one call.
    ops.swiglu_mlp(x, gate_up, down) -> down(silu_mul(gate_up(x)))
        a SwiGLU MLP given its fused gate/up projection and its down projection (the layers
        themselves, callables on x [..., E]); a backend may run all three in one native call.
    ops.rope_cache_attention_block(x, qkv, o_proj, cos, sin, k_cache, v_cache, pos, heads, scale)
        -> o_proj(rope_cache_attention(qkv(x), cos, sin, k_cache, v_cache, pos, heads, scale))
        the same for the attention block of one row's decode token: from the normed input through
        the fused q/k/v projection, rotary, cache write and attention to the output projection.
    ops.decoder_layer(x, pending, w1, eps1, qkv, o_proj, cos, sin, k_cache, v_cache, pos, heads, scale,
                      w2, eps2, gate_up, down) -> (x', h')
        a pre-norm Llama layer for one row's decode token, its last residual add left to the caller:
        s, n = add_rms_norm(x, pending, w1, eps1); h = rope_cache_attention_block(n, ...);
        x', n = add_rms_norm(s, h, w2, eps2); h' = swiglu_mlp(n, gate_up, down).

This module imports nothing above `ember.nn` (tests/test_layout.py).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight.float() if weight.dtype != x.dtype else weight, eps)
    h = F.rms_norm(x.float(), (x.shape[-1],), None, eps)
    return weight * h.to(x.dtype)


def _add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    s = x + delta
    return s, _rms_norm(s, weight, eps)


def _silu_mul(gu) -> torch.Tensor:
    if isinstance(gu, torch.Tensor):
        g, u = gu.chunk(2, dim=-1)
    else:
        g, u = gu
    return F.silu(g) * u


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      scale: float | None = None) -> torch.Tensor:
    B, H, T, D = q.shape
    KV = k.shape[1]
    if KV != H and (mask is None or mask.shape[1] == 1):
        # grouped queries: fold each KV head's query group into the query-length axis, so the kernel
        # sees plain multi-head attention over KV heads (no K/V repeat, no GQA path)
        o = F.scaled_dot_product_attention(q.reshape(B, KV, H // KV, D), k, v, attn_mask=mask, scale=scale)
        return o.view(B, H, 1, D)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=KV != H)


def _rope_cache_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                          v_cache: torch.Tensor, pos: int, heads: int, scale: float | None = None) -> torch.Tensor:
    from .rope import apply_rotary_bthd

    KV, D = k_cache.shape[1], k_cache.shape[3]
    qk = apply_rotary_bthd(qkv[..., : (heads + KV) * D].view(1, 1, heads + KV, D), cos, sin)
    q, k = qk[:, :, :heads].transpose(1, 2), qk[:, :, heads:].transpose(1, 2)
    k_cache[:, :, pos : pos + 1].copy_(k)
    v_cache[:, :, pos : pos + 1].copy_(qkv[..., (heads + KV) * D:].view(1, 1, KV, D).transpose(1, 2))
    o = decode_attention(q, k_cache[:, :, : pos + 1], v_cache[:, :, : pos + 1], None, scale)
    return o.transpose(1, 2).reshape(1, 1, heads * D)


def _swiglu_mlp(x: torch.Tensor, gate_up: Callable, down: Callable) -> torch.Tensor:
    return down(silu_mul(gate_up(x)))


def _rope_cache_attention_block(x: torch.Tensor, qkv: Callable, o_proj: Callable, cos: torch.Tensor, sin: torch.Tensor,
                                k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int, heads: int,
                                scale: float | None = None) -> torch.Tensor:
    return o_proj(rope_cache_attention(qkv(x), cos, sin, k_cache, v_cache, pos, heads, scale))


def _decoder_layer(x: torch.Tensor, pending: torch.Tensor, w1: torch.Tensor, eps1: float, qkv: Callable, o_proj: Callable,
                   cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int, heads: int,
                   scale: float | None, w2: torch.Tensor, eps2: float, gate_up: Callable, down: Callable):
    x, normed = add_rms_norm(x, pending, w1, eps1)
    h = rope_cache_attention_block(normed, qkv, o_proj, cos, sin, k_cache, v_cache, pos, heads, scale)
    x, normed = add_rms_norm(x, h, w2, eps2)
    return x, swiglu_mlp(normed, gate_up, down)


DEFAULTS: dict[str, Callable] = {
    "rms_norm": _rms_norm,
    "add_rms_norm": _add_rms_norm,
    "silu_mul": _silu_mul,
    "decode_attention": _decode_attention,
    "rope_cache_attention": _rope_cache_attention,
    "swiglu_mlp": _swiglu_mlp,
    "rope_cache_attention_block": _rope_cache_attention_block,
    "decoder_layer": _decoder_layer,
}

# The current implementations, bound as module attributes so that a call is one global lookup.
rms_norm = _rms_norm
add_rms_norm = _add_rms_norm
silu_mul = _silu_mul
decode_attention = _decode_attention
rope_cache_attention = _rope_cache_attention
swiglu_mlp = _swiglu_mlp
rope_cache_attention_block = _rope_cache_attention_block
decoder_layer = _decoder_layer


def default(name: str) -> Callable:
    """The pure-PyTorch implementation of `name`."""
    return DEFAULTS[name]


def current(name: str) -> Callable:
    """The implementation `name` dispatches to now."""
    if name not in DEFAULTS:
        raise KeyError(f"unknown op {name!r}; ops: {', '.join(DEFAULTS)}")
    return globals()[name]


def register(name: str, fn: Callable | None) -> Callable:
    """Make `fn` the implementation of op `name` (None: back to the default); returns the previous one."""
    before = current(name)
    globals()[name] = DEFAULTS[name] if fn is None else fn
    return before


def reset() -> None:
    """Every op back to its pure-PyTorch default."""
    for name in DEFAULTS:
        register(name, None)


def registered() -> dict[str, str]:
    """Each op and where its implementation comes from ("default" or the function's module)."""
    return {n: "default" if current(n) is f else f"{current(n).__module__}.{current(n).__qualname__}"
            for n, f in DEFAULTS.items()}


@contextlib.contextmanager
def using(impls: dict[str, Callable | None]):
    """Temporarily register `impls` (name -> fn, None = the default)."""
    before = {n: current(n) for n in impls}
    try:
        for n, f in impls.items():
            register(n, f)
        yield
    finally:
        for n, f in before.items():
            globals()[n] = f


__all__ = ["DEFAULTS", "add_rms_norm", "current", "decode_attention", "decoder_layer", "default", "register", "registered", "reset",
           "rms_norm", "rope_cache_attention", "rope_cache_attention_block", "silu_mul", "swiglu_mlp", "using"]
