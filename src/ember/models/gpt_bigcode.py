"""GPTBigCode (SantaCoder, StarCoder 1): GPT-2's block with ordinary Linears and multi-query
attention: `c_attn` gives q (all heads), then one shared k and v head. Without multi_query the
fused c_attn is laid out per head, [heads, (q, k, v), head_dim], reordered once at load.

Reference: transformers/models/gpt_bigcode/modeling_gpt_bigcode.py, configuration_gpt_bigcode.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import gguf_source as gguf
from ..nn import Embedding, LayerNorm, activation, attention, linear, linear_from_weight
from ..varbuilder import VarBuilder
from . import gpt2
from .base import CausalLM, Step, tied_or_own_head


@dataclass
class Config(gpt2.Config):
    activation_function: str = "gelu_pytorch_tanh"
    multi_query: bool = True


class Attention(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int):
        super().__init__()
        E, H = cfg.n_embd, cfg.n_head
        D = E // H
        self.layer_idx, self.window = layer_idx, None
        self.num_heads, self.num_kv_heads, self.head_dim = H, 1 if cfg.multi_query else H, D
        n = E + 2 * self.num_kv_heads * D
        w, b = vb.get((n, E), "c_attn.weight"), vb.get((n,), "c_attn.bias")
        if not cfg.multi_query:  # [H, 3, D] rows -> [3, H, D], once
            w = w.view(H, 3, D, E).transpose(0, 1).reshape(n, E)
            b = b.view(H, 3, D).transpose(0, 1).reshape(n)
        self.c_attn = linear_from_weight(w, b)
        self.c_proj = linear(E, E, vb.pp("c_proj"), bias=True)
        self.scale = D ** -0.5 if cfg.scale_attn_weights else 1.0

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        B, T, E = x.shape
        KV, D = self.num_kv_heads, self.head_dim
        q, k, v = self.c_attn(x).split([E, KV * D, KV * D], dim=-1)
        q = q.view(B, T, self.num_heads, D).transpose(1, 2)
        k, v = k.view(B, T, KV, D).transpose(1, 2), v.view(B, T, KV, D).transpose(1, 2)
        if step.cache is not None:
            k, v = step.cache.update(self.layer_idx, k, v, step.position_ids, step.kv_len, step.cache_rows,
                                     fresh=step.fresh)
        o = attention(q, k, v, step.mask(), scale=self.scale)
        return self.c_proj(o.transpose(1, 2).reshape(B, T, E))


class Block(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int):
        super().__init__()
        E, eps = cfg.n_embd, cfg.layer_norm_epsilon
        self.ln_1 = LayerNorm.from_vb(E, eps, vb.pp("ln_1"))
        self.self_attn = Attention(cfg, vb.pp("attn"), layer_idx)  # named for cache_layout()
        self.ln_2 = LayerNorm.from_vb(E, eps, vb.pp("ln_2"))
        self.c_fc = linear(E, cfg.intermediate_size, vb.pp("mlp.c_fc"), bias=True)
        self.c_proj = linear(cfg.intermediate_size, E, vb.pp("mlp.c_proj"), bias=True)
        self.act = activation(cfg.activation_function)

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        x = x + self.self_attn(self.ln_1(x), step)
        return x + self.c_proj(self.act(self.c_fc(self.ln_2(x))))


class Model(gpt2.Model):
    def __init__(self, cfg: Config, vb: VarBuilder):
        nn.Module.__init__(self)
        self.wte = Embedding.from_vb(cfg.vocab_size, cfg.n_embd, vb.pp("wte"))
        self.wpe = Embedding.from_vb(cfg.n_positions, cfg.n_embd, vb.pp("wpe"))
        self.layers = nn.ModuleList(Block(cfg, vb.pp(f"h.{i}"), i) for i in range(cfg.n_layer))
        self.ln_f = LayerNorm.from_vb(cfg.n_embd, cfg.layer_norm_epsilon, vb.pp("ln_f"))


class ForCausalLM(CausalLM):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()  # c_attn is fused in the checkpoint itself
        self.config = cfg
        self.model = Model(cfg, vb.pp("transformer"))
        self.lm_head = tied_or_own_head(vb, cfg, self.model.wte.weight, cfg.n_embd, cfg.vocab_size)


# ---- GGUF (llama.cpp's starcoder: multi-query GPTBigCode) --------------------------------------------
def _gguf_starcoder(meta: gguf.Meta) -> dict:
    heads = gguf.attention_heads(meta)
    return {"model_type": "gpt_bigcode", "vocab_size": gguf.vocab_size(meta), "n_embd": meta.need("embedding_length"),
            "n_layer": gguf.layer_count(meta), "n_head": heads, "n_positions": meta.need("context_length"),
            "n_inner": meta.need("feed_forward_length"),
            "layer_norm_epsilon": float(meta.need("attention.layer_norm_epsilon", kind=(int, float))),
            "multi_query": meta.get("attention.head_count_kv", 1, kind=int) == 1,
            "tie_word_embeddings": "output.weight" not in meta.names, **gguf.token_ids(meta.m),
            "num_hidden_layers": gguf.layer_count(meta), "num_attention_heads": heads}


GGUF = {"starcoder": gguf.GGUFMapping(_gguf_starcoder, layers_prefix="transformer.h", top={
    "token_embd": "transformer.wte", "position_embd": "transformer.wpe", "output_norm": "transformer.ln_f",
    "output": "lm_head"}, layer={
    "attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_norm": "ln_2",
    "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"})}
