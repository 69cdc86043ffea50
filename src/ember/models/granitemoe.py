"""GraniteMoE (Granite 3.0 MoE): Granite's multipliers (embedding, residual, attention scale,
logits) over a sparse MoE in every layer whose router takes the top-k logits, then the softmax of
those k. The experts are stored fused: `block_sparse_moe.input_linear.weight` [E, 2F, H] (gate
rows, then up rows), `output_linear.weight` [E, H, F], `router.layer.weight` (transformers 5 names
them `experts.gate_up_proj`, `experts.down_proj`, `router.weight` in memory; both are read).

GraniteMoeShared (`granitemoeshared`) adds a dense gated MLP every token goes through
(`shared_mlp.input_linear` [2S, H], gate rows then up rows, `shared_mlp.output_linear`), S =
shared_intermediate_size (0: none).

Reference: transformers/models/granitemoe/modeling_granitemoe.py, configuration_granitemoe.py,
granitemoeshared/modeling_granitemoeshared.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import gguf_source as gguf
from ..nn import SharedExpertMoE, TopLogitsMoE, activation, linear
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
    shared_intermediate_size: int = 0

    def validate(self) -> None:
        super().validate()
        self._positive("shared_intermediate_size", allow_zero=True)


class SharedMLP(nn.Module):
    """GraniteMoeShared's always-on expert: down(act(gate(x)) * up(x)) from one fused input_linear."""

    def __init__(self, cfg: Config, vb: VarBuilder):
        super().__init__()
        S, H = cfg.shared_intermediate_size, cfg.hidden_size
        self.input_linear = linear(H, 2 * S, vb.pp("input_linear"))
        self.output_linear = linear(S, H, vb.pp("output_linear"))
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.input_linear(x).chunk(2, dim=-1)
        return self.output_linear(self.act(g) * u)


def moe(cfg: Config, vb: VarBuilder) -> TopLogitsMoE:
    E, H, F_ = cfg.num_local_experts, cfg.hidden_size, cfg.moe_intermediate_size
    hub = vb.contains("input_linear.weight")
    gate_up = vb.get((E, 2 * F_, H), "input_linear.weight" if hub else "experts.gate_up_proj")
    down = vb.get((E, H, F_), "output_linear.weight" if hub else "experts.down_proj")
    router = vb.get((E, H), "router.layer.weight" if vb.contains("router.layer.weight") else "router.weight")
    return TopLogitsMoE(router, gate_up, down, cfg.num_experts_per_tok, activation(cfg.hidden_act))


class DecoderLayer(llama.DecoderLayer):
    def make_mlp(self, cfg: Config, vb: VarBuilder, layer_idx: int, fuse: bool) -> nn.Module:
        routed = moe(cfg, vb.pp("block_sparse_moe"))
        if not cfg.shared_intermediate_size:
            return routed
        return SharedExpertMoE(routed, SharedMLP(cfg, vb.pp("shared_mlp")))


class ForCausalLM(CausalLM):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        self.config = cfg
        self.model = llama.Model(cfg, vb.pp("model"), fuse, layer_cls=DecoderLayer)
        self.lm_head = tied_or_own_head(vb, cfg, self.model.embed_tokens.weight, cfg.hidden_size, cfg.vocab_size)
        self.logits_scaling = cfg.logits_scaling


# ---- GGUF (llama.cpp's granitemoe: the llama converter, so Q/K permuted; input_linear split into
# gate and up, which the Derived tensors put back) ---------------------------------------------
def _gguf_granitemoe(meta: gguf.Meta) -> dict:
    cfg = gguf.decoder_config(meta, "granitemoe")
    cfg.update(gguf.moe_config(meta))
    cfg.pop("norm_topk_prob", None)
    for key, name in (("attention.scale", "attention_multiplier"), ("embedding_scale", "embedding_multiplier"),
                      ("residual_scale", "residual_multiplier"), ("logit_scale", "logits_scaling")):
        v = meta.get(key, kind=(int, float))
        if v is not None:
            cfg[name] = float(v)
    shared = meta.get("expert_shared_feed_forward_length", kind=int)
    if shared:
        cfg.update(model_type="granitemoeshared", shared_intermediate_size=shared)
    return cfg


def _cat_rows(parts: list, cfg: dict):
    return torch.cat(parts, dim=-2)


GRANITEMOE_LAYER = {**gguf.LLAMA_LAYER, "ffn_gate_inp": "block_sparse_moe.router",
                    "ffn_down_exps.weight": "block_sparse_moe.experts.down_proj",
                    "ffn_down_shexp": "shared_mlp.output_linear"}
GGUF = {"granitemoe": gguf.GGUFMapping(_gguf_granitemoe, layer=GRANITEMOE_LAYER, permute_qk=True, derived=(
    gguf.Derived("block_sparse_moe.experts.gate_up_proj", ("ffn_gate_exps.weight", "ffn_up_exps.weight"), _cat_rows),
    gguf.Derived("shared_mlp.input_linear.weight", ("ffn_gate_shexp.weight", "ffn_up_shexp.weight"), _cat_rows)))}
