"""GPT-J: attention and MLP in parallel on one LayerNorm (x + attn(ln_1(x)) + mlp(ln_1(x))), rotary
over the first `rotary_dim` dims of each head in adjacent pairs, q/k/v/out without bias, a GELU MLP
(fc_in, fc_out) with biases, an untied head with a bias.

Reference: transformers/models/gptj/modeling_gptj.py, configuration_gptj.py.
Weights: transformer.wte, transformer.h.N.{ln_1, attn.{q,k,v,out}_proj, mlp.fc_in/fc_out}, transformer.ln_f, lm_head.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from ..nn import Embedding, FusedLinears, LayerNorm, activation, apply_rotary_interleaved, attention, linear
from ..nn.rope import RotaryEmbedding, rope_parameters
from ..varbuilder import VarBuilder
from .base import CausalLM, Step, tied_or_own_head


@dataclass
class Config(ModelConfig):
    vocab_size: int = 50400
    n_positions: int = 2048
    n_embd: int = 4096
    n_layer: int = 28
    n_head: int = 16
    rotary_dim: int | None = 64
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = False
    bos_token_id: int | list | None = 50256
    eos_token_id: int | list | None = 50256
    pad_token_id: int | None = None

    # the names the rest of ember reads
    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    @property
    def max_position_embeddings(self) -> int:
        return self.n_positions

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def validate(self) -> None:
        self._positive("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "rotary_dim")
        self._positive("layer_norm_epsilon", allow_zero=True)
        self._require(self.n_embd % self.n_head == 0, f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        r = self.rotary_dim
        self._require(r is None or (r <= self.head_dim and r % 2 == 0),
                      f"rotary_dim ({r}) must be even and at most the head dim ({self.head_dim})")
        activation(self.activation_function)


class Attention(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int, fuse: bool = True):
        super().__init__()
        E = cfg.n_embd
        self.layer_idx, self.window = layer_idx, None
        self.num_heads = self.num_kv_heads = cfg.n_head
        self.head_dim = cfg.head_dim
        self.qkv = FusedLinears(E, {n: (E, vb.pp(n)) for n in ("q_proj", "k_proj", "v_proj")}, fuse=fuse)
        self.out_proj = linear(E, E, vb.pp("out_proj"))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step: Step) -> torch.Tensor:
        B, T, E = x.shape
        q, k, v = (t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2) for t in self.qkv(x))
        q, k = apply_rotary_interleaved(q, k, cos, sin)
        if step.cache is not None:
            k, v = step.cache.update(self.layer_idx, k, v, step.position_ids, step.kv_len, step.cache_rows,
                                     fresh=step.fresh)
        o = attention(q, k, v, step.mask())
        return self.out_proj(o.transpose(1, 2).reshape(B, T, E))


class Block(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int, fuse: bool = True):
        super().__init__()
        E, inner = cfg.n_embd, cfg.n_inner or 4 * cfg.n_embd
        self.ln_1 = LayerNorm.from_vb(E, cfg.layer_norm_epsilon, vb.pp("ln_1"))
        self.self_attn = Attention(cfg, vb.pp("attn"), layer_idx, fuse)  # named for cache_layout()
        self.fc_in = linear(E, inner, vb.pp("mlp.fc_in"), bias=True)
        self.fc_out = linear(inner, E, vb.pp("mlp.fc_out"), bias=True)
        self.act = activation(cfg.activation_function)

    def forward(self, x: torch.Tensor, cos, sin, step: Step) -> torch.Tensor:
        n = self.ln_1(x)
        return self.self_attn(n, cos, sin, step) + self.fc_out(self.act(self.fc_in(n))) + x


class Model(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        self.wte = Embedding.from_vb(cfg.vocab_size, cfg.n_embd, vb.pp("wte"))
        self.layers = nn.ModuleList(Block(cfg, vb.pp(f"h.{i}"), i, fuse) for i in range(cfg.n_layer))
        self.ln_f = LayerNorm.from_vb(cfg.n_embd, cfg.layer_norm_epsilon, vb.pp("ln_f"))
        # GPT-J's sinusoidal table: base 10000, no scaling
        self.rotary = RotaryEmbedding(cfg.head_dim, rope_parameters({}), cfg.n_positions,
                                      rotary_dim=cfg.rotary_dim or cfg.head_dim).to(vb.device)

    def forward(self, input_ids: torch.Tensor, step: Step) -> torch.Tensor:
        x = self.wte(input_ids)
        cos, sin = self.rotary(step.position_ids, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, step)
        return self.ln_f(x)


class ForCausalLM(CausalLM):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        self.config = cfg
        self.model = Model(cfg, vb.pp("transformer"), fuse)
        if cfg.tie_word_embeddings or not vb.contains("lm_head.weight"):
            self.lm_head = tied_or_own_head(vb, cfg, self.model.wte.weight, cfg.n_embd, cfg.vocab_size)
        else:
            self.lm_head = linear(cfg.n_embd, cfg.vocab_size, vb.pp("lm_head"), bias=None)
