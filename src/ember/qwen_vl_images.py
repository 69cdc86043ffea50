"""transformers' Qwen2VLImageProcessor (PIL backend), the processor of Qwen2-VL, Qwen2.5-VL and
Qwen3-VL: each image keeps its aspect ratio and becomes a grid of patches.

    proc = GridImageProcessor.from_file(snapshot_root / "preprocessor_config.json", defaults)
    out = proc([PIL image, "cat.jpg", b"<png bytes>"])
    out["pixel_values"]     # [patches of all images, 3 * temporal_patch_size * patch_size^2] float32
    out["image_grid_thw"]   # [images, 3]: (1, rows, cols) patches of each image

Steps (transformers' `smart_resize`, `patchify`): convert to RGB; resize (bicubic) to the nearest
multiple of patch_size * merge_size on each side, scaled down to at most `size["longest_edge"]`
pixels or up to at least `size["shortest_edge"]`; rescale and normalise as the other processors
(ember.images); cut into patches listed in merge-block order (the merge_size^2 patches that become
one text token one after another), each repeated temporal_patch_size times (an image is a one-frame
video).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import EmbeddingError, ImageError
from .images import MAX_PIXELS, RESAMPLE_NAMES, _pil, _triple, open_image, to_rgb

MAX_ASPECT = 200  # transformers' smart_resize refuses longer/shorter side ratios past this


def smart_resize(h: int, w: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width): multiples of `factor` near (h, w), with the pixel count brought within
    [min_pixels, max_pixels] at the same aspect ratio (transformers' smart_resize)."""
    if max(h, w) / min(h, w) > MAX_ASPECT:
        raise ImageError(f"the image's aspect ratio ({w}x{h}) is more than {MAX_ASPECT}:1, which this processor refuses")
    hb, wb = round(h / factor) * factor, round(w / factor) * factor
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb, wb = max(factor, math.floor(h / beta / factor) * factor), max(factor, math.floor(w / beta / factor) * factor)
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return hb, wb


def _int(d: dict, key: str, where: str, lo: int, hi: int) -> int:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise EmbeddingError(f"{where}: {key} must be an integer in [{lo}, {hi}], got {v!r:.60}")
    return v


@dataclass
class GridImageProcessor:
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    resample: int = 3  # PIL.Image.BICUBIC
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)

    @classmethod
    def from_dict(cls, d: dict, defaults: dict, where: str = "preprocessor_config.json") -> "GridImageProcessor":
        """`d` over `defaults` (the family's), every field checked."""
        if not isinstance(d, dict):
            raise EmbeddingError(f"{where}: expected a JSON object")
        d = {**defaults, **{k: v for k, v in d.items() if v is not None}}
        size = dict(d.get("size") or {})
        if not isinstance(size, dict):
            raise EmbeddingError(f"{where}: size must be {{'shortest_edge': min pixels, 'longest_edge': max pixels}}")
        for old, new in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
            if d.get(old) is not None:  # older configs name the bounds min_pixels / max_pixels
                size[new] = d[old]
        for k in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if not isinstance(d.get(k, True), bool):
                raise EmbeddingError(f"{where}: {k} must be true or false, got {d.get(k)!r:.60}")
        if not d.get("do_resize", True) or not d.get("do_convert_rgb", True):
            raise EmbeddingError(f"{where}: do_resize=false and do_convert_rgb=false are not supported by ember's "
                                 f"image processor")
        p = _int(d, "patch_size", where, 1, 1024)
        m = _int(d, "merge_size", where, 1, 16)
        t = _int(d, "temporal_patch_size", where, 1, 16)
        lo = _int(size, "shortest_edge", f"{where}: size", 1, MAX_PIXELS)
        hi = _int(size, "longest_edge", f"{where}: size", lo, MAX_PIXELS)
        if hi < (p * m) ** 2:
            raise EmbeddingError(f"{where}: size.longest_edge ({hi} pixels) holds no {p * m}x{p * m} block")
        resample = d.get("resample", 3)
        if resample not in RESAMPLE_NAMES or isinstance(resample, bool):
            raise EmbeddingError(f"{where}: resample must be a Pillow filter number, got {resample!r:.60}")
        factor = d.get("rescale_factor", 1 / 255)
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not np.isfinite(factor):
            raise EmbeddingError(f"{where}: rescale_factor must be a number, got {factor!r:.60}")
        std = _triple(d.get("image_std", list(cls.image_std)), "image_std", where, 3)
        if any(s == 0 for s in std):
            raise EmbeddingError(f"{where}: image_std must not contain 0, got {list(std)}")
        return cls(p, m, t, lo, hi, resample, d.get("do_rescale", True), float(factor), d.get("do_normalize", True),
                   _triple(d.get("image_mean", list(cls.image_mean)), "image_mean", where, 3), std)

    @classmethod
    def from_file(cls, path: Path | None, defaults: dict) -> "GridImageProcessor":
        if path is None or not Path(path).is_file():
            return cls.from_dict({}, defaults, "the default image processor")
        from .config import load_json
        from .errors import ConfigError

        try:
            d = load_json(path)
        except ConfigError as e:
            raise EmbeddingError(str(e)) from None
        return cls.from_dict(d, defaults, str(path))

    def process(self, img) -> tuple[np.ndarray, int, int]:
        """One decoded PIL image → ([rows * cols, patch_dim] float32 patches, rows, cols)."""
        Image = _pil()
        a = to_rgb(img)
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        h, w = smart_resize(a.shape[0], a.shape[1], p * m, self.min_pixels, self.max_pixels)
        a = np.asarray(Image.fromarray(a).resize((w, h), resample=self.resample)).transpose(2, 0, 1)
        x = a.astype(np.float64) * self.rescale_factor if self.do_rescale else a
        x = x.astype(np.float32)
        if self.do_normalize:
            x = (x - np.asarray(self.image_mean, np.float32)[:, None, None]) / np.asarray(self.image_std,
                                                                                          np.float32)[:, None, None]
        rows, cols = h // p, w // p
        # [C, H, W] → [block row, block col, row in block, col in block, C, P, P], then T copies
        x = x.reshape(3, rows // m, m, p, cols // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
        x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))
        return x.reshape(rows * cols, -1), rows, cols

    def __call__(self, images: Sequence[Any], what: str = "images") -> dict:
        """{"pixel_values": [patches, patch_dim], "image_grid_thw": [N, 3]} torch tensors of `images`
        (PIL images, paths, encoded bytes)."""
        import torch

        patches, grids = [], []
        for i, im in enumerate(images):
            x, rows, cols = self.process(open_image(im, f"{what}[{i}]"))
            patches.append(x)
            grids.append((1, rows, cols))
        return {"pixel_values": torch.from_numpy(np.concatenate(patches)),
                "image_grid_thw": torch.tensor(grids, dtype=torch.long)}
