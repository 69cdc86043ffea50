"""Hunyuan dense V1: Llama with an RMSNorm over each head of q and k applied after the rotation
(`query_layernorm`, `key_layernorm`).

Reference: transformers/models/hunyuan_v1_dense/modeling_hunyuan_v1_dense.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import gguf_source as gguf
from ..nn import RMSNorm, apply_rotary
from ..varbuilder import VarBuilder
from . import llama
from .base import CausalLM, Step, tied_or_own_head


@dataclass
class Config(llama.Config):
    vocab_size: int = 290943
    rms_norm_eps: float = 1e-5
    pad_token_id: int | None = 0
    bos_token_id: int | list | None = 1
    eos_token_id: int | list | None = 2


class Attention(llama.Attention):
    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int, window: int | None, fuse: bool = True):
        super().__init__(cfg, vb, layer_idx, window, fuse)
        self.query_layernorm = RMSNorm.from_vb(self.head_dim, cfg.rms_norm_eps, vb.pp("query_layernorm"))
        self.key_layernorm = RMSNorm.from_vb(self.head_dim, cfg.rms_norm_eps, vb.pp("key_layernorm"))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step: Step) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, k, cos, sin)
        return self._attend(self.query_layernorm(q), self.key_layernorm(k), v, step, B, T)


class DecoderLayer(llama.DecoderLayer):
    def make_attention(self, cfg: Config, vb: VarBuilder, layer_idx: int, window: int | None, fuse: bool):
        return Attention(cfg, vb.pp("self_attn"), layer_idx, window, fuse)


class ForCausalLM(CausalLM):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        self.config = cfg
        self.model = llama.Model(cfg, vb.pp("model"), fuse, layer_cls=DecoderLayer)
        self.lm_head = tied_or_own_head(vb, cfg, self.model.embed_tokens.weight, cfg.hidden_size, cfg.vocab_size)


# ---- GGUF (llama.cpp's hunyuan-dense: the converter folds the dynamic-NTK alpha into freq_base) ---
def _gguf_hunyuan_dense(meta: gguf.Meta) -> dict:
    cfg = gguf.decoder_config(meta, "hunyuan_v1_dense", head_dim=gguf.head_dim(meta))
    cfg["attention_bias"] = "blk.0.attn_q.bias" in meta.names
    cfg.pop("rope_scaling", None)  # "none" with factor 1: the alpha is already in rope_theta
    return cfg


GGUF = {"hunyuan-dense": gguf.GGUFMapping(_gguf_hunyuan_dense, layer={
    **gguf.LLAMA_LAYER, "attn_q_norm": "self_attn.query_layernorm", "attn_k_norm": "self_attn.key_layernorm"})}
