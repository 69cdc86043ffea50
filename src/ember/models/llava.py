"""LLaVA (`llava`): a CLIP vision tower, a two-layer projector and a text decoder (Llama, Mistral,
Qwen2 ... any registered family ember can feed embeddings: see models/multimodal.py).

Reference: transformers/models/llava/modeling_llava.py. An image's features are the tower's hidden
states at `vision_feature_layer` (default -2: the second-to-last layer's output; a list of layers is
concatenated), without the class token when `vision_feature_select_strategy` is "default", through
linear_1 → projector_hidden_act → linear_2. So an image takes (image_size / patch_size)^2 tokens
("default") or one more ("full"); the processor writes that many `<image>` tokens where the chat
template wrote one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..nn import activation, linear
from ..varbuilder import VarBuilder
from . import clip, multimodal

STRATEGIES = ("default", "full")


@dataclass
class Config(multimodal.Config):
    image_token_index: int | None = 32000
    vision_feature_layer: int | list | None = -2
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True

    # (parsed text config, its ForCausalLM class): ember.registry resolves text_config's model_type
    decoder: Any = None

    def __post_init__(self):
        if self.decoder is None:
            raise ConfigError("a llava config is parsed through ember.registry (which resolves its text decoder)")
        self.text, self.text_class = self.decoder
        self.raw = {k: v for k, v in self.raw.items() if k != "decoder"}  # config.json's keys only
        self.vision = self.tower(clip.VisionConfig, self.vision_config, "vision_config")

    def validate(self) -> None:
        super().validate()
        self._require(self.vision_feature_select_strategy in STRATEGIES,
                      f"vision_feature_select_strategy must be one of {STRATEGIES}, got "
                      f"{self.vision_feature_select_strategy!r:.60}")
        n = self.vision.num_hidden_layers
        layers = self.feature_layers
        self._require(bool(layers) and all(isinstance(i, int) and not isinstance(i, bool) and -n - 1 <= i <= n
                                           for i in layers),
                      f"vision_feature_layer must be a layer index in [-{n + 1}, {n}] (or a list of them), got "
                      f"{self.vision_feature_layer!r:.60}")
        activation(self.projector_hidden_act)

    @property
    def feature_layers(self) -> list:
        v = self.vision_feature_layer
        return v if isinstance(v, list) else [v]


class Projector(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder):
        super().__init__()
        inp = cfg.vision.hidden_size * len(cfg.feature_layers)
        E, bias = cfg.text.hidden_size, cfg.multimodal_projector_bias
        self.linear_1 = linear(inp, E, vb.pp("linear_1"), bias=bias)
        self.act = activation(cfg.projector_hidden_act)
        self.linear_2 = linear(E, E, vb.pp("linear_2"), bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class ForConditionalGeneration(multimodal.ImageTextLM):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        text = cfg.text_class(cfg.text, multimodal.language_model(vb), fuse)
        v = cfg.vision
        tokens = v.num_patches + (cfg.vision_feature_select_strategy == "full")
        super().__init__(cfg, text, tokens)
        tower = multimodal.vision_tower(vb)
        if tower is None:
            raise CheckpointError(f"this LLaVA checkpoint has no vision tower (no {multimodal.PATCHES} under any of "
                                  f"{', '.join(multimodal.VISION_PREFIXES)})")
        self.vision_tower = clip.VisionTransformer(v, tower, pooled=tower.contains("post_layernorm.weight"))
        self.multi_modal_projector = Projector(cfg, multimodal.projector(vb, "linear_1.weight"))
        n = v.num_hidden_layers
        self.feature_layers = [i if i >= 0 else n + 1 + i for i in cfg.feature_layers]
        self.drop_class = cfg.vision_feature_select_strategy == "default"

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        states = self.vision_tower.hidden_states(pixel_values, max(self.feature_layers))
        x = torch.cat([states[i][:, 1:] if self.drop_class else states[i] for i in self.feature_layers], dim=-1)
        return self.multi_modal_projector(x)

    def image_text(self, tokenizer) -> tuple[str, str]:
        image = tokenizer.id_to_token(self.image_token_id)
        return image, image * self.tokens_per_image

    def processor_defaults(self) -> dict:
        """transformers' LlavaImageProcessor defaults: CLIP's."""
        s = self.mm_config.vision.image_size
        return {"size": {"shortest_edge": s}, "do_center_crop": True, "crop_size": {"height": s, "width": s},
                "resample": 3, "image_mean": list(clip.OPENAI_MEAN), "image_std": list(clip.OPENAI_STD),
                **(self.mm_config.mmproj_processor or {})}
