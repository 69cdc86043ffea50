"""Gemma 3 (text): the Gemma 2 decoder plus RMSNorm (1 + w) over each head of q and k, per-layer
`layer_types` (by default five sliding layers to one global), and a rotary table per layer type:
global layers use rope_parameters["full_attention"] (old configs: rope_theta, default 1e6, with
rope_scaling), sliding layers rope_parameters["sliding_attention"] (old: rope_local_base_freq,
default 1e4). No attention soft-capping: the reference keeps attn_logit_softcapping in the config
but never applies it.

Checkpoints come as Gemma3ForCausalLM (model_type gemma3_text, weights model.*, lm_head.*) or as
the multimodal Gemma3ForConditionalGeneration (model_type gemma3, the text config under
text_config, weights language_model.model.* / language_model.lm_head.* as transformers saves them,
or model.language_model.* / lm_head.* as it names them in memory). The multimodal form loads with
its SigLIP vision tower and projector (`ForConditionalGeneration`, models/multimodal.py): images in
chat take mm_tokens_per_image tokens each, between <start_of_image> and <end_of_image>.

Reference: transformers/models/gemma3/modeling_gemma3.py, configuration_gemma3.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .. import gguf_source as gguf
from ..errors import UnsupportedModelError
from ..nn import RMSNorm
from ..varbuilder import VarBuilder
from . import gemma, gemma2, multimodal, siglip


@dataclass
class Config(gemma2.Config):
    vocab_size: int = 262208
    max_position_embeddings: int = 131072
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    rope_local_base_freq: float | None = None
    sliding_window_pattern: int = 6
    qk_norm: bool = True
    bidirectional_ok: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        if self.use_bidirectional_attention and isinstance(self.sliding_window, int):
            # As Gemma3TextConfig: a bidirectional window of w reaches w // 2 tokens either way
            # (distance < w // 2 + 1), not w tokens back.
            self.sliding_window = self.sliding_window // 2 + 1

    def validate(self) -> None:
        self._positive("sliding_window_pattern", "rope_local_base_freq")
        super().validate()

    def default_layer_types(self) -> list[str]:
        p = self.sliding_window_pattern
        if not isinstance(p, int) or p <= 0:
            return []  # validate() reports the bad pattern / the layer_types length
        return ["sliding_attention" if (i + 1) % p else "full_attention" for i in range(self.num_hidden_layers)]

    def attention_softcap(self) -> float | None:
        return None

    def rope_configs(self) -> dict[str, dict]:
        params = self.rope_parameters or {}
        nested = any(t in params for t in gemma.LAYER_TYPES)
        # A flat rope_parameters is taken as the global layers' (the reference would ignore it).
        full = dict((params.get("full_attention") if nested else params) or {})
        if self.rope_scaling:
            full.update(self.rope_scaling)
        full.setdefault("rope_theta", self.rope_theta if self.rope_theta is not None else 1_000_000.0)
        sliding = dict((params.get("sliding_attention") if nested else None) or {})
        sliding.setdefault("rope_theta", self.rope_local_base_freq if self.rope_local_base_freq is not None else 10_000.0)
        base = {k: v for k, v in self.raw.items() if k not in ("rope_parameters", "rope_scaling", "rope_theta")}
        return {"full_attention": {**base, "rope_parameters": full}, "sliding_attention": {**base, "rope_parameters": sliding}}


class ForCausalLM(gemma.ForCausalLM):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__(cfg, multimodal.language_model(vb), fuse)


def _text_of(d: dict) -> dict:
    """The decoder's config of a Gemma3ForConditionalGeneration config.json; a flat config (model_type
    gemma3 without text_config, as some GGUF conversions write it) is read as is."""
    if isinstance(d.get("text_config"), dict):
        # the head is tied by the outer config, and the multimodal model never soft-caps the logits
        return {**multimodal.text_config(d, tie_default=True), "final_logit_softcapping": None}
    return d


@dataclass
class MultimodalConfig(multimodal.Config):
    """A Gemma3ForConditionalGeneration config.json: the text Config (`text`) and the SigLIP tower's
    (`vision`; None for a flat config, which loads as text only)."""

    image_token_index: int | None = 262144
    boi_token_index: int = 255999
    eoi_token_index: int = 256000
    mm_tokens_per_image: int = 256

    def __post_init__(self):
        self.text = Config.from_dict(_text_of(self.raw))
        if isinstance(self.raw.get("text_config"), dict):
            self.vision = self.tower(siglip.VisionConfig, {"vision_use_head": False, **(self.vision_config or {})},
                                     "vision_config")

    def validate(self) -> None:
        super().validate()
        if self.vision is not None:
            side = self.vision.image_size // self.vision.patch_size
            per_side = math.isqrt(self.mm_tokens_per_image) if self.mm_tokens_per_image > 0 else 0
            self._require(per_side > 0 and per_side * per_side == self.mm_tokens_per_image and side % per_side == 0,
                          f"mm_tokens_per_image ({self.mm_tokens_per_image}) must be a square whose side divides the "
                          f"{side} patches per side of the image")


class Projector(nn.Module):
    """Gemma3MultiModalProjector: average-pool the patch grid to mm_tokens_per_image, RMSNorm (1 + w),
    then a matmul by mm_input_projection_weight [vision hidden, text hidden]."""

    def __init__(self, cfg: MultimodalConfig, vb: VarBuilder):
        super().__init__()
        v, E = cfg.vision, cfg.text.hidden_size
        self.side = v.image_size // v.patch_size
        self.kernel = self.side // math.isqrt(cfg.mm_tokens_per_image)
        self.mm_soft_emb_norm = RMSNorm.from_vb(v.hidden_size, v.layer_norm_eps, vb.pp("mm_soft_emb_norm"), offset=1.0)
        self.weight = nn.Parameter(vb.get((v.hidden_size, E), "mm_input_projection_weight"), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, _, H = x.shape
        x = x.transpose(1, 2).reshape(N, H, self.side, self.side)
        x = F.avg_pool2d(x, self.kernel, self.kernel).flatten(2).transpose(1, 2)
        return torch.matmul(self.mm_soft_emb_norm(x), self.weight)


class ForConditionalGeneration(multimodal.ImageTextLM):
    """Gemma3ForConditionalGeneration: the text decoder, the SigLIP tower's last hidden state (no
    pooling head) and the projector. Tokens of one image attend to each other both ways (transformers'
    token_type_ids mask). A config without a vision tower loads the decoder alone."""

    bidirectional_images = True

    def __init__(self, cfg: MultimodalConfig, vb: VarBuilder, fuse: bool = True):
        super().__init__(cfg, ForCausalLM(cfg.text, vb, fuse), cfg.mm_tokens_per_image)
        self.vision_tower = self.multi_modal_projector = None
        tower = multimodal.vision_tower(vb) if cfg.vision is not None else None
        if tower is not None:
            self.vision_tower = siglip.VisionTransformer(cfg.vision, tower)
            self.multi_modal_projector = Projector(cfg, multimodal.projector(vb, "mm_input_projection_weight"))

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.vision_tower is None:
            raise UnsupportedModelError("this Gemma 3 checkpoint has no vision tower: it takes text only")
        x = self.multi_modal_projector(self.vision_tower.last_hidden_state(pixel_values))
        return x.to(self.model.embed_tokens.weight.dtype)

    def image_text(self, tokenizer) -> tuple[str, str]:
        cfg = self.mm_config
        boi, eoi, image = (tokenizer.id_to_token(i) for i in (cfg.boi_token_index, cfg.eoi_token_index, cfg.image_token))
        return boi, f"\n\n{boi}{image * self.tokens_per_image}{eoi}\n\n"

    def processor_defaults(self) -> dict:
        """transformers' Gemma3ImageProcessor defaults: a square resize (bilinear), mean and std 0.5."""
        s = self.mm_config.vision.image_size
        return {"size": {"height": s, "width": s}, "do_center_crop": False, "resample": 2,
                "image_mean": [0.5] * 3, "image_std": [0.5] * 3, **(self.mm_config.mmproj_processor or {})}


# ---- GGUF --------------------------------------------------------------------------------------
def _gguf_gemma3(meta: gguf.Meta) -> dict:
    cfg = gguf.decoder_config(meta, "gemma3_text", head_dim=meta.get("attention.key_length", kind=int))
    cfg["tie_word_embeddings"] = "output.weight" not in meta.names
    window = meta.get("attention.sliding_window", kind=int)
    if window is not None:
        cfg["sliding_window"] = window
    cfg["layer_types"] = gguf.sliding_layer_types(meta, cfg["num_hidden_layers"], 6)
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        v = meta.get(key, kind=(int, float))
        if v is not None:
            cfg[key] = float(v)
    return cfg


GGUF = {"gemma3": gguf.GGUFMapping(_gguf_gemma3, layer=gemma2.GEMMA_LAYER, norm_offset=True)}
