"""ERNIE 4.5 MoE: ERNIE 4.5's layers (pairwise rotary, `use_bias`) with an MoE on layers
moe_layer_start_index..moe_layer_end_index every moe_layer_interval-th: softmax scores, the top-k
of score + e_score_correction_bias (`moe_statics`) chosen, their scores renormalised, plus
moe_num_shared_experts always-on experts (one MLP that many times moe_intermediate_size wide).

Reference: transformers/models/ernie4_5_moe/modeling_ernie4_5_moe.py, configuration_ernie4_5_moe.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .. import gguf_source as gguf
from ..nn import GroupLimitedMoE, SharedExpertMoE, activation, linear_from_weight
from ..varbuilder import VarBuilder
from . import deepseek, ernie4_5, llama
from .base import CausalLM


@dataclass
class Config(ernie4_5.Config):
    hidden_size: int = 2560
    intermediate_size: int = 12288
    num_hidden_layers: int = 28
    num_attention_heads: int = 20
    num_key_value_heads: int | None = 4
    moe_intermediate_size: int = 1536
    moe_k: int = 6
    moe_num_experts: int = 64
    moe_num_shared_experts: int = 2
    moe_layer_start_index: int = 1
    moe_layer_end_index: int = -1
    moe_layer_interval: int = 1
    moe_norm_min: float = 1e-12

    def validate(self) -> None:
        super().validate()
        self._positive("moe_intermediate_size", "moe_k", "moe_num_experts", "moe_layer_interval")
        self._positive("moe_num_shared_experts", "moe_layer_start_index", allow_zero=True)
        self._require(self.moe_k <= self.moe_num_experts,
                      f"moe_k ({self.moe_k}) exceeds moe_num_experts ({self.moe_num_experts})")

    def sparse(self, i: int) -> bool:
        end = self.num_hidden_layers - 1 if self.moe_layer_end_index == -1 else self.moe_layer_end_index
        return (i + 1) % self.moe_layer_interval == 0 and self.moe_layer_start_index <= i <= end


class DecoderLayer(ernie4_5.DecoderLayer):
    def make_mlp(self, cfg: Config, vb: VarBuilder, layer_idx: int, fuse: bool) -> nn.Module:
        if not cfg.sparse(layer_idx):
            return llama.MLP(cfg, vb.pp("mlp"), fuse)
        vb, E = vb.pp("mlp"), cfg.moe_num_experts
        name = next((n for n in ("moe_statics.e_score_correction_bias", "gate.moe_statics.e_score_correction_bias")
                     if vb.contains(n)), "moe_statics.e_score_correction_bias")
        moe = GroupLimitedMoE.from_vb(vb, E, cfg.hidden_size, cfg.moe_intermediate_size, cfg.moe_k, True,
                                      activation(cfg.hidden_act), scoring="softmax", bias=vb.get((1, E), name)[0])
        if not cfg.moe_num_shared_experts:
            return moe
        shared = llama.MLP(cfg, vb.pp("shared_experts"), fuse,
                           intermediate=cfg.moe_intermediate_size * cfg.moe_num_shared_experts)
        return SharedExpertMoE(moe, shared)


class ForCausalLM(CausalLM):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        self.config = cfg
        self.model = llama.Model(cfg, vb.pp("model"), fuse, layer_cls=DecoderLayer)
        V, E = cfg.vocab_size, cfg.hidden_size
        tied = cfg.tie_word_embeddings or not vb.contains("lm_head.weight")
        weight = self.model.embed_tokens.weight if tied else vb.get((V, E), "lm_head.weight", quantized=True)
        self.lm_head = linear_from_weight(weight, vb.get((V,), "lm_head.bias") if cfg.use_bias else None)


# ---- GGUF (llama.cpp's ernie4_5-moe) ---------------------------------------------------------------
def _gguf_ernie4_5_moe(meta: gguf.Meta) -> dict:
    cfg = ernie4_5._gguf_ernie4_5(meta, "ernie4_5_moe")
    moe = gguf.moe_config(meta)
    cfg.update(moe_num_experts=moe["num_local_experts"], moe_k=moe["num_experts_per_tok"],
               moe_layer_start_index=meta.get("leading_dense_block_count", 0, kind=int),
               moe_layer_interval=meta.get("interleave_moe_layer_step", 1, kind=int),
               moe_num_shared_experts=meta.get("expert_shared_count", 0, kind=int))
    if "moe_intermediate_size" in moe:
        cfg["moe_intermediate_size"] = moe["moe_intermediate_size"]
    return cfg


GGUF = {"ernie4_5-moe": gguf.GGUFMapping(_gguf_ernie4_5_moe, layer={
    **gguf.LLAMA_LAYER, **gguf.MOE_LAYER, **deepseek.SHARED_EXPERTS,
    "exp_probs_b.bias": "mlp.moe_statics.e_score_correction_bias"})}
