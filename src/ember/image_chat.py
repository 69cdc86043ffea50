"""Images in chat messages, for image+text models (models/multimodal.py): `LLM.chat` and the server's
`/v1/chat/completions` take them as OpenAI content parts.

    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR..."}}   # a data: URL
    {"type": "image_url", "image_url": {"url": "/photos/cat.jpg"}}                  # a local file (Python
    {"type": "image_url", "image_url": {"url": "file:///photos/cat.jpg"}}           #   API only, not the server)
    {"type": "image_url", "image_url": {"url": "https://..."}}                      # only when remote
                                                                                     #   fetching is allowed
    {"type": "image", "image": <PIL image | path | bytes>}                          # transformers' form

`split_images` turns each image part into `{"type": "image"}` (what chat templates, like
transformers' processors, expect) and returns the images in order; `expand` replaces what the
template wrote for each image with the model's image tokens, as the family's transformers processor
does. Reading is bounded: a data: URL or download larger than images.MAX_FILE_BYTES is refused before
it is decoded, and images.open_image refuses images whose header claims too many pixels.
"""
from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path
from typing import Any

from .errors import GenerationError, ImageError
from .images import MAX_FILE_BYTES

# At most this many images in one request (each costs a vision tower pass and its tokens).
MAX_IMAGES = 16
IMAGE_PARTS = ("image_url", "image", "input_image")
REMOTE_TIMEOUT_S = 20
_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)


def is_image_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") in IMAGE_PARTS


def has_images(messages: Any) -> bool:
    """Whether any message holds an image content part."""
    return isinstance(messages, (list, tuple)) and any(
        isinstance(m, dict) and isinstance(m.get("content"), list) and any(map(is_image_part, m["content"]))
        for m in messages)


def split_images(messages: list[dict], *, allow_local: bool = True, allow_remote: bool = False) -> tuple[list, list]:
    """(messages with each image part as {"type": "image"}, the images in order: PIL images, paths
    or encoded bytes, not yet decoded). allow_local: paths and file: URLs (the server refuses
    them); allow_remote: http(s) URLs are downloaded."""
    out: list = []
    images: list = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list) or not any(map(is_image_part, content)):
            out.append(m)
            continue
        parts = []
        for j, part in enumerate(content):
            if is_image_part(part):
                if len(images) == MAX_IMAGES:
                    raise ImageError(f"more than {MAX_IMAGES} images in one chat; send fewer")
                images.append(_source(part, f"messages[{i}].content[{j}]", allow_local, allow_remote))
                parts.append({"type": "image"})
            else:
                parts.append(part)
        out.append({**m, "content": parts})
    return out, images


def _source(part: dict, where: str, allow_local: bool, allow_remote: bool) -> Any:
    if part["type"] == "image_url" or part["type"] == "input_image":
        v = part.get("image_url")
        url = v.get("url") if isinstance(v, dict) else v
        if not isinstance(url, str):
            raise ImageError(f"{where}: an image_url part needs image_url.url, a data: URL"
                             f"{', a file path' if allow_local else ''} or an http(s) URL")
        return read_url(url, where, allow_local=allow_local, allow_remote=allow_remote)
    v = next((part[k] for k in ("image", "url", "path") if part.get(k) is not None), None)
    if isinstance(v, str):
        return read_url(v, where, allow_local=allow_local, allow_remote=allow_remote)
    if v is None:
        raise ImageError(f"{where}: an image part needs 'image' (a PIL image, a path or bytes), 'url' or 'path'")
    return v  # a PIL image or bytes: images.open_image checks them


def read_url(url: str, where: str = "image", *, allow_local: bool = True, allow_remote: bool = False) -> bytes | Path:
    """The bytes (data: and http(s) URLs) or the path (file: URLs and paths) an image URL names."""
    low = url[:16].lower()
    if low.startswith("data:"):
        return _data_url(url, where)
    if low.startswith(("http://", "https://")):
        if not allow_remote:
            raise ImageError(f"{where}: ember does not download images ({url[:80]!r}) unless remote fetching is "
                             f"allowed (LLM.chat(..., allow_remote_images=True), `ember serve "
                             f"--allow-remote-images`); send the image as a data: URL")
        return _download(url, where)
    if not allow_local:
        raise ImageError(f"{where}: expected a data: URL (base64 image bytes), got {url[:80]!r}")
    if low.startswith("file://"):
        from urllib.parse import unquote, urlparse

        return Path(unquote(urlparse(url).path))
    if re.match(r"[a-z][a-z0-9+.-]*://", low):
        raise ImageError(f"{where}: unsupported URL scheme in {url[:80]!r} (data:, file:, http(s): or a path)")
    return Path(url)


def _data_url(url: str, where: str) -> bytes:
    m = _DATA_URL.match(url[:300])
    if m is None:
        raise ImageError(f"{where}: a malformed data: URL (expected data:image/<type>;base64,<data>)")
    mime = (m.group("mime") or "").lower()
    if mime and not mime.startswith("image/"):
        raise ImageError(f"{where}: the data: URL holds {mime!r}, not an image")
    payload = url[m.end():]
    if not m.group("b64"):
        raise ImageError(f"{where}: only base64 data: URLs are read (data:image/<type>;base64,...)")
    if len(payload) > (MAX_FILE_BYTES // 3 + 1) * 4:  # refused before decoding
        raise ImageError(f"{where}: the data: URL holds more than the {MAX_FILE_BYTES:,} bytes ember reads")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{where}: the data: URL's base64 is malformed") from None


def _download(url: str, where: str) -> bytes:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "ember"}),
                                    timeout=REMOTE_TIMEOUT_S) as r:
            data = r.read(MAX_FILE_BYTES + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ImageError(f"{where}: could not download {url[:120]!r}: {str(e)[:200]}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ImageError(f"{where}: {url[:120]!r} is larger than the {MAX_FILE_BYTES:,} bytes ember reads")
    return data


def expand(prompt: str, n_images: int, placeholder: str, replacement: str | list[str]) -> str:
    """The prompt with each image's `placeholder` (what the chat template wrote) replaced by the
    model's image tokens (`replacement`, or one per image in order); the template must have written
    one per image."""
    found = prompt.count(placeholder) if placeholder else 0
    if found != n_images:
        raise GenerationError(f"the chat template wrote {found} image placeholder(s) ({placeholder!r}) for {n_images} "
                              f"image(s); put each image in a message's content as its own part")
    if isinstance(replacement, str):
        return prompt.replace(placeholder, replacement)
    pieces = prompt.split(placeholder)
    return pieces[0] + "".join(r + p for r, p in zip(replacement, pieces[1:]))
