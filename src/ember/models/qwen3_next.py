"""Qwen3-Next and the text decoders of Qwen3.5 / Qwen3.5-MoE: a hybrid of gated DeltaNet layers ("linear_attention") and gated full-attention layers
("full_attention", one in four in the released models), over Qwen2-MoE's sparse MoE with a gated
shared expert (or a dense MLP where `mlp_only_layers` / `decoder_sparse_step` say).

- Gated DeltaNet (`GatedDeltaNet`): q/k/v and the output gate z from one projection (`in_proj_qkvz`,
  grouped per key head), b (the write strength) and a (the decay) from another (`in_proj_ba`); a
  short causal convolution over q/k/v (its last inputs are state), then the gated delta rule on a
  [value heads, key dim, value dim] float32 matrix per row: S <- exp(g) S + k (beta (v - S^T k))^T,
  output S^T q; q and k L2-normalised, q scaled by 1/sqrt(key dim). The output is RMS-normalised per
  head and multiplied by silu(z) before `out_proj`.
- Full attention: q/k RMSNorm per head, partial rotary, and q_proj twice as wide: each head's query
  followed by a gate; the attention output is multiplied by sigmoid(gate) before `o_proj`.
- Every RMSNorm scales by (1 + weight) in float32 (zero-centred weights), the gated one excepted.

The cache is a StateCache (ember.nn.state_cache): keys and values for the attention layers, the
conv window and the delta-rule matrix for the DeltaNet layers. The recurrence runs token by token
(prefill too): exact, and what a single decode step needs.

Qwen3.5 differs in storage only: four DeltaNet projections (in_proj_qkv, in_proj_z, in_proj_b,
in_proj_a, heads in order rather than grouped), dense MLPs (qwen3_5_text) or the same MoE
(qwen3_5_moe_text), and M-RoPE sections that reduce to plain rotary for text (every section gets
the same position).

Reference: transformers/models/qwen3_next/modeling_qwen3_next.py, qwen3_5/modeling_qwen3_5.py (torch_recurrent_gated_delta_rule,
Qwen3NextGatedDeltaNet, Qwen3NextAttention).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..nn import RMSNorm, apply_rotary, attention, linear
from ..nn.ssm import CausalConv, padding_zeroed, read_state, write_state
from ..varbuilder import VarBuilder
from . import llama, mixtral
from .base import CausalLM, Step, tied_or_own_head

LINEAR, FULL = "linear_attention", "full_attention"
ZERO_CENTRED = dict(offset=1.0)


@dataclass
class Config(mixtral.Config):
    linear_num_value_heads: int = 32
    linear_num_key_heads: int = 16
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    full_attention_interval: int = 4

    def __post_init__(self):
        super().__post_init__()
        if self.layer_types is None:
            n = self.full_attention_interval if isinstance(self.full_attention_interval, int) else 4
            self.layer_types = [FULL if (i + 1) % max(n, 1) == 0 else LINEAR for i in range(self.num_hidden_layers)]

    def validate(self) -> None:
        super().validate()
        self._positive("linear_num_value_heads", "linear_num_key_heads", "linear_key_head_dim",
                       "linear_value_head_dim", "linear_conv_kernel_dim")
        self._require(self.linear_num_value_heads % self.linear_num_key_heads == 0,
                      f"linear_num_value_heads ({self.linear_num_value_heads}) must be a multiple of "
                      f"linear_num_key_heads ({self.linear_num_key_heads})")
        bad = [t for t in self.layer_types if t not in (LINEAR, FULL)]
        if bad:
            raise ConfigError(f"layer_types: {bad[0]!r:.40} is not a qwen3_next layer type ({LINEAR!r} or {FULL!r})")

    def layer_windows(self) -> list[int | None]:
        return [None] * self.num_hidden_layers


def gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                     state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [B, T, Hv, Dk] (already repeated to the value heads), v [B, T, Hv, Dv], g, beta [B, T, Hv],
    state [B, Hv, Dk, Dv] float32 or None (zeros) -> (out [B, T, Hv, Dv] float32, the final state).
    q and k are L2-normalised here, q scaled by Dk ** -0.5, all in float32."""
    q, k, v, g, beta = (t.float() for t in (q, k, v, g, beta))
    q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6) * q.shape[-1] ** -0.5
    k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    B, T, H, Dk = k.shape
    S = state.float() if state is not None else k.new_zeros(B, H, Dk, v.shape[-1])
    decay = g.exp()
    out = []
    for t in range(T):
        S = S * decay[:, t, :, None, None]
        kt = k[:, t]  # [B, H, Dk]
        remembered = (S * kt[..., None]).sum(-2)  # S^T k: [B, H, Dv]
        delta = (v[:, t] - remembered) * beta[:, t, :, None]
        S = S + kt[..., None] * delta[..., None, :]
        out.append((S * q[:, t, :, :, None]).sum(-2))
    return torch.stack(out, dim=1), S


class GatedRMSNorm(nn.Module):
    """RMSNorm of x (per value head) times silu(gate): normalise in float32, cast back, scale by the
    weight, then the gate in float32 (transformers' Qwen3NextRMSNormGated)."""

    def __init__(self, dim: int, eps: float, vb: VarBuilder):
        super().__init__()
        self.weight = nn.Parameter(vb.get((dim,), "weight"), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        h = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)
        return (self.weight * h * F.silu(gate.float())).to(x.dtype)


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.kh, self.vh = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.dk, self.dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        key_dim, value_dim, E = self.kh * self.dk, self.vh * self.dv, cfg.hidden_size
        # Qwen3-Next stores q/k/v/z and b/a fused and grouped per key head; Qwen3.5 as four projections
        self.separate = vb.contains("in_proj_qkv.weight")
        if self.separate:
            self.in_proj_qkv = linear(E, 2 * key_dim + value_dim, vb.pp("in_proj_qkv"))
            self.in_proj_z = linear(E, value_dim, vb.pp("in_proj_z"))
            self.in_proj_b = linear(E, self.vh, vb.pp("in_proj_b"))
            self.in_proj_a = linear(E, self.vh, vb.pp("in_proj_a"))
        else:
            self.in_proj_qkvz = linear(E, 2 * key_dim + 2 * value_dim, vb.pp("in_proj_qkvz"))
            self.in_proj_ba = linear(E, 2 * self.vh, vb.pp("in_proj_ba"))
        self.conv1d = CausalConv(2 * key_dim + value_dim, cfg.linear_conv_kernel_dim, vb.pp("conv1d"), bias=False,
                                 act=cfg.hidden_act)
        self.dt_bias = nn.Parameter(vb.get((self.vh,), "dt_bias"), requires_grad=False)
        self.A_log = nn.Parameter(vb.get((self.vh,), "A_log"), requires_grad=False)
        self.norm = GatedRMSNorm(self.dv, cfg.rms_norm_eps, vb.pp("norm"))
        self.out_proj = linear(value_dim, E, vb.pp("out_proj"))

    def state_spec(self):
        """The conv window (the cache's dtype) and the delta-rule matrix [Hv, Dk, Dv] (float32)."""
        return ((self.conv1d.state_shape(), None), ((self.vh, self.dk, self.dv), torch.float32))

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(q|k|v [B, T, 2 kh dk + vh dv] as the conv takes them, z [B, T, vh, dv], b, a [B, T, vh])."""
        B, T, _ = x.shape
        kh, vh, dk, dv = self.kh, self.vh, self.dk, self.dv
        if self.separate:
            return (self.in_proj_qkv(x), self.in_proj_z(x).view(B, T, vh, dv), self.in_proj_b(x),
                    self.in_proj_a(x))
        per = vh // kh
        # grouped per key head: [q (dk), k (dk), v (per * dv), z (per * dv)] and [b (per), a (per)]
        q, k, v, z = self.in_proj_qkvz(x).view(B, T, kh, 2 * dk + 2 * per * dv).split(
            [dk, dk, per * dv, per * dv], dim=-1)
        ba = self.in_proj_ba(x).view(B, T, kh, 2 * per)
        mixed = torch.cat([q.reshape(B, T, -1), k.reshape(B, T, -1), v.reshape(B, T, -1)], dim=-1)
        return mixed, z.reshape(B, T, vh, dv), ba[..., :per].reshape(B, T, vh), ba[..., per:].reshape(B, T, vh)

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        B, T, _ = x.shape
        kh, vh, dk, dv = self.kh, self.vh, self.dk, self.dv
        per = vh // kh  # value heads per key head
        x = padding_zeroed(x, step.attention_mask)
        mixed, z, b, a = self._project(x)
        conv_state, S = read_state(step, self.layer_idx, B) or (None, None)
        mixed, conv_state = self.conv1d(mixed.transpose(1, 2), conv_state)
        q, k, v = mixed.transpose(1, 2).split([kh * dk, kh * dk, vh * dv], dim=-1)
        q = q.reshape(B, T, kh, dk).repeat_interleave(per, dim=2)
        k = k.reshape(B, T, kh, dk).repeat_interleave(per, dim=2)
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
        out, S = gated_delta_rule(q, k, v.reshape(B, T, vh, dv), g, b.sigmoid(), S)
        write_state(step, self.layer_idx, B, conv_state, S)
        out = self.norm(out.to(x.dtype), z)
        return self.out_proj(out.reshape(B, T, vh * dv))


class GatedAttention(nn.Module):
    """Full attention whose q_proj also gives a per-head output gate (see the module docstring)."""

    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int):
        super().__init__()
        self.layer_idx, self.window = layer_idx, None
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        H, KV, D, E = self.num_heads, self.num_kv_heads, self.head_dim, cfg.hidden_size
        bias = cfg.attention_bias
        self.qkv = llama.projections(E, {"q_proj": (2 * H * D, vb.pp("q_proj")), "k_proj": (KV * D, vb.pp("k_proj")),
                                         "v_proj": (KV * D, vb.pp("v_proj"))}, vb, "qkv_proj", bias=bias)
        self.o_proj = linear(H * D, E, vb.pp("o_proj"), bias=bias)
        self.q_norm = RMSNorm.from_vb(D, cfg.rms_norm_eps, vb.pp("q_norm"), **ZERO_CENTRED)
        self.k_norm = RMSNorm.from_vb(D, cfg.rms_norm_eps, vb.pp("k_norm"), **ZERO_CENTRED)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step: Step) -> torch.Tensor:
        B, T, _ = x.shape
        H, KV, D = self.num_heads, self.num_kv_heads, self.head_dim
        qg, k, v = self.qkv(x)
        q, gate = qg.view(B, T, H, 2 * D).chunk(2, dim=-1)
        q = self.q_norm(q).transpose(1, 2)
        k = self.k_norm(k.view(B, T, KV, D)).transpose(1, 2)
        v = v.view(B, T, KV, D).transpose(1, 2)
        q, k = apply_rotary(q, k, cos, sin)
        if step.cache is not None:
            k, v = step.cache.update(self.layer_idx, k, v, step.position_ids, step.kv_len, step.cache_rows,
                                     fresh=step.fresh)
        o = attention(q, k, v, step.mask(None)).transpose(1, 2).reshape(B, T, H * D)
        return self.o_proj(o * torch.sigmoid(gate.reshape(B, T, H * D)))


class DecoderLayer(mixtral.DecoderLayer):
    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int, window: int | None, fuse: bool = True):
        super().__init__(cfg, vb, layer_idx, window, fuse)
        self.input_layernorm = RMSNorm.from_vb(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("input_layernorm"),
                                               **ZERO_CENTRED)
        self.post_attention_layernorm = RMSNorm.from_vb(cfg.hidden_size, cfg.rms_norm_eps,
                                                        vb.pp("post_attention_layernorm"), **ZERO_CENTRED)

    def make_attention(self, cfg: Config, vb: VarBuilder, layer_idx: int, window: int | None, fuse: bool):
        self.linear_attn = None
        if cfg.layer_types[layer_idx] == LINEAR:
            self.linear_attn = GatedDeltaNet(cfg, vb.pp("linear_attn"), layer_idx)
            return None
        return GatedAttention(cfg, vb.pp("self_attn"), layer_idx)

    def state_spec(self):
        return self.linear_attn.state_spec() if self.linear_attn is not None else None

    def mix(self, x, cos, sin, step: Step):
        return self.linear_attn(x, step) if self.linear_attn is not None else self.self_attn(x, cos, sin, step)


class ForCausalLM(CausalLM):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        self.config = cfg
        self.model = llama.Model(cfg, vb.pp("model"), fuse, layer_cls=DecoderLayer, norm_kw=ZERO_CENTRED)
        self.lm_head = tied_or_own_head(vb, cfg, self.model.embed_tokens.weight, cfg.hidden_size, cfg.vocab_size)
