"""PhiMoE (Phi-3.5-MoE): Mixtral's layers with LayerNorm (with bias) in place of RMSNorm, optional
attention and lm_head biases, and the SparseMixer router: two experts per token, chosen one after the
other, each weighted by its softmax over the logits within 2 * router_jitter_noise (relative) of its
own, the weights not renormalised.

Longrope scaling (Phi-3.5-MoE) is read with its `short_mscale` / `long_mscale` as the attention
factor; the reference switches between the two with the batch's length, so only equal ones (as the
released checkpoint has) are supported.

Reference: transformers/models/phimoe/modeling_phimoe.py (sparsemixer in eval mode).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import gguf_source as gguf
from ..distributed import layers as parallel
from ..errors import ConfigError
from ..nn import LayerNorm, SparseMoE, activation
from ..varbuilder import VarBuilder
from . import llama, mixtral
from .base import CausalLM, tied_or_own_head


@dataclass
class Config(mixtral.Config):
    vocab_size: int = 32064
    intermediate_size: int = 6400
    num_local_experts: int | None = 16
    rms_norm_eps: float = 1e-5  # the LayerNorms' eps
    router_jitter_noise: float = 0.01
    lm_head_bias: bool = False

    def validate(self) -> None:
        super().validate()
        self._positive("router_jitter_noise", allow_zero=True)
        self._require(self.num_local_experts >= 2, f"SparseMixer routes to two experts; "
                                                   f"num_local_experts is {self.num_local_experts}")


def prepare(d: dict) -> dict:
    """Longrope's equal short/long mscale becomes its attention factor (see the module docstring); a
    GGUF file's longrope gives its attention factor itself."""
    for key in ("rope_parameters", "rope_scaling"):
        p = d.get(key)
        if isinstance(p, dict) and p.get("rope_type", p.get("type")) not in (None, "default") \
                and ("short_mscale" in p or "long_mscale" in p or "attention_factor" not in p):
            short, long = p.get("short_mscale"), p.get("long_mscale")
            if short != long or not isinstance(short, (int, float)):
                raise ConfigError(f"phimoe: short_mscale {short!r:.20} and long_mscale {long!r:.20} must be equal "
                                  f"numbers (the reference switches between them with the batch's length)")
            d = {**d, key: {**p, "attention_factor": float(short)}}
    return d


class MoE(SparseMoE):
    """SparseMixer routing (eval mode) over Mixtral's experts."""

    def __init__(self, router, gate_up, down, top_k: int, norm_topk_prob: bool, act, *, jitter_eps: float = 0.01,
                 **kw):
        super().__init__(router, gate_up, down, 2, False, act, **kw)
        self.jitter_eps = jitter_eps

    def _pick(self, s: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the best of s, weighted by its softmax over the entries of s within the jitter of it (as
        # the reference, the gap is measured relative to the raw scores)
        best, idx = s.max(dim=-1, keepdim=True)
        far = (best - scores) / scores.abs().clamp(min=best) > 2 * self.jitter_eps
        return torch.softmax(s.masked_fill(far, float("-inf")), dim=-1).gather(-1, idx), idx

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = F.linear(x, self.router).float()
        w1, i1 = self._pick(scores, scores)
        w2, i2 = self._pick(scores.scatter(-1, i1, float("-inf")), scores)
        return torch.cat((w1, w2), dim=-1), torch.cat((i1, i2), dim=-1)


class DecoderLayer(llama.DecoderLayer):
    def make_norm(self, cfg: Config, vb: VarBuilder) -> nn.Module:
        return LayerNorm.from_vb(cfg.hidden_size, cfg.rms_norm_eps, vb)

    def make_mlp(self, cfg: Config, vb: VarBuilder, layer_idx: int, fuse: bool) -> nn.Module:
        moe = vb.pp("block_sparse_moe") if vb.contains("block_sparse_moe.gate.weight") else vb.pp("mlp")
        rows = vb.tp.even(cfg.intermediate_size, "intermediate_size") if vb.tp is not None else None
        return parallel.row_parallel(MoE.from_vb(moe, cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size,
                                                 2, False, activation(cfg.hidden_act), rows,
                                                 jitter_eps=cfg.router_jitter_noise), vb.tp)


class ForCausalLM(CausalLM):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        self.config = cfg
        self.model = llama.Model(cfg, vb.pp("model"), fuse, layer_cls=DecoderLayer)
        self.model.norm = LayerNorm.from_vb(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("model.norm"))
        self.lm_head = tied_or_own_head(vb, cfg, self.model.embed_tokens.weight, cfg.hidden_size, cfg.vocab_size,
                                        bias=cfg.lm_head_bias)


# ---- GGUF (llama.cpp's phimoe architecture) -----------------------------------------------------------
def _gguf_phimoe(meta: gguf.Meta) -> dict:
    cfg = llama.gguf_phi3(meta, "phimoe")
    moe = gguf.moe_config(meta)
    cfg.update(num_local_experts=moe["num_local_experts"], num_experts_per_tok=moe["num_experts_per_tok"],
               attention_bias="blk.0.attn_q.bias" in meta.names, lm_head_bias="output.bias" in meta.names)
    return cfg


GGUF = {"phimoe": gguf.GGUFMapping(_gguf_phimoe, layer={
    **gguf.LLAMA_LAYER, **{k: v.replace("mlp.", "block_sparse_moe.") for k, v in gguf.MOE_LAYER.items()
                           if "shexp" not in k}})}
