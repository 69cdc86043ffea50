"""GPT-NeoX (Pythia, ...): fused query_key_value, partial rotary, LayerNorm, parallel or sequential
residual, untied `embed_out` head.

Reference: transformers/models/gpt_neox/modeling_gpt_neox.py. NeoX's fused projection is laid
out per head, [heads, (q, k, v), head_dim] along its output rows; the rows are reordered once at
load to [(q, k, v), heads, head_dim] so the forward splits q, k, v with plain views. The rotary
fraction comes from `rope_parameters.partial_rotary_factor`, `partial_rotary_factor` or the
older `rotary_pct` (default 0.25), the base from `rope_parameters`/`rope_theta` or the older
`rotary_emb_base`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import DecoderConfig
from ..nn import Embedding, LayerNorm, activation, apply_rotary, attention, linear, linear_from_weight
from ..nn.rope import RotaryEmbedding, rope_parameters
from ..varbuilder import VarBuilder
from .base import CausalLM, Step, tied_or_own_head


@dataclass
class Config(DecoderConfig):
    vocab_size: int = 50432
    hidden_size: int = 6144
    num_hidden_layers: int = 44
    num_attention_heads: int = 64
    intermediate_size: int = 24576
    hidden_act: str = "gelu"
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    rope_scaling: dict | None = None
    rope_theta: float | None = None
    rotary_emb_base: float | None = None
    partial_rotary_factor: float | None = None
    rotary_pct: float | None = None
    bos_token_id: int | list | None = 0
    eos_token_id: int | list | None = 2
    pad_token_id: int | None = None

    def rope(self) -> dict:
        """The rope parameters, with the old NeoX names folded in."""
        raw = dict(self.raw)
        if self.rope_theta is None and self.rotary_emb_base is not None:
            raw["rope_theta"] = self.rotary_emb_base
        p = rope_parameters(raw)
        if "partial_rotary_factor" not in p:
            p["partial_rotary_factor"] = self.rotary_pct if self.rotary_pct is not None else 0.25
        return p

    def validate(self) -> None:
        super().validate()
        self._positive("intermediate_size", "rotary_emb_base")
        self._positive("layer_norm_eps", allow_zero=True)
        self._head_dim_divides_hidden()
        f = float(self.rope()["partial_rotary_factor"])
        self._require(0.0 <= f <= 1.0 and int(self.head_dim * f) % 2 == 0,
                      f"the rotary fraction {f} must be in [0, 1] and rotate an even number of the "
                      f"{self.head_dim} head dims")
        activation(self.hidden_act)


class Attention(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int):
        super().__init__()
        E, H, D = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        self.layer_idx = layer_idx
        self.num_heads = self.num_kv_heads = H
        self.head_dim = D
        qkv = vb.pp("query_key_value")
        # [H, 3, D] rows -> [3, H, D] rows, once
        w = qkv.get((3 * E, E), "weight").view(H, 3, D, E).transpose(0, 1).reshape(3 * E, E)
        b = qkv.get((3 * E,), "bias").view(H, 3, D).transpose(0, 1).reshape(3 * E) if cfg.attention_bias else None
        self.query_key_value = linear_from_weight(w, b)
        self.dense = linear(E, E, vb.pp("dense"), bias=cfg.attention_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step: Step) -> torch.Tensor:
        B, T, E = x.shape
        q, k, v = self.query_key_value(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, k, cos, sin)
        if step.cache is not None:
            k, v = step.cache.update(self.layer_idx, k, v, step.position_ids, step.kv_len, step.cache_rows)
        o = attention(q, k, v, step.mask())
        return self.dense(o.transpose(1, 2).reshape(B, T, E))


class MLP(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder):
        super().__init__()
        self.dense_h_to_4h = linear(cfg.hidden_size, cfg.intermediate_size, vb.pp("dense_h_to_4h"), bias=True)
        self.dense_4h_to_h = linear(cfg.intermediate_size, cfg.hidden_size, vb.pp("dense_4h_to_h"), bias=True)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class Layer(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int):
        super().__init__()
        E, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.parallel = cfg.use_parallel_residual
        self.input_layernorm = LayerNorm.from_vb(E, eps, vb.pp("input_layernorm"))
        self.post_attention_layernorm = LayerNorm.from_vb(E, eps, vb.pp("post_attention_layernorm"))
        self.self_attn = Attention(cfg, vb.pp("attention"), layer_idx)  # named for cache_layout()
        self.mlp = MLP(cfg, vb.pp("mlp"))

    def forward(self, x: torch.Tensor, cos, sin, step: Step) -> torch.Tensor:
        a = self.self_attn(self.input_layernorm(x), cos, sin, step)
        if self.parallel:  # x + attn(ln1(x)) + mlp(ln2(x))
            return self.mlp(self.post_attention_layernorm(x)) + a + x
        a = a + x
        return self.mlp(self.post_attention_layernorm(a)) + a


class Model(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder):
        super().__init__()
        self.embed_in = Embedding.from_vb(cfg.vocab_size, cfg.hidden_size, vb.pp("embed_in"))
        self.layers = nn.ModuleList(Layer(cfg, vb.pp(f"layers.{i}"), i) for i in range(cfg.num_hidden_layers))
        self.final_layer_norm = LayerNorm.from_vb(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("final_layer_norm"))
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope(), cfg.max_position_embeddings).to(vb.device)

    def forward(self, input_ids: torch.Tensor, step: Step) -> torch.Tensor:
        x = self.embed_in(input_ids)
        cos, sin = self.rotary(step.position_ids, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, step)
        return self.final_layer_norm(x)


class ForCausalLM(CausalLM):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()  # query_key_value is fused in the checkpoint itself
        self.config = cfg
        self.model = Model(cfg, vb.pp("gpt_neox"))
        # the Hub and save_pretrained name the head embed_out; transformers 5 holds it as lm_head
        if not cfg.tie_word_embeddings and vb.contains("embed_out.weight"):
            self.lm_head = linear(cfg.hidden_size, cfg.vocab_size, vb.pp("embed_out"))
        else:
            self.lm_head = tied_or_own_head(vb, cfg, self.model.embed_in.weight, cfg.hidden_size, cfg.vocab_size)
