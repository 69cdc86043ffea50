"""OLMoE: Llama's pre-norm layers with RMSNorm over the whole q and k projections (as OLMo 2),
optional clamping of q, k and v to ±clip_qkv, and Mixtral's sparse MoE in every layer (softmax
top-k, renormalised only with norm_topk_prob).

Reference: transformers/models/olmoe/modeling_olmoe.py, configuration_olmoe.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import gguf_source as gguf
from ..nn import SparseMoE, activation, apply_rotary
from ..varbuilder import VarBuilder
from . import llama, mixtral
from .base import CausalLM, Step, tied_or_own_head


@dataclass
class Config(mixtral.Config):
    vocab_size: int = 50304
    hidden_size: int = 2048
    intermediate_size: int = 2048
    num_hidden_layers: int = 16
    num_attention_heads: int = 16
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    pad_token_id: int | None = 1
    eos_token_id: int | list | None = 50279
    num_experts: int | None = 64
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = False
    clip_qkv: float | None = None

    def validate(self) -> None:
        super().validate()
        self._positive("clip_qkv")


class Attention(llama.Attention):
    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int, window: int | None, fuse: bool = True):
        super().__init__(cfg, vb, layer_idx, window, fuse, qk_norm="full")
        self.clip = cfg.clip_qkv

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step: Step) -> torch.Tensor:
        if self.clip is None:
            return super().forward(x, cos, sin, step)
        B, T, _ = x.shape
        q, k, v = self.qkv(x)
        c = self.clip
        q, k, v = self.q_norm(q).clamp(-c, c), self.k_norm(k).clamp(-c, c), v.clamp(-c, c)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, k, cos, sin)
        return self._attend(q, k, v, step, B, T)


class DecoderLayer(llama.DecoderLayer):
    def make_attention(self, cfg: Config, vb: VarBuilder, layer_idx: int, window: int | None, fuse: bool):
        return Attention(cfg, vb.pp("self_attn"), layer_idx, window, fuse)

    def make_mlp(self, cfg: Config, vb: VarBuilder, layer_idx: int, fuse: bool) -> nn.Module:
        return SparseMoE.from_vb(vb.pp("mlp"), cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size,
                                 cfg.num_experts_per_tok, cfg.norm_topk_prob, activation(cfg.hidden_act))


class ForCausalLM(CausalLM):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        self.config = cfg
        self.model = llama.Model(cfg, vb.pp("model"), fuse, layer_cls=DecoderLayer)
        self.lm_head = tied_or_own_head(vb, cfg, self.model.embed_tokens.weight, cfg.hidden_size, cfg.vocab_size)


# ---- GGUF (llama.cpp's olmoe: experts stacked per projection; the top k never renormalised) ------
def _gguf_olmoe(meta: gguf.Meta) -> dict:
    cfg = gguf.decoder_config(meta, "olmoe")
    cfg.update(gguf.moe_config(meta))
    cfg["num_experts"] = cfg["num_local_experts"]
    return cfg


GGUF = {"olmoe": gguf.GGUFMapping(_gguf_olmoe, layer={**gguf.LLAMA_LAYER, **gguf.MOE_LAYER})}
