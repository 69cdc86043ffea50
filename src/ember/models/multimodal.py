"""The decoder of an image-text checkpoint (Gemma 3, Llama 4, Mistral 3): its config nested under
`text_config`, its weights under `language_model.` (as transformers saves them) or
`model.language_model.` (as it names them in memory). The vision tower is not loaded.
"""
from __future__ import annotations

from ..varbuilder import VarBuilder


def text_config(d: dict, tie_default: bool) -> dict:
    """A multimodal config.json dict → its decoder's dict: text_config with the outer model_type,
    architectures, head tying (the outer config decides it; `tie_default` when it says nothing) and
    dtype. A dict without text_config is returned as is."""
    if not isinstance(d, dict) or not isinstance(d.get("text_config"), dict):
        return d
    return {
        **d["text_config"],
        "model_type": d.get("model_type"),
        "architectures": d.get("architectures"),
        "tie_word_embeddings": d.get("tie_word_embeddings", tie_default),
        **{k: d[k] for k in ("dtype", "torch_dtype") if d.get(k) is not None},
    }


def language_model(vb: VarBuilder) -> VarBuilder:
    """A builder that reads a multimodal checkpoint's decoder under the text model's names
    (`model.*`, `lm_head.*`); a text-only checkpoint's builder is returned as is."""
    if vb.contains("language_model.model.embed_tokens.weight"):  # as saved by transformers
        return vb.rename({"model": "language_model.model", "lm_head": "language_model.lm_head"})
    if vb.contains("model.language_model.embed_tokens.weight"):  # transformers' in-memory names
        return vb.rename({"model": "model.language_model"})
    return vb
