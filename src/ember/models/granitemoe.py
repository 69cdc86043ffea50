"""GraniteMoE (Granite 3.0 MoE): Granite's multipliers (embedding, residual, attention scale,
logits) over a sparse MoE in every layer whose router takes the top-k logits, then the softmax of
those k. The experts are stored fused: `block_sparse_moe.input_linear.weight` [E, 2F, H] (gate
rows, then up rows), `output_linear.weight` [E, H, F], `router.layer.weight` (transformers 5 names
them `experts.gate_up_proj`, `experts.down_proj`, `router.weight` in memory; both are read).

Reference: transformers/models/granitemoe/modeling_granitemoe.py, configuration_granitemoe.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..nn import TopLogitsMoE, activation
from ..varbuilder import VarBuilder
from . import llama, mixtral
from .base import CausalLM, tied_or_own_head


@dataclass
class Config(mixtral.Config):
    intermediate_size: int = 11008
    num_key_value_heads: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float | None = None
    attention_multiplier: float | None = 1.0
    bos_token_id: int | list | None = 1
    eos_token_id: int | list | None = 2


def moe(cfg: Config, vb: VarBuilder) -> TopLogitsMoE:
    E, H, F_ = cfg.num_local_experts, cfg.hidden_size, cfg.moe_intermediate_size
    hub = vb.contains("input_linear.weight")
    gate_up = vb.get((E, 2 * F_, H), "input_linear.weight" if hub else "experts.gate_up_proj")
    down = vb.get((E, H, F_), "output_linear.weight" if hub else "experts.down_proj")
    router = vb.get((E, H), "router.layer.weight" if vb.contains("router.layer.weight") else "router.weight")
    return TopLogitsMoE(router, gate_up, down, cfg.num_experts_per_tok, activation(cfg.hidden_act))


class DecoderLayer(llama.DecoderLayer):
    def make_mlp(self, cfg: Config, vb: VarBuilder, layer_idx: int, fuse: bool) -> nn.Module:
        return moe(cfg, vb.pp("block_sparse_moe"))


class ForCausalLM(CausalLM):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        self.config = cfg
        self.model = llama.Model(cfg, vb.pp("model"), fuse, layer_cls=DecoderLayer)
        self.lm_head = tied_or_own_head(vb, cfg, self.model.embed_tokens.weight, cfg.hidden_size, cfg.vocab_size)
        self.logits_scaling = cfg.logits_scaling
