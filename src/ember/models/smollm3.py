"""SmolLM3: Llama with NoPE layers (no rotary positions on every `no_rope_layer_interval`-th layer,
or as `no_rope_layers` lists: 1 = rotary, 0 = none) and optional sliding windows on the NoPE layers.

Reference: transformers/models/smollm3/modeling_smollm3.py, configuration_smollm3.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import gguf_source as gguf
from ..varbuilder import VarBuilder
from . import llama
from .base import CausalLM, tied_or_own_head


@dataclass
class Config(llama.Config):
    vocab_size: int = 128256
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 4
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float | None = 2_000_000.0
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 128004
    bos_token_id: int | list | None = 128000
    eos_token_id: int | list | None = 128001
    use_sliding_window: bool = False
    no_rope_layers: list[int] | None = None
    no_rope_layer_interval: int = 4

    def __post_init__(self):
        super().__post_init__()
        n, k = self.num_hidden_layers, self.no_rope_layer_interval
        if self.no_rope_layers is None and isinstance(n, int) and 0 <= n <= 1 << 16 and k > 0:
            self.no_rope_layers = [int((i + 1) % k != 0) for i in range(n)]
        if not self.use_sliding_window:
            self.sliding_window = None
        elif self.layer_types is None and self.no_rope_layers is not None:
            # as SmolLM3Config: the NoPE layers slide
            self.layer_types = ["full_attention" if r else "sliding_attention" for r in self.no_rope_layers]

    def validate(self) -> None:
        self._positive("no_rope_layer_interval")
        super().validate()
        self._require(self.no_rope_layers is not None and len(self.no_rope_layers) == self.num_hidden_layers,
                      f"no_rope_layers must list {self.num_hidden_layers} flags, got {self.no_rope_layers!r:.80}")


class DecoderLayer(llama.DecoderLayer):
    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int, window: int | None, fuse: bool = True):
        super().__init__(cfg, vb, layer_idx, window, fuse)
        self.self_attn.rotary = bool(cfg.no_rope_layers[layer_idx])


class ForCausalLM(CausalLM):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        self.config = cfg
        self.model = llama.Model(cfg, vb.pp("model"), fuse, layer_cls=DecoderLayer)
        self.lm_head = tied_or_own_head(vb, cfg, self.model.embed_tokens.weight, cfg.hidden_size, cfg.vocab_size)


# ---- GGUF (llama.cpp's smollm3: the llama converter, Q/K permuted; every 4th layer NoPE, as
# transformers' default no_rope_layer_interval) ---------------------------------------------------
def _gguf_smollm3(meta: gguf.Meta) -> dict:
    cfg = gguf.decoder_config(meta, "smollm3", head_dim=gguf.head_dim(meta))
    cfg["attention_bias"] = "blk.0.attn_q.bias" in meta.names
    return cfg


GGUF = {"smollm3": gguf.GGUFMapping(_gguf_smollm3, permute_qk=True)}
