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

from .. import gguf_source as gguf
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


# ---- GGUF (llama.cpp's granitehybrid: the attention layers marked by their KV heads, Q/K permuted by
# the llama converter, the experts and the shared MLP split as granitemoe's; a model without experts
# stores its shared MLP as the plain ffn_* tensors) ------------------------------------------------
def _gguf_config(meta: gguf.Meta) -> dict:
    n = gguf.layer_count(meta)
    kv = meta.need("attention.head_count_kv", kind=(int, list))
    kv = kv if isinstance(kv, list) else [kv] * n
    if len(kv) != n or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in kv):
        raise ConfigError(f"{meta.f.path}: granitehybrid.attention.head_count_kv should list {n} KV-head counts "
                          f"(0 for the Mamba layers), got {kv!r:.80}")
    d, hidden = mamba2.ssm_dims(meta), meta.need("embedding_length")
    heads = gguf.attention_heads(meta)
    experts = meta.get("expert_count", 0, kind=int)
    # which layers attend: their tensors say (llama.cpp marks them by KV heads too, but its converter writes
    # all zeros for a transformers 5 config.json, whose layer_types say "full_attention")
    attends = [f"blk.{i}.attn_q.weight" in meta.names for i in range(n)]
    kv_heads = max(kv)
    if not kv_heads and any(attends):
        k = meta.f.tensors[f"blk.{attends.index(True)}.attn_k.weight"]
        kv_heads = k.shape[0] // (hidden // heads)
    cfg = {"model_type": "granitemoehybrid", "vocab_size": gguf.vocab_size(meta), "hidden_size": hidden,
           "num_hidden_layers": n, "num_attention_heads": heads, "num_key_value_heads": kv_heads or heads,
           "layer_types": ["attention" if a else "mamba" for a in attends],
           "max_position_embeddings": meta.get("context_length", 4096, kind=int),
           "rms_norm_eps": float(meta.get("attention.layer_norm_rms_epsilon", 1e-5, kind=(int, float))),
           "position_embedding_type": "rope" if meta.get("rope.scaling.finetuned", False, kind=bool) else None,
           "mamba_n_heads": d["heads"], "mamba_d_head": d["head_dim"], "mamba_d_state": d["state"],
           "mamba_n_groups": d["groups"], "mamba_d_conv": d["conv"], "mamba_expand": d["inner"] // hidden,
           "mamba_conv_bias": "ssm_conv1d.bias" in _any_layer(meta),
           "mamba_proj_bias": "ssm_in.bias" in _any_layer(meta),
           "tie_word_embeddings": "output.weight" not in meta.names, **gguf.token_ids(meta.m)}
    theta = meta.get("rope.freq_base", kind=(int, float))
    if theta is not None:
        cfg["rope_theta"] = float(theta)
    for key, name in (("attention.scale", "attention_multiplier"), ("embedding_scale", "embedding_multiplier"),
                      ("residual_scale", "residual_multiplier"), ("logit_scale", "logits_scaling")):
        v = meta.get(key, kind=(int, float))
        if v is not None:
            cfg[name] = float(v)
    ff = meta.int_or_uniform("feed_forward_length")
    if experts:
        cfg.update(gguf.moe_config(meta))
        cfg["intermediate_size"] = cfg.pop("moe_intermediate_size", ff)
        cfg["shared_intermediate_size"] = meta.get("expert_shared_feed_forward_length", kind=int) or 0
    else:  # the shared MLP alone, written as the layer's plain MLP (its width from the tensor: the
        # metadata's feed_forward_length is the config's unused intermediate_size)
        gate = next((meta.f.tensors[f"blk.{i}.ffn_gate.weight"] for i in range(n)
                     if f"blk.{i}.ffn_gate.weight" in meta.names), None)
        width = gate.shape[0] if gate is not None else ff
        cfg.update(num_local_experts=0, shared_intermediate_size=width, intermediate_size=width)
    return cfg


def _any_layer(meta: gguf.Meta) -> set[str]:
    """The layer-relative tensor names (leaf.suffix) any layer of the file has."""
    return {name.split(".", 2)[2] for name in meta.names if name.startswith("blk.") and name.count(".") >= 3}


_TABLE, _DERIVED = mamba2.mixer_gguf("mamba")
GGUF = {"granitehybrid": gguf.GGUFMapping(
    _gguf_config, layer={**granitemoe.GRANITEMOE_LAYER, **_TABLE, "ffn_down": "shared_mlp.output_linear"},
    permute_qk=True, derived=granitemoe.GGUF["granitemoe"].derived + _DERIVED + (
        gguf.Derived("shared_mlp.input_linear.weight", ("ffn_gate.weight", "ffn_up.weight"),
                     granitemoe._cat_rows),))}
