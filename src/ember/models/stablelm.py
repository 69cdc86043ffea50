"""StableLM (StableLM-2, StableLM-3B-4E1T, Zephyr): Llama's attention and gated MLP with partial
rotary, LayerNorm, optional q/k/v bias, optional per-head q/k LayerNorm and parallel residual.

Reference: transformers/models/stablelm/modeling_stablelm.py. `qk_layernorm` is one bias-free
LayerNorm per head (`q_layernorm.norms.N.weight`): the per-head weights are stacked at load into
one [heads, head_dim] scale applied after a shared normalisation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DecoderConfig
from ..nn import Embedding, LayerNorm, activation
from ..nn.rope import RotaryEmbedding, rope_parameters
from ..varbuilder import VarBuilder
from . import llama
from .base import CausalLM, Step, tied_or_own_head


@dataclass
class Config(DecoderConfig):
    vocab_size: int = 50304
    intermediate_size: int = 6912
    hidden_size: int = 2560
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 32
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    layer_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    rope_theta: float | None = None
    rope_scaling: dict | None = None
    rope_parameters: dict | None = None
    partial_rotary_factor: float | None = None
    use_qkv_bias: bool = False  # (the registry maps it onto qkv_bias)
    qk_layernorm: bool = False
    use_parallel_residual: bool = False
    bos_token_id: int | list | None = 0
    eos_token_id: int | list | None = 0
    pad_token_id: int | None = None

    mlp_bias: bool = False  # (what llama.MLP reads; StableLM's MLP has none)

    def rope(self) -> dict:
        p = rope_parameters(self.raw)
        p.setdefault("partial_rotary_factor", 0.25)
        return p

    def validate(self) -> None:
        super().validate()
        self._positive("intermediate_size")
        self._positive("layer_norm_eps", allow_zero=True)
        self._head_dim_divides_hidden()
        f = float(self.rope()["partial_rotary_factor"])
        self._require(0.0 <= f <= 1.0 and int(self.head_dim * f) % 2 == 0,
                      f"partial_rotary_factor {f} must be in [0, 1] and rotate an even number of the "
                      f"{self.head_dim} head dims")
        activation(self.hidden_act)


class PerHeadLayerNorm(nn.Module):
    """A bias-free LayerNorm per head, on [..., heads, head_dim]."""

    def __init__(self, heads: int, dim: int, eps: float, vb: VarBuilder):
        super().__init__()
        self.weight = nn.Parameter(torch.stack([vb.get((dim,), f"norms.{h}.weight") for h in range(heads)]),
                                   requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), None, None, self.eps) * self.weight


class Attention(llama.Attention):
    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int, fuse: bool = True):
        super().__init__(cfg, vb, layer_idx, None, fuse)
        if cfg.qk_layernorm and vb.tp is not None:
            from ..errors import DistributedError

            raise DistributedError("StableLM's per-head q/k LayerNorms (qk_layernorm) are not split for tensor "
                                   "parallelism yet")
        if cfg.qk_layernorm:  # Llama's forward applies q_norm / k_norm to q, k as [B, T, heads, head_dim]
            self.qk_norm = "head"
            D, eps = cfg.head_dim, cfg.layer_norm_eps
            self.q_norm = PerHeadLayerNorm(cfg.num_attention_heads, D, eps, vb.pp("q_layernorm"))
            self.k_norm = PerHeadLayerNorm(cfg.num_key_value_heads, D, eps, vb.pp("k_layernorm"))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int, fuse: bool = True):
        super().__init__()
        E, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.parallel = cfg.use_parallel_residual
        self.self_attn = Attention(cfg, vb.pp("self_attn"), layer_idx, fuse)
        self.mlp = llama.MLP(cfg, vb.pp("mlp"), fuse)
        self.input_layernorm = LayerNorm.from_vb(E, eps, vb.pp("input_layernorm"))
        self.post_attention_layernorm = (None if self.parallel else
                                         LayerNorm.from_vb(E, eps, vb.pp("post_attention_layernorm")))

    def forward(self, x, cos, sin, step: Step):
        h = self.input_layernorm(x)
        a = self.self_attn(h, cos, sin, step)
        if self.parallel:  # x + attn(ln(x)) + mlp(ln(x))
            return x + a + self.mlp(h)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x))


class Model(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        self.embed_tokens = Embedding.from_vb(cfg.vocab_size, cfg.hidden_size, vb.pp("embed_tokens"))
        self.layers = nn.ModuleList(DecoderLayer(cfg, vb.pp(f"layers.{i}"), i, fuse) for i in range(cfg.num_hidden_layers))
        self.norm = LayerNorm.from_vb(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("norm"))
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope(), cfg.max_position_embeddings).to(vb.device)

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
