"""Ministral 3, and the language model of Mistral 3 image-text checkpoints.

Ministral 3 is Mistral (Llama layers) with yarn rope and queries scaled by
1 + llama_4_scaling_beta * log(1 + floor(pos / original_max_position_embeddings)), both read from
`rope_parameters`. Mistral 3 checkpoints (Mistral3ForConditionalGeneration) nest the decoder's
config under text_config (model_type ministral3, or mistral for Mistral Small 3.1/3.2) and store its
weights under language_model.*; the vision tower and projector are not loaded.

Reference: transformers/models/ministral3/modeling_ministral3.py, mistral3/modeling_mistral3.py.
"""
from __future__ import annotations

from torch import nn

from ..varbuilder import VarBuilder
from . import llama, multimodal
from .base import CausalLM, tied_or_own_head
from .llama import Config  # noqa: F401  (the config is Llama's)

# transformers' defaults of the text configs where config.json may leave a key out
MINISTRAL3 = {"vocab_size": 131072, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 34,
              "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 262144,
              "rms_norm_eps": 1e-5, "pad_token_id": 11, "bos_token_id": 1, "eos_token_id": 2,
              "sliding_window": None,
              "rope_parameters": {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 16.0,
                                  "original_max_position_embeddings": 16384, "beta_fast": 32.0, "beta_slow": 1.0,
                                  "mscale_all_dim": 1.0, "mscale": 1.0, "llama_4_scaling_beta": 0.1}}
MISTRAL = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 4096 * 32,
           "rms_norm_eps": 1e-6, "sliding_window": 4096, "bos_token_id": 1, "eos_token_id": 2}


def prepare(d: dict) -> dict:
    """config.json (ministral3, or mistral3 with text_config) → the text config dict with the text
    model type's defaults."""
    text = d.get("text_config") if isinstance(d, dict) else None
    inner = text.get("model_type", "mistral") if isinstance(text, dict) else d.get("model_type")
    defaults = MINISTRAL3 if inner == "ministral3" else MISTRAL
    return {**defaults, **multimodal.text_config(d, tie_default=True if text is not None else False)}


def query_temperature(cfg: Config) -> tuple[float, float, float] | None:
    """(beta, floor, offset) of Ministral 3's query scaling, None when the config has none."""
    rope = cfg.rope_parameters or cfg.rope_scaling or {}
    beta, orig = rope.get("llama_4_scaling_beta"), rope.get("original_max_position_embeddings")
    if beta is None:
        return None
    cfg._require(isinstance(beta, (int, float)) and isinstance(orig, (int, float)) and orig > 0,
                 f"llama_4_scaling_beta needs a positive original_max_position_embeddings, got {orig!r:.40}")
    return float(beta), float(orig), 0.0


class DecoderLayer(llama.DecoderLayer):
    def make_attention(self, cfg: Config, vb: VarBuilder, layer_idx: int, window: int | None, fuse: bool) -> nn.Module:
        return llama.Attention(cfg, vb.pp("self_attn"), layer_idx, window, fuse, temperature=query_temperature(cfg))


class ForCausalLM(CausalLM):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        vb = multimodal.language_model(vb)
        self.config = cfg
        self.model = llama.Model(cfg, vb.pp("model"), fuse, layer_cls=DecoderLayer)
        self.lm_head = tied_or_own_head(vb, cfg, self.model.embed_tokens.weight, cfg.hidden_size, cfg.vocab_size)
