"""OLMo 2: Llama's blocks with the norms moved after the sublayers (x + norm(attn(x)),
x + norm(mlp(x)); no input norm) and RMSNorm over the whole q and k projections before they are
split into heads. Every RMSNorm scales in float32 before casting back.

Reference: transformers/models/olmo2/modeling_olmo2.py, configuration_olmo2.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .. import gguf_source as gguf
from ..nn import RMSNorm
from ..varbuilder import VarBuilder
from . import llama
from .base import CausalLM, Step, tied_or_own_head

NORM = {"scale_in_float": True}  # Olmo2RMSNorm: (w * x_normed).to(dtype)


@dataclass
class Config(llama.Config):
    vocab_size: int = 50304
    rms_norm_eps: float = 1e-5
    pad_token_id: int | None = 1
    bos_token_id: int | list | None = None
    eos_token_id: int | list | None = 50279


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int, window: int | None, fuse: bool = True):
        super().__init__()
        self.self_attn = llama.Attention(cfg, vb.pp("self_attn"), layer_idx, window, fuse, qk_norm="full", norm_kw=NORM)
        self.mlp = llama.MLP(cfg, vb.pp("mlp"), fuse)
        self.post_attention_layernorm = RMSNorm.from_vb(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("post_attention_layernorm"), **NORM)
        self.post_feedforward_layernorm = RMSNorm.from_vb(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("post_feedforward_layernorm"), **NORM)

    def forward(self, x, cos, sin, step: Step):
        x = x + self.post_attention_layernorm(self.self_attn(x, cos, sin, step))
        return x + self.post_feedforward_layernorm(self.mlp(x))


class ForCausalLM(CausalLM):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        self.config = cfg
        self.model = llama.Model(cfg, vb.pp("model"), fuse, layer_cls=DecoderLayer, norm_kw=NORM)
        self.lm_head = tied_or_own_head(vb, cfg, self.model.embed_tokens.weight, cfg.hidden_size, cfg.vocab_size)


# ---- GGUF (llama.cpp's olmo2, which OLMo 3 files share: a sliding window makes them olmo3) -------
OLMO2_LAYER = {
    **{k: v for k, v in gguf.LLAMA_LAYER.items() if k not in ("attn_norm", "ffn_norm")},
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def _gguf_olmo2(meta: gguf.Meta) -> dict:
    cfg = gguf.decoder_config(meta, "olmo2")
    window = meta.get("attention.sliding_window", kind=int)
    if window is not None:
        cfg.update(model_type="olmo3", sliding_window=window,
                   layer_types=gguf.sliding_layer_types(meta, cfg["num_hidden_layers"], 4))
    return cfg


GGUF = {"olmo2": gguf.GGUFMapping(_gguf_olmo2, layer=OLMO2_LAYER)}
