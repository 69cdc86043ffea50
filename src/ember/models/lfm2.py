"""LFM2 (Liquid AI): Llama's pre-norm layers where most layers mix tokens with a gated short
convolution instead of attention: in_proj → (B, C, x); y = C * conv(B * x) over the last
`conv_L_cache` positions (depthwise, no activation); out_proj. The attention layers normalise each
head of q and k (RMSNorm). `layer_types` ("conv" / "full_attention", or `full_attn_idxs`) says which.
The MLP's width is adjusted as transformers does (2/3, `block_ffn_dim_multiplier`, rounded up to
`block_multiple_of`).

The cache is a StateCache: keys and values for the attention layers, the convolution's last inputs
for the conv layers. Checkpoint names differ from Llama's only by name (`operator_norm`, `ffn_norm`,
`feed_forward.w1/w3/w2`, `self_attn.out_proj`, `q_layernorm`, `embedding_norm`), read through one
renaming of the VarBuilder.

Reference: transformers/models/lfm2/modeling_lfm2.py, configuration_lfm2.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import gguf_source as gguf
from ..errors import ConfigError
from ..nn import linear
from ..nn.ssm import CausalConv, padding_zeroed, read_state, write_state
from ..varbuilder import VarBuilder
from . import llama
from .base import CausalLM, Step, tied_or_own_head

# ember's Llama names -> LFM2's
_NAMES = ((".self_attn.o_proj.", ".self_attn.out_proj."), (".self_attn.q_norm.", ".self_attn.q_layernorm."),
          (".self_attn.k_norm.", ".self_attn.k_layernorm."), (".input_layernorm.", ".operator_norm."),
          (".post_attention_layernorm.", ".ffn_norm."), (".mlp.gate_proj.", ".feed_forward.w1."),
          (".mlp.up_proj.", ".feed_forward.w3."), (".mlp.down_proj.", ".feed_forward.w2."))


def _checkpoint_name(key: str) -> str | None:
    if key.startswith("model.norm."):
        return "model.embedding_norm." + key[len("model.norm."):]
    for ours, theirs in _NAMES:
        if ours in key:
            return key.replace(ours, theirs)
    return None


def prepare(d: dict) -> dict:
    """LFM2's config.json names onto the fields the shared Llama blocks read."""
    d = {**d, "rms_norm_eps": d.get("norm_eps", 1e-5), "qk_norm": True}
    if "tie_embedding" in d:
        d["tie_word_embeddings"] = d["tie_embedding"]
    if "block_ff_dim" in d:
        d["intermediate_size"] = d["block_ff_dim"]
    if not any(k in d for k in ("rope_theta", "rope_parameters", "rope_scaling")):
        d["rope_theta"] = 1_000_000.0
    return d


@dataclass
class Config(llama.Config):
    vocab_size: int = 65536
    hidden_size: int = 2560
    intermediate_size: int = 12288
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8
    max_position_embeddings: int = 128_000
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | list | None = 1
    eos_token_id: int | list | None = 2
    conv_bias: bool = False
    conv_L_cache: int = 3
    block_multiple_of: int = 256
    block_ffn_dim_multiplier: float | None = 1.0
    block_auto_adjust_ff_dim: bool = True
    full_attn_idxs: list | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.layer_types is None and isinstance(self.num_hidden_layers, int) and 0 < self.num_hidden_layers <= 1 << 16:
            idx = self.full_attn_idxs if self.full_attn_idxs is not None else range(self.num_hidden_layers)
            self.layer_types = ["full_attention" if i in idx else "conv" for i in range(self.num_hidden_layers)]

    def validate(self) -> None:
        super().validate()
        self._positive("conv_L_cache", "block_multiple_of", "block_ffn_dim_multiplier")
        bad = [t for t in self.layer_types or () if t not in ("conv", "full_attention")]
        if bad:
            raise ConfigError(f"layer_types: {bad[0]!r:.40} is not an LFM2 layer type (conv or full_attention)")
        self._positive("ff_dim")

    @property
    def ff_dim(self) -> int:
        """The MLP's width, adjusted as transformers' Lfm2MLP does."""
        n = self.intermediate_size
        if self.block_auto_adjust_ff_dim:
            n = int(2 * n / 3)
            if self.block_ffn_dim_multiplier is not None:
                m = self.block_multiple_of
                n = m * ((int(self.block_ffn_dim_multiplier * n) + m - 1) // m)
        return n


class ShortConv(nn.Module):
    """y = out_proj(C * conv(B * x)) with (B, C, x) = in_proj(h): a gated causal depthwise conv."""

    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int):
        super().__init__()
        H = cfg.hidden_size
        self.layer_idx = layer_idx
        self.in_proj = linear(H, 3 * H, vb.pp("in_proj"), bias=cfg.conv_bias)
        self.conv = CausalConv(H, cfg.conv_L_cache, vb.pp("conv"), cfg.conv_bias, "linear")
        self.out_proj = linear(H, H, vb.pp("out_proj"), bias=cfg.conv_bias)

    def state_spec(self):
        """The convolution's last inputs (the cache's dtype)."""
        return ((self.conv.state_shape(), None),)

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        B = x.shape[0]
        (state,) = read_state(step, self.layer_idx, B) or (None,)
        b, c, h = self.in_proj(padding_zeroed(x, step.attention_mask)).transpose(1, 2).chunk(3, dim=1)
        y, state = self.conv(b * h, state)
        write_state(step, self.layer_idx, B, state)
        return self.out_proj((c * y).transpose(1, 2))


class DecoderLayer(llama.DecoderLayer):
    def make_attention(self, cfg: Config, vb: VarBuilder, layer_idx: int, window: int | None, fuse: bool):
        self.conv = None
        if cfg.layer_types[layer_idx] == "conv":
            self.conv = ShortConv(cfg, vb.pp("conv"), layer_idx)
            return None
        return llama.Attention(cfg, vb.pp("self_attn"), layer_idx, window, fuse)

    def make_mlp(self, cfg: Config, vb: VarBuilder, layer_idx: int, fuse: bool) -> nn.Module:
        return llama.MLP(cfg, vb.pp("mlp"), fuse, intermediate=cfg.ff_dim)

    def state_spec(self):
        return self.conv.state_spec() if self.conv is not None else None

    def mix(self, x, cos, sin, step: Step):
        return self.conv(x, step) if self.conv is not None else self.self_attn(x, cos, sin, step)


class ForCausalLM(CausalLM):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        self.config = cfg
        vb = vb.rename(_checkpoint_name)
        self.model = llama.Model(cfg, vb.pp("model"), fuse, layer_cls=DecoderLayer)
        self.lm_head = tied_or_own_head(vb, cfg, self.model.embed_tokens.weight, cfg.hidden_size, cfg.vocab_size)


# ---- GGUF (llama.cpp's lfm2: the conv layers marked by 0 KV heads, the MLP width already adjusted) -
def _gguf_config(meta: gguf.Meta) -> dict:
    n = gguf.layer_count(meta)
    kv = meta.need("attention.head_count_kv", kind=(int, list))
    kv = kv if isinstance(kv, list) else [kv] * n
    if len(kv) != n or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in kv) or not any(kv):
        raise ConfigError(f"{meta.f.path}: lfm2.attention.head_count_kv should list {n} KV-head counts (0 for the "
                          f"conv layers, at least one attention layer), got {kv!r:.80}")
    cfg = {"model_type": "lfm2", "vocab_size": gguf.vocab_size(meta), "hidden_size": meta.need("embedding_length"),
           "intermediate_size": meta.need("feed_forward_length"), "block_auto_adjust_ff_dim": False,
           "num_hidden_layers": n, "num_attention_heads": gguf.attention_heads(meta), "num_key_value_heads": max(kv),
           "layer_types": ["full_attention" if k else "conv" for k in kv],
           "conv_L_cache": meta.need("shortconv.l_cache"),
           "norm_eps": float(meta.get("attention.layer_norm_rms_epsilon", 1e-5, kind=(int, float))),
           "max_position_embeddings": meta.get("context_length", 128_000, kind=int),
           "conv_bias": any(f"blk.{i}.shortconv.in_proj.bias" in meta.names for i in range(n)),
           "tie_word_embeddings": "output.weight" not in meta.names, **gguf.token_ids(meta.m)}
    theta = meta.get("rope.freq_base", kind=(int, float))
    if theta is not None:
        cfg["rope_theta"] = float(theta)
    return prepare(cfg)


def _conv_parts(name: str, fn=lambda p, cfg: p[0]) -> gguf.Derived:
    # the short-conv tensors' GGUF leaves hold a dot (shortconv.in_proj), which the layer table cannot key
    return gguf.Derived(f"conv.{name}", (f"shortconv.{name}",), fn)


GGUF = {"lfm2": gguf.GGUFMapping(
    _gguf_config, top={"token_embd": "model.embed_tokens", "token_embd_norm": "model.embedding_norm",
                       "output": "lm_head"},
    layer={"attn_norm": "operator_norm", "ffn_norm": "ffn_norm", "ffn_gate": "feed_forward.w1",
           "ffn_up": "feed_forward.w3", "ffn_down": "feed_forward.w2", "attn_q": "self_attn.q_proj",
           "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.out_proj",
           "attn_q_norm": "self_attn.q_layernorm", "attn_k_norm": "self_attn.k_layernorm"},
    derived=(_conv_parts("in_proj.weight"), _conv_parts("in_proj.bias"), _conv_parts("out_proj.weight"),
             _conv_parts("out_proj.bias"), _conv_parts("conv.weight", lambda p, cfg: p[0].unsqueeze(1)),
             _conv_parts("conv.bias")))}
