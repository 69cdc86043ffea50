"""Images in, pixel tensors out: decoding (Pillow) and the CLIP/SigLIP image processors.

    proc = ImageProcessor.from_file(snapshot_root / "preprocessor_config.json", defaults)
    pixel_values = proc([PIL image, "cat.jpg", b"<png bytes>"])     # [N, 3, H, W] float32

The steps and their arithmetic are those of transformers' PIL image processors (the "slow" ones,
`image_processing_pil_*.py`), so the pixel tensors match theirs exactly: convert to RGB (transparency
composited onto white), resize with Pillow (the shortest edge to `size["shortest_edge"]`, or to
`size["height"] x size["width"]`), center-crop (zero-padded when too small), rescale in float64 then
float32, normalise in float32.

Bad images are `ImageError`s (also `EmbeddingError`s) that say which one and why: unreadable or truncated files, formats
other than the common raster ones (Pillow's EPS/PDF plugins are never used), images with no pixels,
and images whose header claims more than `MAX_PIXELS` pixels; those are refused from the header,
before any pixel is decoded.
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import EmbeddingError, ImageError

# Pillow's own decompression-bomb threshold (Image.MAX_IMAGE_PIXELS): ~89.5 M pixels, 268 MB as RGB.
MAX_PIXELS = 89_478_485
# Encoded files larger than this are refused before they are read.
MAX_FILE_BYTES = 64 << 20
# Formats Pillow may decode (never the ones that run external programs or parse documents).
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "PPM", "ICO")
# Processor sizes past this are not a real model's (a hostile config cannot size an allocation).
MAX_SIDE = 8192
RESAMPLE_NAMES = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}


def _pil():
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImageError("images need Pillow: pip install 'ember[vision]' (or pip install pillow)") from None
    return Image


def _check_size(img, where: str):
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError(f"{where}: the image has no pixels ({w}x{h})")
    if w * h > MAX_PIXELS:
        raise ImageError(f"{where}: the image claims {w}x{h} = {w * h:,} pixels, more than the {MAX_PIXELS:,} "
                             f"ember decodes (Pillow's decompression-bomb limit); downscale it first")
    return img


def open_image(item: Any, where: str = "image"):
    """A decoded PIL image from a PIL image, a path, or the bytes of an encoded file."""
    Image = _pil()
    if isinstance(item, Image.Image):
        return _check_size(item, where)
    if isinstance(item, (bytes, bytearray, memoryview)):
        data = bytes(item)
        if len(data) > MAX_FILE_BYTES:
            raise ImageError(f"{where}: {len(data):,} bytes, more than the {MAX_FILE_BYTES:,} ember reads")
        fp, name = io.BytesIO(data), where
    elif isinstance(item, (str, os.PathLike)):
        path = Path(item)
        try:
            size = path.stat().st_size
        except OSError as e:
            raise ImageError(f"{where}: cannot read {str(path)[:200]!r}: {e.strerror or e}") from None
        if not path.is_file():
            raise ImageError(f"{where}: {str(path)[:200]!r} is not a file")
        if size > MAX_FILE_BYTES:
            raise ImageError(f"{where}: {path} is {size:,} bytes, more than the {MAX_FILE_BYTES:,} ember reads")
        fp, name = path, f"{where} ({path})"
    else:
        raise ImageError(f"{where}: expected a PIL image, a file path or the bytes of an image file, "
                             f"got {type(item).__name__}")
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp, formats=FORMATS)  # reads the header only
            _check_size(img, name)
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{name}: the image claims more than the {MAX_PIXELS:,} pixels ember decodes (a "
                             f"decompression bomb, Pillow says: {str(e)[:120]})") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{name}: not an image ember reads (formats: {', '.join(FORMATS)})") from None
    except (OSError, ValueError, SyntaxError, MemoryError, EOFError) as e:  # truncated or corrupt data
        raise ImageError(f"{name}: corrupt or truncated image: {str(e)[:200]}") from None
    return img


def to_rgb(img) -> np.ndarray:
    """HWC uint8 RGB; transparency composited onto white (as transformers' convert_to_rgb)."""
    Image = _pil()
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        img = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img).convert("RGB")
    else:
        img = img.convert("RGB")
    return np.asarray(img)


def rescale_normalize(a: np.ndarray, proc: Any) -> np.ndarray:
    """[C, H, W] uint8 → float32 as transformers' PIL processors do it: rescaled in float64 then
    cast, normalised in float32 (`proc`'s do_rescale, rescale_factor, do_normalize, image_mean,
    image_std)."""
    x = a.astype(np.float64) * proc.rescale_factor if proc.do_rescale else a
    x = x.astype(np.float32)
    if proc.do_normalize:
        mean = np.asarray(proc.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(proc.image_std, dtype=np.float32)[:, None, None]
        x = (x - mean) / std
    return x


def _side(v: Any, key: str, where: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_SIDE:
        raise EmbeddingError(f"{where}: {key} must be an integer in [1, {MAX_SIDE}], got {v!r:.60}")
    return v


def _triple(v: Any, key: str, where: str, channels: int) -> tuple[float, ...]:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = [v] * channels
    if (not isinstance(v, list) or len(v) != channels
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x) for x in v)):
        raise EmbeddingError(f"{where}: {key} must be a number or {channels} numbers, got {v!r:.80}")
    return tuple(float(x) for x in v)


@dataclass
class ImageProcessor:
    """transformers' CLIP/SigLIP image processor (PIL backend), from preprocessor_config.json."""

    size: dict
    crop_size: dict | None  # None: no center crop
    resample: int = 3  # PIL.Image.BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    @classmethod
    def from_dict(cls, d: dict, defaults: dict, where: str = "preprocessor_config.json") -> "ImageProcessor":
        """`d` over `defaults` (the family's processor defaults), every field checked."""
        if not isinstance(d, dict):
            raise EmbeddingError(f"{where}: expected a JSON object")
        d = {**defaults, **{k: v for k, v in d.items() if v is not None}}

        def flag(key):
            v = d.get(key, True)
            if not isinstance(v, bool):
                raise EmbeddingError(f"{where}: {key} must be true or false, got {v!r:.60}")
            return v

        size = d.get("size")
        if isinstance(size, int) and not isinstance(size, bool):  # old configs: an int is the shortest edge
            size = {"shortest_edge": size}
        if not isinstance(size, dict) or not ({"shortest_edge"} <= size.keys() or {"height", "width"} <= size.keys()):
            raise EmbeddingError(f"{where}: size must be {{'shortest_edge': n}} or {{'height': h, 'width': w}}, "
                                 f"got {size!r:.80}")
        size = ({"shortest_edge": _side(size["shortest_edge"], "size.shortest_edge", where)} if "shortest_edge" in size
                else {k: _side(size[k], f"size.{k}", where) for k in ("height", "width")})
        crop = None
        if flag("do_center_crop") and d.get("crop_size") is not None:
            c = d["crop_size"]
            if isinstance(c, int) and not isinstance(c, bool):
                c = {"height": c, "width": c}
            if not isinstance(c, dict) or not {"height", "width"} <= c.keys():
                raise EmbeddingError(f"{where}: crop_size must be {{'height': h, 'width': w}}, got {c!r:.80}")
            crop = {k: _side(c[k], f"crop_size.{k}", where) for k in ("height", "width")}
        resample = d.get("resample", 3)
        if resample not in RESAMPLE_NAMES or isinstance(resample, bool):
            raise EmbeddingError(f"{where}: resample must be a Pillow filter number "
                                 f"({', '.join(f'{k} {v}' for k, v in RESAMPLE_NAMES.items())}), got {resample!r:.60}")
        factor = d.get("rescale_factor", 1 / 255)
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not np.isfinite(factor):
            raise EmbeddingError(f"{where}: rescale_factor must be a number, got {factor!r:.60}")
        std = _triple(d.get("image_std", 0.5), "image_std", where, 3)
        if any(s == 0 for s in std):
            raise EmbeddingError(f"{where}: image_std must not contain 0, got {list(std)}")
        return cls(size=size, crop_size=crop, resample=resample, do_resize=flag("do_resize"),
                   do_rescale=flag("do_rescale"), rescale_factor=float(factor), do_normalize=flag("do_normalize"),
                   image_mean=_triple(d.get("image_mean", 0.5), "image_mean", where, 3), image_std=std)

    @classmethod
    def from_file(cls, path: Path | None, defaults: dict) -> "ImageProcessor":
        if path is None or not Path(path).is_file():
            return cls.from_dict({}, defaults, "the default image processor")
        from .config import load_json
        from .errors import ConfigError

        try:
            d = load_json(path)
        except ConfigError as e:
            raise EmbeddingError(str(e)) from None
        return cls.from_dict(d, defaults, str(path))

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every output, when fixed by the config."""
        if self.crop_size is not None:
            return self.crop_size["height"], self.crop_size["width"]
        if self.do_resize and "height" in self.size:
            return self.size["height"], self.size["width"]
        return None

    def _resized_shape(self, h: int, w: int) -> tuple[int, int]:
        if "height" in self.size:
            return self.size["height"], self.size["width"]
        s = self.size["shortest_edge"]  # transformers' get_resize_output_image_size(default_to_square=False)
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(s * long / short)
        return (new_long, s) if w <= h else (s, new_long)

    def process(self, img) -> np.ndarray:
        """One decoded PIL image → [3, H, W] float32."""
        Image = _pil()
        a = to_rgb(img)
        if self.do_resize:
            h, w = self._resized_shape(a.shape[0], a.shape[1])
            if h * w > MAX_PIXELS:
                raise ImageError(f"resizing gives {w}x{h} pixels, more than {MAX_PIXELS:,}")
            a = np.asarray(Image.fromarray(a).resize((w, h), resample=self.resample))
        a = a.transpose(2, 0, 1)  # CHW
        if self.crop_size is not None:
            a = center_crop(a, self.crop_size["height"], self.crop_size["width"])
        return rescale_normalize(a, self)

    def __call__(self, images: Sequence[Any], what: str = "images"):
        """[N, 3, H, W] float32 torch tensor of `images` (PIL images, paths, encoded bytes)."""
        import torch

        out = [self.process(open_image(im, f"{what}[{i}]")) for i, im in enumerate(images)]
        shapes = {x.shape for x in out}
        if len(shapes) > 1:
            raise EmbeddingError(f"the processed images differ in size ({sorted(shapes)}); this processor "
                                 f"({self.size}) does not give one size for all")
        return torch.from_numpy(np.stack(out))


def center_crop(a: np.ndarray, ch: int, cw: int) -> np.ndarray:
    """[C, H, W] → [C, ch, cw] around the center, zero-padded where the image is smaller
    (transformers' center_crop, including its rounding)."""
    H, W = a.shape[1:]
    top, left = (H - ch) // 2, (W - cw) // 2
    if top >= 0 and left >= 0:
        return a[:, top:top + ch, left:left + cw]
    nh, nw = max(ch, H), max(cw, W)
    out = np.zeros((a.shape[0], nh, nw), dtype=a.dtype)
    tp, lp = -(-(nh - H) // 2), -(-(nw - W) // 2)  # ceil
    out[:, tp:tp + H, lp:lp + W] = a
    top, left = top + tp, left + lp
    return out[:, max(0, top):min(nh, top + ch), max(0, left):min(nw, left + cw)]


@dataclass
class PatchProcessor:
    """transformers' Siglip2ImageProcessor (PIL backend, "NaFlex"): each image resized, aspect ratio
    kept, to the most patches that fit `max_num_patches` (its binary search over the scale), then
    cut into flattened patches padded to `max_num_patches`, with a patch mask and (rows, cols)."""

    patch_size: int = 16
    max_num_patches: int = 256
    resample: int = 2  # PIL.Image.BILINEAR
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    @classmethod
    def from_file(cls, path: Path | None, defaults: dict) -> "PatchProcessor":
        d = dict(defaults)
        where = str(path) if path is not None else "the default image processor"
        if path is not None and Path(path).is_file():
            from .config import load_json
            from .errors import ConfigError

            try:
                raw = load_json(path)
            except ConfigError as e:
                raise EmbeddingError(str(e)) from None
            if not isinstance(raw, dict):
                raise EmbeddingError(f"{where}: expected a JSON object")
            d.update({k: v for k, v in raw.items() if v is not None})
        p = _side(d.get("patch_size"), "patch_size", where)
        n = d.get("max_num_patches")
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 1 << 16:
            raise EmbeddingError(f"{where}: max_num_patches must be an integer in [1, 65536], got {n!r:.60}")
        if n * p * p > MAX_PIXELS:  # the padded batch is sized by these: bounded as a decoded image is
            raise EmbeddingError(f"{where}: max_num_patches {n} of {p}x{p} pixels is more than the {MAX_PIXELS:,} "
                                 f"pixels ember processes per image")
        resample = d.get("resample", 2)
        if resample not in RESAMPLE_NAMES or isinstance(resample, bool):
            raise EmbeddingError(f"{where}: resample must be a Pillow filter number, got {resample!r:.60}")
        factor = d.get("rescale_factor", 1 / 255)
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not np.isfinite(factor):
            raise EmbeddingError(f"{where}: rescale_factor must be a number, got {factor!r:.60}")
        std = _triple(d.get("image_std", 0.5), "image_std", where, 3)
        if any(s == 0 for s in std):
            raise EmbeddingError(f"{where}: image_std must not contain 0, got {list(std)}")
        for k in ("do_rescale", "do_normalize"):
            if not isinstance(d.get(k, True), bool):
                raise EmbeddingError(f"{where}: {k} must be true or false, got {d.get(k)!r:.60}")
        return cls(p, n, resample, d.get("do_rescale", True), float(factor), d.get("do_normalize", True),
                   _triple(d.get("image_mean", 0.5), "image_mean", where, 3), std)

    def target_size(self, h: int, w: int, eps: float = 1e-5) -> tuple[int, int]:
        """transformers' get_image_size_for_max_num_patches: the largest scale (binary search) whose
        patch-rounded size has at most max_num_patches patches."""
        p = self.patch_size

        def scaled(scale: float, size: int) -> int:
            return int(max(p, math.ceil(size * scale / p) * p))

        lo, hi = eps / 10, 100.0
        while hi - lo >= eps:
            scale = (lo + hi) / 2
            if (scaled(scale, h) / p) * (scaled(scale, w) / p) <= self.max_num_patches:
                lo = scale
            else:
                hi = scale
        return scaled(lo, h), scaled(lo, w)

    def process(self, img) -> tuple[np.ndarray, int, int]:
        """One decoded PIL image → ([rows * cols, P * P * 3] float32 patches, rows, cols)."""
        Image = _pil()
        a = to_rgb(img)
        h, w = self.target_size(a.shape[0], a.shape[1])
        a = np.asarray(Image.fromarray(a).resize((w, h), resample=self.resample)).transpose(2, 0, 1)
        x = rescale_normalize(a, self)
        p = self.patch_size
        rows, cols = h // p, w // p
        patches = x.reshape(3, rows, p, cols, p).transpose(1, 3, 2, 4, 0).reshape(rows * cols, -1)
        return patches, rows, cols

    def __call__(self, images: Sequence[Any], what: str = "images") -> dict:
        """{"pixel_values": [N, max_num_patches, P*P*3], "pixel_attention_mask": [N, max_num_patches],
        "spatial_shapes": [N, 2]} torch tensors of `images` (PIL images, paths, encoded bytes)."""
        import torch

        n = len(images)
        px = np.zeros((n, self.max_num_patches, 3 * self.patch_size ** 2), np.float32)
        mask = np.zeros((n, self.max_num_patches), np.int32)
        shapes = np.zeros((n, 2), np.int64)
        for i, im in enumerate(images):
            patches, rows, cols = self.process(open_image(im, f"{what}[{i}]"))
            px[i, :len(patches)] = patches
            mask[i, :len(patches)] = 1
            shapes[i] = rows, cols
        return {"pixel_values": torch.from_numpy(px), "pixel_attention_mask": torch.from_numpy(mask),
                "spatial_shapes": torch.from_numpy(shapes)}
