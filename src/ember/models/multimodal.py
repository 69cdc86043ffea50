"""What image+text chat models share (LLaVA: models/llava.py, Gemma 3: models/gemma3.py): a text
decoder from the registry, a vision tower and a projector, and the merge of image features into the
prompt's embeddings.

    feats = model.encode_images(pixel_values)          # [N, tokens_per_image, hidden]: tower + projector
    logits = model(input_ids, image_embeds=feats.flatten(0, 1))   # or pixel_values=...

The prompt holds `tokens_per_image` image tokens (`image_token_id`) per image; their embeddings are
replaced by the image features in order, row after row (transformers' masked_scatter). Everything
else is the text decoder's: the cache, the decode step and batching are the plain causal LM's, so
the engine runs these models unchanged once the prompt is prefilled.

Families whose images take different numbers of tokens (Qwen2.5-VL, models/qwen2_5_vl.py) bring
their own processor (`make_image_processor`: its output a dict of tensors), say per image what
replaces the template's placeholder (`image_texts`), return flattened features (`image_features`)
and, with M-RoPE (`mrope = True`), the prompt's 3-D rotary positions (`rope_positions`): the hooks
LLM.chat_inputs calls. Decoding after such a prompt rotates by cache position + the row's rope delta
(models/base.CausalLM.mrope), so the engine still runs them unchanged.

`text_config` and `language_model` also serve the families whose image-text checkpoints ember reads
for their decoder alone (Llama 4, Gemma 4, Mistral 3: the vision tower is not loaded).

Checkpoint names: transformers saves `language_model.model.*` / `language_model.lm_head.*`,
`vision_tower.*` (older Hub checkpoints: `vision_tower.vision_model.*`), `multi_modal_projector.*`,
and names them in memory `model.language_model.*`, `lm_head.*`, `model.vision_tower.*`,
`model.multi_modal_projector.*`; all of these load.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import ConfigError, GenerationError, UnsupportedModelError
from ..varbuilder import VarBuilder
from .base import CausalLM


def text_config(d: dict, tie_default: bool) -> dict:
    """A multimodal config.json dict → its decoder's dict: text_config with the outer model_type,
    architectures, head tying (the outer config decides it; `tie_default` when it says nothing) and
    dtype. A dict without text_config is returned as is."""
    if not isinstance(d, dict) or not isinstance(d.get("text_config"), dict):
        return d
    return {
        **d["text_config"],
        "model_type": d.get("model_type"),
        "architectures": d.get("architectures"),
        "tie_word_embeddings": d.get("tie_word_embeddings", tie_default),
        **{k: d[k] for k in ("dtype", "torch_dtype") if d.get(k) is not None},
    }


def language_model(vb: VarBuilder) -> VarBuilder:
    """A builder that reads a multimodal checkpoint's decoder under the text model's names."""
    if vb.contains("language_model.model.embed_tokens.weight"):  # as saved by transformers
        return vb.rename({"model": "language_model.model", "lm_head": "language_model.lm_head"})
    if vb.contains("model.language_model.embed_tokens.weight"):  # transformers' in-memory names
        return vb.rename({"model": "model.language_model"})
    return vb


VISION_PREFIXES = ("vision_tower.vision_model", "vision_tower", "model.vision_tower.vision_model", "model.vision_tower")
PATCHES = "embeddings.patch_embedding.weight"


def vision_tower(vb: VarBuilder) -> VarBuilder | None:
    """The vision tower's builder, under whichever prefix the checkpoint uses; None if it has none."""
    return next((vb.pp(p) for p in VISION_PREFIXES if vb.contains(f"{p}.{PATCHES}")), None)


def projector(vb: VarBuilder, probe: str) -> VarBuilder:
    return vb.pp_first(["multi_modal_projector", "model.multi_modal_projector"], probe)


@dataclass
class Config(ModelConfig):
    """An image+text config.json: the decoder's config under text_config, the tower's under
    vision_config. Attributes it lacks are the text config's (vocab_size, eos_token_id ...), so code
    written for a causal LM's config reads it unchanged."""

    text_config: dict | None = None
    vision_config: dict | None = None
    image_token_index: int | None = None
    image_token_id: int | None = None
    # a GGUF mmproj file's image_mean / image_std (ember.mmproj), over the family's processor defaults
    mmproj_processor: dict | None = None
    text: Any = dataclasses.field(default=None, init=False, repr=False)
    vision: Any = dataclasses.field(default=None, init=False, repr=False)

    def __getattr__(self, name: str):
        text = self.__dict__.get("text")
        if text is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(text, name)

    @property
    def image_token(self) -> int:
        """The id of the image tokens (config.json's image_token_index, or image_token_id)."""
        return self.image_token_index if self.image_token_index is not None else self.image_token_id

    def validate(self) -> None:
        self._require(self.image_token is not None and self.image_token >= 0,
                      "an image+text config needs image_token_index (the image tokens' id)")

    @staticmethod
    def tower(config_class, d: dict | None, name: str):
        """A tower's config parsed from its dict, its errors naming the dict (vision_config ...)."""
        try:
            return config_class.from_dict(d or {})
        except ConfigError as e:
            raise ConfigError(f"{name}: {e}") from None


class ImageTextLM(CausalLM):
    """A text decoder (`text`: a family's ForCausalLM) with a vision tower and projector that
    subclasses build and run in `encode_images`. Its model / lm_head / config are the decoder's, so
    caches, decode steps and the Generator treat it as the text model."""

    bidirectional_images = False  # Gemma 3: an image's tokens attend to each other both ways

    def __init__(self, cfg: Config, text: CausalLM, tokens_per_image: int):
        super().__init__()
        if not hasattr(text.model, "embed"):
            raise UnsupportedModelError(f"{cfg.model_type}: ember merges images into the embeddings of Llama- and "
                                        f"Gemma-family decoders, not {text.config.model_type}")
        self.config = text.config
        self.mm_config = cfg
        self.model, self.lm_head = text.model, text.lm_head
        self.final_logit_softcapping = text.final_logit_softcapping
        self.logits_scaling = text.logits_scaling
        self.image_token_id = cfg.image_token
        self.tokens_per_image = tokens_per_image

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] pixels → [N, tokens_per_image, hidden] features in the decoder's space."""
        raise NotImplementedError

    def image_text(self, tokenizer) -> tuple[str, str]:
        """(what the chat template writes for an image, the text the processor puts in its place)."""
        raise NotImplementedError

    def processor_defaults(self) -> dict:
        """transformers' image processor defaults for this family (preprocessor_config.json wins)."""
        raise NotImplementedError

    # What LLM.chat_inputs asks of the model, given the image processor's output (`pixels`: a tensor,
    # or a dict of tensors for a family with its own processor, `make_image_processor(path)`).
    @property
    def takes_images(self) -> bool:
        return getattr(self, "vision_tower", None) is not None

    def image_texts(self, tokenizer, pixels) -> tuple[str, list[str]]:
        """(what the chat template writes for an image, the text the processor puts in its place, per
        image)."""
        placeholder, text = self.image_text(tokenizer)
        return placeholder, [text] * len(pixels)

    def image_features(self, pixels) -> torch.Tensor:
        """The features [n, hidden] of the prompt's n image tokens, in order."""
        return self.encode_images(pixels).flatten(0, 1)

    def feature_shape(self, n: int) -> tuple[int, ...]:
        """The shape of image_features' output for a prompt with n image tokens: [n, hidden] (Qwen3-VL
        adds its DeepStack sets: [n, 1 + k, hidden])."""
        return n, self.config.hidden_size

    def rope_positions(self, ids: list[int], pixels) -> torch.Tensor | None:
        """M-RoPE families: the prompt's rotary positions [3, T]; None: plain positions."""
        return None

    def merge(self, input_ids: torch.Tensor, image_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(input embeddings with the image tokens' replaced by `image_embeds` [n, hidden] in order,
        image block ids [B, T] or None)."""
        is_image = input_ids == self.image_token_id
        n = int(is_image.sum())
        if n != image_embeds.shape[0]:
            per = f" ({self.tokens_per_image} per image)" if self.tokens_per_image else ""
            raise GenerationError(f"the prompt has {n} image tokens but the images give {image_embeds.shape[0]} "
                                  f"features{per}")
        x = self.model.embed(input_ids.masked_fill(is_image, 0))  # the image id may lie past the vocabulary
        x = x.masked_scatter(is_image.unsqueeze(-1), image_embeds.to(x.device, x.dtype))
        blocks = None
        if self.bidirectional_images:  # transformers' get_block_sequence_ids_for_mask
            starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]
            blocks = torch.where(is_image, starts.long().cumsum(-1) - 1, -1)
        return x, blocks

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache=None, kv_len: int | None = None,
                logits_index: torch.Tensor | None = None, cache_rows: slice | None = None, fresh: bool = False,
                pixel_values: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None,
                rope_position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The causal LM's forward; with `pixel_values` (or their features, `image_embeds`
        [n, hidden]) the image tokens of `input_ids` take the images' features. rope_position_ids:
        M-RoPE families' rotary positions (see CausalLM.forward)."""
        kw: dict = {"rope_position_ids": rope_position_ids} if rope_position_ids is not None else {}
        if pixel_values is not None:
            image_embeds = self.encode_images(pixel_values).flatten(0, 1)
        if image_embeds is not None:
            embeds, blocks = self.merge(input_ids, image_embeds)
            kw.update(inputs_embeds=embeds, image_blocks=blocks)
        return super().forward(input_ids, attention_mask, position_ids, cache, kv_len, logits_index, cache_rows,
                               fresh, **kw)
