"""Mamba (state-spaces/mamba, Falcon-Mamba's ancestor): no attention; every layer is a selective
state-space mixer behind an RMSNorm, on a residual stream kept in float32.

The mixer: in_proj → (x, z); x → causal depthwise conv → silu → x_proj → (dt_rank, B, C);
dt = softplus(dt_proj(dt_rank)); the selective scan h_t = exp(dt A) h + dt B x, y = C h + D x;
y * silu(z) → out_proj. Its state per sequence is the conv's last K - 1 inputs and h [I, N]
(`ember.nn.state_cache.StateCache`); prefill scans the chunk step by step from that state, decode
is one step of the same recurrence.

Reference: transformers/models/mamba/modeling_mamba.py, configuration_mamba.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..nn import Embedding, RMSNorm, linear
from ..nn.ssm import CausalConv, padding_zeroed, read_state, selective_scan, write_state
from ..varbuilder import VarBuilder
from .base import CausalLM, Step, tied_or_own_head


@dataclass
class Config(ModelConfig):
    vocab_size: int = 50280
    hidden_size: int = 768
    state_size: int = 16
    num_hidden_layers: int = 32
    layer_norm_epsilon: float = 1e-5
    expand: int = 2
    conv_kernel: int = 4
    use_bias: bool = False
    use_conv_bias: bool = True
    hidden_act: str = "silu"
    residual_in_fp32: bool = True
    time_step_rank: int | str = "auto"  # "auto": ceil(hidden_size / 16)
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | list | None = 0
    eos_token_id: int | list | None = 0

    def __post_init__(self):
        if self.time_step_rank == "auto":
            self.time_step_rank = math.ceil(self.hidden_size / 16)

    @property
    def intermediate_size(self) -> int:  # transformers derives it, whatever config.json says
        return self.expand * self.hidden_size

    def validate(self) -> None:
        self._require(isinstance(self.time_step_rank, int), f"time_step_rank must be an integer or \"auto\", "
                      f"got {self.time_step_rank!r:.40}")
        self._positive("vocab_size", "hidden_size", "state_size", "num_hidden_layers", "layer_norm_epsilon",
                       "expand", "conv_kernel", "time_step_rank")


class Mixer(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int):
        super().__init__()
        H, I, N, R = cfg.hidden_size, cfg.intermediate_size, cfg.state_size, cfg.time_step_rank
        self.layer_idx, self.sizes = layer_idx, (R, N, N)
        self.in_proj = linear(H, 2 * I, vb.pp("in_proj"), bias=cfg.use_bias)
        self.conv1d = CausalConv(I, cfg.conv_kernel, vb.pp("conv1d"), cfg.use_conv_bias, cfg.hidden_act)
        self.x_proj = linear(I, R + 2 * N, vb.pp("x_proj"))
        self.dt_proj = linear(R, I, vb.pp("dt_proj"), bias=True)
        self.A_log = nn.Parameter(vb.get((I, N), "A_log"), requires_grad=False)
        self.D = nn.Parameter(vb.get((I,), "D"), requires_grad=False)
        self.out_proj = linear(I, H, vb.pp("out_proj"), bias=cfg.use_bias)

    def state_spec(self):
        """The conv window (the cache's dtype) and the SSM state h [I, N] (float32)."""
        return ((self.conv1d.state_shape(), None), (tuple(self.A_log.shape), torch.float32))

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        B, T, _ = x.shape
        mask = step.attention_mask
        conv_state, ssm_state = read_state(step, self.layer_idx, B) or (None, None)
        h, z = self.in_proj(padding_zeroed(x, mask)).chunk(2, dim=-1)
        h, conv_state = self.conv1d(h.transpose(1, 2), conv_state)
        h = padding_zeroed(h.transpose(1, 2), mask)  # [B, T, I]
        dt, Bm, Cm = self.x_proj(h).split(self.sizes, dim=-1)
        dt = F.softplus(self.dt_proj(dt).float())
        y, ssm_state = selective_scan(h, dt, -torch.exp(self.A_log.float()), Bm, Cm, ssm_state)
        write_state(step, self.layer_idx, B, conv_state, ssm_state)
        y = (y + h.float() * self.D.float()) * F.silu(z.float())
        return self.out_proj(y.to(x.dtype))


class Block(nn.Module):
    """x + mixer(norm(x)), the residual in float32 when residual_in_fp32."""

    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int, mixer_cls=Mixer):
        super().__init__()
        self.norm = RMSNorm.from_vb(cfg.hidden_size, cfg.layer_norm_epsilon, vb.pp("norm"))
        self.mixer = mixer_cls(cfg, vb.pp("mixer"), layer_idx)
        self.residual_in_fp32 = cfg.residual_in_fp32

    def state_spec(self):
        return self.mixer.state_spec()

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        residual = x.float() if self.residual_in_fp32 else x
        return residual + self.mixer(self.norm(x.to(self.norm.weight.dtype)), step)


class Backbone(nn.Module):
    """Embeddings → blocks → final RMSNorm (applied to the float32 stream, then cast back)."""

    def __init__(self, cfg: Config, vb: VarBuilder, block_cls=Block):
        super().__init__()
        # the original state-spaces checkpoints name it `embedding` (transformers' load hook renames it)
        name = "embeddings" if vb.contains("embeddings.weight") or not vb.contains("embedding.weight") else "embedding"
        self.embeddings = Embedding.from_vb(cfg.vocab_size, cfg.hidden_size, vb.pp(name))
        self.layers = nn.ModuleList(block_cls(cfg, vb.pp(f"layers.{i}"), i) for i in range(cfg.num_hidden_layers))
        self.norm_f = RMSNorm.from_vb(cfg.hidden_size, cfg.layer_norm_epsilon, vb.pp("norm_f"), scale_in_float=True)

    def forward(self, input_ids: torch.Tensor, step: Step) -> torch.Tensor:
        x = self.embeddings(input_ids)
        dtype = x.dtype
        for layer in self.layers:
            x = layer(x, step)
        return self.norm_f(x).to(dtype)


class ForCausalLM(CausalLM):
    backbone_cls = Backbone

    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        self.config = cfg
        self.model = self.backbone_cls(cfg, vb.pp("backbone"))
        self.lm_head = tied_or_own_head(vb, cfg, self.model.embeddings.weight, cfg.hidden_size, cfg.vocab_size)
