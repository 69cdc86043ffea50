"""Cohere (Command-R) and Cohere 2 (Command R7B, Command A): one LayerNorm without bias (mean-
centred, float32) before attention and MLP run in parallel on its output (x + attn(n) + mlp(n)),
rotary over adjacent pairs, logits multiplied by `logit_scale`, a tied head. Cohere optionally
LayerNorms q and k per head with a weight per head (`use_qk_norm`); Cohere 2 has sliding layers
(`layer_types`, or every `sliding_window_pattern`-th layer full) with rotary positions, and full
layers without (NoPE).

Reference: transformers/models/cohere/modeling_cohere.py, cohere2/modeling_cohere2.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import gguf_source as gguf
from ..nn import LayerNorm, apply_rotary_interleaved
from ..varbuilder import VarBuilder
from . import llama
from .base import CausalLM, Step, tied_or_own_head


@dataclass
class Config(llama.Config):
    vocab_size: int = 256000
    hidden_size: int = 8192
    intermediate_size: int = 22528
    num_hidden_layers: int = 40
    num_attention_heads: int = 64
    max_position_embeddings: int = 8192
    layer_norm_eps: float = 1e-5
    logit_scale: float = 0.0625
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | list | None = 5
    eos_token_id: int | list | None = 255001
    use_qk_norm: bool = False
    sliding_window_pattern: int = 4
    cohere2: bool = False  # set by the cohere2 registry entry: sliding layers, NoPE full layers

    def __post_init__(self):
        super().__post_init__()
        self.head_dim = self.hidden_size // self.num_attention_heads if self.num_attention_heads else None
        n, p = self.num_hidden_layers, self.sliding_window_pattern
        if not self.cohere2:
            self.sliding_window = None
        elif self.layer_types is None and isinstance(n, int) and 0 <= n <= 1 << 16 and p > 0:
            self.layer_types = ["sliding_attention" if (i + 1) % p else "full_attention" for i in range(n)]

    def validate(self) -> None:
        self._head_dim_divides_hidden()
        self._positive("layer_norm_eps", "sliding_window_pattern")
        super().validate()
        self._require(self.logit_scale != 0, "logit_scale must not be 0")


class HeadNorm(nn.Module):
    """LayerNorm over each head's dims with a weight per head ([heads, head_dim]), in float32."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(weight, requires_grad=False), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, T, heads, head_dim]
        return (F.layer_norm(x.float(), x.shape[-1:], None, None, self.eps) * self.weight.float()).to(x.dtype)


class Attention(llama.Attention):
    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int, window: int | None, fuse: bool = True):
        super().__init__(cfg, vb, layer_idx, window, fuse, interleaved=True)
        self.rotary = not cfg.cohere2 or window is not None
        self.head_norm = cfg.use_qk_norm
        if self.head_norm:
            H, KV, D = self.num_heads, self.num_kv_heads, self.head_dim
            self.q_norm = HeadNorm(vb.get((H, D), "q_norm.weight"), cfg.layer_norm_eps)
            self.k_norm = HeadNorm(vb.get((KV, D), "k_norm.weight"), cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step: Step) -> torch.Tensor:
        if not self.head_norm:
            return super().forward(x, cos, sin, step)
        B, T, _ = x.shape
        q, k, v = self.qkv(x)
        q = self.q_norm(q.view(B, T, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(k.view(B, T, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.rotary:
            q, k = apply_rotary_interleaved(q, k, cos, sin)
        return self._attend(q, k, v, step, B, T)


def layer_norm(cfg: Config, vb: VarBuilder) -> LayerNorm:
    return LayerNorm.from_vb(cfg.hidden_size, cfg.layer_norm_eps, vb, bias=False)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int, window: int | None, fuse: bool = True):
        super().__init__()
        self.self_attn = Attention(cfg, vb.pp("self_attn"), layer_idx, window, fuse)
        self.mlp = llama.MLP(cfg, vb.pp("mlp"), fuse)
        self.input_layernorm = layer_norm(cfg, vb.pp("input_layernorm"))

    def forward(self, x, cos, sin, step: Step):
        n = self.input_layernorm(x)
        return x + self.self_attn(n, cos, sin, step) + self.mlp(n)


class Model(llama.Model):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__(cfg, vb, fuse, layer_cls=DecoderLayer)
        self.norm = layer_norm(cfg, vb.pp("norm"))


class ForCausalLM(CausalLM):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        self.config = cfg
        self.model = Model(cfg, vb.pp("model"), fuse)
        self.lm_head = tied_or_own_head(vb, cfg, self.model.embed_tokens.weight, cfg.hidden_size, cfg.vocab_size)
        self.logits_scaling = 1.0 / cfg.logit_scale


# ---- GGUF (llama.cpp's command-r and cohere2: parallel blocks, one LayerNorm, tied head) ----------
COHERE_LAYER = {k: v for k, v in gguf.LLAMA_LAYER.items() if k != "ffn_norm"}


def _gguf_cohere(meta: gguf.Meta, model_type: str = "cohere") -> dict:
    cfg = gguf.decoder_config(meta, model_type)
    del cfg["rms_norm_eps"]
    cfg["layer_norm_eps"] = float(meta.need("attention.layer_norm_epsilon", kind=(int, float)))
    scale = meta.get("logit_scale", kind=(int, float))
    if scale is not None:
        cfg["logit_scale"] = float(scale)
    cfg["use_qk_norm"] = "blk.0.attn_q_norm.weight" in meta.names
    return cfg


def _gguf_cohere2(meta: gguf.Meta) -> dict:
    cfg = _gguf_cohere(meta, "cohere2")
    cfg["sliding_window"] = meta.need("attention.sliding_window")  # every 4th layer full (llama.cpp's pattern)
    return cfg


GGUF = {"command-r": gguf.GGUFMapping(_gguf_cohere, layer=COHERE_LAYER),
        "cohere2": gguf.GGUFMapping(_gguf_cohere2, layer=COHERE_LAYER)}
