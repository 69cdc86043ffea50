"""Qwen2.5-VL (`qwen2_5_vl`): a Qwen2 decoder with M-RoPE, and a vision transformer whose images
take as many tokens as their size gives.

Reference: transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py (and vision_utils.py).
- Images are cut into patches by the processor (ember.image_patches: smart_resize, patches of
  3 x temporal_patch_size x patch_size^2 values, merge_size x merge_size neighbours in a row), so an
  image of (t, h, w) patches is t*h*w rows; its prompt holds t*h*w / merge_size^2 `<|image_pad|>`
  tokens between `<|vision_start|>` and `<|vision_end|>`.
- The tower: the patch embedding (a Conv3d whose kernel is its stride: one matmul per patch), a 2-D
  rotary embedding (half the rotated dims by the patch's row, half by its column), RMSNorm blocks
  with a SwiGLU MLP attending within windows of window_size pixels (patches reordered window by
  window), except the `fullatt_block_indexes` blocks, which attend over the whole image; each image
  attends only to itself. The merger (RMSNorm, then an MLP over each merge_size^2 block) gives one
  token per block, in the decoder's width.
- M-RoPE: text tokens take position p on all three axes (t, h, w); an image's tokens take
  (start + t, start + row, start + col), and the text after it continues from start + max(rows,
  cols). Decoding continues from the prompt's largest position + 1: the cache row's rope delta
  (`rope_positions`, models/base.CausalLM.mrope, nn/kv_cache.RopeDeltas).

Checkpoint names: transformers 5 saves (and older Hub checkpoints hold) `visual.*`, `model.*`,
`lm_head.*`; in memory it names them `model.visual.*`, `model.language_model.*`, `lm_head.*`.
Both load. Config: the decoder's keys under text_config, or (older Hub configs) at the top level.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import gguf_source as gguf
from ..config import MAX_LAYERS, ModelConfig
from ..errors import ConfigError, GenerationError
from ..nn import RMSNorm, activation, linear
from ..nn.rope import rotate_half
from ..varbuilder import VarBuilder
from . import multimodal

MAX_VISION_WIDTH = 1 << 15


@dataclass
class VisionConfig(ModelConfig):
    """Qwen2_5_VLVisionConfig."""

    depth: int = 32
    hidden_size: int = 3584
    hidden_act: str = "silu"
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    tokens_per_second: int = 4
    window_size: int = 112
    out_hidden_size: int = 3584
    fullatt_block_indexes: list = dataclasses.field(default_factory=lambda: [7, 15, 23, 31])
    rope_parameters: dict | None = None

    def validate(self) -> None:
        self._positive("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
                       "spatial_merge_size", "temporal_patch_size", "window_size", "out_hidden_size")
        self._require(self.depth <= MAX_LAYERS and max(self.hidden_size, self.intermediate_size, self.out_hidden_size,
                                                       self.patch_size * self.spatial_merge_size) <= MAX_VISION_WIDTH
                      and self.in_channels <= 4 and self.temporal_patch_size <= 16,
                      "vision_config: these sizes are not a real vision tower's")
        self._require(self.hidden_size % self.num_heads == 0 and (self.hidden_size // self.num_heads) % 4 == 0,
                      f"vision_config: hidden_size ({self.hidden_size}) must split into num_heads ({self.num_heads}) "
                      f"heads of a multiple of 4 dims (the 2-D rotary embedding)")
        self._require(self.window_size >= self.patch_size * self.spatial_merge_size,
                      f"vision_config: window_size ({self.window_size}) must span at least one merged patch "
                      f"({self.patch_size * self.spatial_merge_size} pixels)")
        self._require(all(isinstance(i, int) and not isinstance(i, bool) for i in self.fullatt_block_indexes),
                      f"vision_config: fullatt_block_indexes must be block numbers, got "
                      f"{self.fullatt_block_indexes!r:.80}")
        activation(self.hidden_act)
        theta = self.rope_theta
        self._require(isinstance(theta, (int, float)) and not isinstance(theta, bool) and 0 < theta < 1e12,
                      f"vision_config: rope_theta must be a positive number, got {theta!r:.60}")

    @property
    def rope_theta(self) -> Any:
        return (self.rope_parameters or {}).get("rope_theta", 10000.0)


@dataclass
class Config(multimodal.Config):
    """A Qwen2_5_VLConfig: the Qwen2 decoder (`text`, parsed through the registry) and the tower."""

    image_token_id: int | None = 151655
    video_token_id: int | None = 151656
    vision_start_token_id: int | None = 151652
    vision_end_token_id: int | None = 151653
    tie_word_embeddings: bool = False

    # (parsed text config, its ForCausalLM class): ember.registry resolves text_config (see prepare)
    decoder: Any = None

    def __post_init__(self):
        if self.decoder is None:
            raise ConfigError("a qwen2_5_vl config is parsed through ember.registry (which resolves its decoder)")
        self.text, self.text_class = self.decoder
        self.raw = {k: v for k, v in self.raw.items() if k != "decoder"}
        self.vision = self.tower(VisionConfig, self.vision_config, "vision_config")

    def validate(self) -> None:
        super().validate()
        self._require(self.vision.out_hidden_size == self.text.hidden_size,
                      f"vision_config.out_hidden_size ({self.vision.out_hidden_size}) must be the decoder's "
                      f"hidden_size ({self.text.hidden_size})")


def prepare(d: dict) -> dict:
    """config.json → the dict the registry parses: text_config (older Hub configs: the top level's
    decoder keys) made a Qwen2 decoder's, the outer config deciding head tying and dtype."""
    text = d.get("text_config")
    if not isinstance(text, dict):
        text = {k: v for k, v in d.items() if k not in ("vision_config", "model_type", "architectures")}
    text = {**text, "model_type": "qwen2", "architectures": None,
            "tie_word_embeddings": d.get("tie_word_embeddings", text.get("tie_word_embeddings", False)),
            **{k: d[k] for k in ("dtype", "torch_dtype") if d.get(k) is not None}}
    return {**d, "text_config": text}


# ---- the vision tower ---------------------------------------------------------------------------
def segments(cu: list[int], device) -> list[torch.Tensor]:
    """The rows of each attention segment ([start, end) between consecutive `cu` boundaries),
    segments of equal length stacked: [n, L] index tensors, one per length."""
    by_len: dict[int, list[int]] = {}
    for s, e in zip(cu[:-1], cu[1:]):
        if e > s:
            by_len.setdefault(e - s, []).append(s)
    return [(torch.tensor(starts, device=device)[:, None] + torch.arange(n, device=device)) for n, starts in
            by_len.items()]


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: list[torch.Tensor]) -> torch.Tensor:
    """Attention of q, k, v [N, H, D] within segments (each row sees the rows of its own): the
    variable-length attention over cu_seqlens that transformers runs, equal-length segments batched."""
    out = torch.empty_like(q)
    for idx in groups:
        n, L = idx.shape
        flat = idx.flatten()
        qs, ks, vs = (t[flat].view(n, L, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs)
        out[flat] = o.transpose(1, 2).reshape(n * L, *q.shape[1:])
    return out


def window_index(grids: list[tuple[int, int, int]], merge: int, window: int) -> tuple[torch.Tensor, list[int]]:
    """transformers' get_vision_window_index: the order of the merged blocks window by window
    (window x window blocks, the last ones cut short), and the windows' boundaries in patch rows."""
    order, cu, base = [], [0], 0
    for t, h, w in grids:
        gh, gw = h // merge, w // merge
        idx = torch.arange(t * gh * gw).reshape(t, gh, gw)
        ph, pw = window - gh % window, window - gw % window
        nh, nw = (gh + ph) // window, (gw + pw) // window
        padded = F.pad(idx, (0, pw, 0, ph), value=-100).reshape(t, nh, window, nw, window)
        padded = padded.permute(0, 1, 3, 2, 4).reshape(t, nh * nw, window, window)
        lens = (padded != -100).sum([2, 3]).reshape(-1)
        flat = padded.reshape(-1)
        order.append(flat[flat != -100] + base)
        cu.extend((lens.cumsum(0) * merge * merge + cu[-1]).tolist())
        base += t * gh * gw
    return torch.cat(order), [c for i, c in enumerate(cu) if i == 0 or c != cu[i - 1]]


def patch_positions(grids: list[tuple[int, int, int]], merge: int) -> torch.Tensor:
    """[patches, 2] (row, column) of every patch in the processor's order (merge blocks in a row)."""
    out = []
    for t, h, w in grids:
        hp, wp = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        shape = (h // merge, merge, w // merge, merge)
        hp, wp = hp.reshape(shape).transpose(1, 2).flatten(), wp.reshape(shape).transpose(1, 2).flatten()
        out.append(torch.stack([hp, wp], dim=-1).repeat(t, 1))
    return torch.cat(out)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig, vb: VarBuilder):
        super().__init__()
        E = cfg.hidden_size
        self.heads, self.head_dim = cfg.num_heads, E // cfg.num_heads
        self.qkv = linear(E, 3 * E, vb.pp("qkv"), bias=True)
        self.proj = linear(E, E, vb.pp("proj"), bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, groups: list[torch.Tensor]) -> torch.Tensor:
        N = x.shape[0]
        q, k, v = self.qkv(x).view(N, 3, self.heads, self.head_dim).unbind(1)
        # rotated in float32, as transformers' apply_rotary_pos_emb_vision
        c, s = cos[:, None].float(), sin[:, None].float()
        q = (q.float() * c + rotate_half(q.float()) * s).to(v.dtype)
        k = (k.float() * c + rotate_half(k.float()) * s).to(v.dtype)
        return self.proj(segment_attention(q, k, v, groups).reshape(N, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig, vb: VarBuilder):
        super().__init__()
        E, F_ = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = linear(E, F_, vb.pp("gate_proj"), bias=True)
        self.up_proj = linear(E, F_, vb.pp("up_proj"), bias=True)
        self.down_proj = linear(F_, E, vb.pp("down_proj"), bias=True)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig, vb: VarBuilder):
        super().__init__()
        self.norm1 = RMSNorm.from_vb(cfg.hidden_size, 1e-6, vb.pp("norm1"))
        self.norm2 = RMSNorm.from_vb(cfg.hidden_size, 1e-6, vb.pp("norm2"))
        self.attn = VisionAttention(cfg, vb.pp("attn"))
        self.mlp = VisionMLP(cfg, vb.pp("mlp"))

    def forward(self, x, cos, sin, groups):
        x = x + self.attn(self.norm1(x), cos, sin, groups)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """RMSNorm each patch, then an MLP (Linear, GELU, Linear) over each merge_size^2 block's patches."""

    def __init__(self, cfg: VisionConfig, vb: VarBuilder):
        super().__init__()
        E = cfg.hidden_size
        self.width = E * cfg.spatial_merge_size ** 2
        self.ln_q = RMSNorm.from_vb(E, 1e-6, vb.pp("ln_q"))
        self.fc1 = linear(self.width, self.width, vb.pp("mlp.0"), bias=True)
        self.fc2 = linear(self.width, cfg.out_hidden_size, vb.pp("mlp.2"), bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.ln_q(x).view(-1, self.width))))


class VisionTransformer(nn.Module):
    """Qwen2_5_VisionTransformerPretrainedModel: patches [P, C*T*p*p] of images with patch grids
    (t, h, w) → [P / merge_size^2, out_hidden_size] image tokens, image after image."""

    def __init__(self, cfg: VisionConfig, vb: VarBuilder):
        super().__init__()
        self.cfg = cfg
        E, p, t = cfg.hidden_size, cfg.patch_size, cfg.temporal_patch_size
        w = vb.get((E, cfg.in_channels, t, p, p), "patch_embed.proj.weight")
        # a Conv3d whose stride is its kernel, over inputs of one kernel each: a matmul
        self.patch_embed = nn.Parameter(w.reshape(E, -1), requires_grad=False)
        self.blocks = nn.ModuleList(VisionBlock(cfg, vb.pp(f"blocks.{i}")) for i in range(cfg.depth))
        self.merger = PatchMerger(cfg, vb.pp("merger"))
        half = E // cfg.num_heads // 2
        inv = 1.0 / (float(cfg.rope_theta) ** (torch.arange(0, half, 2, dtype=torch.float) / half))
        self.register_buffer("inv_freq", inv.to(w.device), persistent=False)
        self.full = set(cfg.fullatt_block_indexes)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        m, unit = cfg.spatial_merge_size, cfg.spatial_merge_size ** 2
        grids = [tuple(int(v) for v in g) for g in grid_thw.tolist()]
        P = sum(t * h * w for t, h, w in grids)
        width = self.patch_embed.shape[1]
        if any(h % m or w % m or t < 1 for t, h, w in grids) or tuple(pixel_values.shape) != (P, width):
            raise GenerationError(f"pixel_values {list(pixel_values.shape)} do not match image_grid_thw {grids} "
                                  f"({width} values per patch, sides multiples of {m})")
        dev = pixel_values.device
        order, cu_window = window_index(grids, m, cfg.window_size // m // cfg.patch_size)
        order = order.to(dev)
        cu_full = [0]  # each frame of each image attends to itself
        for t, h, w in grids:
            for _ in range(t):
                cu_full.append(cu_full[-1] + h * w)
        windows, images = segments(cu_window, dev), segments(cu_full, dev)

        x = F.linear(pixel_values.to(self.patch_embed.dtype), self.patch_embed)
        x = x.view(P // unit, unit, -1)[order].reshape(P, -1)
        freqs = patch_positions(grids, m).to(dev)[..., None].float() * self.inv_freq  # [P, 2, D/4]
        emb = freqs.flatten(1)
        emb = torch.cat((emb, emb), dim=-1).view(P // unit, unit, -1)[order].reshape(P, -1)
        cos, sin = emb.cos(), emb.sin()
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, images if i in self.full else windows)
        return self.merger(x)[torch.argsort(order)]


# ---- the image+text model -----------------------------------------------------------------------
class ForConditionalGeneration(multimodal.ImageTextLM):
    """Qwen2_5_VLForConditionalGeneration: the Qwen2 decoder with M-RoPE and the vision tower.

    `model(input_ids, pixel_values=..., image_grid_thw=...)` runs the tower and computes the rotary
    positions itself (a fresh sequence, as transformers' forward). In generation the LLM gives the
    image tokens' features (`image_embeds`) and the prompt's rotary positions (`rope_positions`)."""

    mrope = True

    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__(cfg, cfg.text_class(cfg.text, multimodal.language_model(vb), fuse), 0)
        self.visual = VisionTransformer(cfg.vision, vb.pp_first(["model.visual", "visual"], "patch_embed.proj.weight"))
        self.merge_size = cfg.vision.spatial_merge_size

    @property
    def takes_images(self) -> bool:
        return True

    def make_image_processor(self, path):
        """transformers' Qwen2VLImageProcessor over preprocessor_config.json (ember.image_patches),
        its patch sizes defaulting to the tower's."""
        from ..image_patches import GridPatchProcessor

        v = self.mm_config.vision
        proc = GridPatchProcessor.from_file(path, {"patch_size": v.patch_size, "merge_size": v.spatial_merge_size,
                                                   "temporal_patch_size": v.temporal_patch_size,
                                                   **(self.mm_config.mmproj_processor or {})})
        if (proc.patch_size, proc.merge_size, proc.temporal_patch_size) != (v.patch_size, v.spatial_merge_size,
                                                                          v.temporal_patch_size):
            raise ConfigError(f"{path}: the processor's patch_size / merge_size / temporal_patch_size "
                              f"({proc.patch_size}, {proc.merge_size}, {proc.temporal_patch_size}) are not the vision "
                              f"tower's ({v.patch_size}, {v.spatial_merge_size}, {v.temporal_patch_size})")
        return proc

    def encode_images(self, pixels: dict) -> torch.Tensor:
        """{"pixel_values": [patches, C*T*p*p], "image_grid_thw": [N, 3]} → [image tokens, hidden]."""
        x = self.visual(pixels["pixel_values"], pixels["image_grid_thw"])
        return x.to(self.model.embed_tokens.weight.dtype)

    def image_features(self, pixels: dict) -> torch.Tensor:
        return self.encode_images(pixels)

    def image_texts(self, tokenizer, pixels: dict) -> tuple[str, list[str]]:
        """Qwen2_5_VLProcessor's expansion: each `<|image_pad|>` the template wrote becomes as many as
        the image has merged blocks."""
        pad = tokenizer.id_to_token(self.image_token_id)
        return pad, [pad * (int(g.prod()) // self.merge_size ** 2) for g in pixels["image_grid_thw"]]

    def rope_positions(self, ids, pixels: dict) -> torch.Tensor:
        return self.rope_index(ids, pixels["image_grid_thw"].tolist())

    def rope_index(self, ids, grids: list) -> torch.Tensor:
        """transformers' get_rope_index for one prompt: [3, T] (t, h, w) rotary positions of token
        ids `ids`, whose runs of image tokens are the images of patch grids `grids` in order."""
        ids = torch.as_tensor(ids).tolist()
        m, T, image = self.merge_size, len(ids), self.image_token_id
        out = torch.empty(3, T, dtype=torch.long)
        i = cur = n_img = 0
        while i < T:
            j = i
            if ids[i] != image:
                while j < T and ids[j] != image:
                    j += 1
                out[:, i:j] = torch.arange(cur, cur + j - i)
                cur += j - i
                i = j
                continue
            if n_img == len(grids):
                raise GenerationError(f"the prompt has more runs of image tokens than the {len(grids)} image(s) given")
            t, h, w = (int(v) for v in grids[n_img])
            n_img += 1
            gh, gw = h // m, w // m
            n = t * gh * gw
            if ids[i:i + n] != [image] * n:
                raise GenerationError(f"image {n_img} takes {n} image tokens, but the prompt has fewer in a row there")
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
            out[:, i:i + n] = torch.stack([tt, hh, ww]).reshape(3, -1) + cur
            cur += max(h, w) // m
            i += n
        if n_img != len(grids):
            raise GenerationError(f"the prompt holds {n_img} image(s) of image tokens but {len(grids)} were given")
        return out

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache=None, kv_len: int | None = None,
                logits_index: torch.Tensor | None = None, cache_rows: slice | None = None, fresh: bool = False,
                pixel_values: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None,
                rope_position_ids: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        """The causal LM's forward; with `pixel_values` and `image_grid_thw` (transformers' processor
        outputs) the image tokens take the images' features and, without a cache, the rows their
        M-RoPE positions (padding, given by attention_mask, skipped as transformers does)."""
        if pixel_values is not None:
            if image_grid_thw is None:
                raise GenerationError("pixel_values need image_grid_thw (each image's patch grid)")
            image_embeds = self.encode_images({"pixel_values": pixel_values, "image_grid_thw": image_grid_thw})
        if image_grid_thw is not None and rope_position_ids is None and cache is None:
            grids = image_grid_thw.tolist()
            rows = []
            for b in range(input_ids.shape[0]):
                keep = attention_mask[b].bool() if attention_mask is not None else torch.ones_like(input_ids[b],
                                                                                                   dtype=torch.bool)
                row_ids = input_ids[b][keep]
                n = len([g for g in _image_runs(row_ids.tolist(), self.image_token_id)])
                pos = torch.zeros(3, input_ids.shape[1], dtype=torch.long)
                pos[:, keep.cpu()] = self.rope_index(row_ids, grids[:n])
                grids = grids[n:]
                rows.append(pos)
            rope_position_ids = torch.stack(rows, dim=1).to(input_ids.device)
        return super().forward(input_ids, attention_mask, position_ids, cache, kv_len, logits_index, cache_rows, fresh,
                               image_embeds=image_embeds, rope_position_ids=rope_position_ids)


def _image_runs(ids: list[int], image: int):
    """The starts of the runs of image tokens in `ids`."""
    return (i for i, t in enumerate(ids) if t == image and (i == 0 or ids[i - 1] != image))


# ---- GGUF: the decoder of Qwen2-VL / Qwen2.5-VL files (llama.cpp's qwen2vl; the vision tower comes from
# their mmproj file, ember.mmproj) -------------------------------------------------------------------
def _gguf_qwen2vl(meta: gguf.Meta) -> dict:
    """A Qwen2 decoder whose rotary frequencies split into M-RoPE sections (rope.dimension_sections:
    t, h, w and a fourth, zero, part)."""
    cfg = gguf.decoder_config(meta, "qwen2")
    sections = meta.need("rope.dimension_sections", kind=list)
    if not (3 <= len(sections) <= 4 and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in sections)
            and not any(sections[3:])):
        raise ConfigError(f"{meta.f.path}: qwen2vl.rope.dimension_sections should be [t, h, w, 0], got {sections!r:.80}")
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.pop("rope_theta", 10000.0),
                              "mrope_section": sections[:3]}
    return cfg


GGUF = {"qwen2vl": gguf.GGUFMapping(_gguf_qwen2vl)}
