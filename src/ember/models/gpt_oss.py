"""GPT-OSS: Llama-shaped attention (biases on q/k/v/o) with a learned sink logit per head that joins
each softmax and is dropped, alternating sliding (window 128) and full layers (`layer_types`), yarn
rotary, and an MoE in every layer: router with bias, softmax over the top-k logits, experts with
biases and a clamped SwiGLU, (clamp(up, ±limit) + 1) * g * sigmoid(alpha * g) for
g = clamp(gate, max=limit), over gate/up columns interleaved in `gate_up_proj`.

Weights in bf16 (MXFP4 checkpoints: ember.hfquant.mxfp4 dequantises the experts at load): experts are stored
[E, H, 2F] / [E, F, H] (`mlp.experts.gate_up_proj`, `down_proj`, with `_bias`), used as transposed
views, no copy.

Reference: transformers/models/gpt_oss/modeling_gpt_oss.py, configuration_gpt_oss.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import gguf_source as gguf
from ..nn import RMSNorm, TopLogitsMoE, attention
from ..varbuilder import VarBuilder
from . import llama
from .base import CausalLM, Step, tied_or_own_head

# transformers' default rope for GPT-OSS (configs without rope_parameters/rope_scaling)
DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 4096}


@dataclass
class Config(llama.Config):
    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880
    num_hidden_layers: int = 36
    num_attention_heads: int = 64
    num_key_value_heads: int | None = 8
    head_dim: int | None = 64
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    sliding_window: int | None = 128
    attention_bias: bool = True
    num_local_experts: int = 128
    num_experts_per_tok: int = 4
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0

    def __post_init__(self):
        super().__post_init__()
        n = self.num_hidden_layers
        if self.layer_types is None and isinstance(n, int) and 0 <= n <= 1 << 16:
            self.layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]

    def validate(self) -> None:
        super().validate()
        self._positive("num_local_experts", "num_experts_per_tok", "swiglu_alpha", "swiglu_limit")
        self._require(self.num_experts_per_tok <= self.num_local_experts,
                      f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_local_experts ({self.num_local_experts})")


def prepare(d: dict) -> dict:
    if d.get("rope_parameters") is None and d.get("rope_scaling") is None:
        d = {**d, "rope_parameters": dict(DEFAULT_ROPE)}
    return d


class Attention(llama.Attention):
    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int, window: int | None, fuse: bool = True):
        super().__init__(cfg, vb, layer_idx, window, fuse)
        self.sinks = nn.Parameter(vb.get((cfg.num_attention_heads,), "sinks"), requires_grad=False)

    def _attend(self, q, k, v, step: Step, B: int, T: int) -> torch.Tensor:
        if step.cache is not None:
            k, v = step.cache.update(self.layer_idx, k, v, step.position_ids, step.kv_len, step.cache_rows,
                                     fresh=step.fresh)
        o = attention(q, k, v, step.mask(self.window), scale=self.scale, sinks=self.sinks)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class MoE(TopLogitsMoE):
    """The router (with bias; softmax over the k best logits) and the biased, clamped-SwiGLU experts."""

    def __init__(self, cfg: Config, vb: VarBuilder):
        E, H, F_ = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
        gate_up = vb.get((E, H, 2 * F_), "experts.gate_up_proj").transpose(1, 2)  # [E, 2F, H] view
        down = vb.get((E, F_, H), "experts.down_proj").transpose(1, 2)  # [E, H, F] view
        super().__init__(vb.get((E, H), "router.weight"), gate_up, down, cfg.num_experts_per_tok, None,
                         router_bias=vb.get((E,), "router.bias"))
        self.gate_up_bias = nn.Parameter(vb.get((E, 2 * F_), "experts.gate_up_proj_bias"), requires_grad=False)
        self.down_bias = nn.Parameter(vb.get((E, H), "experts.down_proj_bias"), requires_grad=False)
        self.alpha, self.limit = cfg.swiglu_alpha, cfg.swiglu_limit

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gu = F.linear(x, self.gate_up[e], self.gate_up_bias[e])
        gate, up = gu[..., ::2].clamp(max=self.limit), gu[..., 1::2].clamp(-self.limit, self.limit)
        return F.linear((up + 1) * (gate * torch.sigmoid(gate * self.alpha)), self.down[e], self.down_bias[e])


class DecoderLayer(llama.DecoderLayer):
    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int, window: int | None, fuse: bool = True):
        nn.Module.__init__(self)
        self.self_attn = Attention(cfg, vb.pp("self_attn"), layer_idx, window, fuse)
        self.mlp = MoE(cfg, vb.pp("mlp"))
        self.input_layernorm = RMSNorm.from_vb(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("input_layernorm"))
        self.post_attention_layernorm = RMSNorm.from_vb(cfg.hidden_size, cfg.rms_norm_eps,
                                                        vb.pp("post_attention_layernorm"))
        self.residual_multiplier = 1.0


class ForCausalLM(CausalLM):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        self.config = cfg
        self.model = llama.Model(cfg, vb.pp("model"), fuse, layer_cls=DecoderLayer)
        self.lm_head = tied_or_own_head(vb, cfg, self.model.embed_tokens.weight, cfg.hidden_size, cfg.vocab_size)


# ---- GGUF (llama.cpp's gpt-oss: gate and up de-interleaved into their own stacked experts, the
# experts [E, out, in]; the Derived tensors rebuild transformers' layout, dequantised) ------------
def _gguf_gpt_oss(meta: gguf.Meta) -> dict:
    cfg = gguf.decoder_config(meta, "gpt_oss", head_dim=gguf.head_dim(meta))
    moe = gguf.moe_config(meta)
    cfg.update(num_local_experts=moe["num_local_experts"], num_experts_per_tok=moe["num_experts_per_tok"],
               sliding_window=meta.need("attention.sliding_window"))
    if "moe_intermediate_size" in moe:
        cfg["intermediate_size"] = moe["moe_intermediate_size"]
    if cfg.get("rope_scaling", {}).get("rope_type") == "yarn":
        cfg["rope_scaling"] = {**DEFAULT_ROPE, **cfg["rope_scaling"]}
    return cfg


def _interleave(parts: list[torch.Tensor], cfg: dict) -> torch.Tensor:
    """gate [E, F, ...] and up [E, F, ...] -> [E, 2F, ...], gate and up rows alternating."""
    gate, up = parts
    return torch.stack((gate, up), dim=2).flatten(1, 2)


GGUF = {"gpt-oss": gguf.GGUFMapping(_gguf_gpt_oss, layer={
    **gguf.LLAMA_LAYER, "post_attention_norm": "post_attention_layernorm", "attn_sinks.weight": "self_attn.sinks",
    "ffn_gate_inp": "mlp.router", "ffn_down_exps.bias": "mlp.experts.down_proj_bias"}, derived=(
    gguf.Derived("mlp.experts.gate_up_proj", ("ffn_gate_exps.weight", "ffn_up_exps.weight"),
                 lambda p, cfg: _interleave(p, cfg).transpose(1, 2)),
    gguf.Derived("mlp.experts.gate_up_proj_bias", ("ffn_gate_exps.bias", "ffn_up_exps.bias"), _interleave),
    gguf.Derived("mlp.experts.down_proj", ("ffn_down_exps.weight",), lambda p, cfg: p[0].transpose(1, 2))))}
