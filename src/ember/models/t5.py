"""T5 and mT5 (`t5`, `mt5`): an encoder-decoder with relative position buckets.

Reference: transformers/models/t5/modeling_t5.py. Tensor names are the checkpoint's (shared,
encoder.block.N.layer.0.SelfAttention.q, decoder.block.N.layer.1.EncDecAttention.k,
layer.M.DenseReluDense.wi / wi_0 / wi_1 / wo, *.layer_norm, *.final_layer_norm, lm_head).

- No absolute positions: the first layer of each stack owns a learned bias per (bucket, head),
  bidirectional buckets in the encoder, causal ones in the decoder, added to every layer's scores.
- Scores are q·k without the 1/sqrt(d) scale (folded into the weights at training).
- RMSNorm without a bias before each block; feed-forward relu (v1.0) or gated (v1.1, mT5: gelu_new).
- The decoder's output is scaled by d_model^-0.5 before the head when the embeddings are tied (the
  original T5; `scale_decoder_outputs` where transformers 5 wrote it).

    enc = model.encode(input_ids, attention_mask)                       # [B, S, d_model]
    logits = model.decode(decoder_ids, enc, attention_mask, cache=None)  # [B, T, vocab] float32
    logits = model(input_ids, decoder_ids, attention_mask)              # both

A checkpoint with only the encoder (T5EncoderModel: sentence-T5, GTR) builds no decoder; it embeds
(`as_encoder()`), it does not generate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MAX_LAYERS, ModelConfig
from ..errors import ConfigError
from ..nn import Embedding, RMSNorm, activation, linear, linear_from_weight
from ..nn.seq2seq_cache import Seq2SeqCache
from ..varbuilder import VarBuilder


@dataclass
class Config(ModelConfig):
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None  # None: num_layers
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool | None = None  # None: tie_word_embeddings (transformers 5 writes it)
    pad_token_id: int | None = 0
    eos_token_id: int | list | None = 1
    decoder_start_token_id: int | None = 0
    n_positions: int = 512  # the trained length (relative positions allow more)

    def __post_init__(self):
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        if self.scale_decoder_outputs is None:
            self.scale_decoder_outputs = self.tie_word_embeddings

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def act(self) -> str:
        # transformers maps "gated-gelu" to gelu_new (the original T5 v1.1 activation)
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else self.feed_forward_proj.split("-")[-1]

    def validate(self) -> None:
        self._positive("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                       "relative_attention_num_buckets", "relative_attention_max_distance", "layer_norm_epsilon")
        self._positive("num_decoder_layers", allow_zero=True)
        self._require(self.num_decoder_layers <= MAX_LAYERS, f"num_decoder_layers {self.num_decoder_layers} is not "
                                                             f"a real model's")
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or len(parts) == 2 and parts[0] != "gated":
            raise ConfigError(f"feed_forward_proj must be 'ACT' or 'gated-ACT', got {self.feed_forward_proj!r:.60}")
        activation(self.act)
        self._require(self.relative_attention_max_distance > self.relative_attention_num_buckets // 4,
                      "relative_attention_max_distance must exceed a quarter of relative_attention_num_buckets")


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool = True, num_buckets: int = 32,
                             max_distance: int = 128) -> torch.Tensor:
    """transformers' T5Attention._relative_position_bucket, operation for operation: key minus query
    position → bucket. Half the buckets (per direction) are exact offsets, the rest logarithmic up
    to max_distance."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).to(torch.long) * num_buckets
        relative_position = torch.abs(relative_position)
    else:
        relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    large = max_exact + (torch.log(relative_position.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).to(torch.long)
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(is_small, relative_position, large)


class Attention(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder, relative_bias: bool = False, bidirectional: bool = True):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.heads, self.head_dim = cfg.num_heads, cfg.d_kv
        self.q = linear(cfg.d_model, inner, vb.pp("q"))
        self.k = linear(cfg.d_model, inner, vb.pp("k"))
        self.v = linear(cfg.d_model, inner, vb.pp("v"))
        self.o = linear(inner, cfg.d_model, vb.pp("o"))
        self.bidirectional = bidirectional
        self.buckets, self.max_distance = cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        self.relative_attention_bias = (Embedding.from_vb(self.buckets, cfg.num_heads, vb.pp("relative_attention_bias"))
                                        if relative_bias else None)

    def position_bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """[1, H, T, S] learned bias for query positions q_pos [T] and key positions k_pos [S]."""
        b = relative_position_bucket(k_pos[None, :] - q_pos[:, None], self.bidirectional, self.buckets,
                                     self.max_distance)
        return self.relative_attention_bias(b).permute(2, 0, 1).unsqueeze(0)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """softmax(q·k + bias)·v with k, v [B, H, S, D] given (see `kv`)."""
        B, T, _ = x.shape
        q = self._heads(self.q(x))
        a = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=None if bias is None else bias.to(q.dtype),
                                           scale=1.0)
        return self.o(a.transpose(1, 2).reshape(B, T, -1))

    def kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._heads(self.k(x)), self._heads(self.v(x))


class FeedForward(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder):
        super().__init__()
        self.gated = cfg.gated
        if self.gated:
            self.wi_0 = linear(cfg.d_model, cfg.d_ff, vb.pp("wi_0"))
            self.wi_1 = linear(cfg.d_model, cfg.d_ff, vb.pp("wi_1"))
        else:
            self.wi = linear(cfg.d_model, cfg.d_ff, vb.pp("wi"))
        self.wo = linear(cfg.d_ff, cfg.d_model, vb.pp("wo"))
        self.act = activation(cfg.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(h)


class Block(nn.Module):
    """Pre-norm sublayers: self-attention, (decoder) cross-attention, feed-forward; each x += f(LN(x))."""

    def __init__(self, cfg: Config, vb: VarBuilder, first: bool, decoder: bool):
        super().__init__()
        eps = cfg.layer_norm_epsilon
        self.self_norm = RMSNorm.from_vb(cfg.d_model, eps, vb.pp("layer.0.layer_norm"))
        self.self_attn = Attention(cfg, vb.pp("layer.0.SelfAttention"), relative_bias=first, bidirectional=not decoder)
        self.cross_attn = self.cross_norm = None
        if decoder:
            self.cross_norm = RMSNorm.from_vb(cfg.d_model, eps, vb.pp("layer.1.layer_norm"))
            self.cross_attn = Attention(cfg, vb.pp("layer.1.EncDecAttention"))
        ff = vb.pp(f"layer.{2 if decoder else 1}")
        self.ff_norm = RMSNorm.from_vb(cfg.d_model, eps, ff.pp("layer_norm"))
        self.ff = FeedForward(cfg, ff.pp("DenseReluDense"))

    def forward(self, x, bias, i: int, cache: Seq2SeqCache | None = None, enc=None, cross_bias=None):
        h = self.self_norm(x)
        k, v = self.self_attn.kv(h)
        if cache is not None:
            k, v = cache.update(i, k, v)
        x = x + self.self_attn(h, bias, (k, v))
        if self.cross_attn is not None:
            kv = cache.cross[i] if cache is not None else None
            if kv is None:
                kv = self.cross_attn.kv(enc)
                if cache is not None:
                    cache.cross[i] = kv
            x = x + self.cross_attn(self.cross_norm(x), cross_bias, kv)
        return x + self.ff(self.ff_norm(x))


def padding_bias(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | int:
    """[B, 1, 1, S] additive mask: 0 for real keys, the dtype's minimum for padding (as transformers);
    0 without a mask."""
    if attention_mask is None:
        return 0
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class Stack(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder, layers: int, decoder: bool):
        super().__init__()
        self.block = nn.ModuleList(Block(cfg, vb.pp(f"block.{i}"), i == 0, decoder) for i in range(layers))
        self.final_layer_norm = RMSNorm.from_vb(cfg.d_model, cfg.layer_norm_epsilon, vb.pp("final_layer_norm"))


class ForConditionalGeneration(nn.Module):
    """T5ForConditionalGeneration (or, without decoder weights, T5EncoderModel)."""

    def __init__(self, cfg: Config, vb: VarBuilder):
        super().__init__()
        self.config = cfg
        self.shared = Embedding.from_vb(cfg.vocab_size, cfg.d_model, vb.pp("shared") if vb.contains("shared.weight")
                                        else vb.pp("encoder.embed_tokens"))
        self.encoder = Stack(cfg, vb.pp("encoder"), cfg.num_layers, decoder=False)
        self.decoder = None
        if vb.contains("decoder.final_layer_norm.weight") and cfg.num_decoder_layers:
            self.decoder = Stack(cfg, vb.pp("decoder"), cfg.num_decoder_layers, decoder=True)
            self.lm_head = (linear(cfg.d_model, cfg.vocab_size, vb.pp("lm_head")) if vb.contains("lm_head.weight")
                            else linear_from_weight(self.shared.weight))
        self.scale = cfg.d_model ** -0.5 if cfg.scale_decoder_outputs else 1.0
        eos = cfg.eos_token_id
        self.eos_token_ids = [eos] if isinstance(eos, int) else [e for e in (eos or []) if isinstance(e, int)]
        self.decoder_start_token_id = cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else 0
        self.pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0

    @property
    def dtype(self) -> torch.dtype:
        return self.shared.weight.dtype

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's last hidden states [B, S, d_model]; padding (attention_mask 0) is masked."""
        x = self.shared(input_ids)
        S = input_ids.shape[1]
        pos = torch.arange(S, device=x.device)
        bias = self.encoder.block[0].self_attn.position_bias(pos, pos) + padding_bias(attention_mask, x.dtype)
        for i, blk in enumerate(self.encoder.block):
            x = blk(x, bias, i)
        return self.encoder.final_layer_norm(x)

    def decode(self, decoder_input_ids: torch.Tensor, encoder_hidden: torch.Tensor,
               attention_mask: torch.Tensor | None = None, cache: Seq2SeqCache | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] (float32) of the decoder tokens after those in `cache` (if any);
        attention_mask: the encoder input's padding."""
        if self.decoder is None:
            from ..errors import GenerationError

            raise GenerationError("this T5 checkpoint has no decoder (an encoder-only T5EncoderModel): it embeds, "
                                  "it does not generate")
        x = self.shared(decoder_input_ids)
        T = decoder_input_ids.shape[1]
        start = cache.length if cache is not None else 0
        q_pos = torch.arange(start, start + T, device=x.device)
        k_pos = torch.arange(start + T, device=x.device)
        causal = torch.zeros(T, start + T, dtype=x.dtype, device=x.device).masked_fill_(
            k_pos[None, :] > q_pos[:, None], torch.finfo(x.dtype).min)
        bias = self.decoder.block[0].self_attn.position_bias(q_pos, k_pos) + causal
        cross_bias = padding_bias(attention_mask, x.dtype) if attention_mask is not None else None
        for i, blk in enumerate(self.decoder.block):
            x = blk(x, bias, i, cache, encoder_hidden, cross_bias)
        if cache is not None:
            cache.advance(T)
        h = self.decoder.final_layer_norm(x) * self.scale
        return self.lm_head(h).float()

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(decoder_input_ids, self.encode(input_ids, attention_mask), attention_mask)

    def new_cache(self, batch: int, max_len: int) -> Seq2SeqCache:
        c = self.config
        return Seq2SeqCache(c.num_decoder_layers, batch, c.num_heads, c.d_kv, max_len, dtype=self.dtype,
                            device=self.shared.weight.device)

    def as_encoder(self) -> nn.Module:
        """The encoder as ember's Embedder calls one: model(input_ids, attention_mask) -> hidden states."""
        return T5Encoder(self)


class T5Encoder(nn.Module):
    def __init__(self, t5: ForConditionalGeneration):
        super().__init__()
        self.t5 = t5
        self.config = t5.config
        self.hidden_size = t5.config.d_model
        self.max_tokens = t5.config.n_positions  # the trained length (relative positions have no table to run past)
        self.pad_token_id = t5.pad_token_id

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.t5.encode(input_ids, attention_mask).float()
