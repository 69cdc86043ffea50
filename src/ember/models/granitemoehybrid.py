"""Granite 4 (GraniteMoeHybrid): GraniteMoeShared's layers (Granite's multipliers, a top-k MoE plus
an always-on shared MLP; or the shared MLP alone when num_local_experts is 0) where most layers mix
tokens with a Mamba-2 mixer (`ember.models.mamba2.Mixer`, weights under `mamba.`) instead of
attention. `layer_types` says which: "mamba" / "linear_attention" or "attention" /
"full_attention" (older configs call the list `layers_block_type`). Attention takes rotary
positions only with position_embedding_type "rope" (Granite 4 ships NoPE).

The cache is a StateCache: keys and values for the attention layers, conv and SSM state for the
Mamba layers.

Reference: transformers/models/granitemoehybrid/modeling_granitemoehybrid.py,
configuration_granitemoehybrid.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError
from ..nn import SharedExpertMoE
from ..varbuilder import VarBuilder
from . import granitemoe, llama, mamba2
from .base import CausalLM, Step, tied_or_own_head

MAMBA, ATTENTION = ("mamba", "linear_attention"), ("attention", "full_attention")


def prepare(d: dict) -> dict:
    if d.get("layer_types") is None and d.get("layers_block_type") is not None:
        d = {**d, "layer_types": d["layers_block_type"]}
    return mamba2.prepare(d)


@dataclass
class Config(granitemoe.Config):
    shared_intermediate_size: int = 1024
    position_embedding_type: str | None = None  # "rope", or None: no positions (NoPE)
    mamba_n_heads: int = 128
    mamba_n_groups: int = 1
    mamba_d_state: int = 256
    mamba_d_head: int | str = "auto"  # "auto": mamba_expand * hidden_size / mamba_n_heads
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_chunk_size: int = 256
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    time_step_limit: list | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.mamba_d_head == "auto" and self.mamba_n_heads:
            self.mamba_d_head = self.mamba_expand * self.hidden_size // self.mamba_n_heads
        if self.layer_types is None:
            self.layer_types = ["mamba"] * self.num_hidden_layers

    def validate(self) -> None:
        super().validate()
        self._positive("mamba_n_heads", "mamba_n_groups", "mamba_d_state", "mamba_d_conv", "mamba_expand",
                       "mamba_chunk_size", "shared_intermediate_size")
        self._require(isinstance(self.mamba_d_head, int) and self.mamba_d_head > 0,
                      f"mamba_d_head must be a positive integer or \"auto\", got {self.mamba_d_head!r:.40}")
        self._require(self.mamba_d_head * self.mamba_n_heads == self.mamba_expand * self.hidden_size,
                      f"mamba_n_heads * mamba_d_head ({self.mamba_n_heads} * {self.mamba_d_head}) must equal "
                      f"mamba_expand * hidden_size ({self.mamba_expand * self.hidden_size})")
        bad = [t for t in self.layer_types if t not in MAMBA + ATTENTION]
        if bad:
            raise ConfigError(f"layer_types: {bad[0]!r:.40} is not a layer type granitemoehybrid has "
                              f"(one of {', '.join(MAMBA + ATTENTION)})")
        self._require(self.position_embedding_type in (None, "rope", "nope"),
                      f"position_embedding_type must be \"rope\" or null, got {self.position_embedding_type!r:.40}")
        self.mamba_dims().validate(self)

    def mamba_dims(self) -> mamba2.Dims:
        return mamba2.Dims(self.hidden_size, self.mamba_n_heads, self.mamba_d_head, self.mamba_d_state,
                           self.mamba_n_groups, self.mamba_d_conv, self.mamba_chunk_size, self.mamba_proj_bias,
                           self.mamba_conv_bias, self.hidden_act, self.rms_norm_eps,
                           mamba2._limit(self, self.time_step_limit))


class DecoderLayer(llama.DecoderLayer):
    def make_attention(self, cfg: Config, vb: VarBuilder, layer_idx: int, window: int | None, fuse: bool):
        self.mamba = None
        if cfg.layer_types[layer_idx] in MAMBA:
            self.mamba = mamba2.Mixer(cfg.mamba_dims(), vb.pp("mamba"), layer_idx)
            return None
        return llama.Attention(cfg, vb.pp("self_attn"), layer_idx, window, fuse, scale=cfg.attention_multiplier,
                               rotary=cfg.position_embedding_type == "rope")

    def make_mlp(self, cfg: Config, vb: VarBuilder, layer_idx: int, fuse: bool) -> nn.Module:
        shared = granitemoe.SharedMLP(cfg, vb.pp("shared_mlp"))
        if not cfg.num_local_experts:
            return shared
        return SharedExpertMoE(granitemoe.moe(cfg, vb.pp("block_sparse_moe")), shared)

    def state_spec(self):
        return self.mamba.state_spec() if self.mamba is not None else None

    def mix(self, x, cos, sin, step: Step):
        return self.mamba(x, step) if self.mamba is not None else self.self_attn(x, cos, sin, step)


class ForCausalLM(CausalLM):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        self.config = cfg
        self.model = llama.Model(cfg, vb.pp("model"), fuse, layer_cls=DecoderLayer)
        self.lm_head = tied_or_own_head(vb, cfg, self.model.embed_tokens.weight, cfg.hidden_size, cfg.vocab_size)
        self.logits_scaling = cfg.logits_scaling
