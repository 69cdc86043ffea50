"""Phi (Phi-1, Phi-1.5, Phi-2): one LayerNorm per layer feeding attention and MLP in parallel
(x + attn(ln(x)) + mlp(ln(x))), biases everywhere, partial rotary (partial_rotary_factor, 0.5 by
default), the attention output projection named `dense`, a GELU MLP fc1/fc2, optional LayerNorm
over each head of q and k (qk_layernorm), a final LayerNorm, and an lm_head with a bias (which
stays the head's own when the weight is tied to the embeddings).

Reference: transformers/models/phi/modeling_phi.py, configuration_phi.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import DecoderConfig
from ..nn import Embedding, FusedLinears, LayerNorm, Linear, activation, apply_rotary, attention, linear, rotary_from_config
from ..varbuilder import VarBuilder
from .base import CausalLM, Step
from .llama import check_partial_rotary


@dataclass
class Config(DecoderConfig):
    vocab_size: int = 51200
    hidden_size: int = 2048
    intermediate_size: int = 8192
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    hidden_act: str = "gelu_new"
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    rope_theta: float | None = None
    rope_scaling: dict | None = None
    rope_parameters: dict | None = None
    partial_rotary_factor: float | None = None  # 0.5 when neither here nor in rope_parameters
    qk_layernorm: bool = False
    bos_token_id: int | list | None = 1
    eos_token_id: int | list | None = 2
    pad_token_id: int | None = None

    def validate(self) -> None:
        super().validate()
        self._positive("intermediate_size")
        self._positive("layer_norm_eps", allow_zero=True)
        check_partial_rotary(self)
        activation(self.hidden_act)

    def rope_config(self) -> dict:
        """The config dict for the rotary table; partial_rotary_factor as the reference resolves it:
        rope_parameters' own, else the top-level key, else 0.5."""
        prf = self.partial_rotary_factor if self.partial_rotary_factor is not None else 0.5
        return {**self.raw, "partial_rotary_factor": prf}


class Attention(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int, fuse: bool = True):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        H, KV, D, E = self.num_heads, self.num_kv_heads, self.head_dim, cfg.hidden_size
        self.qkv = FusedLinears(E, {"q_proj": (H * D, vb.pp("q_proj")), "k_proj": (KV * D, vb.pp("k_proj")),
                                    "v_proj": (KV * D, vb.pp("v_proj"))}, bias=True, fuse=fuse)
        self.dense = linear(H * D, E, vb.pp("dense"), bias=True)
        if cfg.qk_layernorm:  # the reference sizes these hidden_size // num_attention_heads
            n = cfg.hidden_size // cfg.num_attention_heads
            self.q_layernorm = LayerNorm.from_vb(n, cfg.layer_norm_eps, vb.pp("q_layernorm"))
            self.k_layernorm = LayerNorm.from_vb(n, cfg.layer_norm_eps, vb.pp("k_layernorm"))
        else:
            self.q_layernorm = self.k_layernorm = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step: Step) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x)
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_layernorm is not None:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q, k = apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # partial: leading dims only
        if step.cache is not None:
            k, v = step.cache.update(self.layer_idx, k, v, step.position_ids, step.kv_len, step.cache_rows)
        o = attention(q, k, v, step.mask())
        return self.dense(o.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder):
        super().__init__()
        self.fc1 = linear(cfg.hidden_size, cfg.intermediate_size, vb.pp("fc1"), bias=True)
        self.fc2 = linear(cfg.intermediate_size, cfg.hidden_size, vb.pp("fc2"), bias=True)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int, fuse: bool = True):
        super().__init__()
        self.self_attn = Attention(cfg, vb.pp("self_attn"), layer_idx, fuse)
        self.mlp = MLP(cfg, vb.pp("mlp"))
        self.input_layernorm = LayerNorm.from_vb(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("input_layernorm"))

    def forward(self, x, cos, sin, step: Step):
        h = self.input_layernorm(x)
        return self.self_attn(h, cos, sin, step) + self.mlp(h) + x


class Model(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        self.embed_tokens = Embedding.from_vb(cfg.vocab_size, cfg.hidden_size, vb.pp("embed_tokens"))
        self.layers = nn.ModuleList(DecoderLayer(cfg, vb.pp(f"layers.{i}"), i, fuse) for i in range(cfg.num_hidden_layers))
        self.final_layernorm = LayerNorm.from_vb(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("final_layernorm"))
        self.rotary = rotary_from_config(cfg.rope_config(), cfg.head_dim, cfg.max_position_embeddings, device=vb.device)

    def forward(self, input_ids: torch.Tensor, step: Step) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(step.position_ids, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, step)
        return self.final_layernorm(x)


class ForCausalLM(CausalLM):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        self.config = cfg
        self.model = Model(cfg, vb.pp("model"), fuse)
        bias = vb.get((cfg.vocab_size,), "lm_head.bias")
        if cfg.tie_word_embeddings:
            self.lm_head = Linear(self.model.embed_tokens.weight, bias)
        else:
            self.lm_head = linear(cfg.hidden_size, cfg.vocab_size, vb.pp("lm_head"), bias=True)
