"""MiniMax-M2: Llama's pre-norm layers with RMSNorm over the whole q and k projections, rotary
over the first `rotary_dim` dims of each head (halves), and an MoE in every layer routed by sigmoid
scores: the top-k of score + e_score_correction_bias are chosen, their scores (bias excluded)
renormalised to sum to one.

Weights: the Hub's `block_sparse_moe.{gate, experts.N.w1/w2/w3, e_score_correction_bias}`, or
transformers 5's `mlp.{gate, experts.gate_up_proj/down_proj, e_score_correction_bias}`.

Reference: transformers/models/minimax_m2/modeling_minimax_m2.py, configuration_minimax_m2.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .. import gguf_source as gguf
from ..nn import GroupLimitedMoE, activation
from ..varbuilder import VarBuilder
from . import llama, mixtral
from .base import CausalLM, tied_or_own_head


@dataclass
class Config(mixtral.Config):
    vocab_size: int = 200064
    hidden_size: int = 3072
    intermediate_size: int = 1536
    num_hidden_layers: int = 62
    num_attention_heads: int = 48
    num_key_value_heads: int | None = 8
    head_dim: int | None = 128
    max_position_embeddings: int = 196608
    rms_norm_eps: float = 1e-6
    bos_token_id: int | list | None = 200034
    eos_token_id: int | list | None = 200020
    num_local_experts: int | None = 256
    num_experts_per_tok: int = 8


def prepare(d: dict) -> dict:
    # released checkpoints give partial rotary as rotary_dim
    r, h = d.get("rotary_dim"), d.get("head_dim", 128)
    if isinstance(r, int) and isinstance(h, int) and h > 0 and "partial_rotary_factor" not in d:
        d = {**d, "partial_rotary_factor": r / h}
    return d


class DecoderLayer(llama.DecoderLayer):
    def make_attention(self, cfg: Config, vb: VarBuilder, layer_idx: int, window: int | None, fuse: bool):
        return llama.Attention(cfg, vb.pp("self_attn"), layer_idx, window, fuse, qk_norm="full")

    def make_mlp(self, cfg: Config, vb: VarBuilder, layer_idx: int, fuse: bool) -> nn.Module:
        moe = vb.pp("block_sparse_moe") if vb.contains("block_sparse_moe.gate.weight") else vb.pp("mlp")
        E = cfg.num_local_experts
        return GroupLimitedMoE.from_vb(moe, E, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok,
                                       True, activation(cfg.hidden_act), bias=moe.get((E,), "e_score_correction_bias"))


class ForCausalLM(CausalLM):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        self.config = cfg
        self.model = llama.Model(cfg, vb.pp("model"), fuse, layer_cls=DecoderLayer)
        self.lm_head = tied_or_own_head(vb, cfg, self.model.embed_tokens.weight, cfg.hidden_size, cfg.vocab_size)


# ---- GGUF (llama.cpp's minimax-m2: experts stacked, sigmoid routing with exp_probs_b) ------------
def _gguf_minimax_m2(meta: gguf.Meta) -> dict:
    head = gguf.head_dim(meta)
    cfg = gguf.decoder_config(meta, "minimax_m2", head_dim=head)
    cfg.update(gguf.moe_config(meta))
    cfg.pop("norm_topk_prob", None)
    rot = meta.get("rope.dimension_count", kind=int)
    if rot is not None:
        cfg["rotary_dim"] = rot
    return cfg


GGUF = {"minimax-m2": gguf.GGUFMapping(_gguf_minimax_m2, layer={
    **gguf.LLAMA_LAYER, **gguf.MOE_LAYER, "exp_probs_b.bias": "mlp.e_score_correction_bias"})}
