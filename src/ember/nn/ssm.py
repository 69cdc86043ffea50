"""State-space layers' arithmetic, shared by Mamba, Mamba-2 and the hybrids built on them: the short
causal convolution that carries its last inputs as state, Mamba's selective scan, Mamba-2's chunked
SSD scan (prefill) and its one-token recurrence (decode), and the gated group RMSNorm. Pure PyTorch,
in float32, as transformers' reference paths compute them.

References: transformers/models/mamba/modeling_mamba.py (mamba_selective_scan, selective_state_update),
transformers/models/mamba2/modeling_mamba2.py (mamba2_chunk_scan, MambaRMSNormGated); the SSD
algorithm of "Transformers are SSMs" (Dao & Gu, 2024), section 6.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..varbuilder import VarBuilder
from .activations import activation


def padding_zeroed(x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """x [B, T, C] with padding positions (mask 0) set to zero, so that they add nothing to the state
    (transformers' apply_mask_to_padding_states)."""
    if attention_mask is None:
        return x
    return (x * attention_mask[:, :, None]).to(x.dtype)


class CausalConv(nn.Module):
    """A depthwise causal convolution over time (`conv1d` [C, 1, K]) followed by an activation. Its
    state is the last K - 1 inputs [B, C, K - 1], so a chunk of any length, one token included,
    continues where the previous one stopped."""

    def __init__(self, channels: int, kernel: int, vb: VarBuilder, bias: bool, act: str):
        super().__init__()
        self.weight = nn.Parameter(vb.get((channels, 1, kernel), "weight"), requires_grad=False)
        self.bias = nn.Parameter(vb.get((channels,), "bias"), requires_grad=False) if bias else None
        self.kernel = kernel
        self.act = activation(act)

    def state_shape(self) -> tuple[int, int]:
        return (self.weight.shape[0], self.kernel - 1)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, C, T], state [B, C, K - 1] or None (zeros) -> (act(conv(x)) [B, C, T], the new state)."""
        B, C, T = x.shape
        if state is None:
            state = x.new_zeros(B, C, self.kernel - 1)
        full = torch.cat([state.to(x.dtype), x], dim=-1)
        # windows times taps, summed: a depthwise conv1d is far slower on CPU for these shapes
        y = (full.unfold(-1, self.kernel, 1).to(self.weight.dtype) * self.weight).sum(-1)  # [B, C, T]
        if self.bias is not None:
            y = y + self.bias[:, None]
        return self.act(y).to(x.dtype), full[:, :, full.shape[-1] - (self.kernel - 1):]


def selective_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba's scan, step by step: h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t, y_t = h_t C_t.

    x, dt [b, T, I]; A [I, N]; B, C [b, T, N]; state [b, I, N] (float32) or None (zeros)
    -> y [b, T, I] (float32, without the D skip), the final state."""
    x, dt, B, C = x.float(), dt.float(), B.float(), C.float()
    dA = torch.exp(dt[..., None] * A)  # [b, T, I, N]
    dBx = (dt * x)[..., None] * B[:, :, None, :]  # [b, T, I, N]
    h = state.float() if state is not None else x.new_zeros(x.shape[0], *A.shape)
    ys = []
    for t in range(x.shape[1]):
        h = dA[:, t] * h + dBx[:, t]
        ys.append(torch.matmul(h, C[:, t, :, None])[..., 0])
    return torch.stack(ys, dim=1), h


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """[..., L] -> [..., L, L]: out[..., i, j] = a[j+1] + ... + a[i] for j <= i, -inf above the diagonal
    (cumulative sums of masked copies: stabler than differences of one cumulative sum)."""
    L = a.shape[-1]
    a = a[..., None].expand(*a.shape, L)
    below = torch.tril(torch.ones(L, L, dtype=torch.bool, device=a.device), diagonal=-1)
    s = torch.cumsum(a.masked_fill(~below, 0), dim=-2)
    keep = torch.tril(torch.ones(L, L, dtype=torch.bool, device=a.device), diagonal=0)
    return s.masked_fill(~keep, -torch.inf)


def ssd_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk: int,
             state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2's scan over a sequence in chunks of `chunk` (SSD): attention-like within a chunk, the
    state carried from chunk to chunk.

    x [b, T, h, p]; dt [b, T, h]; A [h]; B, C [b, T, g, n]; state [b, h, p, n] (float32) or None
    -> y [b, T, h, p] (float32, without the D skip), the final state."""
    b, T, h, p = x.shape
    chunk = max(1, min(chunk, T))  # the result does not depend on it: no padding sized by the config
    rep = h // B.shape[2]
    B = B.float().repeat_interleave(rep, dim=2)
    C = C.float().repeat_interleave(rep, dim=2)
    pad = (-T) % chunk
    x = x.float() * dt[..., None].float()
    a = A.float() * dt.float()  # [b, T, h]

    def chunks(t: torch.Tensor) -> torch.Tensor:  # [b, T, ...] -> [b, c, l, ...]
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(b, -1, chunk, *t.shape[2:])

    x, a, B, C = chunks(x), chunks(a), chunks(B), chunks(C)
    a = a.permute(0, 3, 1, 2)  # [b, h, c, l]
    a_cum = torch.cumsum(a, dim=-1)
    # within each chunk: y_l = sum_{s <= l} (C_l . B_s) exp(a_{s+1} + ... + a_l) x_s
    decay = torch.exp(_segsum(a))  # [b, h, c, l, s]
    scores = torch.einsum("bclhn,bcshn->bclsh", C, B) * decay.permute(0, 2, 3, 4, 1)
    y = torch.einsum("bclsh,bcshp->bclhp", scores, x)
    # each chunk's own contribution to the state at its end
    to_end = torch.exp(a_cum[..., -1:] - a_cum)  # [b, h, c, l]
    states = torch.einsum("bclhn,bclhp->bchpn", B * to_end.permute(0, 2, 3, 1)[..., None], x)
    # the state entering each chunk: the previous ones' (and the initial state), decayed across chunks
    init = state.float()[:, None] if state is not None else torch.zeros_like(states[:, :1])
    states = torch.cat([init, states], dim=1)  # [b, c + 1, h, p, n]
    across = torch.exp(_segsum(F.pad(a_cum[..., -1], (1, 0))))  # [b, h, c + 1 (to), c + 1 (from)]
    states = torch.einsum("bhzc,bchpn->bzhpn", across, states)
    states, final = states[:, :-1], states[:, -1]
    # what the state entering a chunk gives each of its positions
    y = y + torch.einsum("bclhn,bchpn->bclhp", C, states) * torch.exp(a_cum).permute(0, 2, 3, 1)[..., None]
    return y.reshape(b, -1, h, p)[:, :T], final


def ssd_step(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2's recurrence for one token: h = exp(dt A) h + dt x B^T, y = h C.

    x [b, h, p]; dt [b, h]; A [h]; B, C [b, g, n]; state [b, h, p, n] (float32) or None
    -> y [b, h, p] (float32, without the D skip), the new state."""
    rep = x.shape[1] // B.shape[1]
    B = B.float().repeat_interleave(rep, dim=1)  # [b, h, n]
    C = C.float().repeat_interleave(rep, dim=1)
    dt = dt.float()
    h = state.float() if state is not None else x.new_zeros(*x.shape, B.shape[-1], dtype=torch.float32)
    h = h * torch.exp(dt * A)[..., None, None] + (dt[..., None] * x.float())[..., None] * B[:, :, None, :]
    return torch.matmul(h, C[..., None])[..., 0], h


class GatedRMSNorm(nn.Module):
    """Mamba-2's output norm: RMSNorm over groups of channels of x * silu(gate), in float32, then
    scaled (transformers' MambaRMSNormGated)."""

    def __init__(self, dim: int, groups: int, eps: float, vb: VarBuilder):
        super().__init__()
        self.weight = nn.Parameter(vb.get((dim,), "weight"), requires_grad=False)
        self.groups, self.eps = groups, eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float() * F.silu(gate.float())
        g = h.view(*h.shape[:-1], self.groups, -1)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * g.view(h.shape).to(dtype)


def read_state(step, layer: int, batch: int) -> tuple[torch.Tensor, ...] | None:
    """Layer `layer`'s state for this forward's rows from the step's cache; None (zeros) without a
    cache, or for a fresh forward (every row starts at position 0)."""
    c = step.cache
    if c is None or step.fresh:
        return None
    return c.state(layer, step.cache_rows or slice(0, batch))


def write_state(step, layer: int, batch: int, *new: torch.Tensor) -> None:
    """Store layer `layer`'s new state in the step's cache (rows idling on the scratch position keep theirs)."""
    if step.cache is not None:
        step.cache.write_state(layer, step.cache_rows or slice(0, batch), step.position_ids, *new)
