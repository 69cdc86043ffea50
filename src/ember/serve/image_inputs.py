"""Images in /v1/embeddings, for image-text models (CLIP, SigLIP): an `input` item may be a content
part, in the shape of OpenAI's chat `image_url` parts, instead of a string.

    {"model": "clip", "input": [
        "a photo of a cat",                                                          # text (as always)
        {"type": "text", "text": "a photo of a dog"},                                # text, as a part
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR..."}},  # an image
        {"type": "image_url", "image_url": "data:image/jpeg;base64,/9j/4AAQ..."},    # the same, shorter
        {"type": "image_url", "image_url": {"url": "iVBORw0KGgo..."}}                # bare base64
    ]}

Each item gets one embedding, in order, in the model's shared space: texts through the text tower,
images through the image tower (the projected features, as `ImageTextEmbedder.embed` returns them).
Images come only inside the request (data: URLs or base64): no URL is fetched and no path is read.
A model without an image tower, an http(s) URL, bad base64 or an undecodable image is a 400 naming
the item.
"""
from __future__ import annotations

import base64
import binascii
from typing import Any

from .protocol import ApiError


class Image(bytes):
    """The bytes of an encoded image file taken from a request."""


def _bad(i: int, why: str) -> ApiError:
    return ApiError(400, f"Invalid 'input[{i}]': {why}", param="input", code="invalid_value")


def part(item: dict, i: int) -> "str | Image":
    """A text (str) or an image (Image bytes) from the content part `item` (input[i])."""
    kind = item.get("type")
    if kind == "text":
        text = item.get("text")
        if not isinstance(text, str) or not text:
            raise _bad(i, "a text part needs a non-empty string 'text'.")
        return text
    if kind != "image_url":
        raise _bad(i, f"a content part's 'type' must be 'text' or 'image_url', got {str(kind)[:40]!r}.")
    ref: Any = item.get("image_url")
    if isinstance(ref, dict):
        ref = ref.get("url")
    if not isinstance(ref, str) or not ref:
        raise _bad(i, "an image_url part needs 'image_url': {'url': 'data:image/...;base64,...'}.")
    if ref.startswith(("http://", "https://", "file:", "/")):
        raise _bad(i, "images must be sent in the request (a data: URL or base64); ember serve fetches no URL "
                      "and reads no file.")
    data = ref
    if ref.startswith("data:"):
        head, sep, data = ref.partition(",")
        if not sep or not head.endswith(";base64"):
            raise _bad(i, "a data: URL must be 'data:<type>;base64,<data>'.")
        if not head[5:].startswith("image/"):
            raise _bad(i, f"a data: URL of type {head[5:-7][:40]!r}; expected an image type (image/png, "
                          f"image/jpeg, ...).")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(i, "the image is not valid base64.") from None
    if not raw:
        raise _bad(i, "the image is empty.")
    return Image(raw)


def embed_mixed(embedder, items: list, indices: list[int]) -> "Any":
    """Embeddings [N, dim] of `items` (str texts and Image bytes; input[indices[k]] each), in order."""
    import torch

    from ..images import open_image

    imgs = [k for k, x in enumerate(items) if isinstance(x, Image)]
    if not imgs:
        return embedder.embed(items)
    if not hasattr(embedder, "pixel_values"):
        raise ApiError(400, "This embedding model takes text only; images need an image-text model (CLIP, SigLIP).",
                       param="input", code="invalid_value")
    texts = [k for k, x in enumerate(items) if not isinstance(x, Image)]
    pics = [open_image(bytes(items[k]), f"input[{indices[k]}]") for k in imgs]  # errors name the input item
    parts = [(imgs, embedder.embed(images=pics))]
    if texts:
        parts.append((texts, embedder.embed([items[k] for k in texts])))
    out = torch.empty(len(items), parts[0][1].shape[1], dtype=parts[0][1].dtype)
    for idx, vecs in parts:
        out[idx] = vecs
    return out
