"""Nemotron-H (NVIDIA's hybrid): a stack of single-mixer blocks, each `x + mixer(norm(x))`, whose
mixer is one of a Mamba-2 layer ("linear_attention", `ember.models.mamba2.Mixer`), attention
without positional encoding ("full_attention"), a non-gated relu² MLP ("mlp") or a mixture of such
MLPs ("moe": sigmoid routing with a score-correction bias over groups of experts, DeepSeek-V3 style,
plus an always-on shared MLP, optionally through a smaller latent width). `layers_block_type` lists
the blocks (older configs give `hybrid_override_pattern`: M, *, - and E).

The cache is a StateCache: keys and values for the attention blocks, conv and SSM state for the
Mamba blocks, nothing for the MLPs.

Reference: transformers/models/nemotron_h/modeling_nemotron_h.py, configuration_nemotron_h.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import gguf_source as gguf
from ..config import DecoderConfig
from ..errors import ConfigError
from ..nn import RMSNorm, activation, linear
from ..nn.layers import Embedding
from ..nn.moe import GroupLimitedMoE
from ..varbuilder import VarBuilder
from . import llama, mamba2
from .base import CausalLM, Step, tied_or_own_head

MAMBA, ATTENTION, MLP, MOE = "linear_attention", "full_attention", "mlp", "moe"
PATTERN = {"M": MAMBA, "*": ATTENTION, "-": MLP, "E": MOE}


def prepare(d: dict) -> dict:
    types = d.get("layers_block_type") or d.get("layer_types")
    pattern = d.get("hybrid_override_pattern")
    if types is None and isinstance(pattern, str):
        if len(pattern) > 1 << 16 or any(c not in PATTERN for c in pattern):
            raise ConfigError(f"hybrid_override_pattern must be a string of {''.join(PATTERN)} "
                              f"(one per block), got {pattern!r:.60}")
        types = [PATTERN[c] for c in pattern]
    if isinstance(types, list):
        d = {**d, "layers_block_type": types, "num_hidden_layers": len(types)}
    renames = {"mamba_n_groups": "n_groups", "mamba_d_conv": "conv_kernel", "mamba_expand": "expand",
               "mamba_dt_min": "time_step_min", "mamba_conv_bias": "use_conv_bias", "mamba_chunk_size": "chunk_size"}
    return {**{new: d[old] for old, new in renames.items() if old in d and new not in d}, **d}


@dataclass
class Config(DecoderConfig):
    vocab_size: int = 131072
    hidden_size: int = 4096
    layers_block_type: list | None = None
    num_hidden_layers: int = 4
    num_attention_heads: int = 32
    intermediate_size: int = 21504
    mlp_hidden_act: str = "relu2"
    mlp_bias: bool = False
    layer_norm_epsilon: float = 1e-5
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    # the Mamba-2 blocks
    ssm_state_size: int = 128
    mamba_num_heads: int = 128
    mamba_head_dim: int = 64
    mamba_hidden_act: str = "silu"
    n_groups: int = 8
    conv_kernel: int = 4
    chunk_size: int = 128
    use_conv_bias: bool = True
    mamba_proj_bias: bool = False
    time_step_min: float = 0.001
    # the MoE blocks
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 7688
    moe_shared_expert_intermediate_size: int = 7688
    moe_latent_size: int | None = None
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | list | None = 1
    eos_token_id: int | list | None = 2

    def __post_init__(self):
        super().__post_init__()
        if self.layers_block_type is None:
            self.layers_block_type = [MAMBA, MOE, ATTENTION, MLP]

    def validate(self) -> None:
        super().validate()
        self._positive("ssm_state_size", "mamba_num_heads", "mamba_head_dim", "n_groups", "conv_kernel", "chunk_size",
                       "intermediate_size", "layer_norm_epsilon")
        bad = [t for t in self.layers_block_type if t not in (MAMBA, ATTENTION, MLP, MOE)]
        if bad:
            raise ConfigError(f"layers_block_type: {bad[0]!r:.40} is not a Nemotron-H block "
                              f"(one of {MAMBA}, {ATTENTION}, {MLP}, {MOE})")
        self._require(len(self.layers_block_type) == self.num_hidden_layers,
                      f"layers_block_type lists {len(self.layers_block_type)} blocks for {self.num_hidden_layers} layers")
        if MOE in self.layers_block_type:
            self._positive("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "n_group", "topk_group")
            self._require(self.num_experts_per_tok <= self.n_routed_experts and self.n_routed_experts % self.n_group == 0
                          and self.topk_group <= self.n_group,
                          "the MoE sizes are inconsistent (num_experts_per_tok <= n_routed_experts, a multiple of "
                          "n_group >= topk_group)")
        self.mamba_dims().validate(self)
        activation(self.mlp_hidden_act)

    def mamba_dims(self) -> mamba2.Dims:
        return mamba2.Dims(self.hidden_size, self.mamba_num_heads, self.mamba_head_dim, self.ssm_state_size,
                           self.n_groups, self.conv_kernel, self.chunk_size, self.mamba_proj_bias,
                           self.use_conv_bias, self.mamba_hidden_act, self.layer_norm_epsilon,
                           (self.time_step_min, float("inf")))

    def layer_windows(self) -> list[int | None]:
        return [None] * self.num_hidden_layers


class PlainMLP(nn.Module):
    """down(act(up(x))): no gate."""

    def __init__(self, hidden: int, width: int, vb: VarBuilder, bias: bool, act):
        super().__init__()
        self.up_proj = linear(hidden, width, vb.pp("up_proj"), bias=bias)
        self.down_proj = linear(width, hidden, vb.pp("down_proj"), bias=bias)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


class PlainExpertsMoE(GroupLimitedMoE):
    """GroupLimitedMoE's routing over non-gated experts: `gate_up` holds the up projections
    [E, F, H] only (no gate rows)."""

    def __init__(self, router, up, down, top_k, norm_topk_prob, act, **kw):
        # the parent's checks read gate_up as [E, 2F, L] and the router as [E, L] (the experts' width L,
        # the latent one where there is one): stand-ins of those shapes (no memory), then the real ones
        E, F_, L = up.shape
        super().__init__(torch.empty(E, L, device="meta"), torch.empty(E, 2 * F_, L, device="meta"), down, top_k,
                         norm_topk_prob, act, **kw)
        self.gate_up = nn.Parameter(up, requires_grad=False)
        self.router = nn.Parameter(router, requires_grad=False)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.act(F.linear(x, self.gate_up[e])), self.down[e])


def _experts(vb: VarBuilder, name: str, shape: tuple[int, int, int]) -> torch.Tensor:
    """The experts' `name` weights stacked [E, out, in]: transformers' fused tensor as it is, or the
    per-expert tensors of saved checkpoints (experts.N.name.weight) stacked once."""
    if vb.contains(f"experts.{name}"):
        return vb.get(shape, f"experts.{name}")
    first = vb.get(shape[1:], f"experts.0.{name}.weight")
    out = first.new_empty(shape)
    out[0].copy_(first)
    for i in range(1, shape[0]):
        out[i].copy_(vb.get(shape[1:], f"experts.{i}.{name}.weight"))
    return out


class LatentMoE(nn.Module):
    """Routed experts (through optional latent projections) plus the shared MLP, on the block input."""

    def __init__(self, cfg: Config, vb: VarBuilder):
        super().__init__()
        E, H, F_ = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        L = cfg.moe_latent_size or H
        act = activation(cfg.mlp_hidden_act)
        bias = vb.get_optional((E,), "gate.e_score_correction_bias")
        self.experts = PlainExpertsMoE(vb.get((E, H), "gate.weight"), _experts(vb, "up_proj", (E, F_, L)),
                                       _experts(vb, "down_proj", (E, L, F_)), cfg.num_experts_per_tok,
                                       cfg.norm_topk_prob, act, scoring="sigmoid", bias=bias, n_group=cfg.n_group,
                                       topk_group=cfg.topk_group, routed_scaling_factor=cfg.routed_scaling_factor)
        self.fc1_latent_proj = self.fc2_latent_proj = None
        if cfg.moe_latent_size is not None:
            self.fc1_latent_proj = linear(H, L, vb.pp("fc1_latent_proj"), bias=cfg.mlp_bias)
            self.fc2_latent_proj = linear(L, H, vb.pp("fc2_latent_proj"), bias=cfg.mlp_bias)
        self.shared_experts = PlainMLP(H, cfg.moe_shared_expert_intermediate_size, vb.pp("shared_experts"),
                                       cfg.mlp_bias, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        weights, idx = self.experts.route(flat)
        h = self.fc1_latent_proj(flat) if self.fc1_latent_proj is not None else flat
        out = torch.zeros(h.shape[0], h.shape[1], dtype=torch.float32, device=x.device)
        for e in idx.unique().tolist():
            rows, slot = (idx == e).nonzero(as_tuple=True)
            out.index_add_(0, rows, (self.experts.expert(e, h[rows]).float() * weights[rows, slot, None]))
        out = out.to(x.dtype)
        if self.fc2_latent_proj is not None:
            out = self.fc2_latent_proj(out)
        return out.view(B, T, H) + self.shared_experts(x)


class Block(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int):
        super().__init__()
        self.kind = cfg.layers_block_type[layer_idx]
        self.norm = RMSNorm.from_vb(cfg.hidden_size, cfg.layer_norm_epsilon, vb.pp("norm"), scale_in_float=True)
        m = vb.pp("mixer")
        self.self_attn = self.mamba = None
        if self.kind == MAMBA:
            self.mamba = self.mixer = mamba2.Mixer(cfg.mamba_dims(), m, layer_idx)
        elif self.kind == ATTENTION:
            self.self_attn = self.mixer = llama.Attention(cfg, m, layer_idx, None, rotary=False)
        elif self.kind == MLP:
            self.mixer = PlainMLP(cfg.hidden_size, cfg.intermediate_size, m, cfg.mlp_bias, activation(cfg.mlp_hidden_act))
        else:
            self.mixer = LatentMoE(cfg, m)

    def state_spec(self):
        return self.mamba.state_spec() if self.mamba is not None else None

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        h = self.norm(x)
        if self.mamba is not None:
            h = self.mamba(h, step)
        elif self.self_attn is not None:
            h = self.self_attn(h, None, None, step)
        else:
            h = self.mixer(h)
        return x + h


class Model(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder):
        super().__init__()
        self.embeddings = Embedding.from_vb(cfg.vocab_size, cfg.hidden_size, vb.pp("embeddings"))
        self.layers = nn.ModuleList(Block(cfg, vb.pp(f"layers.{i}"), i) for i in range(cfg.num_hidden_layers))
        self.norm_f = RMSNorm.from_vb(cfg.hidden_size, cfg.layer_norm_epsilon, vb.pp("norm_f"), scale_in_float=True)

    def forward(self, input_ids: torch.Tensor, step: Step) -> torch.Tensor:
        x = self.embeddings(input_ids)
        for layer in self.layers:
            x = layer(x, step)
        return self.norm_f(x)


class ForCausalLM(CausalLM):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        self.config = cfg
        # transformers names the stack `model`; NVIDIA's original checkpoints `backbone`
        self.model = Model(cfg, vb.pp_first(["model", "backbone"], "embeddings.weight"))
        self.lm_head = tied_or_own_head(vb, cfg, self.model.embeddings.weight, cfg.hidden_size, cfg.vocab_size)


# ---- GGUF (llama.cpp's nemotron_h: the dense models; nemotron_h_moe is not mapped) ---------------
def _gguf_config(meta: gguf.Meta) -> dict:
    n = gguf.layer_count(meta)

    def per_layer(key: str) -> list[int]:
        v = meta.get(key, 0, kind=(int, list))
        v = v if isinstance(v, list) else [v] * n
        if len(v) != n or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v):
            raise ConfigError(f"{meta.f.path}: {meta.arch}.{key} should list {n} non-negative integers, got {v!r:.80}")
        return v

    kv, ff = per_layer("attention.head_count_kv"), per_layer("feed_forward_length")
    # llama.cpp marks the attention blocks by their KV heads and the MLP blocks by their width
    types = [ATTENTION if k else MLP if f else MAMBA for k, f in zip(kv, ff)]
    d = mamba2.ssm_dims(meta)
    heads = meta.need("attention.head_count")
    cfg = {"model_type": "nemotron_h", "vocab_size": gguf.vocab_size(meta), "hidden_size": meta.need("embedding_length"),
           "layers_block_type": types, "num_hidden_layers": n, "num_attention_heads": heads,
           "num_key_value_heads": max(kv) or heads, "head_dim": meta.get("attention.key_length", kind=int),
           "intermediate_size": max(ff) or 1, "max_position_embeddings": meta.get("context_length", 4096, kind=int),
           "layer_norm_epsilon": float(meta.get("attention.layer_norm_rms_epsilon", 1e-5, kind=(int, float))),
           "mamba_num_heads": d["heads"], "mamba_head_dim": d["head_dim"], "ssm_state_size": d["state"],
           "n_groups": d["groups"], "conv_kernel": d["conv"], "use_conv_bias": "blk.0.ssm_conv1d.bias" in meta.names,
           "tie_word_embeddings": "output.weight" not in meta.names, **gguf.token_ids(meta.m),
           "time_step_min": 0.0}  # llama.cpp's scan never clamps dt
    return cfg


_TABLE, _DERIVED = mamba2.mixer_gguf("mixer")
GGUF = {"nemotron_h": gguf.GGUFMapping(
    _gguf_config, top={"token_embd": "backbone.embeddings", "output_norm": "backbone.norm_f", "output": "lm_head"},
    layer={"attn_norm": "norm", **_TABLE, "attn_q": "mixer.q_proj", "attn_k": "mixer.k_proj", "attn_v": "mixer.v_proj",
           "attn_output": "mixer.o_proj", "ffn_up": "mixer.up_proj", "ffn_down": "mixer.down_proj"},
    layers_prefix="backbone.layers", derived=_DERIVED)}
