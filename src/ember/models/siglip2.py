"""SigLIP 2 (`siglip2`, the NaFlex variable-resolution checkpoints): SigLIP's towers (models/siglip.py)
with a vision tower that takes each image at its own aspect ratio.

Reference: transformers/models/siglip2/modeling_siglip2.py. Differences from SigLIP's vision tower:
- the processor (ember.images.PatchProcessor) resizes an image to at most `max_num_patches` patches
  keeping its aspect ratio, and hands over flattened patches [N, max_num_patches, C*P*P] (padded),
  a patch mask and each image's (rows, cols) of patches;
- patches go through a Linear (not a conv); the learned position grid (sqrt(num_patches) squared)
  is resized to each image's rows x cols (bilinear, antialiased, as F.interpolate);
- padding patches are masked out of every attention, the pooling head's included.
The text tower is SigLIP's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import EmbeddingError
from ..nn import Embedding, LayerNorm, linear
from ..varbuilder import VarBuilder
from . import clip, siglip
from .clip import MAX_TOWER_SIZE


@dataclass
class VisionConfig(clip.TowerConfig):
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_attention_heads: int = 12
    num_channels: int = 3
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    vision_use_head: bool = True
    num_patches: int = 256

    def validate(self) -> None:
        super().validate()
        self._positive("num_channels", "patch_size", "num_patches")
        self._require(self.patch_size <= MAX_TOWER_SIZE and self.num_channels <= 4 and self.num_patches <= 1 << 20,
                      "patch_size / num_channels / num_patches is not a real vision tower's")
        g = math.isqrt(self.num_patches)
        self._require(g * g == self.num_patches, f"num_patches ({self.num_patches}) must be a square (the position grid)")


@dataclass
class Config(clip.Config):
    text_class: ClassVar[type] = siglip.TextConfig
    vision_class: ClassVar[type] = VisionConfig


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig, vb: VarBuilder):
        super().__init__()
        self.config = cfg
        E, P, C = cfg.hidden_size, cfg.patch_size, cfg.num_channels
        self.patch_embedding = linear(C * P * P, E, vb.pp("embeddings.patch_embedding"), bias=True)
        self.position_embedding = Embedding.from_vb(cfg.num_patches, E, vb.pp("embeddings.position_embedding"))
        self.grid = math.isqrt(cfg.num_patches)
        self.layers = clip.encoder_layers(cfg, vb)
        self.post_layernorm = LayerNorm.from_vb(E, cfg.layer_norm_eps, vb.pp("post_layernorm"))
        self.head = siglip.PoolingHead(cfg, vb.pp("head")) if cfg.vision_use_head else None

    def positions(self, spatial_shapes: torch.Tensor, length: int) -> torch.Tensor:
        """[N, length, E]: the position grid resized to each image's rows x cols, zeros after."""
        w = self.position_embedding.weight
        grid = w.reshape(self.grid, self.grid, -1).permute(2, 0, 1)[None].float()  # [1, E, g, g]
        out = w.new_zeros(spatial_shapes.shape[0], length, w.shape[1])
        for i, (h, wd) in enumerate(spatial_shapes.tolist()):
            r = F.interpolate(grid, size=(h, wd), mode="bilinear", align_corners=False, antialias=True)
            out[i, :h * wd] = r[0].reshape(w.shape[1], -1).T.to(w.dtype)
        return out

    def forward(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor,
                spatial_shapes: torch.Tensor) -> torch.Tensor:
        """The pooled image state [N, E] of patchified images (the head's output; without a head,
        the mean of the real patches)."""
        cfg = self.config
        N, L = pixel_values.shape[:2]
        want = cfg.num_channels * cfg.patch_size ** 2
        if pixel_values.dim() != 3 or pixel_values.shape[2] != want or tuple(pixel_attention_mask.shape) != (N, L) \
                or tuple(spatial_shapes.shape) != (N, 2):
            raise EmbeddingError(f"pixel_values must be [N, patches, {want}] with a [N, patches] mask and [N, 2] "
                                 f"spatial shapes, got {list(pixel_values.shape)}, {list(pixel_attention_mask.shape)}, "
                                 f"{list(spatial_shapes.shape)}")
        if bool((spatial_shapes <= 0).any()) or bool((spatial_shapes.prod(-1) > L).any()):
            raise EmbeddingError(f"spatial shapes {spatial_shapes.tolist()[:4]} do not fit {L} patches")
        w = self.patch_embedding.weight
        x = self.patch_embedding(pixel_values.to(w.dtype)) + self.positions(spatial_shapes, L)
        keys = pixel_attention_mask.bool()
        mask = keys[:, None, None, :]  # [N, 1, 1, L]: padding patches are never attended to
        for layer in self.layers:
            x = layer(x, mask)
        x = self.post_layernorm(x)
        if self.head is None:
            m = keys[..., None].to(x.dtype)
            return (x * m).sum(1) / m.sum(1)
        h = self.head
        a = h.attention(h.probe.to(x.dtype).expand(N, 1, -1), mask, kv=x)
        a = a + h.mlp(h.layernorm(a))
        return a[:, 0]


class Model(siglip.Model):
    """Siglip2Model: SigLIP's text tower and head, the NaFlex vision tower."""

    def __init__(self, cfg: Config, vb: VarBuilder):
        nn.Module.__init__(self)
        self.config = cfg
        t = cfg.text
        self.text_model = siglip.TextTransformer(t, vb.pp("text_model"))
        self.text_head = linear(t.hidden_size, t.projection_size, vb.pp("text_model.head"), bias=True)
        self.vision_model = VisionTransformer(cfg.vision, vb.pp("vision_model"))
        self.register_buffer("logit_scale", vb.get((1,), "logit_scale").float())
        self.register_buffer("logit_bias", vb.get((1,), "logit_bias").float())

    patchified = True  # the Embedder uses images.PatchProcessor

    def processor_defaults(self) -> dict:
        """transformers' Siglip2ImageProcessor defaults (a checkpoint's preprocessor_config.json wins)."""
        v = self.config.vision
        return {"patch_size": v.patch_size, "max_num_patches": v.num_patches, "resample": 2,
                "image_mean": [0.5] * 3, "image_std": [0.5] * 3}

    def image_features(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None,
                       spatial_shapes: torch.Tensor | None = None) -> torch.Tensor:
        if pixel_attention_mask is None or spatial_shapes is None:
            raise EmbeddingError("siglip2 takes pixel_values with pixel_attention_mask and spatial_shapes "
                                 "(what its processor gives)")
        return self.vision_model(pixel_values, pixel_attention_mask, spatial_shapes).float()

    def forward(self, input_ids, pixel_values, attention_mask=None, pixel_attention_mask=None, spatial_shapes=None):
        return self.logits(self.image_features(pixel_values, pixel_attention_mask, spatial_shapes),
                           self.text_features(input_ids, attention_mask))
