"""SigLIP (`siglip`): CLIP's towers (models/clip.py) with a sigmoid loss's logits.

Reference: transformers/models/siglip/modeling_siglip.py. Differences from CLIP:
- text: bidirectional attention (padding masked), the *last* token's state through `head` (a Linear
  with bias) instead of an EOS token and a projection;
- vision: patches with a conv bias, no class token, no pre-LayerNorm, post_layernorm over every
  token, then a multihead attention pooling head (a learned probe attends over the tokens);
- logits = cos(text, image) * exp(logit_scale) + logit_bias (read as probabilities through a sigmoid).

SigLIP was trained on texts padded to `max_position_embeddings` (the model card's
`padding="max_length"`): the Embedder pads them so (see vision_embeddings.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..nn import Embedding, FusedLinears, LayerNorm, linear
from ..varbuilder import VarBuilder
from . import clip


@dataclass
class TextConfig(clip.TextConfig):
    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_attention_heads: int = 12
    max_position_embeddings: int = 64
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    projection_size: int | None = None  # None: hidden_size

    def __post_init__(self):
        if self.projection_size is None:
            self.projection_size = self.hidden_size

    def validate(self) -> None:
        super().validate()
        self._positive("projection_size")


@dataclass
class VisionConfig(clip.VisionConfig):
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    vision_use_head: bool = True


@dataclass
class Config(clip.Config):
    text_class: ClassVar[type] = TextConfig
    vision_class: ClassVar[type] = VisionConfig


class TextTransformer(clip.TextTransformer):
    causal = False


class PoolingHead(nn.Module):
    """Multihead attention pooling: a learned probe attends over the tokens (torch's
    MultiheadAttention weights: in_proj_weight [3E, E]), then x + mlp(LN(x))."""

    def __init__(self, cfg: VisionConfig, vb: VarBuilder):
        super().__init__()
        E = cfg.hidden_size
        self.probe = nn.Parameter(vb.get((1, 1, E), "probe"), requires_grad=False)
        a = vb.pp("attention")
        fused = a.rename({f"{a.prefix}.in_proj.weight": f"{a.prefix}.in_proj_weight",
                          f"{a.prefix}.in_proj.bias": f"{a.prefix}.in_proj_bias"}).pp("in_proj")
        self.attention = clip.Attention(E, cfg.num_attention_heads, a,
                                        qkv=FusedLinears.from_fused(E, [E, E, E], fused, bias=True))
        self.layernorm = LayerNorm.from_vb(E, cfg.layer_norm_eps, vb.pp("layernorm"))
        self.mlp = clip.MLP(cfg, vb.pp("mlp"))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.attention(self.probe.to(h.dtype).expand(h.shape[0], 1, -1), None, kv=h)
        x = x + self.mlp(self.layernorm(x))
        return x[:, 0]


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig, vb: VarBuilder):
        super().__init__()
        self.config = cfg
        E, P, C = cfg.hidden_size, cfg.patch_size, cfg.num_channels
        self.patch_weight = nn.Parameter(vb.get((E, C, P, P), "embeddings.patch_embedding.weight"), requires_grad=False)
        self.patch_bias = nn.Parameter(vb.get((E,), "embeddings.patch_embedding.bias"), requires_grad=False)
        self.position_embedding = Embedding.from_vb(cfg.num_patches, E, vb.pp("embeddings.position_embedding"))
        self.layers = clip.encoder_layers(cfg, vb)
        self.post_layernorm = LayerNorm.from_vb(E, cfg.layer_norm_eps, vb.pp("post_layernorm"))
        self.head = PoolingHead(cfg, vb.pp("head")) if cfg.vision_use_head else None

    patches = clip.VisionTransformer.patches

    def last_hidden_state(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Every patch's state after post_layernorm [N, patches, E] (what Gemma 3 projects)."""
        x = self.patches(pixel_values, self.patch_bias) + self.position_embedding.weight
        for layer in self.layers:
            x = layer(x, None)
        return self.post_layernorm(x)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The pooled image state [N, E] (the head's output; without a head, the mean token, as the
        SigLIP classification model pools)."""
        x = self.last_hidden_state(pixel_values)
        return self.head(x) if self.head is not None else x.mean(dim=1)


class Model(clip.Model):
    """SiglipModel: both towers; the text head and the vision pooling head are the projections."""

    def __init__(self, cfg: Config, vb: VarBuilder):
        nn.Module.__init__(self)
        self.config = cfg
        t = cfg.text
        self.text_model = TextTransformer(t, vb.pp("text_model"))
        self.text_head = linear(t.hidden_size, t.projection_size, vb.pp("text_model.head"), bias=True)
        self.vision_model = VisionTransformer(cfg.vision, vb.pp("vision_model"))
        self.register_buffer("logit_scale", vb.get((1,), "logit_scale").float())
        self.register_buffer("logit_bias", vb.get((1,), "logit_bias").float())

    text_padding = "max_length"  # as SigLIP was trained; the last token's state is pooled

    @property
    def dim(self) -> int:
        return self.config.text.projection_size

    def processor_defaults(self) -> dict:
        """transformers' SiglipImageProcessor defaults (a checkpoint's preprocessor_config.json wins)."""
        s = self.config.vision.image_size
        return {"size": {"height": s, "width": s}, "do_center_crop": False, "resample": 3,
                "image_mean": [0.5] * 3, "image_std": [0.5] * 3}

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.text_head(self.text_model(input_ids, attention_mask)[:, -1]).float()

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values).float()

    def logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        t, i = clip.l2_normalize(text_embeds), clip.l2_normalize(image_embeds)
        return (t @ i.T * self.logit_scale.exp() + self.logit_bias).T
