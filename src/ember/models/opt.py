"""OPT: learned positions offset by 2, LayerNorm before (or, OPT-350m, after) attention and the ReLU
MLP (fc1, fc2), biases everywhere (`enable_bias`), q scaled before the product, and an optional
projection between a narrower embedding (`word_embed_proj_dim`) and the hidden size.

Reference: transformers/models/opt/modeling_opt.py, configuration_opt.py.
Weights: model.decoder.{embed_tokens, embed_positions, project_in, project_out, final_layer_norm,
layers.N.{self_attn.{q,k,v,out}_proj, self_attn_layer_norm, fc1, fc2, final_layer_norm}}, lm_head.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import DecoderConfig
from ..nn import Embedding, FusedLinears, LayerNorm, activation, attention, linear
from ..varbuilder import VarBuilder
from .base import CausalLM, Step, tied_or_own_head

OFFSET = 2  # OPT's position table starts two rows in


@dataclass
class Config(DecoderConfig):
    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    ffn_dim: int = 3072
    max_position_embeddings: int = 2048
    do_layer_norm_before: bool = True
    _remove_final_layer_norm: bool = False
    word_embed_proj_dim: int | None = None
    activation_function: str = "relu"
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 1
    bos_token_id: int | list | None = 2
    eos_token_id: int | list | None = 2

    def validate(self) -> None:
        super().validate()
        self._head_dim_divides_hidden()
        self._positive("ffn_dim", "word_embed_proj_dim")
        activation(self.activation_function)


def layer_norm(cfg: Config, dim: int, vb: VarBuilder) -> LayerNorm:
    if not cfg.layer_norm_elementwise_affine:
        return LayerNorm(None, None, 1e-5)
    return LayerNorm.from_vb(dim, 1e-5, vb)


class Attention(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int, fuse: bool = True):
        super().__init__()
        E, b = cfg.hidden_size, cfg.enable_bias
        self.layer_idx, self.window = layer_idx, None
        self.num_heads = self.num_kv_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.scale = self.head_dim ** -0.5
        self.qkv = FusedLinears(E, {n: (E, vb.pp(n)) for n in ("q_proj", "k_proj", "v_proj")}, bias=b, fuse=fuse)
        self.out_proj = linear(E, E, vb.pp("out_proj"), bias=b)

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        B, T, E = x.shape
        q, k, v = (t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2) for t in self.qkv(x))
        if step.cache is not None:
            k, v = step.cache.update(self.layer_idx, k, v, step.position_ids, step.kv_len, step.cache_rows,
                                     fresh=step.fresh)
        o = attention(q * self.scale, k, v, step.mask(), scale=1.0)  # OPT scales q first
        return self.out_proj(o.transpose(1, 2).reshape(B, T, E))


class Layer(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int, fuse: bool = True):
        super().__init__()
        E = cfg.hidden_size
        self.pre = cfg.do_layer_norm_before
        self.self_attn = Attention(cfg, vb.pp("self_attn"), layer_idx, fuse)
        self.self_attn_layer_norm = layer_norm(cfg, E, vb.pp("self_attn_layer_norm"))
        self.fc1 = linear(E, cfg.ffn_dim, vb.pp("fc1"), bias=cfg.enable_bias)
        self.fc2 = linear(cfg.ffn_dim, E, vb.pp("fc2"), bias=cfg.enable_bias)
        self.final_layer_norm = layer_norm(cfg, E, vb.pp("final_layer_norm"))
        self.act = activation(cfg.activation_function)

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        if self.pre:
            x = x + self.self_attn(self.self_attn_layer_norm(x), step)
            return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))
        x = self.self_attn_layer_norm(x + self.self_attn(x, step))
        return self.final_layer_norm(x + self.fc2(self.act(self.fc1(x))))


class Model(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        E, P = cfg.hidden_size, cfg.word_embed_proj_dim or cfg.hidden_size
        self.embed_tokens = Embedding.from_vb(cfg.vocab_size, P, vb.pp("embed_tokens"))
        self.embed_positions = Embedding.from_vb(cfg.max_position_embeddings + OFFSET, E, vb.pp("embed_positions"))
        self.project_in = linear(P, E, vb.pp("project_in")) if P != E else None
        self.project_out = linear(E, P, vb.pp("project_out")) if P != E else None
        self.layers = nn.ModuleList(Layer(cfg, vb.pp(f"layers.{i}"), i, fuse) for i in range(cfg.num_hidden_layers))
        final = cfg.do_layer_norm_before and not cfg._remove_final_layer_norm
        self.final_layer_norm = layer_norm(cfg, E, vb.pp("final_layer_norm")) if final else None

    def forward(self, input_ids: torch.Tensor, step: Step) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.project_in is not None:
            x = self.project_in(x)
        x = x + self.embed_positions(step.position_ids + OFFSET)
        for layer in self.layers:
            x = layer(x, step)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        return self.project_out(x) if self.project_out is not None else x


class ForCausalLM(CausalLM):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        self.config = cfg
        self.model = Model(cfg, vb.pp("model.decoder"), fuse)
        P = cfg.word_embed_proj_dim or cfg.hidden_size
        self.lm_head = tied_or_own_head(vb, cfg, self.model.embed_tokens.weight, P, cfg.vocab_size)
