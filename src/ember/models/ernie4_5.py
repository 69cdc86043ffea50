"""ERNIE 4.5 (dense): Llama with one `use_bias` flag for q/k/v/o and the MLP, rotary over adjacent
pairs (computed in float32), head_dim 128 and rope theta 5e5 by default, a tied head.

Reference: transformers/models/ernie4_5/modeling_ernie4_5.py, configuration_ernie4_5.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import gguf_source as gguf
from ..varbuilder import VarBuilder
from . import llama
from .base import CausalLM, tied_or_own_head


@dataclass
class Config(llama.Config):
    vocab_size: int = 103424
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 18
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 2
    head_dim: int | None = 128
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    rope_theta: float | None = 500_000.0
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | list | None = 1
    eos_token_id: int | list | None = 2
    use_bias: bool = False

    def __post_init__(self):
        super().__post_init__()
        self.attention_bias = self.mlp_bias = self.use_bias


class DecoderLayer(llama.DecoderLayer):
    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int, window: int | None, fuse: bool = True):
        super().__init__(cfg, vb, layer_idx, window, fuse)
        self.self_attn.interleaved = True


class ForCausalLM(CausalLM):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        self.config = cfg
        self.model = llama.Model(cfg, vb.pp("model"), fuse, layer_cls=DecoderLayer)
        self.lm_head = tied_or_own_head(vb, cfg, self.model.embed_tokens.weight, cfg.hidden_size, cfg.vocab_size)


# ---- GGUF (llama.cpp's ernie4_5: the converter splits qkv_proj / up_gate_proj into Llama's names) --
def _gguf_ernie4_5(meta: gguf.Meta, model_type: str = "ernie4_5") -> dict:
    cfg = gguf.decoder_config(meta, model_type, head_dim=gguf.head_dim(meta))
    cfg["use_bias"] = "blk.0.attn_q.bias" in meta.names
    return cfg


GGUF = {"ernie4_5": gguf.GGUFMapping(_gguf_ernie4_5)}
