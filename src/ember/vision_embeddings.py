"""Image and text embeddings in one space (CLIP, SigLIP): `ember.load(model)` returns an ImageTextEmbedder.

    enc = ember.load("openai/clip-vit-base-patch32")
    img = enc.embed(images=["cat.jpg", pil_image, png_bytes])   # [N, dim] float32
    txt = enc.embed(["a photo of a cat", "a photo of a dog"])    # [M, dim] float32
    enc.logits(images=[...], texts=[...])                         # logits_per_image [N, M], as transformers
    enc.similarity(img, txt)                                      # cosine similarities [N, M]

Embeddings are the towers' projected features, not normalised (transformers' get_image_features /
get_text_features); `normalize=True` L2-normalises them. Images go through the checkpoint's
preprocessor_config.json (ember.images: the same pixels transformers' processor gives); texts are
tokenized with tokenizer.json, truncated to the text tower's positions, and padded as the family
was trained: CLIP to the longest text (padding masked; the EOS token's state is used), SigLIP to
`max_position_embeddings` (its model card's `padding="max_length"`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .embeddings import _check_texts
from .errors import EmbeddingError, TokenizerError
from .images import ImageProcessor, PatchProcessor
from .loading import Loaded

log = logging.getLogger("ember")


def _check_images(images) -> list:
    """A list of images from one image (a path, bytes, a PIL image) or a list/tuple of them."""
    if isinstance(images, (str, bytes, bytearray, Path)) or (hasattr(images, "getbands") and hasattr(images, "size")):
        return [images]
    if not isinstance(images, (list, tuple)):
        raise EmbeddingError(f"images must be a list of PIL images, file paths or image bytes, "
                             f"got {type(images).__name__}")
    if not images:
        raise EmbeddingError("embed() got an empty list of images; pass at least one")
    return list(images)


def _check_flag(name: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise EmbeddingError(f"{name} must be True or False, got {v!r:.60}")


class ImageTextEmbedder:
    """A loaded CLIP/SigLIP model with its tokenizer and image processor (see the module docstring).

    Attributes: `model` (text_features / image_features / logits), `tokenizer`, `processor`, `dim`,
    `max_length` (text tokens).
    """

    def __init__(self, loaded: Loaded):
        self._loaded = loaded
        self.config = loaded.config
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.dim = self.model.dim
        vision = self.config.vision
        pre = loaded.snapshot.file("preprocessor_config.json")
        if getattr(self.model, "patchified", False):  # SigLIP 2 NaFlex: patches at each image's own shape
            self.processor = PatchProcessor.from_file(pre, self.model.processor_defaults())
            if self.processor.patch_size != vision.patch_size:
                raise EmbeddingError(f"{loaded.snapshot.root}: the image processor cuts {self.processor.patch_size}-pixel "
                                     f"patches, the vision tower takes {vision.patch_size}")
            size = want = None
        else:
            self.processor = ImageProcessor.from_file(pre, self.model.processor_defaults())
            size = self.processor.output_size
            want = (vision.image_size, vision.image_size)
        if size is not None and size != want:
            raise EmbeddingError(f"{loaded.snapshot.root}: the image processor gives {size[0]}x{size[1]} images, "
                                 f"the vision tower takes {want[0]}x{want[1]}")
        text = self.config.text
        self.max_length = text.max_position_embeddings
        self.pad_to_max = self.model.text_padding == "max_length"
        self.pad_token_id = text.pad_token_id if isinstance(text.pad_token_id, int) else 0
        if self.tokenizer is not None:
            self.tokenizer.tk.enable_truncation(self.max_length)
            pad = self.tokenizer.pad_token_id
            if pad is not None:
                self.pad_token_id = pad

    def __repr__(self) -> str:
        return (f"ImageTextEmbedder({self._loaded.snapshot.source!r}, type={self._loaded.entry.model_type}, "
                f"dim={self.dim}, dtype={self.dtype}, device={self.device})")

    # ---- inputs -------------------------------------------------------------------------------
    def pixel_values(self, images) -> torch.Tensor:
        """[N, 3, H, W] float32 pixels of `images` (PIL images, paths or encoded bytes); for SigLIP 2
        NaFlex, a dict of pixel_values [N, patches, P*P*3], pixel_attention_mask and spatial_shapes."""
        return self.processor(_check_images(images))

    def tokenize(self, texts) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) [B, T] of `texts`, truncated and padded as the family expects."""
        texts = _check_texts(texts)
        if self.tokenizer is None:
            raise TokenizerError("this model has no tokenizer.json; call model.text_features(input_ids) instead")
        ids = self.tokenizer.encode_batch(texts)
        T = self.max_length if self.pad_to_max else max(1, max(len(x) for x in ids))
        input_ids = torch.full((len(ids), T), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(ids), T, dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
            mask[i, :len(x)] = 1
        return input_ids, mask

    # ---- embeddings ---------------------------------------------------------------------------
    @torch.inference_mode()
    def embed(self, texts=None, *, images=None, batch_size: int = 32, normalize: bool = False) -> torch.Tensor:
        """Embeddings [N, dim] (float32, CPU) of `texts` or of `images` (one of the two), in order."""
        if (texts is None) == (images is None):
            raise EmbeddingError("embed() takes texts or images=..., one of the two")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise EmbeddingError(f"batch_size must be a positive int, got {batch_size!r}")
        _check_flag("normalize", normalize)
        out = []
        if images is not None:
            images = _check_images(images)
            for s in range(0, len(images), batch_size):  # decoded a batch at a time: memory stays bounded
                px = self.processor(images[s:s + batch_size], "images" if s == 0 else f"images[{s}:]")
                if isinstance(px, dict):  # patches, their mask and shapes (PatchProcessor)
                    feats = self.model.image_features(**{k: v.to(self.device) for k, v in px.items()})
                else:
                    feats = self.model.image_features(px.to(self.device))
                out.append(feats.cpu())
        else:
            texts = _check_texts(texts)
            for s in range(0, len(texts), batch_size):
                ids, mask = self.tokenize(texts[s:s + batch_size])
                m = None if bool(mask.all()) else mask.to(self.device)
                out.append(self.model.text_features(ids.to(self.device), m).cpu())
        e = torch.cat(out).float()
        return F.normalize(e, dim=-1) if normalize else e

    __call__ = embed

    @torch.inference_mode()
    def logits(self, images, texts) -> torch.Tensor:
        """logits_per_image [N_images, N_texts] (CLIP: scaled cosines, softmax over texts; SigLIP: plus
        a bias, sigmoid per pair), as transformers' model(...).logits_per_image."""
        return self.model.logits(self.embed(images=images).to(self.device),
                                 self.embed(texts).to(self.device)).float().cpu()

    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Cosine similarity matrix [len(a), len(b)] of two sets of embeddings."""
        return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T
