"""Qwen2-VL's image processor (Qwen2VLImageProcessor, used by Qwen2.5-VL): each image resized to a
multiple of patch_size * merge_size within [min_pixels, max_pixels] pixels, aspect ratio kept
(`smart_resize`), then cut into flattened patches.

    proc = GridPatchProcessor.from_file(snapshot_root / "preprocessor_config.json")
    out = proc([PIL image, "cat.jpg", b"<png bytes>"])
    out["pixel_values"]      # [sum of patches, 3 * temporal_patch_size * patch_size ** 2] float32
    out["image_grid_thw"]    # [N, 3] (1, rows, cols) of patches per image

The arithmetic is transformers' PIL processor's (`image_processing_pil_qwen2_vl.py`): convert to RGB,
Pillow resize (bicubic), rescale in float64 then float32, normalise in float32 (images.py's steps),
then patches ordered merge block by merge block (merge_size x merge_size neighbours in a row), each
repeated temporal_patch_size times (a still image is a clip of identical frames). An image takes
rows * cols / merge_size ** 2 tokens in the prompt.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import ConfigError, ImageError
from .images import MAX_PIXELS, RESAMPLE_NAMES, _pil, open_image, rescale_normalize, to_rgb

MAX_ASPECT = 200  # transformers' smart_resize refuses images longer than this many times their width


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """transformers' smart_resize: (height, width) multiples of `factor`, their product within
    [min_pixels, max_pixels], the aspect ratio kept as nearly as that allows."""
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise ImageError(f"the image is {width}x{height}: its aspect ratio must be at most {MAX_ASPECT}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _int(d: dict, key: str, where: str, lo: int, hi: int) -> int:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ConfigError(f"{where}: {key} must be an integer in [{lo}, {hi:,}], got {v!r:.60}")
    return v


def _floats(d: dict, key: str, where: str) -> tuple[float, ...]:
    v = d.get(key)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = [v] * 3
    if (not isinstance(v, list) or len(v) != 3
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)):
        raise ConfigError(f"{where}: {key} must be a number or 3 numbers, got {v!r:.80}")
    return tuple(float(x) for x in v)


@dataclass
class GridPatchProcessor:
    """transformers' Qwen2VLImageProcessor (PIL backend), from preprocessor_config.json."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    resample: int = 3  # PIL.Image.BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)

    @classmethod
    def from_dict(cls, d: dict, defaults: dict | None = None,
                  where: str = "preprocessor_config.json") -> "GridPatchProcessor":
        """`d` over `defaults` (the model's: its patch and merge sizes), every field checked. The pixel
        bounds are min_pixels / max_pixels, or size's shortest_edge / longest_edge (transformers 5)."""
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a JSON object")
        base, raw = cls(), d
        d = {**{k: getattr(base, k) for k in base.__dataclass_fields__}, **(defaults or {}),
             **{k: v for k, v in d.items() if v is not None}}
        size = d.get("size")
        if isinstance(size, dict):  # transformers 5 spells the bounds so; min_pixels / max_pixels win, as there
            given = {k for k in ("min_pixels", "max_pixels") if k in d and k in (raw or {})}
            for key, name in (("shortest_edge", "min_pixels"), ("longest_edge", "max_pixels")):
                if size.get(key) is not None and name not in given:
                    d[name] = size[key]
        for key in ("do_resize", "do_rescale", "do_normalize"):
            if not isinstance(d[key], bool):
                raise ConfigError(f"{where}: {key} must be true or false, got {d[key]!r:.60}")
        p = _int(d, "patch_size", where, 1, 1024)
        t = _int(d, "temporal_patch_size", where, 1, 16)
        m = _int(d, "merge_size", where, 1, 64)
        hi = _int(d, "max_pixels", where, 1, MAX_PIXELS)  # a config cannot size an allocation past decoding's bound
        lo = _int(d, "min_pixels", where, 1, hi)
        if (p * m) ** 2 > hi:
            raise ConfigError(f"{where}: max_pixels ({hi}) is less than one merged patch ({p * m}x{p * m} pixels)")
        resample = d["resample"]
        if resample not in RESAMPLE_NAMES or isinstance(resample, bool):
            raise ConfigError(f"{where}: resample must be a Pillow filter number, got {resample!r:.60}")
        factor = d["rescale_factor"]
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not math.isfinite(factor):
            raise ConfigError(f"{where}: rescale_factor must be a number, got {factor!r:.60}")
        std = _floats(d, "image_std", where)
        if any(s == 0 for s in std):
            raise ConfigError(f"{where}: image_std must not contain 0, got {list(std)}")
        return cls(lo, hi, p, t, m, resample, d["do_resize"], d["do_rescale"], float(factor), d["do_normalize"],
                   _floats(d, "image_mean", where), std)

    @classmethod
    def from_file(cls, path: Path | None, defaults: dict | None = None) -> "GridPatchProcessor":
        if path is None or not Path(path).is_file():
            return cls.from_dict({}, defaults, "the default image processor")
        from .config import load_json

        return cls.from_dict(load_json(path), defaults, str(path))

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) an image of this size is resized to."""
        f = self.patch_size * self.merge_size
        if self.do_resize:
            return smart_resize(height, width, f, self.min_pixels, self.max_pixels)
        if height % f or width % f or height * width > self.max_pixels:
            raise ImageError(f"the image is {width}x{height}: without resizing (do_resize=false) its sides must be "
                             f"multiples of {f} and its pixels at most max_pixels ({self.max_pixels:,})")
        return height, width

    def process(self, img) -> tuple[np.ndarray, tuple[int, int, int]]:
        """One decoded PIL image → ([rows * cols, 3 * T * P * P] float32 patches, (1, rows, cols))."""
        a = to_rgb(img)
        h, w = self.target_size(a.shape[0], a.shape[1])
        if (h, w) != a.shape[:2]:
            a = np.asarray(_pil().fromarray(a).resize((w, h), resample=self.resample))
        x = rescale_normalize(a.transpose(2, 0, 1), self)
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        rows, cols = h // p, w // p
        x = x.reshape(3, rows // m, m, p, cols // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
        x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))
        return x.reshape(rows * cols, 3 * t * p * p), (1, rows, cols)

    def tokens(self, grid: Sequence[int]) -> int:
        """How many image tokens an image of patch grid (t, rows, cols) takes."""
        return int(np.prod(grid)) // self.merge_size ** 2

    def __call__(self, images: Sequence[Any], what: str = "images") -> dict:
        """{"pixel_values": [patches, 3 * T * P * P], "image_grid_thw": [N, 3]} torch tensors of
        `images` (PIL images, paths, encoded bytes)."""
        import torch

        out = [self.process(open_image(im, f"{what}[{i}]")) for i, im in enumerate(images)]
        return {"pixel_values": torch.from_numpy(np.concatenate([x for x, _ in out])),
                "image_grid_thw": torch.tensor([g for _, g in out], dtype=torch.long)}

