"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2's attention (q/k/v bias) over Mixtral's sparse MoE
(softmax top-k, renormalised only with norm_topk_prob), plus a shared expert every token goes
through, its output scaled by sigmoid(shared_expert_gate(x)).

Sliding windows follow Qwen2MoeConfig: with use_sliding_window, layers i < max_window_layers with
i even slide (unless config.json lists layer_types).

Reference: transformers/models/qwen2_moe/modeling_qwen2_moe.py, configuration_qwen2_moe.py.
Weights: model.layers.N.mlp.{gate, experts.M.*, shared_expert.*, shared_expert_gate}.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..nn import SharedExpertMoE, SparseMoE, activation, linear
from ..varbuilder import VarBuilder
from . import llama, mixtral
from .base import CausalLM, tied_or_own_head


@dataclass
class Config(mixtral.Config):
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 16
    max_position_embeddings: int = 32768
    rope_theta: float | None = 10000.0
    qkv_bias: bool = True
    num_experts: int | None = 60
    num_experts_per_tok: int = 4
    moe_intermediate_size: int | None = 1408
    shared_expert_intermediate_size: int = 5632
    norm_topk_prob: bool = False

    def validate(self) -> None:
        super().validate()
        self._positive("shared_expert_intermediate_size")


def prepare(d: dict) -> dict:
    """config.json → the fields ember reads: the sliding layers as Qwen2MoeConfig derives them."""
    d = dict(d)
    if not d.get("use_sliding_window", False):
        d["sliding_window"] = None
    elif d.get("layer_types") is None and isinstance(d.get("num_hidden_layers", 24), int):
        n, m = d.get("num_hidden_layers", 24), d.get("max_window_layers", 28)
        if isinstance(m, int) and 0 <= n <= 1 << 16:
            d["layer_types"] = ["sliding_attention" if i % 2 == 0 and i < m else "full_attention" for i in range(n)]
    d["max_window_layers"] = None  # layer_types (or no window) decide
    return d


class DecoderLayer(llama.DecoderLayer):
    def make_mlp(self, cfg: Config, vb: VarBuilder, layer_idx: int, fuse: bool) -> nn.Module:
        if not cfg.sparse(layer_idx):
            return llama.MLP(cfg, vb.pp("mlp"), fuse)
        vb = vb.pp("mlp")
        moe = SparseMoE.from_vb(vb, cfg.num_local_experts, cfg.hidden_size, cfg.moe_intermediate_size,
                                cfg.num_experts_per_tok, cfg.norm_topk_prob, activation(cfg.hidden_act))
        shared = llama.MLP(cfg, vb.pp("shared_expert"), fuse, intermediate=cfg.shared_expert_intermediate_size)
        return SharedExpertMoE(moe, shared, linear(cfg.hidden_size, 1, vb.pp("shared_expert_gate")))


class ForCausalLM(CausalLM):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        self.config = cfg
        self.model = llama.Model(cfg, vb.pp("model"), fuse, layer_cls=DecoderLayer)
        self.lm_head = tied_or_own_head(vb, cfg, self.model.embed_tokens.weight, cfg.hidden_size, cfg.vocab_size)
