"""Qwen3-VL (`qwen3_vl`; `qwen3_vl_moe` with Qwen3-MoE's decoder): the vision tower of
models/qwen3_vl_vision.py before a Qwen3 decoder (q/k RMSNorm) with interleaved multimodal rotary
positions and DeepStack.

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
from typing import ClassVar

import torch
from torch import nn

from ..errors import ConfigError, GenerationError, UnsupportedModelError
from ..nn import SparseMoE, activation
from ..nn.rope import mrope_axes, rope_parameters
from ..varbuilder import VarBuilder
from . import llama, mixtral, multimodal, qwen2_5_vl
from .base import CausalLM, make_step, tied_or_own_head
from .qwen3_vl_vision import VisionConfig, VisionModel

# transformers' Qwen3VLTextConfig defaults that differ from ember's Llama config's
TEXT_DEFAULTS = {"vocab_size": 151936, "intermediate_size": 22016, "head_dim": 128, "rope_theta": 500000.0,
                 "max_position_embeddings": 128000, "qk_norm": True}


# Qwen3VLMoeTextConfig's: its experts always renormalise their top-k weights
MOE_TEXT_DEFAULTS = {**TEXT_DEFAULTS, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24,
                     "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": None, "num_experts": 60,
                     "num_experts_per_tok": 4, "moe_intermediate_size": 1408}


def _text_of(d: dict, defaults: dict) -> dict:
    """The decoder's config dict: text_config over the family's text defaults, Qwen3's q/k norm, and
    the rope dict's M-RoPE sections interleaved (transformers' Qwen3-VL interleaves whatever the
    dict says)."""
    text = multimodal.text_config(d, tie_default=False)
    text = {**defaults, **{k: v for k, v in text.items() if v is not None}, "qk_norm": True, "sliding_window": None,
            "norm_topk_prob": True}
    key = "rope_parameters" if isinstance(text.get("rope_parameters"), dict) or not isinstance(
        text.get("rope_scaling"), dict) else "rope_scaling"
    rope = dict(text.get(key) or {})
    rope.setdefault("mrope_section", [24, 20, 20])
    return {**text, key: {**rope, "mrope_interleaved": True}}


@dataclass
class Config(multimodal.Config):
    """A Qwen3VLForConditionalGeneration config.json: the decoder's (`text`, a Llama config with
    Qwen3's q/k norm) and the tower's (`vision`)."""

    image_token_id: int | None = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    text_class: ClassVar[type] = llama.Config
    text_defaults: ClassVar[dict] = TEXT_DEFAULTS

    def __post_init__(self):
        self.text = self.text_class.from_dict(_text_of(self.raw, self.text_defaults))
        self.vision = self.tower(VisionConfig, self.vision_config, "vision_config")

    def validate(self) -> None:
        super().validate()
        mrope_axes(rope_parameters(self.text.raw), self.text.head_dim // 2)  # a bad mrope_section: ConfigError
        self._require(self.vision.out_hidden_size == self.text.hidden_size,
                      f"vision_config.out_hidden_size ({self.vision.out_hidden_size}) must equal the text model's "
                      f"hidden_size ({self.text.hidden_size})")
        self._require(len(self.vision.deepstack_visual_indexes) <= self.text.num_hidden_layers,
                      f"{len(self.vision.deepstack_visual_indexes)} deepstack feature sets for "
                      f"{self.text.num_hidden_layers} decoder layers")


@dataclass
class MoeConfig(Config):
    """A Qwen3VLMoeForConditionalGeneration config.json: the decoder is Qwen3-MoE's (models/mixtral.py)."""

    text_class: ClassVar[type] = mixtral.Config
    text_defaults: ClassVar[dict] = MOE_TEXT_DEFAULTS


class MoeDecoderLayer(mixtral.DecoderLayer):
    """Qwen3-MoE's layer. Besides transformers 5's expert layout ([E, 2I, H] / [E, H, I], what
    SparseMoE reads), the Hub's checkpoints store them transposed ([E, H, 2I] / [E, I, H], which
    transformers transposes when it loads them): so are they here, once."""

    def make_mlp(self, cfg: mixtral.Config, vb: VarBuilder, layer_idx: int, fuse: bool) -> nn.Module:
        E, H, F_ = cfg.num_local_experts, cfg.hidden_size, cfg.moe_intermediate_size
        name = "mlp.experts.gate_up_proj"
        if not (cfg.sparse(layer_idx) and vb.contains(name) and vb.shape_of(name) == (E, H, 2 * F_) and H != 2 * F_):
            return super().make_mlp(cfg, vb, layer_idx, fuse)
        if vb.tp is not None:
            raise UnsupportedModelError("tensor parallelism does not split the Hub layout's transposed expert "
                                        "tensors; load this Qwen3-VL MoE model without tp")
        moe = vb.pp("mlp")
        gate_up = moe.get((E, H, 2 * F_), "experts.gate_up_proj").transpose(1, 2).contiguous()
        down = moe.get((E, F_, H), "experts.down_proj").transpose(1, 2).contiguous()
        return SparseMoE(moe.get((E, H), "gate.weight"), gate_up, down, cfg.num_experts_per_tok, cfg.norm_topk_prob,
                         activation(cfg.hidden_act))


class TextModel(llama.Model):
    """Qwen3VLTextModel: Llama's model with Qwen3's q/k norm (the config's flag), M-RoPE (the rope
    dict's interleaved mrope_section: nn/rope.py) and the DeepStack additions."""

    def forward(self, input_ids: torch.Tensor, step, inputs_embeds: torch.Tensor | None = None,
                deepstack: torch.Tensor | None = None, visual: torch.Tensor | None = None) -> torch.Tensor:
        """deepstack [k, n, E]: added at the `visual` [B, T] tokens after the first k layers."""
        if deepstack is None:
            return super().forward(input_ids, step, inputs_embeds)
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        cos, sin = self.rotary(step.rope_positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, step)
            if i < len(deepstack):
                x = x.index_put((visual,), deepstack[i].to(x.dtype), accumulate=True)
        return self.norm(x)


class TextLM(CausalLM):
    """The decoder alone (its weights under the text model's names)."""

    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        t = self.config = cfg.text
        moe = isinstance(t, mixtral.Config)
        self.model = TextModel(t, vb.pp("model"), fuse, layer_cls=MoeDecoderLayer if moe else None)
        self.lm_head = tied_or_own_head(vb, t, self.model.embed_tokens.weight, t.hidden_size, t.vocab_size)


# Qwen3-VL's preprocessor_config.json values where transformers' processor defaults are Qwen2-VL's
PROCESSOR_DEFAULTS = {"min_pixels": 256 * 256, "max_pixels": 4096 * 4096, "image_mean": [0.5] * 3,
                      "image_std": [0.5] * 3}


class ForConditionalGeneration(qwen2_5_vl.ForConditionalGeneration):
    """Qwen3VLForConditionalGeneration (and Qwen3VLMoeForConditionalGeneration). What chat asks of
    it is Qwen2.5-VL's (models/qwen2_5_vl.py: the same processor, image tokens and M-RoPE prompt
    positions); the tower, the decoder and DeepStack are its own. An image's features are one
    tensor [tokens, 1 + k, hidden]: the tokens that replace its image tokens, then the k DeepStack
    sets (what `image_features` gives and `forward`'s image_embeds takes, over all the images)."""

    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        multimodal.ImageTextLM.__init__(self, cfg, TextLM(cfg, multimodal.language_model(vb), fuse), 0)
        self.visual = VisionModel(cfg.vision, vb.pp_first(["model.visual", "visual"], "patch_embed.proj.weight"))
        self.merge_size = cfg.vision.spatial_merge_size

    def make_image_processor(self, path):
        """transformers' Qwen2VLImageProcessor (ember.image_patches) over Qwen3-VL's settings, the
        checkpoint's preprocessor_config.json winning."""
        from ..image_patches import GridPatchProcessor

        v = self.mm_config.vision
        sizes = {"patch_size": v.patch_size, "merge_size": v.spatial_merge_size,
                 "temporal_patch_size": v.temporal_patch_size}
        proc = GridPatchProcessor.from_file(path, {**sizes, **PROCESSOR_DEFAULTS})
        if any(getattr(proc, k) != n for k, n in sizes.items()):
            raise ConfigError(f"{path}: the processor's patch_size / merge_size / temporal_patch_size are not the "
                              f"vision tower's ({', '.join(map(str, sizes.values()))})")
        return proc

    def feature_shape(self, n: int) -> tuple[int, ...]:
        return n, 1 + len(self.visual.deepstack_merger_list), self.config.hidden_size

    def encode_images(self, pixels: dict) -> torch.Tensor:
        """{"pixel_values": [patches, patch_dim], "image_grid_thw": [N, 3]} → the images' features
        [tokens, 1 + k, hidden]."""
        tokens, deepstack = self.visual(pixels["pixel_values"], pixels["image_grid_thw"])
        return torch.stack([tokens, *deepstack], dim=1).to(self.model.embed_tokens.weight.dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache=None, kv_len: int | None = None,
                logits_index: torch.Tensor | None = None, cache_rows: slice | None = None, fresh: bool = False,
                pixel_values: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None,
                rope_position_ids: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        """The causal LM's forward; with images (`pixel_values` and `image_grid_thw`, or their
        features `image_embeds` [n, 1 + k, hidden]) the image tokens take the images' features and
        DeepStack's additions. rope_position_ids [3, B, T]: the M-RoPE positions (without a cache,
        computed from the image grids when not given; padding from attention_mask skipped)."""
        if pixel_values is not None:
            if image_grid_thw is None:
                raise GenerationError("pixel_values need image_grid_thw (each image's patch grid)")
            image_embeds = self.encode_images({"pixel_values": pixel_values, "image_grid_thw": image_grid_thw})
        if image_grid_thw is not None and rope_position_ids is None and cache is None:
            rope_position_ids = self._prompt_positions(input_ids, attention_mask, image_grid_thw.tolist())
        if image_embeds is None:
            return CausalLM.forward(self, input_ids, attention_mask, position_ids, cache, kv_len, logits_index,
                                    cache_rows, fresh, rope_position_ids=rope_position_ids)
        want = self.feature_shape(int((input_ids == self.image_token_id).sum()))
        if tuple(image_embeds.shape) != want:
            raise GenerationError(f"image_embeds must be [{', '.join(map(str, want))}] (per image token: its features, "
                                  f"then the DeepStack sets), got {list(image_embeds.shape)}")
        if cache is not None:
            cache.begin_forward()
            if rope_position_ids is None and position_ids is not None:
                rope_position_ids = cache.rope_deltas.positions(position_ids, cache_rows)
        step = make_step(input_ids, attention_mask, position_ids, cache, kv_len, cache_rows, fresh,
                         rope_position_ids=rope_position_ids)
        embeds, _ = self.merge(input_ids, image_embeds[:, 0])
        h = self.model(input_ids, step, embeds, deepstack=image_embeds[:, 1:].transpose(0, 1),
                       visual=input_ids == self.image_token_id)
        return self.logits(h, logits_index)

    def _prompt_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                          grids: list) -> torch.Tensor:
        """[3, B, T] M-RoPE positions of a batch of fresh prompts, the grids taken in order by the
        rows' runs of image tokens (padding: position 0)."""
        image, rows = self.image_token_id, []
        for b in range(input_ids.shape[0]):
            keep = (attention_mask[b].bool() if attention_mask is not None
                    else torch.ones_like(input_ids[b], dtype=torch.bool))
            ids = input_ids[b][keep].tolist()
            n = sum(1 for j, t in enumerate(ids) if t == image and (j == 0 or ids[j - 1] != image))
            pos = torch.zeros(3, input_ids.shape[1], dtype=torch.long)
            pos[:, keep.cpu()] = self.rope_index(ids, grids[:n])
            grids, rows = grids[n:], rows + [pos]
        return torch.stack(rows, dim=1).to(input_ids.device)
