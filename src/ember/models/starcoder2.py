"""StarCoder2: Mistral-style attention (GQA, sliding window) with biases, LayerNorm, and a plain
GELU MLP (`c_fc` / `c_proj`).

Reference: transformers/models/starcoder2/modeling_starcoder2.py. The attention is Llama's
(`ember.models.llama.Attention`, q/k/v fused at load) with `use_bias` on all four projections.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import DecoderConfig
from ..nn import Embedding, LayerNorm, activation, linear, rotary_from_config
from ..varbuilder import VarBuilder
from . import llama
from .base import CausalLM, Step, tied_or_own_head


@dataclass
class Config(DecoderConfig):
    vocab_size: int = 49152
    hidden_size: int = 3072
    intermediate_size: int = 12288
    num_hidden_layers: int = 30
    num_attention_heads: int = 24
    num_key_value_heads: int | None = 2
    hidden_act: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 4096
    norm_epsilon: float = 1e-5
    rope_theta: float | None = None
    rope_scaling: dict | None = None
    rope_parameters: dict | None = None
    sliding_window: int | None = None
    use_bias: bool = True  # (the registry maps it onto attention_bias)
    attention_bias: bool = True
    tie_word_embeddings: bool = True
    bos_token_id: int | list | None = 50256
    eos_token_id: int | list | None = 50256
    pad_token_id: int | None = None

    def validate(self) -> None:
        super().validate()
        self._positive("intermediate_size", "sliding_window")
        self._positive("norm_epsilon", allow_zero=True)
        activation(self.hidden_act)


class MLP(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder):
        super().__init__()
        self.c_fc = linear(cfg.hidden_size, cfg.intermediate_size, vb.pp("c_fc"), bias=cfg.use_bias)
        self.c_proj = linear(cfg.intermediate_size, cfg.hidden_size, vb.pp("c_proj"), bias=cfg.use_bias)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int, fuse: bool = True):
        super().__init__()
        E, eps = cfg.hidden_size, cfg.norm_epsilon
        self.self_attn = llama.Attention(cfg, vb.pp("self_attn"), layer_idx, cfg.sliding_window, fuse)
        self.mlp = MLP(cfg, vb.pp("mlp"))
        self.input_layernorm = LayerNorm.from_vb(E, eps, vb.pp("input_layernorm"))
        self.post_attention_layernorm = LayerNorm.from_vb(E, eps, vb.pp("post_attention_layernorm"))

    def forward(self, x, cos, sin, step: Step):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, step)
        return x + self.mlp(self.post_attention_layernorm(x))


class Model(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        self.embed_tokens = Embedding.from_vb(cfg.vocab_size, cfg.hidden_size, vb.pp("embed_tokens"))
        self.layers = nn.ModuleList(DecoderLayer(cfg, vb.pp(f"layers.{i}"), i, fuse) for i in range(cfg.num_hidden_layers))
        self.norm = LayerNorm.from_vb(cfg.hidden_size, cfg.norm_epsilon, vb.pp("norm"))
        self.rotary = rotary_from_config(cfg.raw, cfg.head_dim, cfg.max_position_embeddings, device=vb.device)

    def forward(self, input_ids: torch.Tensor, step: Step) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(step.position_ids, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, step)
        return self.norm(x)


class ForCausalLM(CausalLM):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        self.config = cfg
        self.model = Model(cfg, vb.pp("model"), fuse)
        self.lm_head = tied_or_own_head(vb, cfg, self.model.embed_tokens.weight, cfg.hidden_size, cfg.vocab_size)
