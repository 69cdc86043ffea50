"""DeepSeek-V2 and -V3 (also Kimi K2, which is `deepseek_v3`): multi-head latent attention (MLA)
and fine-grained MoE with shared experts.

MLA: keys and values come from one compressed latent per token: kv_a_proj_with_mqa(x) splits into
the latent (kv_lora_rank wide, RMS-normalised) and one rotary key part shared by every head
(qk_rope_head_dim wide). kv_b_proj expands the latent into each head's non-rotary key part and
its value. Queries come from q_proj, or the low-rank q_a_proj → q_a_layernorm → q_b_proj. The KV
cache holds the latent and the rotated shared key part only (`cache_layout` (1, kv_lora_rank,
qk_rope_head_dim) per layer: (kv_lora_rank + qk_rope_head_dim) numbers a token, not
2 * heads * head_dim). A prefill expands the latents through kv_b_proj, as transformers does; a
decode step over the cache absorbs kv_b_proj instead (queries taken into the latent space, values
out of it), so it never expands the S cached latents (`Attention.absorbs` picks by cost). Rotary pairs are interleaved (V2 always, V3 with rope_interleave);
with yarn and mscale_all_dim the attention scale is multiplied by mscale².

MoE (layers from first_k_dense_replace on): `ember.nn.GroupLimitedMoE` routing (V3: sigmoid
scores + e_score_correction_bias for the choice, groups scored by their two best; V2: softmax,
"greedy" or "group_limited_greedy"), routed_scaling_factor, plus n_shared_experts always-on experts
(one MLP moe_intermediate_size * n_shared_experts wide).

Reference: transformers/models/deepseek_v3/modeling_deepseek_v3.py, deepseek_v2/modeling_deepseek_v2.py.
The multi-token-prediction layers of V3 checkpoints (model.layers.{num_hidden_layers}.*) are unused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .. import gguf_source as gguf
from ..nn import (GroupLimitedMoE, RMSNorm, SharedExpertMoE, activation, apply_rotary, apply_rotary_interleaved,
                  attention, linear, rope_parameters)
from ..varbuilder import VarBuilder
from . import llama
from .base import CausalLM, Step, tied_or_own_head


@dataclass
class Config(llama.Config):
    # DeepSeek-V3's defaults (V2's come from its registry entry)
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    max_position_embeddings: int = 4096
    bos_token_id: int | list | None = 0
    eos_token_id: int | list | None = 1
    moe_intermediate_size: int = 2048
    n_shared_experts: int | None = 1
    n_routed_experts: int | None = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    n_group: int | None = 8
    topk_group: int | None = 4
    num_experts_per_tok: int | None = 8
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    rope_interleave: bool = True
    topk_method: str | None = None
    scoring_func: str = "sigmoid"  # set by the registry: V3 sigmoid, V2 softmax (as transformers, whatever the file says)

    def __post_init__(self):
        super().__post_init__()
        self.head_dim = self.qk_rope_head_dim  # the rotary tables' width, as transformers sets it
        self.num_key_value_heads = self.num_attention_heads  # MLA has no KV heads (configs carry a stray 128)

    def validate(self) -> None:
        super().validate()
        self._positive("moe_intermediate_size", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "v_head_dim",
                       "n_group", "topk_group", "num_experts_per_tok", "routed_scaling_factor")
        self._positive("qk_nope_head_dim", "n_shared_experts", "n_routed_experts", "first_k_dense_replace",
                       allow_zero=True)
        self._require(self.scoring_func in ("sigmoid", "softmax"), f"unknown scoring_func {self.scoring_func!r}")
        if not self.moe_layers():
            return
        E, k = self.n_routed_experts, self.num_experts_per_tok
        self._require(E is not None and E > 0 and k is not None and k <= E,
                      f"num_experts_per_tok ({k}) must be set and at most n_routed_experts ({E})")
        if self.grouped():
            G, g = self.n_group, self.topk_group
            self._require(g is not None and E % G == 0 and g <= G,
                          f"n_routed_experts ({E}) must split into n_group ({G}) groups, topk_group ({g}) at most n_group")
            self._require(k <= g * (E // G), f"num_experts_per_tok ({k}) exceeds the experts of topk_group groups")
            self._require(self.scoring_func == "softmax" or E // G >= 2, "groups need two experts each (V3 scores a group by its best two)")

    def moe_layers(self) -> bool:
        return self.first_k_dense_replace < self.num_hidden_layers

    def grouped(self) -> bool:
        """Whether routing is group-limited (V3 always is; V2 with topk_method group_limited_greedy)."""
        if self.scoring_func == "softmax":
            return self.topk_method == "group_limited_greedy"
        return (self.n_group or 1) > 1


class Attention(nn.Module):
    """Multi-head latent attention; see the module docstring."""

    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int):
        super().__init__()
        self.layer_idx, self.window = layer_idx, None
        H, E = cfg.num_attention_heads, cfg.hidden_size
        self.num_heads, self.rank = H, cfg.kv_lora_rank
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        qk = self.nope + self.rope
        if cfg.q_lora_rank is None:
            self.q_proj = linear(E, H * qk, vb.pp("q_proj"))
        else:
            self.q_a_proj = linear(E, cfg.q_lora_rank, vb.pp("q_a_proj"), bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm.from_vb(cfg.q_lora_rank, 1e-6, vb.pp("q_a_layernorm"))
            self.q_b_proj = linear(cfg.q_lora_rank, H * qk, vb.pp("q_b_proj"))
        self.kv_a_proj_with_mqa = linear(E, self.rank + self.rope, vb.pp("kv_a_proj_with_mqa"), bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm.from_vb(self.rank, 1e-6, vb.pp("kv_a_layernorm"))
        self.kv_b_proj = linear(self.rank, H * (self.nope + self.v_dim), vb.pp("kv_b_proj"))
        self.o_proj = linear(H * self.v_dim, E, vb.pp("o_proj"), bias=cfg.attention_bias)
        self.rotate = apply_rotary_interleaved if cfg.rope_interleave or cfg.scoring_func == "softmax" else apply_rotary
        self.scale = qk ** -0.5
        p = rope_parameters(cfg.raw)
        if p["rope_type"] != "default" and p.get("mscale_all_dim"):
            factor = float(p.get("factor") or 1.0)
            m = 0.1 * p["mscale_all_dim"] * math.log(factor) + 1.0 if factor > 1 else 1.0
            self.scale *= m * m

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step: Step) -> torch.Tensor:
        B, T, _ = x.shape
        H = self.num_heads
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_pass, q_rot = q.view(B, T, H, self.nope + self.rope).transpose(1, 2).split([self.nope, self.rope], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent).unsqueeze(1)  # [B, 1, T, rank]: one "head" in the cache
        q_rot, k_rot = self.rotate(q_rot, k_rot.unsqueeze(1), cos, sin)
        if step.cache is not None:
            latent, k_rot = step.cache.update(self.layer_idx, latent, k_rot, step.position_ids, step.kv_len,
                                              step.cache_rows, fresh=step.fresh)
        S = latent.shape[2]
        if step.cache is not None and self.absorbs(T, S):
            return self._absorbed(q_pass, q_rot, latent, k_rot, step, B, T)
        kv = self.kv_b_proj(latent[:, 0]).view(B, S, H, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rot.expand(B, H, S, self.rope)], dim=-1)
        q = torch.cat([q_pass, q_rot], dim=-1)
        o = attention(q, k, v, step.mask(None), scale=self.scale)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * self.v_dim))


    def absorbs(self, T: int, S: int) -> bool:
        """Whether attending in the latent space costs fewer multiply-adds than expanding the S cached
        latents through kv_b_proj (decode: always; a long prefill: never)."""
        expand = S * self.rank * (self.nope + self.v_dim) + T * S * (self.nope + self.rope + self.v_dim)
        absorbed = T * (self.nope * self.rank + S * (2 * self.rank + self.rope) + self.rank * self.v_dim)
        return absorbed < expand

    def absorbed_weights(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj's weight as each head's key part [H, nope, rank] and value part [H, v, rank], read
        once by applying the layer to the identity (so any Linear kind, quantised or prepacked, gives it)
        and kept for later steps in the latents' dtype and device."""
        w = getattr(self, "_kv_b", None)
        if w is None or w.device != like.device or w.dtype != like.dtype:
            eye = torch.eye(self.rank, dtype=like.dtype, device=like.device)
            w = self.kv_b_proj(eye).t().reshape(self.num_heads, self.nope + self.v_dim, self.rank).contiguous()
            self._kv_b = w
        return w[:, :self.nope], w[:, self.nope:]

    def _absorbed(self, q_pass, q_rot, latent, k_rot, step: Step, B: int, T: int) -> torch.Tensor:
        """MLA with kv_b_proj absorbed (DeepSeek-V2 paper, appendix): each head's query is taken into the
        latent space (q_nope W_k), scored against the cached latents and the shared rotary key as one
        multi-query attention whose values are the latents, and the output leaves the latent space
        through W_v. The cache is read as it is; nothing S-long is expanded."""
        H, S = self.num_heads, latent.shape[2]
        w_k, w_v = self.absorbed_weights(latent)
        # every head reads the same single key/value "head": the heads' queries become more query rows of
        # one attention, and the latent and rotary scores are summed (no per-head or concatenated copy
        # of the cache)
        q_lat = torch.matmul(q_pass, w_k).reshape(B, 1, H * T, self.rank)
        scores = torch.matmul(q_lat, latent.transpose(-1, -2))
        scores = scores.add_(torch.matmul(q_rot.reshape(B, 1, H * T, self.rope), k_rot.transpose(-1, -2)))
        scores = scores.float().mul_(self.scale)
        mask = step.mask(None)
        if mask is None and T > 1:  # a fresh causal prefill: query t sees keys up to S - T + t
            mask = torch.ones(T, S, dtype=torch.bool, device=q_pass.device).tril(S - T)
        if mask is not None:
            scores = scores.masked_fill_(~mask.expand(B, H, T, S).reshape(B, 1, H * T, S), float("-inf"))
        o = torch.matmul(scores.softmax(dim=-1).to(latent.dtype), latent)  # [B, 1, H * T, rank]
        o = torch.matmul(o.view(B, H, T, self.rank), w_v.transpose(1, 2))  # [B, H, T, v]
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * self.v_dim))


def moe(cfg: Config, vb: VarBuilder, fuse: bool) -> nn.Module:
    routed = GroupLimitedMoE.from_vb(
        vb, cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok,
        cfg.norm_topk_prob, activation(cfg.hidden_act), scoring=cfg.scoring_func,
        bias=vb.get((cfg.n_routed_experts,), "gate.e_score_correction_bias") if cfg.scoring_func == "sigmoid" else None,
        n_group=cfg.n_group if cfg.grouped() else 1, topk_group=cfg.topk_group if cfg.grouped() else 1,
        group_score="top2" if cfg.scoring_func == "sigmoid" else "max", routed_scaling_factor=cfg.routed_scaling_factor)
    if not cfg.n_shared_experts:
        return routed
    shared = llama.MLP(cfg, vb.pp("shared_experts"), fuse, intermediate=cfg.moe_intermediate_size * cfg.n_shared_experts)
    return SharedExpertMoE(routed, shared)


class DecoderLayer(llama.DecoderLayer):
    """Llama's pre-norm layer (its forward, so the residual adds fuse with the norms) around MLA and
    the MoE."""

    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int, window: int | None, fuse: bool = True):
        nn.Module.__init__(self)
        self.self_attn = Attention(cfg, vb.pp("self_attn"), layer_idx)
        dense = layer_idx < cfg.first_k_dense_replace
        self.mlp = llama.MLP(cfg, vb.pp("mlp"), fuse) if dense else moe(cfg, vb.pp("mlp"), fuse)
        self.input_layernorm = RMSNorm.from_vb(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("input_layernorm"))
        self.post_attention_layernorm = RMSNorm.from_vb(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("post_attention_layernorm"))
        self.residual_multiplier = 1.0


class ForCausalLM(CausalLM):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        self.config = cfg
        self.model = llama.Model(cfg, vb.pp("model"), fuse, layer_cls=DecoderLayer)
        self.lm_head = tied_or_own_head(vb, cfg, self.model.embed_tokens.weight, cfg.hidden_size, cfg.vocab_size)

    def cache_layout(self) -> list[tuple[int, ...]]:
        """One latent "head" per layer: the normalised latent as keys, the rotated shared key part as values."""
        return [(1, layer.self_attn.rank, layer.self_attn.rope) for layer in self.model.layers]


# ---- GGUF (llama.cpp's deepseek2, V2 and V3; MLA written as MQA) ---------------------------------
SHARED_EXPERTS = {"ffn_gate_shexp": "mlp.shared_experts.gate_proj", "ffn_up_shexp": "mlp.shared_experts.up_proj",
                  "ffn_down_shexp": "mlp.shared_experts.down_proj"}
GGUF_MOE_LAYER = {**gguf.LLAMA_LAYER, **gguf.MOE_LAYER, **SHARED_EXPERTS,
                  "exp_probs_b.bias": "mlp.gate.e_score_correction_bias"}


def gguf_moe_config(meta: gguf.Meta) -> dict:
    """DeepSeek-style MoE fields (also GLM-4.5's) from `{arch}.expert_*` and
    `leading_dense_block_count`; a file without experts is dense throughout."""
    n = gguf.layer_count(meta)
    if meta.get("expert_count", kind=int) is None:
        return {"first_k_dense_replace": n, "n_routed_experts": None}
    moe = gguf.moe_config(meta)
    cfg = {"n_routed_experts": moe["num_local_experts"], "num_experts_per_tok": moe["num_experts_per_tok"],
           "first_k_dense_replace": meta.get("leading_dense_block_count", 0, kind=int),
           "n_shared_experts": meta.get("expert_shared_count", 0, kind=int),
           "routed_scaling_factor": float(meta.get("expert_weights_scale", 1.0, kind=(int, float))),
           "norm_topk_prob": moe.get("norm_topk_prob", False),
           "n_group": meta.get("expert_group_count", 1, kind=int), "topk_group": meta.get("expert_group_used_count", 1, kind=int)}
    if "moe_intermediate_size" in moe:
        cfg["moe_intermediate_size"] = moe["moe_intermediate_size"]
    return cfg


def _gguf_deepseek2(meta: gguf.Meta) -> dict:
    heads = gguf.attention_heads(meta)
    cfg = gguf.decoder_config(meta, "deepseek_v2")
    cfg["num_key_value_heads"] = heads
    cfg.update(gguf_moe_config(meta))
    sigmoid = meta.get("expert_gating_func", kind=int) == 2  # llama.cpp: 1 softmax (the default), 2 sigmoid
    if sigmoid:
        cfg["model_type"] = "deepseek_v3"
    elif (cfg.get("n_group") or 1) > 1:
        cfg["topk_method"] = "group_limited_greedy"
    rope = meta.need("rope.dimension_count")
    # files written for weight absorption give the MLA sizes as key_length_mla / value_length_mla
    qk = meta.get("attention.key_length_mla", kind=int) or meta.need("attention.key_length")
    v = meta.get("attention.value_length_mla", kind=int) or meta.need("attention.value_length")
    if not rope < qk or v < 1:
        raise gguf.ConfigError(f"{meta.f.path}: deepseek2 key length {qk} must exceed its rotary part {rope}, value "
                               f"length {v} be positive")
    cfg.update(kv_lora_rank=meta.need("attention.kv_lora_rank"), q_lora_rank=meta.get("attention.q_lora_rank", kind=int),
               qk_rope_head_dim=rope, qk_nope_head_dim=qk - rope, v_head_dim=v, rope_interleave=True)
    scaling = cfg.get("rope_scaling") or {}
    if "mscale_all_dim" in scaling:
        # llama.cpp leaves the rotary tables unscaled and puts mscale_all_dim's factor into the softmax
        # scale alone: transformers' yarn with mscale equal to mscale_all_dim
        cfg["rope_scaling"] = {**scaling, "mscale": scaling["mscale_all_dim"]}
    return cfg


def _kv_b(parts: list[torch.Tensor], cfg: dict) -> torch.Tensor:
    """kv_b_proj [H * (nope + v), rank] from llama.cpp's k_b [H, rank, nope] and v_b [H, v, rank]."""
    k_b, v_b = parts
    return torch.cat([k_b.transpose(1, 2), v_b], dim=1).reshape(-1, k_b.shape[1])


GGUF = {"deepseek2": gguf.GGUFMapping(_gguf_deepseek2, layer={
    **GGUF_MOE_LAYER,
    "attn_q_a": "self_attn.q_a_proj", "attn_q_a_norm": "self_attn.q_a_layernorm", "attn_q_b": "self_attn.q_b_proj",
    "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa", "attn_kv_a_norm": "self_attn.kv_a_layernorm",
    "attn_kv_b": "self_attn.kv_b_proj"},
    derived=(gguf.Derived("self_attn.kv_b_proj.weight", ("attn_k_b.weight", "attn_v_b.weight"), _kv_b),))}
