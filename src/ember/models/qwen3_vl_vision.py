"""Qwen3-VL's vision tower (Qwen3VLVisionModel): images of any size as grids of patches.

Reference: transformers/models/qwen3_vl/modeling_qwen3_vl.py (and transformers/vision_utils.py).
The processor (Qwen2VLImageProcessor) cuts each image into patch_size x patch_size patches, each
repeated temporal_patch_size times (an image is a one-frame video), and lists them in merge-block
order: the spatial_merge_size^2 patches that merge into one text token come one after another.

    x = patch_embed(pixels)                     # the Conv3d, a linear map of each flattened patch
      + pos_embed resampled (bilinear, align_corners) from its square grid to the image's grid
    blocks: LayerNorm → attention (2-D rotary over rows and columns, full over each image) → + ;
            LayerNorm → GELU MLP → +
    merger(x): LayerNorm → the m^2 patches of a block concatenated → fc1 → GELU → fc2 (text width)
    deepstack: the states after the blocks in deepstack_visual_indexes, each through its own merger
               (LayerNorm after the concatenation); Qwen3-VL adds them to the first decoder layers.

Weights: `visual.*` under the checkpoint's model prefix (model.visual.* as transformers saves it).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError, GenerationError
from ..nn import LayerNorm, activation, linear
from ..nn.rope import rotate_half
from ..varbuilder import VarBuilder

# Past these a config is not a real model's (a hostile one cannot size an allocation).
MAX_PATCH = 1024
MAX_POSITIONS = 1 << 20


@dataclass
class VisionConfig(ModelConfig):
    """vision_config of a Qwen3-VL config.json (transformers' Qwen3VLVisionConfig defaults)."""

    depth: int = 27
    hidden_size: int = 1152
    hidden_act: str = "gelu_pytorch_tanh"
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    out_hidden_size: int = 3584
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: list = field(default_factory=lambda: [8, 16, 24])
    rope_parameters: dict | None = None

    def validate(self) -> None:
        self._positive("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
                       "spatial_merge_size", "temporal_patch_size", "out_hidden_size", "num_position_embeddings")
        self._require(self.patch_size <= MAX_PATCH and self.temporal_patch_size <= 16 and self.spatial_merge_size <= 16,
                      f"vision_config: patch_size {self.patch_size}, temporal_patch_size {self.temporal_patch_size} "
                      f"or spatial_merge_size {self.spatial_merge_size} is not a real model's")
        self._require(self.num_position_embeddings <= MAX_POSITIONS,
                      f"vision_config: num_position_embeddings {self.num_position_embeddings} is too large")
        side = int(self.num_position_embeddings ** 0.5)
        self._require(side * side == self.num_position_embeddings,
                      f"vision_config: num_position_embeddings ({self.num_position_embeddings}) must be a square")
        self._require(self.hidden_size % self.num_heads == 0 and (self.hidden_size // self.num_heads) % 4 == 0,
                      f"vision_config: hidden_size ({self.hidden_size}) must split into num_heads ({self.num_heads}) "
                      f"heads whose size is a multiple of 4")
        idx = self.deepstack_visual_indexes
        self._require(all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.depth for i in idx)
                      and len(set(idx)) == len(idx),
                      f"vision_config: deepstack_visual_indexes must be distinct block indexes in [0, {self.depth}), "
                      f"got {idx!r:.80}")
        activation(self.hidden_act)
        self.rope_theta  # noqa: B018 - checks rope_parameters

    @property
    def rope_theta(self) -> float:
        p = self.rope_parameters or {}
        theta = p.get("rope_theta", 10000.0)
        if p.get("rope_type", "axial") not in ("axial", "default") or not isinstance(theta, (int, float)) \
                or isinstance(theta, bool) or not theta > 0:
            raise ConfigError(f"vision_config: rope_parameters must be axial with a positive rope_theta, got {p!r:.80}")
        return float(theta)

    @property
    def patch_dim(self) -> int:
        """The length of one flattened patch: channels x frames x rows x columns."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


def check_grids(grid_thw: torch.Tensor, n_patches: int, merge: int) -> list[tuple[int, int, int]]:
    """The (t, h, w) patch grid of each image, checked against the patches given."""
    if grid_thw.ndim != 2 or grid_thw.shape[1] != 3:
        raise GenerationError(f"image_grid_thw must be [images, 3], got {list(grid_thw.shape)}")
    grids = [tuple(int(v) for v in g) for g in grid_thw.tolist()]
    if any(t < 1 or h < 1 or w < 1 or h % merge or w % merge for t, h, w in grids):
        raise GenerationError(f"image_grid_thw: every grid needs positive sides that are multiples of {merge}, "
                              f"got {grids[:4]}")
    if sum(t * h * w for t, h, w in grids) != n_patches:
        raise GenerationError(f"image_grid_thw counts {sum(t * h * w for t, h, w in grids)} patches but "
                              f"pixel_values holds {n_patches}")
    return grids


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig, vb: VarBuilder):
        super().__init__()
        E = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, E // cfg.num_heads
        self.qkv = linear(E, 3 * E, vb.pp("qkv"), bias=True)
        self.proj = linear(E, E, vb.pp("proj"), bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        N = x.shape[0]
        q, k, v = self.qkv(x).view(N, 3, self.num_heads, self.head_dim).unbind(1)
        # rotary in float32, as the reference
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        q = (q.float() * c + rotate_half(q.float()) * s).to(x.dtype)
        k = (k.float() * c + rotate_half(k.float()) * s).to(x.dtype)
        out = [F.scaled_dot_product_attention(qi.transpose(0, 1), ki.transpose(0, 1), vi.transpose(0, 1))
               .transpose(0, 1) for qi, ki, vi in zip(q.split(lengths), k.split(lengths), v.split(lengths))]
        return self.proj(torch.cat(out).reshape(N, -1))


class MLP(nn.Module):
    def __init__(self, E: int, inner: int, act: str, vb: VarBuilder):
        super().__init__()
        self.linear_fc1 = linear(E, inner, vb.pp("linear_fc1"), bias=True)
        self.act = activation(act)
        self.linear_fc2 = linear(inner, E, vb.pp("linear_fc2"), bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig, vb: VarBuilder):
        super().__init__()
        self.norm1 = LayerNorm.from_vb(cfg.hidden_size, 1e-6, vb.pp("norm1"))
        self.norm2 = LayerNorm.from_vb(cfg.hidden_size, 1e-6, vb.pp("norm2"))
        self.attn = Attention(cfg, vb.pp("attn"))
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, vb.pp("mlp"))

    def forward(self, x, cos, sin, lengths):
        x = x + self.attn(self.norm1(x), cos, sin, lengths)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """The m x m patches of a merge block → one token of the text model's width. The final merger
    norms each patch before concatenating them; the deepstack ones norm the concatenation."""

    def __init__(self, cfg: VisionConfig, vb: VarBuilder, postshuffle_norm: bool):
        super().__init__()
        self.width = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.postshuffle_norm = postshuffle_norm
        self.norm = LayerNorm.from_vb(self.width if postshuffle_norm else cfg.hidden_size, 1e-6, vb.pp("norm"))
        self.linear_fc1 = linear(self.width, self.width, vb.pp("linear_fc1"), bias=True)
        self.linear_fc2 = linear(self.width, cfg.out_hidden_size, vb.pp("linear_fc2"), bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.reshape(-1, self.width)) if self.postshuffle_norm else self.norm(x).reshape(-1, self.width)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class VisionModel(nn.Module):
    def __init__(self, cfg: VisionConfig, vb: VarBuilder):
        super().__init__()
        self.config = cfg
        E = cfg.hidden_size
        # the Conv3d's kernel equals its stride and its input is one patch: a linear map of the patch
        w = vb.get((E, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size),
                   "patch_embed.proj.weight")
        self.patch_weight = nn.Parameter(w.reshape(E, -1), requires_grad=False)
        self.patch_bias = nn.Parameter(vb.get((E,), "patch_embed.proj.bias"), requires_grad=False)
        self.side = int(cfg.num_position_embeddings ** 0.5)
        self.pos_embed = nn.Parameter(vb.get((cfg.num_position_embeddings, E), "pos_embed.weight"),
                                      requires_grad=False)
        D = E // cfg.num_heads
        self.register_buffer("inv_freq", 1.0 / cfg.rope_theta ** (torch.arange(0, D // 2, 2, dtype=torch.float)
                                                                  / (D // 2)), persistent=False)
        self.blocks = nn.ModuleList(Block(cfg, vb.pp(f"blocks.{i}")) for i in range(cfg.depth))
        self.merger = PatchMerger(cfg, vb.pp("merger"), postshuffle_norm=False)
        self.deepstack_visual_indexes = list(cfg.deepstack_visual_indexes)
        self.deepstack_merger_list = nn.ModuleList(
            PatchMerger(cfg, vb.pp(f"deepstack_merger_list.{i}"), postshuffle_norm=True)
            for i in range(len(self.deepstack_visual_indexes)))

    def _merge_order(self, a: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """[h, w, ...] in raster order → [h * w, ...] in merge-block order (the processor's)."""
        m = self.config.spatial_merge_size
        a = a.reshape(h // m, m, w // m, m, *a.shape[2:]).transpose(1, 2)
        return a.reshape(h * w, *a.shape[4:])

    def position_embeddings(self, grids: list[tuple[int, int, int]], dtype: torch.dtype) -> torch.Tensor:
        """The learned square grid resampled to each image's grid (bilinear, corners aligned)."""
        table = self.pos_embed.float().T.reshape(1, -1, self.side, self.side)
        out = []
        for t, h, w in grids:
            p = F.interpolate(table, size=(h, w), mode="bilinear", align_corners=True)[0].permute(1, 2, 0)
            out.append(self._merge_order(p, h, w).repeat(t, 1))
        return torch.cat(out).to(dtype)

    def rotary(self, grids: list[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [patches, head_dim] of the 2-D rotary: the first quarter of the frequencies
        turns with the patch's row, the second with its column (then repeated, rotate-half style)."""
        dev = self.inv_freq.device
        pos = []
        for t, h, w in grids:
            rows = torch.arange(h, device=dev)[:, None].expand(h, w)
            cols = torch.arange(w, device=dev)[None, :].expand(h, w)
            pos.append(self._merge_order(torch.stack([rows, cols], -1), h, w).repeat(t, 1))
        freqs = (torch.cat(pos)[..., None].float() * self.inv_freq).flatten(1)  # [N, 2 * D/4]: rows, then cols
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """pixel_values [patches, channels * frames * patch^2] (the processor's), grid_thw [images, 3]
        → (image tokens [patches / merge^2, out_hidden_size], the deepstack features, each alike)."""
        cfg = self.config
        if pixel_values.ndim != 2 or pixel_values.shape[1] != cfg.patch_dim:
            raise GenerationError(f"pixel_values must be [patches, {cfg.patch_dim}], got {list(pixel_values.shape)}")
        grids = check_grids(grid_thw, pixel_values.shape[0], cfg.spatial_merge_size)
        x = F.linear(pixel_values.to(self.patch_weight.dtype), self.patch_weight, self.patch_bias)
        x = x + self.position_embeddings(grids, x.dtype)
        cos, sin = self.rotary(grids)
        lengths = [h * w for t, h, w in grids for _ in range(t)]  # attention within each frame
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, lengths)
            if i in self.deepstack_visual_indexes:
                deepstack.append(self.deepstack_merger_list[self.deepstack_visual_indexes.index(i)](x))
        return self.merger(x), deepstack
