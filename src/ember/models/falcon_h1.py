"""Falcon-H1: every layer runs a Mamba-2 mixer and attention side by side on the same normed input
and adds both outputs to the residual, then a SwiGLU MLP; µP multipliers throughout.

- Mixer (`Mixer`, Mamba-2's with hooks): the input times `ssm_in_multiplier`, in_proj's output
  times the µP vector (`ssm_multipliers` for the z, x, B, C and dt parts); its own width
  (`mamba_d_ssm`); the gated group RMSNorm optional (`mamba_rms_norm`; without it the output is
  multiplied by silu(z)), normalising before or after the gate (`mamba_norm_before_gate`);
  out_proj's bias `projectors_bias`. Its output times `ssm_out_multiplier`.
- Attention: Llama's, on the input times `attention_in_multiplier`, keys times `key_multiplier`
  (the same as scaling the scores), output times `attention_out_multiplier`.
- MLP: down(up(x) * silu(gate(x) * g)) * d with `mlp_multipliers` = (g, d).
- Embeddings times `embedding_multiplier`, logits times `lm_head_multiplier`.

The cache is a StateCache with both keys/values and Mamba state in every layer.

Reference: transformers/models/falcon_h1/modeling_falcon_h1.py, configuration_falcon_h1.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import gguf_source as gguf
from ..nn import RMSNorm, activation, linear
from ..varbuilder import VarBuilder
from . import llama, mamba2
from .base import CausalLM, Step, tied_or_own_head


@dataclass
class Config(llama.Config):
    vocab_size: int = 128000
    intermediate_size: int = 14336
    num_key_value_heads: int | None = 8
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    mamba_d_ssm: int | None = 1024
    mamba_n_heads: int = 128
    mamba_d_head: int | str = "auto"
    mamba_n_groups: int = 1
    mamba_d_state: int = 256
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_chunk_size: int = 256
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    mamba_norm_before_gate: bool = True
    mamba_rms_norm: bool = False
    time_step_limit: list | None = None
    projectors_bias: bool = False
    lm_head_multiplier: float = 1.0
    mlp_multipliers: list | None = None
    key_multiplier: float = 1.0
    attention_out_multiplier: float = 1.0
    attention_in_multiplier: float = 1.0
    ssm_multipliers: list | None = None
    ssm_in_multiplier: float = 1.0
    ssm_out_multiplier: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if self.mamba_d_ssm is None and isinstance(self.mamba_expand, int):
            self.mamba_d_ssm = self.mamba_expand * self.hidden_size
        if self.mamba_d_head == "auto" and isinstance(self.mamba_d_ssm, int) and self.mamba_n_heads:
            self.mamba_d_head = self.mamba_d_ssm // self.mamba_n_heads
        self.mlp_multipliers = list(self.mlp_multipliers or (1.0, 1.0))
        self.ssm_multipliers = list(self.ssm_multipliers or (1.0,) * 5)

    def validate(self) -> None:
        super().validate()
        self._positive("mamba_d_ssm", "mamba_n_heads", "mamba_n_groups", "mamba_d_state", "mamba_d_conv",
                       "mamba_chunk_size")
        self._require(isinstance(self.mamba_d_head, int) and self.mamba_d_head * self.mamba_n_heads == self.mamba_d_ssm,
                      f"mamba_n_heads * mamba_d_head must equal mamba_d_ssm ({self.mamba_d_ssm}), got "
                      f"{self.mamba_n_heads} * {self.mamba_d_head!r:.20}")
        for name, n in (("mlp_multipliers", 2), ("ssm_multipliers", 5)):
            v = getattr(self, name)
            self._require(len(v) == n and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v),
                          f"{name} must list {n} numbers, got {v!r:.60}")
        self.mamba_dims().validate(self)

    def mamba_dims(self) -> mamba2.Dims:
        limit = mamba2._limit(self, self.time_step_limit) if self.time_step_limit is not None else None
        return mamba2.Dims(self.hidden_size, self.mamba_n_heads, self.mamba_d_head, self.mamba_d_state,
                           self.mamba_n_groups, self.mamba_d_conv, self.mamba_chunk_size, self.mamba_proj_bias,
                           self.mamba_conv_bias, self.hidden_act, self.rms_norm_eps, limit)


class Mixer(mamba2.Mixer):
    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int):
        super().__init__(cfg.mamba_dims(), vb, layer_idx, norm=cfg.mamba_rms_norm, out_bias=cfg.projectors_bias)
        d = self.d
        self.norm_before_gate = cfg.mamba_norm_before_gate
        self.in_multiplier = cfg.ssm_in_multiplier
        z, x, b, c, dt = cfg.ssm_multipliers
        gn = d.groups * d.state
        mup = torch.cat([torch.full((n,), float(m)) for n, m in ((d.inner, z), (d.inner, x), (gn, b), (gn, c),
                                                                  (d.heads, dt))])
        self.register_buffer("mup", mup.to(self.in_proj.weight.device), persistent=False)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.in_proj(x * self.in_multiplier) * self.mup.to(x.dtype)

    def gated(self, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        if self.norm is None:
            return y * F.silu(gate)
        if not self.norm_before_gate:
            return self.norm(y, gate)
        # normalise per group, scale (in float32), then the gate
        h = y.float()
        g = h.view(*h.shape[:-1], self.norm.groups, -1)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.norm.eps)
        return (self.norm.weight.float() * g.view(h.shape) * F.silu(gate.float())).to(y.dtype)


class MLP(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        E, F_ = cfg.hidden_size, cfg.intermediate_size
        self.gate_up = llama.projections(E, {"gate_proj": (F_, vb.pp("gate_proj")), "up_proj": (F_, vb.pp("up_proj"))},
                                         vb, "gate_up_proj", bias=cfg.mlp_bias, fuse=fuse)
        self.down_proj = linear(F_, E, vb.pp("down_proj"), bias=cfg.mlp_bias)
        self.act = activation(cfg.hidden_act)
        self.gate_multiplier, self.down_multiplier = cfg.mlp_multipliers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_up(x)
        return self.down_proj(u * self.act(g * self.gate_multiplier)) * self.down_multiplier


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int, window: int | None, fuse: bool = True):
        super().__init__()
        self.mamba = Mixer(cfg, vb.pp("mamba"), layer_idx)
        self.self_attn = llama.Attention(cfg, vb.pp("self_attn"), layer_idx, None, fuse,
                                         scale=cfg.head_dim ** -0.5 * cfg.key_multiplier)
        self.feed_forward = MLP(cfg, vb.pp("feed_forward"), fuse)
        self.input_layernorm = RMSNorm.from_vb(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("input_layernorm"))
        self.pre_ff_layernorm = RMSNorm.from_vb(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("pre_ff_layernorm"))
        self.ssm_out, self.attn_in, self.attn_out = (cfg.ssm_out_multiplier, cfg.attention_in_multiplier,
                                                     cfg.attention_out_multiplier)

    def state_spec(self):
        return self.mamba.state_spec()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step: Step) -> torch.Tensor:
        h = self.input_layernorm(x)
        both = self.mamba(h, step) * self.ssm_out + self.self_attn(h * self.attn_in, cos, sin, step) * self.attn_out
        x = x + both
        return x + self.feed_forward(self.pre_ff_layernorm(x))


class Model(llama.Model):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        # transformers calls the final norm final_layernorm
        super().__init__(cfg, vb.rename({"model.norm": "model.final_layernorm"}), fuse, layer_cls=DecoderLayer)


class ForCausalLM(CausalLM):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        self.config = cfg
        self.model = Model(cfg, vb.pp("model"), fuse)
        self.lm_head = tied_or_own_head(vb, cfg, self.model.embed_tokens.weight, cfg.hidden_size, cfg.vocab_size)
        self.logits_scaling = 1.0 / cfg.lm_head_multiplier


# ---- GGUF (llama.cpp's falcon-h1: every µP multiplier already folded into the weights) ------------
def _gguf_config(meta: gguf.Meta) -> dict:
    cfg = gguf.decoder_config(meta, "falcon_h1", head_dim=gguf.head_dim(meta))
    d = mamba2.ssm_dims(meta)
    cfg.update(mamba_d_ssm=d["inner"], mamba_n_heads=d["heads"], mamba_d_head=d["head_dim"], mamba_d_state=d["state"],
               mamba_n_groups=d["groups"], mamba_d_conv=d["conv"],
               mamba_conv_bias="blk.0.ssm_conv1d.bias" in meta.names, mamba_proj_bias="blk.0.ssm_in.bias" in meta.names,
               projectors_bias="blk.0.ssm_out.bias" in meta.names, mlp_bias="blk.0.ffn_up.bias" in meta.names,
               # llama.cpp gates then normalises (when the file has the norm), with no dt clamp
               mamba_rms_norm="blk.0.ssm_norm.weight" in meta.names, mamba_norm_before_gate=False)
    return cfg


_TABLE, _DERIVED = mamba2.mixer_gguf("mamba")
GGUF = {"falcon-h1": gguf.GGUFMapping(
    _gguf_config, top={"token_embd": "model.embed_tokens", "output_norm": "model.final_layernorm", "output": "lm_head"},
    layer={**gguf.LLAMA_LAYER, **_TABLE, "ffn_gate": "feed_forward.gate_proj", "ffn_up": "feed_forward.up_proj",
           "ffn_down": "feed_forward.down_proj"},
    # the converter writes the pre-MLP norm as `blk.N.ffn_norm`, without a .weight suffix
    derived=_DERIVED + (gguf.Derived("pre_ff_layernorm.weight", ("ffn_norm",), lambda p, cfg: p[0]),))}
