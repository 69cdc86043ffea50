"""EXAONE 4.0: OLMo 2's layer shape (norms after attention and after the MLP, none before) with an
RMSNorm over each head of q and k, sliding-window layers (`layer_types`, or every
`sliding_window_pattern`-th layer full; a string pattern such as "LLLG" marks L sliding, G full),
and rotary positions on the sliding layers only: with a sliding window the full layers are NoPE.

Reference: transformers/models/exaone4/modeling_exaone4.py, configuration_exaone4.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .. import gguf_source as gguf
from ..nn import RMSNorm
from ..varbuilder import VarBuilder
from . import llama, olmo2
from .base import CausalLM, Step, tied_or_own_head


@dataclass
class Config(llama.Config):
    vocab_size: int = 102400
    intermediate_size: int = 16384
    rms_norm_eps: float = 1e-5
    bos_token_id: int | list | None = 0
    eos_token_id: int | list | None = 2
    sliding_window: int | None = 4096
    sliding_window_pattern: int | str | None = 4

    def __post_init__(self):
        super().__post_init__()
        n, p = self.num_hidden_layers, self.sliding_window_pattern
        if self.layer_types is None and isinstance(n, int) and 0 <= n <= 1 << 16:
            if self.sliding_window is None or not p:
                self.layer_types = ["full_attention"] * n
            elif isinstance(p, str):
                self.layer_types = ["sliding_attention" if p[i % len(p)] == "L" else "full_attention" for i in range(n)]
            elif p > 0:
                self.layer_types = ["sliding_attention" if (i + 1) % p else "full_attention" for i in range(n)]

    def validate(self) -> None:
        super().validate()
        p = self.sliding_window_pattern
        self._require(not isinstance(p, str) or (p and set(p) <= {"L", "G"}),
                      f"sliding_window_pattern must be a layer count or a string of L and G, got {p!r:.40}")
        self._require(isinstance(p, str) or p is None or p >= 0, f"sliding_window_pattern must be >= 0, got {p}")
        self._require(self.layer_types is not None, "layer_types could not be derived")


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int, window: int | None, fuse: bool = True):
        super().__init__()
        self.self_attn = llama.Attention(cfg, vb.pp("self_attn"), layer_idx, window, fuse, qk_norm="head")
        # global NoPE in hybrid models: the full layers get no rotation when the model slides
        self.self_attn.rotary = cfg.sliding_window is None or cfg.layer_types[layer_idx] == "sliding_attention"
        self.mlp = llama.MLP(cfg, vb.pp("mlp"), fuse)
        self.post_attention_layernorm = RMSNorm.from_vb(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("post_attention_layernorm"))
        self.post_feedforward_layernorm = RMSNorm.from_vb(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("post_feedforward_layernorm"))

    def forward(self, x, cos, sin, step: Step):
        x = x + self.post_attention_layernorm(self.self_attn(x, cos, sin, step))
        return x + self.post_feedforward_layernorm(self.mlp(x))


class ForCausalLM(CausalLM):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        self.config = cfg
        self.model = llama.Model(cfg, vb.pp("model"), fuse, layer_cls=DecoderLayer)
        self.lm_head = tied_or_own_head(vb, cfg, self.model.embed_tokens.weight, cfg.hidden_size, cfg.vocab_size)


# ---- GGUF (llama.cpp's exaone4: OLMo 2's post-norm names, per-layer sliding flags) ---------------
def _gguf_exaone4(meta: gguf.Meta) -> dict:
    cfg = gguf.decoder_config(meta, "exaone4", head_dim=gguf.head_dim(meta))
    window = meta.get("attention.sliding_window", kind=int)
    n = cfg["num_hidden_layers"]
    cfg.update(sliding_window=window, layer_types=gguf.sliding_layer_types(meta, n, 4) if window else ["full_attention"] * n)
    return cfg


GGUF = {"exaone4": gguf.GGUFMapping(_gguf_exaone4, layer=olmo2.OLMO2_LAYER)}
