"""GLM-4 (GLM-4-9B-0414, GLM-Z1): Llama's attention with q/k/v bias and rotary over the first half
of each head (`partial_rotary_factor`, default 0.5) in adjacent pairs, a fused `gate_up_proj`
SwiGLU, and two extra norms: after attention (`post_self_attn_layernorm`) and after the MLP
(`post_mlp_layernorm`), before each residual add.

Reference: transformers/models/glm4/modeling_glm4.py, configuration_glm4.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .. import gguf_source as gguf
from ..nn import RMSNorm
from ..varbuilder import VarBuilder
from . import llama
from .base import CausalLM, Step, tied_or_own_head


@dataclass
class Config(llama.Config):
    vocab_size: int = 151552
    hidden_size: int = 4096
    intermediate_size: int = 13696
    num_hidden_layers: int = 40
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 2
    head_dim: int | None = 128
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1.5625e-07
    pad_token_id: int | None = 151329


def prepare(d: dict) -> dict:
    # config.json's attention_bias is the q/k/v bias (o_proj has none); rotary covers half a head by default
    d = {**d, "qkv_bias": d.get("attention_bias", True), "attention_bias": False}
    rope = d.get("rope_parameters") or d.get("rope_scaling")
    if "partial_rotary_factor" not in d and not (isinstance(rope, dict) and "partial_rotary_factor" in rope):
        d["partial_rotary_factor"] = 0.5
    return d


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int, window: int | None, fuse: bool = True):
        super().__init__()
        self.self_attn = llama.Attention(cfg, vb.pp("self_attn"), layer_idx, window, fuse, interleaved=True)
        self.mlp = llama.MLP(cfg, vb.pp("mlp"), fuse)

        def norm(name):
            return RMSNorm.from_vb(cfg.hidden_size, cfg.rms_norm_eps, vb.pp(name))

        self.input_layernorm, self.post_self_attn_layernorm = norm("input_layernorm"), norm("post_self_attn_layernorm")
        self.post_attention_layernorm, self.post_mlp_layernorm = norm("post_attention_layernorm"), norm("post_mlp_layernorm")

    def forward(self, x, cos, sin, step: Step):
        x = x + self.post_self_attn_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, step))
        return x + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(x)))


class ForCausalLM(CausalLM):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        self.config = cfg
        self.model = llama.Model(cfg, vb.pp("model"), fuse, layer_cls=DecoderLayer)
        self.lm_head = tied_or_own_head(vb, cfg, self.model.embed_tokens.weight, cfg.hidden_size, cfg.vocab_size)


# ---- GGUF (llama.cpp's glm4: gate_up_proj kept fused as ffn_up, sandwich norms) ----------------
def _gguf_glm4(meta: gguf.Meta) -> dict:
    head = gguf.head_dim(meta)
    cfg = gguf.decoder_config(meta, "glm4", head_dim=head)
    cfg["attention_bias"] = "blk.0.attn_q.bias" in meta.names  # prepare reads it as the q/k/v bias
    cfg["partial_rotary_factor"] = gguf.partial_rotary(meta, head).get("partial_rotary_factor", 1.0)
    return cfg


GGUF = {"glm4": gguf.GGUFMapping(_gguf_glm4, layer={
    **gguf.LLAMA_LAYER, "ffn_up": "mlp.gate_up_proj", "post_attention_norm": "post_self_attn_layernorm",
    "post_ffw_norm": "post_mlp_layernorm"})}
