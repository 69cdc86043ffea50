"""Mamba-2 (state-spaces/mamba2, Mamba-Codestral): Mamba's outer structure (`ember.models.mamba`)
with the SSD mixer: a scalar decay per head, B and C shared by groups of heads, and a gated group
RMSNorm before out_proj.

The mixer: in_proj → (gate z, xBC, dt); xBC → causal depthwise conv → silu → (x, B, C);
dt = softplus(dt + dt_bias); the scan h = exp(dt A) h + dt x B^T per head, y = h C + D x;
norm(y * silu(z)) → out_proj. State per sequence: the conv's last K - 1 inputs and h [heads,
head_dim, N]. Prefill runs the chunked SSD scan from that state; decode one step of the recurrence
(which, as in the reference, does not clamp dt to time_step_limit).

`Mixer` is built from explicit sizes (`Dims`), so hybrids (Granite 4) reuse it with their own
config names.

Reference: transformers/models/mamba2/modeling_mamba2.py, configuration_mamba2.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import gguf_source as gguf
from ..config import ModelConfig
from ..errors import ConfigError
from ..nn import linear
from ..nn.ssm import CausalConv, GatedRMSNorm, padding_zeroed, read_state, ssd_scan, ssd_step, write_state
from ..varbuilder import VarBuilder
from . import mamba
from .base import Step


@dataclass
class Config(ModelConfig):
    vocab_size: int = 32768
    hidden_size: int = 4096
    num_heads: int = 128
    head_dim: int = 64
    state_size: int = 128
    num_hidden_layers: int = 64
    layer_norm_epsilon: float = 1e-5
    expand: int = 2
    conv_kernel: int = 4
    n_groups: int = 8
    use_bias: bool = False
    use_conv_bias: bool = True
    hidden_act: str = "silu"
    residual_in_fp32: bool = True
    time_step_limit: list | None = None  # [min, max] for dt in the chunked scan (None: no limit)
    chunk_size: int = 256
    tie_word_embeddings: bool = False
    pad_token_id: int | None = 1
    bos_token_id: int | list | None = 0
    eos_token_id: int | list | None = 2

    def validate(self) -> None:
        self._positive("vocab_size", "hidden_size", "num_heads", "head_dim", "state_size", "num_hidden_layers",
                       "layer_norm_epsilon", "expand", "conv_kernel", "n_groups", "chunk_size")
        self._require(self.expand * self.hidden_size == self.num_heads * self.head_dim,
                      f"hidden_size * expand ({self.expand * self.hidden_size}) must equal num_heads * head_dim "
                      f"({self.num_heads * self.head_dim})")
        self.dims().validate(self)

    def dims(self) -> "Dims":
        return Dims(self.hidden_size, self.num_heads, self.head_dim, self.state_size, self.n_groups,
                    self.conv_kernel, self.chunk_size, self.use_bias, self.use_conv_bias, self.hidden_act,
                    self.layer_norm_epsilon, _limit(self, self.time_step_limit))


def prepare(d: dict) -> dict:
    """config.json writes time_step_limit's open end as Infinity, which configs refuse as a number:
    an infinite bound becomes null (none)."""
    limit = d.get("time_step_limit")
    if isinstance(limit, (list, tuple)):
        d = {**d, "time_step_limit": [None if isinstance(v, float) and math.isinf(v) else v for v in map(_number, limit)]}
    return d


def _number(v):
    # transformers 5 writes non-finite floats as {"__float__": "Infinity"}
    if isinstance(v, dict) and set(v) == {"__float__"} and v["__float__"] in ("Infinity", "-Infinity"):
        return float(v["__float__"].replace("Infinity", "inf"))
    return v


def _limit(cfg: ModelConfig, limit) -> tuple[float, float] | None:
    """(min, max) to clamp dt to; None where no bound binds (softplus is never below 0)."""
    if limit is None:
        return None
    cfg._require(len(limit) == 2 and all(v is None or isinstance(v, (int, float)) and not isinstance(v, bool)
                                         for v in limit), f"time_step_limit must be [min, max], got {limit!r:.60}")
    lo = float(limit[0]) if limit[0] is not None else 0.0
    hi = float(limit[1]) if limit[1] is not None else math.inf
    cfg._require(lo <= hi, f"time_step_limit's min ({lo}) is above its max ({hi})")
    return None if lo <= 0.0 and math.isinf(hi) else (lo, hi)


@dataclass(frozen=True)
class Dims:
    """The mixer's sizes, whatever the family's config calls them."""

    hidden: int
    heads: int
    head_dim: int
    state: int
    groups: int
    conv_kernel: int
    chunk: int
    bias: bool
    conv_bias: bool
    act: str
    eps: float
    dt_limit: tuple[float, float] | None

    @property
    def inner(self) -> int:
        return self.heads * self.head_dim

    def validate(self, cfg: ModelConfig) -> None:
        cfg._require(self.heads % self.groups == 0,
                     f"the SSM heads ({self.heads}) must be a multiple of its groups ({self.groups})")
        cfg._require(self.inner % self.groups == 0,
                     f"the SSM width ({self.inner}) must be a multiple of its groups ({self.groups})")


class Mixer(nn.Module):
    def __init__(self, d: Dims, vb: VarBuilder, layer_idx: int, *, norm: bool = True, out_bias: bool | None = None):
        """norm=False: no gated norm (the gate multiplies; a hybrid's `gated` says how); out_bias: out_proj's
        bias when it differs from in_proj's (`d.bias`)."""
        super().__init__()
        self.d, self.layer_idx = d, layer_idx
        I, G, N = d.inner, d.groups, d.state
        self.conv_dim = I + 2 * G * N
        self.in_proj = linear(d.hidden, I + self.conv_dim + d.heads, vb.pp("in_proj"), bias=d.bias)
        self.conv1d = CausalConv(self.conv_dim, d.conv_kernel, vb.pp("conv1d"), d.conv_bias, d.act)
        self.dt_bias = nn.Parameter(vb.get((d.heads,), "dt_bias"), requires_grad=False)
        self.A_log = nn.Parameter(vb.get((d.heads,), "A_log"), requires_grad=False)
        self.D = nn.Parameter(vb.get((d.heads,), "D"), requires_grad=False)
        self.norm = GatedRMSNorm(I, G, d.eps, vb.pp("norm")) if norm else None
        self.out_proj = linear(I, d.hidden, vb.pp("out_proj"), bias=d.bias if out_bias is None else out_bias)

    def state_spec(self):
        """The conv window (the cache's dtype) and the SSM state h [heads, head_dim, N] (float32)."""
        d = self.d
        return ((self.conv1d.state_shape(), None), ((d.heads, d.head_dim, d.state), torch.float32))

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        d = self.d
        B, T, _ = x.shape
        mask = step.attention_mask
        conv_state, ssm_state = read_state(step, self.layer_idx, B) or (None, None)
        gate, xbc, dt = self.project(padding_zeroed(x, mask)).split([d.inner, self.conv_dim, d.heads], dim=-1)
        xbc, conv_state = self.conv1d(xbc.transpose(1, 2), conv_state)
        xbc = padding_zeroed(xbc.transpose(1, 2), mask)
        h, Bm, Cm = xbc.split([d.inner, d.groups * d.state, d.groups * d.state], dim=-1)
        h = h.reshape(B, T, d.heads, d.head_dim)
        Bm, Cm = Bm.reshape(B, T, d.groups, d.state), Cm.reshape(B, T, d.groups, d.state)
        dt = F.softplus(dt.float() + self.dt_bias.float())
        A = -torch.exp(self.A_log.float())
        if step.cache is not None and T == 1:
            y, ssm_state = ssd_step(h[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0], ssm_state)
            y = y[:, None]
        else:
            if d.dt_limit is not None:
                dt = dt.clamp(*d.dt_limit)
            y, ssm_state = ssd_scan(h, dt, A, Bm, Cm, d.chunk, ssm_state)
        write_state(step, self.layer_idx, B, conv_state, ssm_state)
        y = y + h.float() * self.D.float()[:, None]
        return self.out_proj(self.gated(y.reshape(B, T, d.inner), gate).to(x.dtype))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """in_proj: (gate z, xBC, dt) in one tensor (a hybrid may scale them, Falcon-H1)."""
        return self.in_proj(x)

    def gated(self, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """The scan's output with the gate applied: the gated group RMSNorm."""
        return self.norm(y, gate)


class Block(mamba.Block):
    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int):
        super().__init__(cfg, vb, layer_idx, mixer_cls=lambda c, v, i: Mixer(c.dims(), v, i))


class Backbone(mamba.Backbone):
    def __init__(self, cfg: Config, vb: VarBuilder):
        super().__init__(cfg, vb, block_cls=Block)


class ForCausalLM(mamba.ForCausalLM):
    backbone_cls = Backbone


# ---- GGUF (llama.cpp's mamba2; granitehybrid and nemotron_h reuse the mixer's tables) -------------
def ssm_dims(meta: gguf.Meta) -> dict:
    """The Mamba-2 mixer's sizes from llama.cpp's ssm.* keys (time_step_rank is the head count)."""
    inner, heads = meta.need("ssm.inner_size"), meta.need("ssm.time_step_rank")
    if heads <= 0 or inner % heads:
        raise ConfigError(f"{meta.f.path}: ssm.inner_size ({inner}) does not split into ssm.time_step_rank "
                          f"({heads}) heads")
    return {"heads": heads, "head_dim": inner // heads, "inner": inner, "state": meta.need("ssm.state_size"),
            "groups": meta.need("ssm.group_count"), "conv": meta.need("ssm.conv_kernel")}


def _gguf_mamba2(meta: gguf.Meta) -> dict:
    d, hidden = ssm_dims(meta), meta.need("embedding_length")
    if d["inner"] % hidden:
        raise ConfigError(f"{meta.f.path}: ssm.inner_size ({d['inner']}) is not a multiple of embedding_length ({hidden})")
    return {"model_type": "mamba2", "vocab_size": gguf.vocab_size(meta), "hidden_size": hidden,
            "num_hidden_layers": gguf.layer_count(meta), "num_heads": d["heads"], "head_dim": d["head_dim"],
            "expand": d["inner"] // hidden, "state_size": d["state"], "n_groups": d["groups"],
            "conv_kernel": d["conv"], "layer_norm_epsilon": float(meta.get("attention.layer_norm_rms_epsilon", 1e-5,
                                                                            kind=(int, float))),
            "use_conv_bias": "blk.0.ssm_conv1d.bias" in meta.names, "use_bias": "blk.0.ssm_in.bias" in meta.names,
            "tie_word_embeddings": "output.weight" not in meta.names, **gguf.token_ids(meta.m)}


def mixer_gguf(prefix: str) -> tuple[dict, tuple]:
    """The mixer's plain tensors (layer table entries) and the ones llama.cpp reshaped or transformed
    (Derived): the conv's [C, K] weight, A stored as -exp(A_log) [H, 1], D as [H, 1] and the group
    norm as [G, I / G]."""
    table = {"ssm_in": f"{prefix}.in_proj", "ssm_out": f"{prefix}.out_proj", "ssm_conv1d.bias": f"{prefix}.conv1d.bias",
             "ssm_dt.bias": f"{prefix}.dt_bias"}
    derived = (gguf.Derived(f"{prefix}.conv1d.weight", ("ssm_conv1d.weight",), lambda p, cfg: p[0].unsqueeze(1)),
               gguf.Derived(f"{prefix}.A_log", ("ssm_a",), lambda p, cfg: torch.log(-p[0].reshape(-1))),
               gguf.Derived(f"{prefix}.D", ("ssm_d",), lambda p, cfg: p[0].reshape(-1)),
               gguf.Derived(f"{prefix}.norm.weight", ("ssm_norm.weight",), lambda p, cfg: p[0].reshape(-1)))
    return table, derived


_TABLE, _DERIVED = mixer_gguf("mixer")
GGUF = {"mamba2": gguf.GGUFMapping(_gguf_mamba2, top={"token_embd": "backbone.embeddings", "output_norm": "backbone.norm_f",
                                                      "output": "lm_head"},
                                   layer={"attn_norm": "norm", **_TABLE}, layers_prefix="backbone.layers",
                                   derived=_DERIVED)}
