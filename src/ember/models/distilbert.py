"""DistilBERT: BERT with six layers, no token types and its own tensor names.

Reference: transformers/models/distilbert/modeling_distilbert.py. Tensor names are the
checkpoint's (embeddings.*, transformer.layer.N.attention.q_lin, ...), with or without the task
models' `distilbert.` prefix. Sinusoidal position embeddings are stored in the checkpoint like
learned ones, so both read the same way.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from ..nn import Embedding, LayerNorm, activation
from ..varbuilder import VarBuilder
from .encoder import EncoderModel, PostLNLayer, f32, key_padding_mask

LAYER_NAMES = {
    "q": "attention.q_lin", "k": "attention.k_lin", "v": "attention.v_lin", "o": "attention.out_lin",
    "ln1": "sa_layer_norm", "up": "ffn.lin1", "down": "ffn.lin2", "ln2": "output_layer_norm",
}
EPS = 1e-12  # fixed in transformers' DistilBERT


@dataclass
class Config(ModelConfig):
    vocab_size: int = 30522
    max_position_embeddings: int = 512
    sinusoidal_pos_embds: bool = False
    n_layers: int = 6
    n_heads: int = 12
    dim: int = 768
    hidden_dim: int = 3072
    activation: str = "gelu"
    pad_token_id: int | None = 0

    def validate(self) -> None:
        self._positive("vocab_size", "max_position_embeddings", "n_layers", "n_heads", "dim", "hidden_dim")
        self._require(self.dim % self.n_heads == 0, f"dim ({self.dim}) must be a multiple of n_heads ({self.n_heads})")
        activation(self.activation)


class Model(EncoderModel):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        self.config = cfg
        vb = vb.pp_first(["", "distilbert"], "embeddings.word_embeddings.weight")
        e = vb.pp("embeddings")
        self.word_embeddings = Embedding.from_vb(cfg.vocab_size, cfg.dim, f32(e).pp("word_embeddings"))
        self.position_embeddings = Embedding.from_vb(cfg.max_position_embeddings, cfg.dim, f32(e).pp("position_embeddings"))
        self.embed_norm = LayerNorm.from_vb(cfg.dim, EPS, f32(e).pp("LayerNorm"))
        self.layers = nn.ModuleList(
            PostLNLayer(vb.pp(f"transformer.layer.{i}"), LAYER_NAMES, cfg.dim, cfg.n_heads, cfg.hidden_dim, EPS,
                        cfg.activation, fuse)
            for i in range(cfg.n_layers))
        self.hidden_size = cfg.dim
        self.pad_token_id = cfg.pad_token_id or 0
        self.max_tokens = cfg.max_position_embeddings

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        T = input_ids.shape[1]
        x = self.word_embeddings(input_ids).float() + self.position_embeddings.weight[:T].float()
        x = self.embed_norm(x)
        mask = key_padding_mask(attention_mask)
        for layer in self.layers:
            x = layer(x, mask)
        return x
