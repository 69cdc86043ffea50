"""Whisper (`whisper`): a log-mel audio encoder and a text decoder with cross-attention.

Reference: transformers/models/whisper/modeling_whisper.py. Tensor names are the checkpoint's
(model.encoder.conv1/conv2, model.encoder.embed_positions, model.encoder.layers.N.self_attn.q_proj,
model.decoder.embed_tokens/embed_positions, model.decoder.layers.N.encoder_attn.k_proj, proj_out).

    encoder: gelu(conv1) → gelu(conv2, stride 2) → + positions → pre-LN layers → layer_norm
    decoder: tokens (× sqrt(d) with scale_embedding) + learned positions → pre-LN layers with
             self-attention (causal, cached) and cross-attention (keys/values of the encoder output,
             computed once) → layer_norm → proj_out (tied to embed_tokens unless the file has its own)

    h = model.encode(input_features)                         # [B, n_mels, 2*max_source_positions] → [B, S, d]
    logits = model.decode(decoder_ids, h, None, cache=None)  # [B, T, vocab] float32

Attention scales q by head_dim^-0.5; k_proj has no bias.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MAX_LAYERS, ModelConfig
from ..errors import AudioError, GenerationError
from ..nn import Embedding, LayerNorm, activation, linear, linear_from_weight
from ..nn.seq2seq_cache import Seq2SeqCache
from ..varbuilder import VarBuilder


@dataclass
class Config(ModelConfig):
    vocab_size: int = 51865
    num_mel_bins: int = 80
    d_model: int = 384
    encoder_layers: int = 4
    encoder_attention_heads: int = 6
    decoder_layers: int = 4
    decoder_attention_heads: int = 6
    encoder_ffn_dim: int = 1536
    decoder_ffn_dim: int = 1536
    activation_function: str = "gelu"
    scale_embedding: bool = False
    max_source_positions: int = 1500
    max_target_positions: int = 448
    pad_token_id: int | None = 50256
    bos_token_id: int | None = 50256
    eos_token_id: int | list | None = 50256
    decoder_start_token_id: int | None = 50257
    median_filter_width: int = 7  # word timestamps: smoothing of the cross-attention weights

    def validate(self) -> None:
        self._positive("vocab_size", "num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads",
                       "decoder_layers", "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim",
                       "max_source_positions", "max_target_positions")
        for n in ("encoder_layers", "decoder_layers"):
            self._require(getattr(self, n) <= MAX_LAYERS, f"{n} {getattr(self, n)} is not a real model's")
        self._require(self.max_source_positions <= 1 << 16 and self.max_target_positions <= 1 << 16,
                      "max_source_positions / max_target_positions are not a real model's")
        for n in ("encoder_attention_heads", "decoder_attention_heads"):
            self._require(self.d_model % getattr(self, n) == 0, f"d_model ({self.d_model}) must be a multiple of {n}")
        activation(self.activation_function)
        self._require(0 < self.median_filter_width <= 99 and self.median_filter_width % 2 == 1,
                      f"median_filter_width must be an odd number up to 99, got {self.median_filter_width}")


class Attention(nn.Module):
    def __init__(self, d: int, heads: int, vb: VarBuilder):
        super().__init__()
        self.heads, self.head_dim = heads, d // heads
        self.q_proj = linear(d, d, vb.pp("q_proj"), bias=True)
        self.k_proj = linear(d, d, vb.pp("k_proj"))
        self.v_proj = linear(d, d, vb.pp("v_proj"), bias=True)
        self.out_proj = linear(d, d, vb.pp("out_proj"), bias=True)
        self.scaling = self.head_dim ** -0.5

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._heads(self.k_proj(x)), self._heads(self.v_proj(x))

    def probs(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """softmax(q·kᵀ) [B, heads, T, S]: the weights `forward` applies to the values (no mask:
        cross-attention), as transformers' eager attention returns them."""
        q = self._heads(self.q_proj(x) * self.scaling)
        return torch.softmax(q @ kv[0].transpose(-1, -2), dim=-1)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None = None):
        B, T, E = x.shape
        q = self._heads(self.q_proj(x) * self.scaling)  # scaled before the product, as transformers
        a = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask, scale=1.0)
        return self.out_proj(a.transpose(1, 2).reshape(B, T, E))


class Layer(nn.Module):
    """x += attn(LN(x)); (decoder) x += cross(LN(x), encoder); x += fc2(act(fc1(LN(x))))."""

    def __init__(self, cfg: Config, vb: VarBuilder, decoder: bool):
        super().__init__()
        d = cfg.d_model
        heads = cfg.decoder_attention_heads if decoder else cfg.encoder_attention_heads
        ffn = cfg.decoder_ffn_dim if decoder else cfg.encoder_ffn_dim
        self.self_attn_layer_norm = LayerNorm.from_vb(d, 1e-5, vb.pp("self_attn_layer_norm"))
        self.self_attn = Attention(d, heads, vb.pp("self_attn"))
        self.encoder_attn = self.encoder_attn_layer_norm = None
        if decoder:
            self.encoder_attn_layer_norm = LayerNorm.from_vb(d, 1e-5, vb.pp("encoder_attn_layer_norm"))
            self.encoder_attn = Attention(d, heads, vb.pp("encoder_attn"))
        self.final_layer_norm = LayerNorm.from_vb(d, 1e-5, vb.pp("final_layer_norm"))
        self.fc1 = linear(d, ffn, vb.pp("fc1"), bias=True)
        self.fc2 = linear(ffn, d, vb.pp("fc2"), bias=True)
        self.act = activation(cfg.activation_function)

    def forward(self, x, i: int = 0, cache: Seq2SeqCache | None = None, enc=None, mask=None, probs=None):
        """probs: a list the cross-attention weights [B, heads, T, S] are appended to (word timestamps)."""
        h = self.self_attn_layer_norm(x)
        k, v = self.self_attn.kv(h)
        if cache is not None:
            k, v = cache.update(i, k, v)
        x = x + self.self_attn(h, (k, v), mask)
        if self.encoder_attn is not None:
            kv = cache.cross[i] if cache is not None else None
            if kv is None:
                kv = self.encoder_attn.kv(enc)
                if cache is not None:
                    cache.cross[i] = kv
            h = self.encoder_attn_layer_norm(x)
            if probs is not None:
                probs.append(self.encoder_attn.probs(h, kv))
            x = x + self.encoder_attn(h, kv)
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))


class Encoder(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder):
        super().__init__()
        d, m = cfg.d_model, cfg.num_mel_bins
        self.conv1_weight = nn.Parameter(vb.get((d, m, 3), "conv1.weight"), requires_grad=False)
        self.conv1_bias = nn.Parameter(vb.get((d,), "conv1.bias"), requires_grad=False)
        self.conv2_weight = nn.Parameter(vb.get((d, d, 3), "conv2.weight"), requires_grad=False)
        self.conv2_bias = nn.Parameter(vb.get((d,), "conv2.bias"), requires_grad=False)
        self.embed_positions = Embedding.from_vb(cfg.max_source_positions, d, vb.pp("embed_positions"))
        self.layers = nn.ModuleList(Layer(cfg, vb.pp(f"layers.{i}"), False) for i in range(cfg.encoder_layers))
        self.layer_norm = LayerNorm.from_vb(d, 1e-5, vb.pp("layer_norm"))
        self.frames = 2 * cfg.max_source_positions
        self.n_mels = m

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 3 or tuple(features.shape[1:]) != (self.n_mels, self.frames):
            raise AudioError(f"input features must be [B, {self.n_mels}, {self.frames}] (30 s of log-mel frames), "
                             f"got {list(features.shape)}")
        x = F.gelu(F.conv1d(features.to(self.conv1_weight.dtype), self.conv1_weight, self.conv1_bias, padding=1))
        x = F.gelu(F.conv1d(x, self.conv2_weight, self.conv2_bias, stride=2, padding=1))
        x = x.transpose(1, 2) + self.embed_positions.weight
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


class Decoder(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder):
        super().__init__()
        d = cfg.d_model
        self.embed_tokens = Embedding.from_vb(cfg.vocab_size, d, vb.pp("embed_tokens"))
        self.embed_positions = Embedding.from_vb(cfg.max_target_positions, d, vb.pp("embed_positions"))
        self.layers = nn.ModuleList(Layer(cfg, vb.pp(f"layers.{i}"), True) for i in range(cfg.decoder_layers))
        self.layer_norm = LayerNorm.from_vb(d, 1e-5, vb.pp("layer_norm"))
        self.embed_scale = math.sqrt(d) if cfg.scale_embedding else 1.0


class ForConditionalGeneration(nn.Module):
    """WhisperForConditionalGeneration."""

    def __init__(self, cfg: Config, vb: VarBuilder):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg, vb.pp("model.encoder"))
        self.decoder = Decoder(cfg, vb.pp("model.decoder"))
        self.proj_out = (linear(cfg.d_model, cfg.vocab_size, vb.pp("proj_out")) if vb.contains("proj_out.weight")
                         else linear_from_weight(self.decoder.embed_tokens.weight))
        eos = cfg.eos_token_id
        self.eos_token_ids = [eos] if isinstance(eos, int) else [e for e in (eos or []) if isinstance(e, int)]
        self.decoder_start_token_id = cfg.decoder_start_token_id
        self.pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.weight.dtype

    @property
    def max_target_positions(self) -> int:
        return self.config.max_target_positions

    def encode(self, input_features: torch.Tensor, attention_mask=None) -> torch.Tensor:
        """Encoder states [B, max_source_positions, d_model] of log-mel features."""
        return self.encoder(input_features)

    def decode(self, decoder_input_ids: torch.Tensor, encoder_hidden: torch.Tensor, attention_mask=None,
               cache: Seq2SeqCache | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] (float32) of the decoder tokens after those in `cache` (if any)."""
        T = decoder_input_ids.shape[1]
        start = cache.length if cache is not None else 0
        if start + T > self.config.max_target_positions:
            raise GenerationError(f"the decoder takes at most {self.config.max_target_positions} tokens; "
                                  f"this step reaches {start + T}")
        x, mask = self._embed(decoder_input_ids, start)
        for i, layer in enumerate(self.decoder.layers):
            x = layer(x, i, cache, encoder_hidden, mask)
        if cache is not None:
            cache.advance(T)
        return self.proj_out(self.decoder.layer_norm(x)).float()

    def _embed(self, ids: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The decoder's input states of `ids` at positions start.., and the causal mask (None for one token)."""
        dec, T = self.decoder, ids.shape[1]
        x = dec.embed_tokens(ids) * dec.embed_scale + dec.embed_positions.weight[start:start + T]
        mask = None
        if T > 1:  # a query sees the cached tokens and those up to itself
            q = torch.arange(start, start + T, device=x.device)[:, None]
            mask = torch.arange(start + T, device=x.device)[None, :] <= q
        return x, mask

    def alignment_weights(self, decoder_input_ids: torch.Tensor, encoder_hidden: torch.Tensor,
                          heads: list[tuple[int, int]]) -> torch.Tensor:
        """The cross-attention weights [len(heads), T, S] of the (layer, head) pairs `heads` over the
        whole of `decoder_input_ids` [1, T] (no cache): what transformers' generate returns as
        `cross_attentions`, computed only when word timestamps are asked for. Only the layers up to
        the last one named run, and only the named heads' weights are kept."""
        T = decoder_input_ids.shape[1]
        if T > self.config.max_target_positions:
            raise GenerationError(f"the decoder takes at most {self.config.max_target_positions} tokens, got {T}")
        x, mask = self._embed(decoder_input_ids, 0)
        kept: dict[tuple[int, int], torch.Tensor] = {}
        for i, layer in enumerate(self.decoder.layers[:1 + max(layer for layer, _ in heads)]):
            probs: list[torch.Tensor] = []
            x = layer(x, i, None, encoder_hidden, mask, probs)
            kept.update({(i, h): probs[0][0, h] for layer_i, h in heads if layer_i == i})
        return torch.stack([kept[p] for p in heads])

    def forward(self, input_features: torch.Tensor, decoder_input_ids: torch.Tensor) -> torch.Tensor:
        return self.decode(decoder_input_ids, self.encode(input_features))

    def new_cache(self, batch: int, max_len: int) -> Seq2SeqCache:
        c = self.config
        return Seq2SeqCache(c.decoder_layers, batch, c.decoder_attention_heads, c.d_model // c.decoder_attention_heads,
                            max_len, dtype=self.dtype, device=self.proj_out.weight.device)
