"""Falcon (7B/40B/180B, Falcon 2/3 with the Falcon layout): rotary positions (ALiBi variants are
refused), a fused query_key_value in one of three layouts, LayerNorm, a GELU MLP, attention and MLP
in parallel (one or, with new_decoder_architecture, two input norms) or in sequence.

The fused projection is reordered once at load to [q (all heads); k; v]:
- new_decoder_architecture: per KV group [group's q heads, k, v] (grouped-query attention);
- multi_query: q heads then one k and one v head;
- otherwise: per head (q, k, v).

Reference: transformers/models/falcon/modeling_falcon.py, configuration_falcon.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import gguf_source as gguf
from ..config import DecoderConfig
from ..nn import Embedding, LayerNorm, activation, apply_rotary, attention, linear, linear_from_weight, rotary_from_config
from ..varbuilder import VarBuilder
from .base import CausalLM, Step, tied_or_own_head


@dataclass
class Config(DecoderConfig):
    vocab_size: int = 65024
    hidden_size: int = 4544
    num_hidden_layers: int = 32
    num_attention_heads: int = 71
    num_ln_in_parallel_attn: int | None = None
    layer_norm_epsilon: float = 1e-5
    num_kv_heads: int | None = None
    alibi: bool = False
    new_decoder_architecture: bool = False
    multi_query: bool = True
    parallel_attn: bool = True
    bias: bool = False
    ffn_hidden_size: int | None = None
    activation: str = "gelu"
    tie_word_embeddings: bool = True
    bos_token_id: int | list | None = 11
    eos_token_id: int | list | None = 11
    pad_token_id: int | None = None

    def __post_init__(self):
        kv = self.num_kv_heads if self.num_kv_heads is not None else self.num_attention_heads
        self.num_key_value_heads = kv if self.new_decoder_architecture or not self.multi_query else 1
        if self.new_decoder_architecture and self.num_ln_in_parallel_attn is None:
            self.num_ln_in_parallel_attn = 2
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        self._head_dim_divides_hidden()
        self._positive("ffn_hidden_size")
        self._require(not self.alibi, "Falcon with ALiBi (alibi: true) is not supported; rotary Falcon checkpoints are")
        self._require(self.num_ln_in_parallel_attn in (None, 1, 2), "num_ln_in_parallel_attn must be 1 or 2")
        activation(self.activation)


def _qkv_order(cfg: Config) -> torch.Tensor:
    """Row index (in units of head_dim) of the checkpoint's fused projection for [q; k; v]."""
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    if cfg.new_decoder_architecture:
        G = H // KV
        blocks = torch.arange(KV * (G + 2)).view(KV, G + 2)
        return torch.cat([blocks[:, :G].reshape(-1), blocks[:, G], blocks[:, G + 1]])
    if cfg.multi_query:
        return torch.arange(H + 2)
    return torch.arange(3 * H).view(H, 3).t().reshape(-1)


class Attention(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int):
        super().__init__()
        E, H, KV, D = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.layer_idx, self.window = layer_idx, None
        self.num_heads, self.num_kv_heads, self.head_dim = H, KV, D
        n = (H + 2 * KV) * D
        qkv = vb.pp("query_key_value")
        rows = (_qkv_order(cfg)[:, None] * D + torch.arange(D)).reshape(-1)
        w = qkv.get((n, E), "weight")[rows]
        b = qkv.get((n,), "bias")[rows] if cfg.bias else None
        self.query_key_value = linear_from_weight(w, b)
        self.dense = linear(H * D, E, vb.pp("dense"), bias=cfg.bias)

    def forward(self, x: torch.Tensor, cos, sin, step: Step) -> torch.Tensor:
        B, T, E = x.shape
        H, KV, D = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.query_key_value(x).split([H * D, KV * D, KV * D], dim=-1)
        q, k = apply_rotary(q.view(B, T, H, D).transpose(1, 2), k.view(B, T, KV, D).transpose(1, 2), cos, sin)
        v = v.view(B, T, KV, D).transpose(1, 2)
        if step.cache is not None:
            k, v = step.cache.update(self.layer_idx, k, v, step.position_ids, step.kv_len, step.cache_rows,
                                     fresh=step.fresh)
        o = attention(q, k, v, step.mask())
        return self.dense(o.transpose(1, 2).reshape(B, T, H * D))


class Layer(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int):
        super().__init__()
        E, eps = cfg.hidden_size, cfg.layer_norm_epsilon
        self.new, self.parallel = cfg.new_decoder_architecture, cfg.parallel_attn
        self.two_norms = self.new and cfg.num_ln_in_parallel_attn == 2
        self.self_attn = Attention(cfg, vb.pp("self_attention"), layer_idx)  # named for cache_layout()
        if self.two_norms:
            self.ln_attn = LayerNorm.from_vb(E, eps, vb.pp("ln_attn"))
            self.ln_mlp = LayerNorm.from_vb(E, eps, vb.pp("ln_mlp"))
        else:
            self.input_layernorm = LayerNorm.from_vb(E, eps, vb.pp("input_layernorm"))
        if not self.parallel:
            self.post_attention_layernorm = LayerNorm.from_vb(E, eps, vb.pp("post_attention_layernorm"))
        self.dense_h_to_4h = linear(E, cfg.ffn_hidden_size, vb.pp("mlp.dense_h_to_4h"), bias=cfg.bias)
        self.dense_4h_to_h = linear(cfg.ffn_hidden_size, E, vb.pp("mlp.dense_4h_to_h"), bias=cfg.bias)
        self.act = activation(cfg.activation)

    def forward(self, x: torch.Tensor, cos, sin, step: Step) -> torch.Tensor:
        a_in = self.ln_attn(x) if self.two_norms else self.input_layernorm(x)
        a = self.self_attn(a_in, cos, sin, step)
        if self.two_norms:
            m_in = self.ln_mlp(x)
        elif self.parallel:
            m_in = a_in
        else:  # sequential: the MLP reads the post-attention stream
            x = x + a
            m_in = self.post_attention_layernorm(x)
        m = self.dense_4h_to_h(self.act(self.dense_h_to_4h(m_in)))
        if self.new or self.parallel:
            m = m + a
        return m + x


class Model(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder):
        super().__init__()
        self.word_embeddings = Embedding.from_vb(cfg.vocab_size, cfg.hidden_size, vb.pp("word_embeddings"))
        self.layers = nn.ModuleList(Layer(cfg, vb.pp(f"h.{i}"), i) for i in range(cfg.num_hidden_layers))
        self.ln_f = LayerNorm.from_vb(cfg.hidden_size, cfg.layer_norm_epsilon, vb.pp("ln_f"))
        self.rotary = rotary_from_config(cfg.raw, cfg.head_dim, cfg.max_position_embeddings, device=vb.device)

    def forward(self, input_ids: torch.Tensor, step: Step) -> torch.Tensor:
        x = self.word_embeddings(input_ids)
        cos, sin = self.rotary(step.position_ids, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, step)
        return self.ln_f(x)


class ForCausalLM(CausalLM):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()  # query_key_value is fused in the checkpoint itself
        self.config = cfg
        self.model = Model(cfg, vb.pp("transformer"))
        self.lm_head = tied_or_own_head(vb, cfg, self.model.word_embeddings.weight, cfg.hidden_size, cfg.vocab_size)


# ---- GGUF (llama.cpp's falcon: 7B's single norm, or 40B's ln_attn / ln_mlp as attn_norm_2 /
# attn_norm; the converter regroups the fused QKV from KV groups to all q, all k, all v) ------------
def _gguf_falcon(meta: gguf.Meta) -> dict:
    heads = gguf.attention_heads(meta)
    kv = meta.get("attention.head_count_kv", 1, kind=int)
    if not 0 < kv <= heads or heads % kv:
        raise gguf.ConfigError(f"{meta.f.path}: falcon.attention.head_count_kv {kv!r:.40} must divide the "
                               f"{heads} heads")
    two_norms = "blk.0.attn_norm_2.weight" in meta.names
    return {"model_type": "falcon", "vocab_size": gguf.vocab_size(meta), "hidden_size": meta.need("embedding_length"),
            "num_hidden_layers": gguf.layer_count(meta), "num_attention_heads": heads, "num_kv_heads": kv,
            "new_decoder_architecture": kv > 1 or two_norms, "multi_query": kv == 1,
            "num_ln_in_parallel_attn": 2 if two_norms else 1, "parallel_attn": True, "alibi": False,
            "bias": "blk.0.attn_qkv.bias" in meta.names, "ffn_hidden_size": meta.need("feed_forward_length"),
            "layer_norm_epsilon": float(meta.need("attention.layer_norm_epsilon", kind=(int, float))),
            "tie_word_embeddings": "output.weight" not in meta.names, **gguf.token_ids(meta.m)}


def _falcon_qkv_rows(leaf: str, rows: int, cfg: dict) -> torch.Tensor | None:
    if not leaf.startswith("attn_qkv."):
        return None
    H, KV = cfg["num_attention_heads"], cfg["num_kv_heads"]
    D = cfg["hidden_size"] // H
    if rows != (H + 2 * KV) * D:
        raise ValueError(f"{rows} rows are not {H} query heads and {KV} key and value heads of {D} dims")
    q = torch.arange(H * D).view(KV, H // KV, D)
    k = H * D + torch.arange(KV * D).view(KV, 1, D)
    return torch.cat([q, k, k + KV * D], dim=1).reshape(-1)  # per group: its queries, its key, its value


_FALCON_LAYER = {"attn_qkv": "self_attention.query_key_value", "attn_output": "self_attention.dense",
                 "ffn_up": "mlp.dense_h_to_4h", "ffn_down": "mlp.dense_4h_to_h"}


def _falcon_layer(cfg: dict) -> dict:
    norms = {"attn_norm": "ln_mlp", "attn_norm_2": "ln_attn"} if cfg["num_ln_in_parallel_attn"] == 2 else \
        {"attn_norm": "input_layernorm"}
    return {**_FALCON_LAYER, **norms}


GGUF = {"falcon": gguf.GGUFMapping(_gguf_falcon, layers_prefix="transformer.h", row_order=_falcon_qkv_rows,
                                   layer_fn=_falcon_layer, top={"token_embd": "transformer.word_embeddings",
                                                                "output_norm": "transformer.ln_f", "output": "lm_head"})}
