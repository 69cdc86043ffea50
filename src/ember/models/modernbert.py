"""ModernBERT: a pre-LayerNorm encoder with rotary positions, a GeGLU MLP, no biases by default, and
local (sliding-window) attention in all layers but every `global_attn_every_n_layers`-th.

Reference: transformers/models/modernbert/modeling_modernbert.py and configuration_modernbert.py.
Tensor names are the checkpoint's (embeddings.tok_embeddings, layers.N.attn.Wqkv, final_norm),
with or without the task models' `model.` prefix. Both config styles are read: transformers 5's
`layer_types` + per-type `rope_parameters`, and the original `global_attn_every_n_layers` +
`global_rope_theta` / `local_rope_theta`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError
from ..nn import Embedding, LayerNorm, activation, linear
from ..nn.rope import RotaryEmbedding, rope_parameters
from ..varbuilder import VarBuilder
from .encoder import EncoderModel, attend, f32, key_padding_mask

LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass
class Config(ModelConfig):
    vocab_size: int = 50368
    hidden_size: int = 768
    intermediate_size: int = 1152
    num_hidden_layers: int = 22
    num_attention_heads: int = 12
    hidden_activation: str = "gelu"
    max_position_embeddings: int = 8192
    norm_eps: float = 1e-5
    norm_bias: bool = False
    pad_token_id: int | None = 50283
    attention_bias: bool = False
    mlp_bias: bool = False
    layer_types: list | None = None
    global_attn_every_n_layers: int = 3
    local_attention: int = 128
    rope_parameters: dict | None = None
    rope_scaling: dict | None = None
    global_rope_theta: float | None = None
    local_rope_theta: float | None = None

    def __post_init__(self):
        if self.layer_types is None and self.global_attn_every_n_layers:
            n = self.global_attn_every_n_layers
            self.layer_types = ["sliding_attention" if i % n else "full_attention" for i in range(self.num_hidden_layers)]

    def validate(self) -> None:
        self._positive("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "max_position_embeddings", "local_attention", "global_attn_every_n_layers")
        self._positive("norm_eps", allow_zero=True)
        self._require(self.hidden_size % self.num_attention_heads == 0,
                      f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                      f"({self.num_attention_heads})")
        self._require(self.layer_types is not None and len(self.layer_types) == self.num_hidden_layers,
                      f"layer_types must list {self.num_hidden_layers} layer types")
        bad = sorted({t for t in self.layer_types if t not in LAYER_TYPES})
        self._require(not bad, f"unknown layer types {bad}; expected {', '.join(LAYER_TYPES)}")
        activation(self.hidden_activation)
        for t in LAYER_TYPES:
            self.rope(t)

    @property
    def sliding_window(self) -> int:
        """Half the local window: a token sees keys at distance <= this (transformers' sliding_window)."""
        return self.local_attention // 2

    def rope(self, layer_type: str) -> dict:
        """Rope parameters of a layer type, normalised like transformers' convert_rope_params_to_dict."""
        params = (self.rope_parameters or {}).get(layer_type) if isinstance(self.rope_parameters, dict) else None
        if params is not None and not isinstance(params, dict):
            raise ConfigError(f"rope_parameters[{layer_type!r}] should be an object, got {params!r:.80}")
        p = dict(params or {"rope_type": "default"})
        if self.rope_scaling:
            p.update(self.rope_scaling)
        if p.get("rope_theta") is None:
            old = self.global_rope_theta if layer_type == "full_attention" else self.local_rope_theta
            p["rope_theta"] = old if old is not None else (160_000.0 if layer_type == "full_attention" else 10_000.0)
        return rope_parameters({"rope_parameters": p, "max_position_embeddings": self.max_position_embeddings})


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder, sliding: bool):
        super().__init__()
        E = cfg.hidden_size
        self.heads, self.head_dim = cfg.num_attention_heads, E // cfg.num_attention_heads
        self.Wqkv = linear(E, 3 * E, vb.pp("Wqkv"), bias=cfg.attention_bias)
        self.Wo = linear(E, E, vb.pp("Wo"), bias=cfg.attention_bias)
        self.sliding = sliding
        self.cdtype = self.Wo.weight.dtype  # the matmuls' dtype; x stays float32

    def forward(self, x, cos, sin, mask):
        B, T, E = x.shape
        cdtype = self.cdtype
        q, k, v = self.Wqkv(x.to(cdtype)).view(B, T, 3, self.heads, self.head_dim).unbind(dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        # rotary in float32, as transformers' ModernBERT does
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        qf, kf = q.float(), k.float()
        q = (qf * cos + _rotate_half(qf) * sin).to(cdtype)
        k = (kf * cos + _rotate_half(kf) * sin).to(cdtype)
        a = attend(q, k, v, mask)
        return self.Wo(a.transpose(1, 2).reshape(B, T, E)).to(x.dtype)


class MLP(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder):
        super().__init__()
        self.Wi = linear(cfg.hidden_size, 2 * cfg.intermediate_size, vb.pp("Wi"), bias=cfg.mlp_bias)
        self.Wo = linear(cfg.intermediate_size, cfg.hidden_size, vb.pp("Wo"), bias=cfg.mlp_bias)
        self.act = activation(cfg.hidden_activation)
        self.cdtype = self.Wo.weight.dtype

    def forward(self, x):
        inp, gate = self.Wi(x.to(self.cdtype)).chunk(2, dim=-1)
        return self.Wo(self.act(inp) * gate).to(x.dtype)


class Layer(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder, idx: int):
        super().__init__()
        E = cfg.hidden_size
        self.layer_type = cfg.layer_types[idx]
        self.attn_norm = (LayerNorm.from_vb(E, cfg.norm_eps, f32(vb).pp("attn_norm"), bias=cfg.norm_bias)
                          if idx > 0 else nn.Identity())
        self.attn = Attention(cfg, vb.pp("attn"), self.layer_type == "sliding_attention")
        self.mlp_norm = LayerNorm.from_vb(E, cfg.norm_eps, f32(vb).pp("mlp_norm"), bias=cfg.norm_bias)
        self.mlp = MLP(cfg, vb.pp("mlp"))

    def forward(self, x, cos, sin, mask):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        return x + self.mlp(self.mlp_norm(x))


class Model(EncoderModel):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        self.config = cfg
        vb = vb.pp_first(["", "model"], "embeddings.tok_embeddings.weight")
        E = cfg.hidden_size
        self.tok_embeddings = Embedding.from_vb(cfg.vocab_size, E, f32(vb).pp("embeddings.tok_embeddings"))
        self.embed_norm = LayerNorm.from_vb(E, cfg.norm_eps, f32(vb).pp("embeddings.norm"), bias=cfg.norm_bias)
        self.layers = nn.ModuleList(Layer(cfg, vb.pp(f"layers.{i}"), i) for i in range(cfg.num_hidden_layers))
        self.final_norm = LayerNorm.from_vb(E, cfg.norm_eps, f32(vb).pp("final_norm"), bias=cfg.norm_bias)
        head_dim = E // cfg.num_attention_heads
        self.rotary = nn.ModuleDict({t: RotaryEmbedding(head_dim, cfg.rope(t), cfg.max_position_embeddings)
                                     for t in sorted(set(cfg.layer_types))})
        self.window = cfg.sliding_window
        self.hidden_size = E
        self.pad_token_id = cfg.pad_token_id or 0
        self.max_tokens = cfg.max_position_embeddings

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        B, T = input_ids.shape
        x = self.embed_norm(self.tok_embeddings(input_ids).float())
        pos = torch.arange(T, device=input_ids.device)[None]
        # rope tables cast to the attention's dtype, then applied in float32, as transformers does
        cdtype = self.layers[0].attn.cdtype
        tables = {t: tuple(c.float() for c in rot(pos, cdtype)) for t, rot in self.rotary.items()}
        keep = key_padding_mask(attention_mask)
        masks = {"full_attention": keep}
        if T > self.window + 1:
            idx = torch.arange(T, device=input_ids.device)
            local = ((idx[None, :] - idx[:, None]).abs() <= self.window)[None, None]
            # a padding query whose window holds only padding sees itself (NaN would leak into real rows)
            eye = torch.eye(T, dtype=torch.bool, device=idx.device)
            masks["sliding_attention"] = local if keep is None else (local & keep) | eye
        else:
            masks["sliding_attention"] = keep
        for layer in self.layers:
            cos, sin = tables[layer.layer_type]
            x = layer(x, cos, sin, masks[layer.layer_type])
        return self.final_norm(x)
