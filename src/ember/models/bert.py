"""BERT, and the families that are BERT with flags: RoBERTa, XLM-RoBERTa, CamemBERT (positions
counted from padding_idx + 1 and skipping padding, a `roberta.` checkpoint prefix).

Reference: transformers/models/bert/modeling_bert.py and roberta/modeling_roberta.py. Tensor names
are the checkpoint's: embeddings.word_embeddings, encoder.layer.N.attention.self.query, ... with or
without the task model's prefix (`bert.` in BertForMaskedLM, `roberta.` in RobertaForMaskedLM).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import UnsupportedModelError
from ..nn import Embedding, LayerNorm, activation
from ..varbuilder import VarBuilder
from .encoder import EncoderModel, PostLNLayer, f32, key_padding_mask, padding_positions

BERT_LAYER_NAMES = {
    "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
    "o": "attention.output.dense", "ln1": "attention.output.LayerNorm",
    "up": "intermediate.dense", "down": "output.dense", "ln2": "output.LayerNorm",
}


@dataclass
class Config(ModelConfig):
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    position_embedding_type: str | None = "absolute"
    is_decoder: bool = False
    # ember flags set by the registry for the remapped families (not config.json keys)
    padding_positions: bool = False  # RoBERTa: positions padding_idx+1.. from the ids, padding at padding_idx
    base_model_prefix: str = "bert"  # the task models' prefix in checkpoints

    def validate(self) -> None:
        self._positive("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                       "max_position_embeddings")
        self._positive("type_vocab_size", "layer_norm_eps", allow_zero=True)
        self._require(self.hidden_size % self.num_attention_heads == 0,
                      f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                      f"({self.num_attention_heads})")
        if self.position_embedding_type not in (None, "absolute"):
            raise UnsupportedModelError(f"position_embedding_type {self.position_embedding_type!r} is not supported "
                                        f"(only 'absolute', as in transformers 5)")
        if self.is_decoder:
            raise UnsupportedModelError(f"{self.model_type or 'bert'} with is_decoder=true (causal BERT) is not "
                                        f"supported; ember runs BERT-style models as encoders")
        if self.padding_positions:
            self._require(self.pad_token_id is not None and 0 <= self.pad_token_id < self.max_position_embeddings - 1,
                          f"pad_token_id {self.pad_token_id} must index the position embeddings")
        activation(self.hidden_act)


def _gamma_beta(key: str) -> str | None:
    # checkpoints from TF-era BERT name LayerNorm parameters gamma/beta (transformers renames them on load)
    if key.endswith("LayerNorm.weight"):
        return key[: -len("weight")] + "gamma"
    if key.endswith("LayerNorm.bias"):
        return key[: -len("bias")] + "beta"
    return None


class Embeddings(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder):
        super().__init__()
        E = cfg.hidden_size
        self.word_embeddings = Embedding.from_vb(cfg.vocab_size, E, f32(vb).pp("word_embeddings"))
        self.position_embeddings = Embedding.from_vb(cfg.max_position_embeddings, E, f32(vb).pp("position_embeddings"))
        self.token_type_embeddings = (Embedding.from_vb(cfg.type_vocab_size, E, f32(vb).pp("token_type_embeddings"))
                                      if cfg.type_vocab_size else None)
        self.LayerNorm = LayerNorm.from_vb(E, cfg.layer_norm_eps, f32(vb).pp("LayerNorm"))
        self.padding_idx = cfg.pad_token_id if cfg.padding_positions else None

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        T = input_ids.shape[1]
        if self.padding_idx is not None:
            pos = padding_positions(input_ids, self.padding_idx)
        else:
            pos = torch.arange(T, device=input_ids.device)[None]
        x = self.word_embeddings(input_ids).float() + self.position_embeddings(pos).float()
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                x = x + self.token_type_embeddings.weight[0].float()
            else:
                x = x + self.token_type_embeddings(token_type_ids).float()
        return self.LayerNorm(x)


class Model(EncoderModel):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        self.config = cfg
        vb = vb.rename(_gamma_beta).pp_first(["", cfg.base_model_prefix], "embeddings.word_embeddings.weight")
        self.embeddings = Embeddings(cfg, vb.pp("embeddings"))
        self.layers = nn.ModuleList(
            PostLNLayer(vb.pp(f"encoder.layer.{i}"), BERT_LAYER_NAMES, cfg.hidden_size, cfg.num_attention_heads,
                        cfg.intermediate_size, cfg.layer_norm_eps, cfg.hidden_act, fuse)
            for i in range(cfg.num_hidden_layers))
        self.hidden_size = cfg.hidden_size
        self.pad_token_id = cfg.pad_token_id or 0
        # RoBERTa's positions start at padding_idx + 1
        self.max_tokens = cfg.max_position_embeddings - (cfg.pad_token_id + 1 if cfg.padding_positions else 0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embeddings(input_ids, token_type_ids)
        mask = key_padding_mask(attention_mask)
        for layer in self.layers:
            x = layer(x, mask)
        return x
