"""Gemma 2: the Gemma decoder (ember.models.gemma) with sandwich norms (after attention, before and
after the MLP), attention scale query_pre_attn_scalar ** -0.5, tanh soft-capping of the attention
scores and of the final logits, and sliding-window layers alternating with global ones.

Reference: transformers/models/gemma2/modeling_gemma2.py, configuration_gemma2.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import gguf_source as gguf
from . import gemma
from .gemma import ForCausalLM  # noqa: F401  (the model is Gemma's; only the config differs)


@dataclass
class Config(gemma.Config):
    vocab_size: int = 256000
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int | None = 4
    head_dim: int | None = 256
    hidden_activation: str = "gelu_pytorch_tanh"  # Gemma 2 reads this key, not hidden_act
    max_position_embeddings: int = 8192
    query_pre_attn_scalar: float | None = 256
    sliding_window: int | None = 4096
    final_logit_softcapping: float | None = 30.0
    attn_logit_softcapping: float | None = 50.0
    sandwich_norms: bool = True

    def __post_init__(self):
        super().__post_init__()
        self.hidden_act = self.hidden_activation
        if self.layer_types is None and self.num_hidden_layers is not None:
            self.layer_types = self.default_layer_types()

    def default_layer_types(self) -> list[str]:
        # Even layers slide, odd layers are global.
        return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(self.num_hidden_layers)]


# ---- GGUF --------------------------------------------------------------------------------------
GEMMA_LAYER = {
    **gguf.LLAMA_LAYER,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def _gguf_gemma2(meta: gguf.Meta) -> dict:
    cfg = gguf.decoder_config(meta, "gemma2", head_dim=meta.get("attention.key_length", kind=int))
    cfg["tie_word_embeddings"] = True
    window = meta.get("attention.sliding_window", kind=int)
    if window is not None:
        cfg["sliding_window"] = window
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        v = meta.get(key, kind=(int, float))
        if v is not None:
            cfg[key] = float(v)
    return cfg


GGUF = {"gemma2": gguf.GGUFMapping(_gguf_gemma2, layer=GEMMA_LAYER, norm_offset=True)}
