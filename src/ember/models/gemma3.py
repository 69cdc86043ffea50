"""Gemma 3 (text): the Gemma 2 decoder plus RMSNorm (1 + w) over each head of q and k, per-layer
`layer_types` (by default five sliding layers to one global), and a rotary table per layer type:
global layers use rope_parameters["full_attention"] (old configs: rope_theta, default 1e6, with
rope_scaling), sliding layers rope_parameters["sliding_attention"] (old: rope_local_base_freq,
default 1e4). No attention soft-capping: the reference keeps attn_logit_softcapping in the config
but never applies it.

Checkpoints come as Gemma3ForCausalLM (model_type gemma3_text, weights model.*, lm_head.*) or as
the multimodal Gemma3ForConditionalGeneration (model_type gemma3, the text config under
text_config, weights language_model.model.* / language_model.lm_head.* as transformers saves them,
or model.language_model.* / lm_head.* as it names them in memory). The multimodal form is read
through `MultimodalConfig` and a renaming VarBuilder; its vision tower is not loaded.

Reference: transformers/models/gemma3/modeling_gemma3.py, configuration_gemma3.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .. import gguf_source as gguf
from ..varbuilder import VarBuilder
from . import gemma, gemma2, multimodal


@dataclass
class Config(gemma2.Config):
    vocab_size: int = 262208
    max_position_embeddings: int = 131072
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    rope_local_base_freq: float | None = None
    sliding_window_pattern: int = 6
    qk_norm: bool = True
    bidirectional_ok: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        if self.use_bidirectional_attention and isinstance(self.sliding_window, int):
            # As Gemma3TextConfig: a bidirectional window of w reaches w // 2 tokens either way
            # (distance < w // 2 + 1), not w tokens back.
            self.sliding_window = self.sliding_window // 2 + 1

    def validate(self) -> None:
        self._positive("sliding_window_pattern", "rope_local_base_freq")
        super().validate()

    def default_layer_types(self) -> list[str]:
        p = self.sliding_window_pattern
        if not isinstance(p, int) or p <= 0:
            return []  # validate() reports the bad pattern / the layer_types length
        return ["sliding_attention" if (i + 1) % p else "full_attention" for i in range(self.num_hidden_layers)]

    def attention_softcap(self) -> float | None:
        return None

    def rope_configs(self) -> dict[str, dict]:
        params = self.rope_parameters or {}
        nested = any(t in params for t in gemma.LAYER_TYPES)
        # A flat rope_parameters is taken as the global layers' (the reference would ignore it).
        full = dict((params.get("full_attention") if nested else params) or {})
        if self.rope_scaling:
            full.update(self.rope_scaling)
        full.setdefault("rope_theta", self.rope_theta if self.rope_theta is not None else 1_000_000.0)
        sliding = dict((params.get("sliding_attention") if nested else None) or {})
        sliding.setdefault("rope_theta", self.rope_local_base_freq if self.rope_local_base_freq is not None else 10_000.0)
        base = {k: v for k, v in self.raw.items() if k not in ("rope_parameters", "rope_scaling", "rope_theta")}
        return {"full_attention": {**base, "rope_parameters": full}, "sliding_attention": {**base, "rope_parameters": sliding}}


@dataclass
class MultimodalConfig(Config):
    """Parses a Gemma3ForConditionalGeneration config.json (decoder config under text_config) into
    the text Config; a flat config (model_type gemma3 without text_config, as some GGUF
    conversions write it) is read as is."""

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> Config:
        if isinstance(d, dict) and isinstance(d.get("text_config"), dict):
            # the multimodal model never soft-caps the logits
            d = {**multimodal.text_config(d, tie_default=True), "final_logit_softcapping": None}
        return Config.from_dict(d, **overrides)


class ForCausalLM(gemma.ForCausalLM):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__(cfg, multimodal.language_model(vb), fuse)


# ---- GGUF --------------------------------------------------------------------------------------
def _gguf_layer_types(meta: gguf.Meta, n_layers: int, default_pattern: int) -> list[str]:
    pattern = meta.get("attention.sliding_window_pattern", kind=(int, list))
    if isinstance(pattern, list):  # per-layer flags: true = sliding
        if len(pattern) != n_layers:
            raise gguf.ConfigError(f"{meta.f.path}: {meta.arch}.attention.sliding_window_pattern has {len(pattern)} "
                                   f"entries for {n_layers} layers")
        return ["sliding_attention" if p else "full_attention" for p in pattern]
    pattern = pattern or default_pattern
    if pattern < 1:
        raise gguf.ConfigError(f"{meta.f.path}: {meta.arch}.attention.sliding_window_pattern must be positive")
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]


def _gguf_gemma3(meta: gguf.Meta) -> dict:
    cfg = gguf.decoder_config(meta, "gemma3_text", head_dim=meta.get("attention.key_length", kind=int))
    cfg["tie_word_embeddings"] = "output.weight" not in meta.names
    window = meta.get("attention.sliding_window", kind=int)
    if window is not None:
        cfg["sliding_window"] = window
    cfg["layer_types"] = _gguf_layer_types(meta, cfg["num_hidden_layers"], 6)
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        v = meta.get(key, kind=(int, float))
        if v is not None:
            cfg[key] = float(v)
    return cfg


GGUF = {"gemma3": gguf.GGUFMapping(_gguf_gemma3, layer=gemma2.GEMMA_LAYER, norm_offset=True)}
