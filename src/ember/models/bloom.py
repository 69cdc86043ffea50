"""BLOOM: ALiBi instead of positions (each head adds slope_h * key position to its scores), a
LayerNorm on the embeddings, fused per-head query_key_value ([heads, (q, k, v), head_dim] rows,
reordered once at load), a tanh-GELU MLP, and optionally the residual taken after the norms
(`apply_residual_connection_post_layernorm`).

Key positions count real tokens (padding excluded), as transformers' alibi does; with a KV cache a
key's column is its position. The ALiBi bias joins the boolean mask as one float mask for SDPA.

Reference: transformers/models/bloom/modeling_bloom.py, configuration_bloom.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .. import gguf_source as gguf
from ..config import ModelConfig
from ..nn import Embedding, LayerNorm, attention, build_mask, linear, linear_from_weight
from ..varbuilder import VarBuilder
from .base import CausalLM, Step, tied_or_own_head


@dataclass
class Config(ModelConfig):
    vocab_size: int = 250880
    hidden_size: int = 64
    n_layer: int = 2
    n_head: int = 8
    layer_norm_epsilon: float = 1e-5
    apply_residual_connection_post_layernorm: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int | list | None = 1
    eos_token_id: int | list | None = 2
    pad_token_id: int | None = None
    max_position_embeddings: int = 1 << 16  # ALiBi has no table; a bound for the generation loop

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    def validate(self) -> None:
        self._positive("vocab_size", "hidden_size", "n_layer", "n_head")
        self._positive("layer_norm_epsilon", allow_zero=True)
        self._require(self.hidden_size % self.n_head == 0,
                      f"hidden_size ({self.hidden_size}) must be divisible by n_head ({self.n_head})")


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The per-head slopes, as transformers computes them (powers of 2^(-8/n), interleaved extras)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != num_heads:
        extra = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
        n = min(closest, num_heads - closest)
        slopes = torch.cat([slopes, torch.pow(extra, torch.arange(1, 1 + 2 * n, 2, dtype=torch.int32))])
    return slopes


def alibi_mask(step: Step, slopes: torch.Tensor, T: int, S: int, dtype: torch.dtype) -> torch.Tensor:
    """The float mask [B, H, T, S]: slope_h * key position where visible, -inf elsewhere."""
    p = step.position_ids
    m = step.mask()
    cached = step.cache is not None and not step.fresh
    if m is None:
        m = build_mask(p, None, kv_len=S) if cached else torch.ones(T, S, dtype=torch.bool, device=p.device).tril(S - T)
    kpos = torch.arange(S, device=p.device)[None] if step.cache is not None else p  # [B or 1, S]
    bias = slopes.to(p.device)[None, :, None, None] * kpos[:, None, None, :].float()
    return bias.masked_fill(~m, float("-inf")).to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int):
        super().__init__()
        E, H = cfg.hidden_size, cfg.n_head
        D = E // H
        self.layer_idx, self.window = layer_idx, None
        self.num_heads = self.num_kv_heads = H
        self.head_dim = D
        qkv = vb.pp("query_key_value")
        w = qkv.get((3 * E, E), "weight").view(H, 3, D, E).transpose(0, 1).reshape(3 * E, E)
        b = qkv.get((3 * E,), "bias").view(H, 3, D).transpose(0, 1).reshape(3 * E)
        self.query_key_value = linear_from_weight(w, b)
        self.dense = linear(E, E, vb.pp("dense"), bias=True)
        self.register_buffer("slopes", alibi_slopes(H).to(vb.device), persistent=False)

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        B, T, E = x.shape
        q, k, v = self.query_key_value(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if step.cache is not None:
            k, v = step.cache.update(self.layer_idx, k, v, step.position_ids, step.kv_len, step.cache_rows,
                                     fresh=step.fresh)
        mask = alibi_mask(step, self.slopes, T, k.shape[2], q.dtype)
        o = attention(q, k, v, mask)
        return self.dense(o.transpose(1, 2).reshape(B, T, E))


def bloom_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


class Block(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int):
        super().__init__()
        E, eps = cfg.hidden_size, cfg.layer_norm_epsilon
        self.post = cfg.apply_residual_connection_post_layernorm
        self.input_layernorm = LayerNorm.from_vb(E, eps, vb.pp("input_layernorm"))
        self.self_attn = Attention(cfg, vb.pp("self_attention"), layer_idx)  # named for cache_layout()
        self.post_attention_layernorm = LayerNorm.from_vb(E, eps, vb.pp("post_attention_layernorm"))
        self.dense_h_to_4h = linear(E, 4 * E, vb.pp("mlp.dense_h_to_4h"), bias=True)
        self.dense_4h_to_h = linear(4 * E, E, vb.pp("mlp.dense_4h_to_h"), bias=True)

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        n = self.input_layernorm(x)
        x = self.self_attn(n, step) + (n if self.post else x)
        n = self.post_attention_layernorm(x)
        return self.dense_4h_to_h(bloom_gelu(self.dense_h_to_4h(n))) + (n if self.post else x)


class Model(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder):
        super().__init__()
        E, eps = cfg.hidden_size, cfg.layer_norm_epsilon
        self.word_embeddings = Embedding.from_vb(cfg.vocab_size, E, vb.pp("word_embeddings"))
        self.word_embeddings_layernorm = LayerNorm.from_vb(E, eps, vb.pp("word_embeddings_layernorm"))
        self.layers = nn.ModuleList(Block(cfg, vb.pp(f"h.{i}"), i) for i in range(cfg.n_layer))
        self.ln_f = LayerNorm.from_vb(E, eps, vb.pp("ln_f"))

    def forward(self, input_ids: torch.Tensor, step: Step) -> torch.Tensor:
        x = self.word_embeddings_layernorm(self.word_embeddings(input_ids))
        for layer in self.layers:
            x = layer(x, step)
        return self.ln_f(x)


class ForCausalLM(CausalLM):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()  # query_key_value is fused in the checkpoint itself
        self.config = cfg
        # BloomForCausalLM checkpoints carry a transformer. prefix, BloomModel ones (bigscience/bloom-*) none
        body = vb.pp("transformer") if vb.contains("transformer.word_embeddings.weight") else vb
        self.model = Model(cfg, body)
        self.lm_head = tied_or_own_head(vb, cfg, self.model.word_embeddings.weight, cfg.hidden_size, cfg.vocab_size)


# ---- GGUF (llama.cpp's bloom: the converter regroups query_key_value from per head (q, k, v) to
# all queries, all keys, all values; the row order puts it back) -------------------------------------
def _gguf_bloom(meta: gguf.Meta) -> dict:
    return {"model_type": "bloom", "vocab_size": gguf.vocab_size(meta), "hidden_size": meta.need("embedding_length"),
            "n_layer": gguf.layer_count(meta), "n_head": gguf.attention_heads(meta),
            "layer_norm_epsilon": float(meta.need("attention.layer_norm_epsilon", kind=(int, float))),
            "tie_word_embeddings": "output.weight" not in meta.names, **gguf.token_ids(meta.m),
            # the fields GGUFSource reads
            "num_hidden_layers": gguf.layer_count(meta), "num_attention_heads": gguf.attention_heads(meta)}


def _bloom_qkv_rows(leaf: str, rows: int, cfg: dict) -> torch.Tensor | None:
    if not leaf.startswith("attn_qkv."):
        return None
    H, E = cfg["n_head"], cfg["hidden_size"]
    if rows != 3 * E or E % H:
        raise ValueError(f"{rows} rows are not q, k and v of {H} heads in {E} dims")
    return torch.arange(rows).view(3, H, -1).transpose(0, 1).reshape(-1)


GGUF = {"bloom": gguf.GGUFMapping(_gguf_bloom, layers_prefix="transformer.h", row_order=_bloom_qkv_rows, top={
    "token_embd": "transformer.word_embeddings", "token_embd_norm": "transformer.word_embeddings_layernorm",
    "output_norm": "transformer.ln_f", "output": "lm_head"}, layer={
    "attn_norm": "input_layernorm", "attn_qkv": "self_attention.query_key_value", "attn_output": "self_attention.dense",
    "ffn_norm": "post_attention_layernorm", "ffn_up": "mlp.dense_h_to_4h", "ffn_down": "mlp.dense_4h_to_h"})}
