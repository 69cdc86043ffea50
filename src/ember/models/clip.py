"""CLIP (`clip`): a text tower and a vision tower projected into one embedding space.

Reference: transformers/models/clip/modeling_clip.py. Both towers are pre-LayerNorm transformers
with the same layer (`layer_norm1`, `self_attn.{q,k,v,out}_proj`, `layer_norm2`, `mlp.fc1/fc2`),
which SigLIP shares (models/siglip.py):

    text:   tokens + positions → causal layers → final_layer_norm → the EOS token's state → text_projection
    vision: [class] + conv patches + positions → pre_layrnorm → layers → post_layernorm(class) → visual_projection

    model.text_features(input_ids, attention_mask)   # [B, projection_dim], not normalised
    model.image_features(pixel_values)                # [N, projection_dim], not normalised
    model(input_ids, pixel_values, attention_mask)    # logits_per_image [N, B], as transformers
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError, EmbeddingError
from ..nn import Embedding, FusedLinears, LayerNorm, activation, linear
from ..varbuilder import VarBuilder

# OpenAI CLIP's normalisation (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# at most this many positions / pixels per side / layers: configs claiming more are refused before
# anything is allocated from them
MAX_TOWER_SIZE = 1 << 16


@dataclass
class TowerConfig(ModelConfig):
    """What the text and vision towers share (config.json's text_config / vision_config names)."""

    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def validate(self) -> None:
        self._positive("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "layer_norm_eps")
        self._require(self.hidden_size % self.num_attention_heads == 0,
                      f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                      f"({self.num_attention_heads})")
        activation(self.hidden_act)


@dataclass
class TextConfig(TowerConfig):
    vocab_size: int = 49408
    max_position_embeddings: int = 77
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int | None = 49407

    def validate(self) -> None:
        super().validate()
        self._positive("vocab_size", "max_position_embeddings")
        self._require(self.max_position_embeddings <= MAX_TOWER_SIZE,
                      f"max_position_embeddings {self.max_position_embeddings} is not a real text tower's")


@dataclass
class VisionConfig(TowerConfig):
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32

    def validate(self) -> None:
        super().validate()
        self._positive("num_channels", "image_size", "patch_size")
        self._require(self.image_size <= MAX_TOWER_SIZE and self.num_channels <= 4,
                      f"image_size {self.image_size} / num_channels {self.num_channels} is not a real vision tower's")
        self._require(self.image_size % self.patch_size == 0,
                      f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class Config(ModelConfig):
    """config.json of CLIPModel: the towers' configs nested under text_config / vision_config."""

    text_config: dict | None = None
    vision_config: dict | None = None
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    text: TowerConfig = field(init=False, repr=False)
    vision: TowerConfig = field(init=False, repr=False)

    text_class: ClassVar[type] = TextConfig
    vision_class: ClassVar[type] = VisionConfig

    def __post_init__(self):
        self.text = self._tower(self.text_class, self.text_config, "text_config")
        self.vision = self._tower(self.vision_class, self.vision_config, "vision_config")

    def _tower(self, cls, d, name):
        try:
            return cls.from_dict(d or {})
        except ConfigError as e:
            raise ConfigError(f"{name}: {e}") from None

    def validate(self) -> None:
        self._positive("projection_dim")


def _check_pixels(pixel_values: torch.Tensor, cfg: VisionConfig) -> None:
    want = (cfg.num_channels, cfg.image_size, cfg.image_size)
    if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != want:
        raise EmbeddingError(f"pixel_values must be [N, {', '.join(map(str, want))}] for this vision tower, "
                             f"got {list(pixel_values.shape)}")


class Attention(nn.Module):
    """Multi-head attention with q/k/v/out projections, all with biases (CLIP, SigLIP)."""

    def __init__(self, hidden: int, heads: int, vb: VarBuilder, qkv: nn.Module | None = None):
        """qkv: the q/k/v projection when the checkpoint stores it fused (torch's MultiheadAttention)."""
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.qkv = qkv or FusedLinears(hidden, {n: (hidden, vb.pp(f"{n}_proj")) for n in ("q", "k", "v")}, bias=True)
        self.out_proj = linear(hidden, hidden, vb.pp("out_proj"), bias=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, kv: torch.Tensor | None = None) -> torch.Tensor:
        B, T, E = x.shape
        q, k, v = self.qkv(x)
        if kv is not None:  # cross-attention (SigLIP's pooling head): keys and values from kv
            _, k, v = self.qkv(kv)
        S = k.shape[1]
        q = q.view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(B, S, self.heads, self.head_dim).transpose(1, 2)
        v = v.view(B, S, self.heads, self.head_dim).transpose(1, 2)
        # SDPA takes the strided q/k/v views as they are (an explicit matmul would copy them: ~1.4x slower)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(a.transpose(1, 2).reshape(B, T, E))


class MLP(nn.Module):
    def __init__(self, cfg: TowerConfig, vb: VarBuilder):
        super().__init__()
        self.fc1 = linear(cfg.hidden_size, cfg.intermediate_size, vb.pp("fc1"), bias=True)
        self.fc2 = linear(cfg.intermediate_size, cfg.hidden_size, vb.pp("fc2"), bias=True)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    """x += attn(LN1(x)); x += mlp(LN2(x))."""

    def __init__(self, cfg: TowerConfig, vb: VarBuilder):
        super().__init__()
        E = cfg.hidden_size
        self.layer_norm1 = LayerNorm.from_vb(E, cfg.layer_norm_eps, vb.pp("layer_norm1"))
        self.self_attn = Attention(E, cfg.num_attention_heads, vb.pp("self_attn"))
        self.layer_norm2 = LayerNorm.from_vb(E, cfg.layer_norm_eps, vb.pp("layer_norm2"))
        self.mlp = MLP(cfg, vb.pp("mlp"))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


def encoder_layers(cfg: TowerConfig, vb: VarBuilder) -> nn.ModuleList:
    return nn.ModuleList(EncoderLayer(cfg, vb.pp(f"encoder.layers.{i}")) for i in range(cfg.num_hidden_layers))


def text_mask(attention_mask: torch.Tensor | None, T: int, causal: bool, device) -> torch.Tensor | None:
    """Boolean [B|1, 1, T, T] (True = attend): causal and/or padded keys masked; None if neither."""
    mask = None
    if causal:
        mask = torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None]
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        keys = attention_mask.bool()[:, None, None, :]
        keys = keys | ~keys.any(dim=-1, keepdim=True)  # a row of padding only sees everything (never NaN)
        mask = keys if mask is None else mask & keys
    return mask


class TextTransformer(nn.Module):
    """Token + position embeddings → layers → final LayerNorm: last hidden states [B, T, E]."""

    causal = True

    def __init__(self, cfg: TextConfig, vb: VarBuilder):
        super().__init__()
        self.config = cfg
        E = cfg.hidden_size
        self.token_embedding = Embedding.from_vb(cfg.vocab_size, E, vb.pp("embeddings.token_embedding"))
        self.position_embedding = Embedding.from_vb(cfg.max_position_embeddings, E,
                                                    vb.pp("embeddings.position_embedding"))
        self.layers = encoder_layers(cfg, vb)
        self.final_layer_norm = LayerNorm.from_vb(E, cfg.layer_norm_eps, vb.pp("final_layer_norm"))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T = input_ids.shape
        if T > self.config.max_position_embeddings:
            raise EmbeddingError(f"{T} tokens: this text tower takes at most {self.config.max_position_embeddings}")
        x = self.token_embedding(input_ids) + self.position_embedding.weight[:T]
        mask = text_mask(attention_mask, T, self.causal, x.device)
        for layer in self.layers:
            x = layer(x, mask)
        return self.final_layer_norm(x)


class VisionTransformer(nn.Module):
    """[class] + conv patches + positions → pre_layrnorm → layers; pooled = post_layernorm(class)."""

    def __init__(self, cfg: VisionConfig, vb: VarBuilder, pooled: bool = True):
        """pooled=False: no post_layernorm (LLaVA reads hidden states only; its mmproj files leave it out)."""
        super().__init__()
        self.config = cfg
        E, P, C = cfg.hidden_size, cfg.patch_size, cfg.num_channels
        self.class_embedding = nn.Parameter(vb.get((E,), "embeddings.class_embedding"), requires_grad=False)
        self.patch_weight = nn.Parameter(vb.get((E, C, P, P), "embeddings.patch_embedding.weight"), requires_grad=False)
        self.position_embedding = Embedding.from_vb(cfg.num_patches + 1, E, vb.pp("embeddings.position_embedding"))
        self.pre_layrnorm = LayerNorm.from_vb(E, cfg.layer_norm_eps, vb.pp("pre_layrnorm"))  # sic: the checkpoint's name
        self.layers = encoder_layers(cfg, vb)
        self.post_layernorm = LayerNorm.from_vb(E, cfg.layer_norm_eps, vb.pp("post_layernorm")) if pooled else None

    def patches(self, pixel_values: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        _check_pixels(pixel_values, self.config)
        w = self.patch_weight
        x = F.conv2d(pixel_values.to(w.dtype), w, bias, stride=self.config.patch_size)  # [N, E, g, g]
        return x.flatten(2).transpose(1, 2)

    def hidden_states(self, pixel_values: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """transformers' output_hidden_states [N, 1 + patches, E] up to index `upto` (default: all):
        [0] the embeddings after pre_layrnorm, [i] the output of layer i (LLaVA picks one of them)."""
        x = self.patches(pixel_values)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.position_embedding.weight
        out = [self.pre_layrnorm(x)]
        for layer in self.layers[:len(self.layers) if upto is None else upto]:
            out.append(layer(out[-1], None))
        return out

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The pooled image state [N, E]."""
        return self.post_layernorm(self.hidden_states(pixel_values)[-1][:, 0])


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(p=2, dim=-1, keepdim=True)


class Model(nn.Module):
    """CLIPModel: both towers and their projections (see the module docstring)."""

    def __init__(self, cfg: Config, vb: VarBuilder):
        super().__init__()
        self.config = cfg
        t, v = cfg.text, cfg.vision
        self.text_model = TextTransformer(t, vb.pp("text_model"))
        self.vision_model = VisionTransformer(v, vb.pp("vision_model"))
        self.text_projection = linear(t.hidden_size, cfg.projection_dim, vb.pp("text_projection"))
        self.visual_projection = linear(v.hidden_size, cfg.projection_dim, vb.pp("visual_projection"))
        self.register_buffer("logit_scale", vb.get((), "logit_scale").float())
        self.eos_token_id = t.eos_token_id

    text_padding = "longest"  # how the Embedder pads texts (the EOS token's state is pooled)

    @property
    def dim(self) -> int:
        return self.config.projection_dim

    def processor_defaults(self) -> dict:
        """transformers' CLIPImageProcessor defaults (a checkpoint's preprocessor_config.json wins)."""
        s = self.config.vision.image_size
        return {"size": {"shortest_edge": s}, "do_center_crop": True, "crop_size": {"height": s, "width": s},
                "resample": 3, "image_mean": list(OPENAI_MEAN), "image_std": list(OPENAI_STD)}

    def pool_text(self, h: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The EOS token's state of each row: the first eos_token_id, or (configs from before
        transformers fixed eos_token_id, which say 2) the highest id in the row, as transformers."""
        if self.eos_token_id == 2 or self.eos_token_id is None:
            idx = input_ids.to(torch.int).argmax(dim=-1)
        else:
            idx = (input_ids == self.eos_token_id).int().argmax(dim=-1)
        return h[torch.arange(h.shape[0], device=h.device), idx]

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.text_model(input_ids, attention_mask)
        return self.text_projection(self.pool_text(h, input_ids)).float()

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(self.vision_model(pixel_values)).float()

    def logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """logits_per_image [N, B] from unnormalised features."""
        return (l2_normalize(text_embeds) @ l2_normalize(image_embeds).T * self.logit_scale.exp()).T

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits(self.image_features(pixel_values), self.text_features(input_ids, attention_mask))
