"""Qwen3-VL (`qwen3_vl`): the vision tower of models/qwen3_vl_vision.py before a Qwen3 decoder
(q/k RMSNorm) with interleaved multimodal rotary positions and DeepStack.

Reference: transformers/models/qwen3_vl/modeling_qwen3_vl.py.
- Images of any size: each takes (rows / merge) x (cols / merge) tokens (`<|image_pad|>`) between
  `<|vision_start|>` and `<|vision_end|>`, as many as its patch grid gives.
- M-RoPE: a token's rotary position has three parts (time, row, column). Text tokens have all three
  equal; an image's tokens share one time and count rows and columns from where the image starts.
  The head's frequencies are assigned to the parts interleaved (mrope_section [t, h, w]: frequency
  j turns with the row when j % 3 == 1 and j < 3h, with the column when j % 3 == 2 and j < 3w,
  else with time). After the prompt every part is again equal, so decoding is plain rotary at the
  cache position plus the prompt's offset (`rope_delta`).
- DeepStack: the tower's intermediate features (one set per deepstack_visual_indexes entry) are
  added to the hidden states of the image tokens after the first decoder layers, one set per layer.

Checkpoint names: transformers (5.x) saves `model.language_model.*`, `model.visual.*`, `lm_head.*`;
older checkpoints `model.*` (the decoder), `visual.*`, `lm_head.*`. Both load.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from ..errors import ConfigError, GenerationError
from ..nn import RotaryEmbedding, rope_parameters
from ..varbuilder import VarBuilder
from . import llama, multimodal
from .base import CausalLM, make_step, tied_or_own_head
from .qwen3_vl_vision import VisionConfig, VisionModel

# transformers' Qwen3VLTextConfig defaults that differ from ember's Llama config's
TEXT_DEFAULTS = {"vocab_size": 151936, "intermediate_size": 22016, "head_dim": 128, "rope_theta": 500000.0,
                 "max_position_embeddings": 128000, "qk_norm": True}


def _text_of(d: dict) -> dict:
    """The decoder's config dict: text_config over the Qwen3-VL text defaults, Qwen3's q/k norm."""
    text = multimodal.text_config(d, tie_default=False)
    return {**TEXT_DEFAULTS, **{k: v for k, v in text.items() if v is not None}, "qk_norm": True,
            "sliding_window": None}


@dataclass
class Config(multimodal.Config):
    """A Qwen3VLForConditionalGeneration config.json: the decoder's (`text`, a Llama config with
    Qwen3's q/k norm) and the tower's (`vision`)."""

    image_token_id: int | None = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    def __post_init__(self):
        self.text = llama.Config.from_dict(_text_of(self.raw))
        self.vision = self.tower(VisionConfig, self.vision_config, "vision_config")

    def validate(self) -> None:
        super().validate()
        self.mrope_section  # noqa: B018 - checks it
        self._require(self.vision.out_hidden_size == self.text.hidden_size,
                      f"vision_config.out_hidden_size ({self.vision.out_hidden_size}) must equal the text model's "
                      f"hidden_size ({self.text.hidden_size})")
        self._require(len(self.vision.deepstack_visual_indexes) <= self.text.num_hidden_layers,
                      f"{len(self.vision.deepstack_visual_indexes)} deepstack feature sets for "
                      f"{self.text.num_hidden_layers} decoder layers")

    @property
    def mrope_section(self) -> list[int]:
        p = rope_parameters(self.text.raw, 500000.0)
        s = p.get("mrope_section", [24, 20, 20])
        half = self.text.head_dim // 2
        if not (isinstance(s, list) and len(s) == 3 and all(isinstance(v, int) and not isinstance(v, bool)
                                                          and v >= 0 for v in s) and sum(s) == half):
            raise ConfigError(f"text_config: mrope_section must be 3 non-negative integers summing to head_dim / 2 "
                              f"({half}), got {s!r:.80}")
        return s


class MRotary(RotaryEmbedding):
    """Rotary tables for 1-D positions [B, T] (text: as RotaryEmbedding) or 3-D ones [3, B, T]
    (time, row, column), the frequencies assigned to the three interleaved (Qwen3-VL)."""

    def __init__(self, head_dim: int, params: dict, max_position_embeddings: int, section: list[int]):
        super().__init__(head_dim, params, max_position_embeddings)
        axis = torch.zeros(head_dim // 2, dtype=torch.long)
        axis[1:3 * section[1]:3] = 1
        axis[2:3 * section[2]:3] = 2
        self.register_buffer("axis", axis, persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if position_ids.ndim == 2:
            return super().forward(position_ids, dtype)
        inv = self._inv_freq(position_ids).to(position_ids.device)
        # each frequency's position: [3, B, T] picked per frequency → [B, T, head_dim / 2]
        freqs = position_ids[self.axis.to(position_ids.device)].permute(1, 2, 0).float() * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


class TextModel(llama.Model):
    """Qwen3VLTextModel: Llama's model with Qwen3's q/k norm (the config's flag), M-RoPE and the
    DeepStack additions."""

    def __init__(self, cfg: llama.Config, vb: VarBuilder, fuse: bool, section: list[int]):
        super().__init__(cfg, vb, fuse)
        self.rotary = MRotary(cfg.head_dim, rope_parameters(cfg.raw, 500000.0), cfg.max_position_embeddings,
                              section).to(vb.device)

    def forward(self, input_ids: torch.Tensor, step, inputs_embeds: torch.Tensor | None = None,
                rope_positions: torch.Tensor | None = None, deepstack: torch.Tensor | None = None,
                visual: torch.Tensor | None = None) -> torch.Tensor:
        """rope_positions [3, B, T]: the rotary positions when they are not the cache positions;
        deepstack [k, n, E]: added at the `visual` [B, T] tokens after the first k layers."""
        if rope_positions is None and deepstack is None:
            return super().forward(input_ids, step, inputs_embeds)
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        cos, sin = self.rotary(step.position_ids if rope_positions is None else rope_positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, step)
            if deepstack is not None and i < len(deepstack):
                x = x.index_put((visual,), deepstack[i].to(x.dtype), accumulate=True)
        return self.norm(x)


class TextLM(CausalLM):
    """The decoder alone (its weights under the text model's names)."""

    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        t = self.config = cfg.text
        self.model = TextModel(t, vb.pp("model"), fuse, cfg.mrope_section)
        self.lm_head = tied_or_own_head(vb, t, self.model.embed_tokens.weight, t.hidden_size, t.vocab_size)


@dataclass
class ImageFeatures:
    """What the tower gives for a prompt's images: the tokens [n, E] that replace the image tokens,
    the DeepStack sets [k, n, E], and each image's patch grid (t, h, w)."""

    tokens: torch.Tensor
    deepstack: torch.Tensor
    grids: list

    @property
    def shape(self):  # the features as one tensor of [n, E] would have it (what callers check)
        return self.tokens.shape


class ForConditionalGeneration(multimodal.ImageTextLM):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        text = TextLM(cfg, multimodal.language_model(vb), fuse)
        super().__init__(cfg, text, tokens_per_image=0)  # images take as many tokens as their grid gives
        self.vision_tower = VisionModel(cfg.vision, vb.pp_first(["model.visual", "visual"], "patch_embed.proj.weight"))
        self.merge_size = cfg.vision.spatial_merge_size

    def encode_images(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> ImageFeatures:
        """The processor's patches [patches, patch_dim] and grids [images, 3] → the images' features."""
        tokens, deepstack = self.vision_tower(pixel_values, grid_thw)
        dtype = self.model.embed_tokens.weight.dtype
        ds = torch.stack(deepstack) if deepstack else tokens.new_zeros(0, *tokens.shape)
        return ImageFeatures(tokens.to(dtype), ds.to(dtype), [tuple(int(v) for v in g) for g in grid_thw.tolist()])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache=None, kv_len: int | None = None,
                logits_index: torch.Tensor | None = None, cache_rows: slice | None = None, fresh: bool = False,
                pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                image_embeds: ImageFeatures | None = None,
                rope_position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The causal LM's forward; with images (`pixel_values` and `image_grid_thw`, or their
        `image_embeds`) their tokens take the images' features and DeepStack's additions.
        rope_position_ids [3, B, T]: the M-RoPE positions of a prompt with images."""
        if pixel_values is not None:
            if image_grid_thw is None:
                raise GenerationError("pixel_values need image_grid_thw (each image's patch grid)")
            image_embeds = self.encode_images(pixel_values, image_grid_thw)
        if image_embeds is None and rope_position_ids is None:
            return super().forward(input_ids, attention_mask, position_ids, cache, kv_len, logits_index, cache_rows,
                                   fresh)
        if cache is not None:
            cache.begin_forward()
        step = make_step(input_ids, attention_mask, position_ids, cache, kv_len, cache_rows, fresh)
        kw = {}
        if image_embeds is not None:
            embeds, _ = self.merge(input_ids, image_embeds.tokens)
            kw = {"inputs_embeds": embeds, "deepstack": image_embeds.deepstack,
                  "visual": input_ids == self.image_token_id}
        h = self.model(input_ids, step, rope_positions=rope_position_ids, **kw)
        return self.logits(h, logits_index)
