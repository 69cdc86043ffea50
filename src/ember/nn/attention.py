"""Attention masks and scaled-dot-product attention shared by every family.

Two situations, one mask rule. Without a cache the keys are the query tokens themselves and an
optional `attention_mask` [B, T] marks padding; positions count only real tokens, so a left- or
right-padded row gives the same logits as the unpadded sequence. With a KV cache each row's
tokens sit at cache columns equal to their positions (see `kv_cache.py`), so a key column j is
visible to a query at position p when j <= p (and p - j < window for sliding layers).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import ops


def positions_from_mask(attention_mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """Token positions [B, T]: 0.. for each row's real tokens (padding gets 0)."""
    if attention_mask is None:
        return torch.arange(length, device=device).unsqueeze(0).expand(batch, length)
    m = attention_mask.to(torch.long)
    return (m.cumsum(-1) - 1).clamp(min=0)


def build_mask(
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    kv_len: int | None = None,
    window: int | None = None,
    causal: bool = True,
) -> torch.Tensor | None:
    """A boolean mask [B, 1, T, S] (True = attend), or None when plain causal attention does.

    `kv_len` set: cached attention, keys are cache columns 0..kv_len-1 (column = position).
    `kv_len` None: self-attention over the T query tokens with optional padding mask [B, T].
    causal=False (encoders built on decoders, e.g. EmbeddingGemma): every real token sees every real
    token, or those less than `window` positions away in either direction.
    """
    B, T = position_ids.shape
    device = position_ids.device
    if kv_len is not None:
        cols = torch.arange(kv_len, device=device)
        pos = position_ids.unsqueeze(-1)  # [B, T, 1]
        mask = cols <= pos
        if window is not None:
            mask = mask & (pos - cols < window)
        return mask.unsqueeze(1)
    if not causal:
        if kv_len is not None:
            raise ValueError("bidirectional attention has no incremental (cached) form")
        mask = torch.ones(B, T, T, dtype=torch.bool, device=device)
        if window is not None:
            mask = (position_ids[:, :, None] - position_ids[:, None, :]).abs() < window
        if attention_mask is not None:
            mask = mask & attention_mask.to(torch.bool)[:, None, :]
        return (mask | torch.eye(T, dtype=torch.bool, device=device)).unsqueeze(1)
    if attention_mask is None and (window is None or window >= T):
        return None  # is_causal fast path
    idx = torch.arange(T, device=device)
    mask = (idx[None, :] <= idx[:, None]).unsqueeze(0).expand(B, T, T)  # causal by index
    if attention_mask is not None:
        mask = mask & attention_mask.to(torch.bool)[:, None, :]
    if window is not None:
        mask = mask & (position_ids[:, :, None] - position_ids[:, None, :] < window)
    # A padding query with no visible key would give NaN: let every query see itself.
    mask = mask | torch.eye(T, dtype=torch.bool, device=device)
    return mask.unsqueeze(1)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale [+ mask]) v for q [B, H, T, D], k/v [B, KV, S, D] (GQA when KV < H).
    `sinks` [H]: one extra logit per head that joins the softmax and is then dropped (GPT-OSS)."""
    if softcap is not None or sinks is not None:
        return _explicit_attention(q, k, v, mask, scale, softcap, sinks)
    if q.shape[2] == 1 and v.shape[-1] == q.shape[-1]:  # decode: one query per row (the registered op)
        return ops.decode_attention(q, k, v, mask, scale)
    gqa = k.shape[1] != q.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def _explicit_attention(q, k, v, mask, scale, softcap, sinks):
    # Gemma 2's tanh soft-capping of attention scores and GPT-OSS's sinks: not expressible with SDPA.
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    T, S = q.shape[2], k.shape[2]
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        B, H = scores.shape[:2]
        scores = torch.cat([scores, sinks.to(scores.dtype).view(1, H, 1, 1).expand(B, H, T, 1)], dim=-1)
        return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32)[..., :-1].to(q.dtype), v)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)
