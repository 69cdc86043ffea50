"""Gemma, and the decoder that Gemma 2 and Gemma 3 configure with their own flags.

Gemma is Llama's layout with: embeddings scaled by sqrt(hidden_size) (the scale rounded to the
model dtype, as the reference does), RMSNorm scaling by (1 + w) in float32, a GeGLU MLP
(gelu_pytorch_tanh) and head_dim from the config (256 by default, not hidden / heads). The
options used by the later generations live here as config fields (absent from Gemma 1 configs):
`query_pre_attn_scalar` (attention scale), `attn_logit_softcapping` / `final_logit_softcapping`,
`layer_types` + `sliding_window`, `sandwich_norms` (norms after attention and around the MLP) and
per-layer-type rotary tables (`rope_configs`, Gemma 3).

Reference: transformers/models/gemma/modeling_gemma.py (gemma2, gemma3 for the options).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..distributed import layers as parallel
from ..nn import RMSNorm, rotary_from_config
from ..varbuilder import VarBuilder
from . import llama
from .base import CausalLM, Step, tied_or_own_head

LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclass
class Config(llama.Config):
    vocab_size: int = 256000
    hidden_size: int = 3072
    intermediate_size: int = 24576
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 16
    head_dim: int | None = 256
    hidden_act: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    bos_token_id: int | list | None = 2
    eos_token_id: int | list | None = 1
    pad_token_id: int | None = 0
    use_bidirectional_attention: bool | None = None
    # Gemma 2 / 3 keys (None in Gemma 1: scale head_dim ** -0.5, no soft-capping)
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    # ember flags set by the Gemma 2 / 3 configs (not config.json keys)
    sandwich_norms: bool = False
    bidirectional_ok: ClassVar[bool] = False

    def __post_init__(self):
        if self.hidden_act == "gelu":  # as GemmaConfig: the released configs' "gelu" means the tanh approximation
            self.hidden_act = "gelu_pytorch_tanh"
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        self._positive("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping")
        self._require(not self.use_bidirectional_attention or self.bidirectional_ok,
                      f"use_bidirectional_attention is supported for gemma3_text only, not {self.model_type}")
        if self.layer_types is not None:
            bad = sorted({t for t in self.layer_types if t not in LAYER_TYPES})
            self._require(not bad, f"unsupported layer_types {bad}; supported: {', '.join(LAYER_TYPES)}")

    def attention_softcap(self) -> float | None:
        """The attention soft-cap the reference applies (Gemma 3 keeps the key but never applies it)."""
        return self.attn_logit_softcapping

    def rope_configs(self) -> dict[str, dict]:
        """The config dict of each rotary table, keyed by the layer type using it ("all": every layer)."""
        return {"all": self.raw}


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int, window: int | None, fuse: bool = True):
        super().__init__()
        scale = cfg.query_pre_attn_scalar ** -0.5 if cfg.query_pre_attn_scalar else None
        self.self_attn = llama.Attention(cfg, vb.pp("self_attn"), layer_idx, window, fuse, scale=scale,
                                         softcap=cfg.attention_softcap(), norm_kw={"offset": 1.0})
        self.mlp = llama.MLP(cfg, vb.pp("mlp"), fuse)

        def norm(name):
            return RMSNorm.from_vb(cfg.hidden_size, cfg.rms_norm_eps, vb.pp(name), offset=1.0)

        self.input_layernorm = norm("input_layernorm")
        self.post_attention_layernorm = norm("post_attention_layernorm")
        self.sandwich = cfg.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = norm("pre_feedforward_layernorm")
            self.post_feedforward_layernorm = norm("post_feedforward_layernorm")

    def forward(self, x, cos, sin, step: Step):
        if not self.sandwich:  # Gemma 1: Llama's pre-norm layer
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, step)
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, step))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Model(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        self.embed_tokens = parallel.embedding(cfg.vocab_size, cfg.hidden_size, vb.pp("embed_tokens"))
        # The reference multiplies by a float32 scalar cast to the weights' dtype: round it the same way.
        self.embed_scale = float(torch.tensor(cfg.hidden_size**0.5).to(self.embed_tokens.weight.dtype))
        windows = cfg.layer_windows()
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, vb.pp(f"layers.{i}"), i, windows[i], fuse) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm.from_vb(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("norm"), offset=1.0)
        ropes = cfg.rope_configs()
        self.rotaries = nn.ModuleDict({
            name: rotary_from_config(raw, cfg.head_dim, cfg.max_position_embeddings, device=vb.device)
            for name, raw in ropes.items()
        })
        types = cfg.layer_types or ["full_attention"] * cfg.num_hidden_layers
        self.layer_rope = [t if t in ropes else "all" for t in types]
        self.rotary = self.rotaries["full_attention" if "full_attention" in ropes else next(iter(ropes))]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The scaled token embeddings (transformers' Gemma3TextScaledWordEmbedding), which an
        image+text model merges image features into."""
        return self.embed_tokens(input_ids) * self.embed_scale

    def forward(self, input_ids: torch.Tensor, step: Step, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        tables = {name: rotary(step.position_ids, x.dtype) for name, rotary in self.rotaries.items()}
        for layer, rope in zip(self.layers, self.layer_rope):
            x = layer(x, *tables[rope], step)
        return self.norm(x)


class ForCausalLM(CausalLM):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        self.config = cfg
        # Gemma3TextModel checkpoints (EmbeddingGemma) are saved without the "model." prefix
        inner = vb.pp_first(["model", ""], "embed_tokens.weight") if cfg.use_bidirectional_attention else vb.pp("model")
        self.model = Model(cfg, inner, fuse)
        self.lm_head = tied_or_own_head(vb, cfg, self.model.embed_tokens.weight, cfg.hidden_size, cfg.vocab_size)
        self.final_logit_softcapping = cfg.final_logit_softcapping
