"""MPNet: a BERT-style encoder with RoBERTa positions and a learned relative attention bias
(T5-style buckets) shared by every layer.

Reference: transformers/models/mpnet/modeling_mpnet.py. Tensor names are the checkpoint's
(embeddings.*, encoder.layer.N.attention.attn.q, encoder.relative_attention_bias), with or without
the task models' `mpnet.` prefix.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from ..nn import Embedding, LayerNorm, activation
from ..varbuilder import VarBuilder
from .encoder import EncoderModel, PostLNLayer, f32, key_padding_mask, padding_positions
from .t5 import relative_position_bucket  # T5's bidirectional buckets

LAYER_NAMES = {
    "q": "attention.attn.q", "k": "attention.attn.k", "v": "attention.attn.v", "o": "attention.attn.o",
    "ln1": "attention.LayerNorm", "up": "intermediate.dense", "down": "output.dense", "ln2": "output.LayerNorm",
}
PADDING_IDX = 1  # fixed in transformers' MPNetEmbeddings, whatever pad_token_id says
NUM_BUCKETS = 32  # compute_position_bias's default, used whatever relative_attention_num_buckets says
MAX_DISTANCE = 128


@dataclass
class Config(ModelConfig):
    vocab_size: int = 30527
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 514
    layer_norm_eps: float = 1e-12
    relative_attention_num_buckets: int = 32
    pad_token_id: int | None = 1

    def validate(self) -> None:
        self._positive("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                       "max_position_embeddings", "relative_attention_num_buckets")
        self._require(self.hidden_size % self.num_attention_heads == 0,
                      f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                      f"({self.num_attention_heads})")
        self._require(self.max_position_embeddings > PADDING_IDX + 1, "max_position_embeddings must exceed 2")
        activation(self.hidden_act)


class Model(EncoderModel):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        self.config = cfg
        vb = vb.pp_first(["", "mpnet"], "embeddings.word_embeddings.weight")
        E, H = cfg.hidden_size, cfg.num_attention_heads
        e = vb.pp("embeddings")
        self.word_embeddings = Embedding.from_vb(cfg.vocab_size, E, f32(e).pp("word_embeddings"))
        self.position_embeddings = Embedding.from_vb(cfg.max_position_embeddings, E, f32(e).pp("position_embeddings"))
        self.embed_norm = LayerNorm.from_vb(E, cfg.layer_norm_eps, f32(e).pp("LayerNorm"))
        self.relative_attention_bias = Embedding.from_vb(cfg.relative_attention_num_buckets, H,
                                                         f32(vb).pp("encoder.relative_attention_bias"))
        self.layers = nn.ModuleList(
            PostLNLayer(vb.pp(f"encoder.layer.{i}"), LAYER_NAMES, E, H, cfg.intermediate_size, cfg.layer_norm_eps,
                        cfg.hidden_act, fuse)
            for i in range(cfg.num_hidden_layers))
        self.hidden_size = E
        self.pad_token_id = PADDING_IDX
        self.max_tokens = cfg.max_position_embeddings - PADDING_IDX - 1
        self._bias_cache: tuple[int, torch.dtype, torch.Tensor] | None = None

    def position_bias(self, T: int, dtype: torch.dtype, device) -> torch.Tensor:
        """[1, H, T, T] relative attention bias (cached for the last length)."""
        c = self._bias_cache
        if c is not None and c[0] == T and c[1] == dtype and c[2].device == device:
            return c[2]
        pos = torch.arange(T, dtype=torch.long, device=device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], True, NUM_BUCKETS, MAX_DISTANCE)
        bias = self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0).to(dtype)
        self._bias_cache = (T, dtype, bias)
        return bias

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        B, T = input_ids.shape
        pos = padding_positions(input_ids, PADDING_IDX)
        x = self.embed_norm(self.word_embeddings(input_ids).float() + self.position_embeddings(pos).float())
        mask = self.position_bias(T, torch.float32, x.device)
        keep = key_padding_mask(attention_mask)
        if keep is not None:
            mask = mask.masked_fill(~keep, torch.finfo(torch.float32).min)
        for layer in self.layers:
            x = layer(x, mask)
        return x
