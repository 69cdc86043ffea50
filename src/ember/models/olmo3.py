"""OLMo 3: OLMo 2's layers (norms after attention and MLP, RMSNorm over the whole q and k
projections) with sliding-window layers (by default three sliding to one full, `layer_types`) and a
rotary table per layer type: `rope_parameters` nested by layer type, or old-style `rope_theta`
(default 5e5) + `rope_scaling`, the scaling applying to the full-attention layers only.

transformers reads an old-style config's `rope_theta` into the full layers' table only (the sliding
ones get the 5e5 default); ember gives both the configured theta. Released checkpoints use 5e5, so
the two agree on them.

Reference: transformers/models/olmo3/modeling_olmo3.py, configuration_olmo3.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..nn import rotary_from_config
from ..varbuilder import VarBuilder
from . import llama, olmo2
from .base import CausalLM, Step, tied_or_own_head

LAYER_TYPES = ("sliding_attention", "full_attention")
DEFAULT_THETA = 500_000.0


@dataclass
class Config(olmo2.Config):
    sliding_window: int | None = 4096

    def __post_init__(self):
        super().__post_init__()
        n = self.num_hidden_layers
        if self.layer_types is None and isinstance(n, int) and 0 <= n <= 1 << 16:
            self.layer_types = ["sliding_attention" if (i + 1) % 4 else "full_attention" for i in range(n)]

    def validate(self) -> None:
        super().validate()
        bad = sorted({str(t) for t in self.layer_types if t not in LAYER_TYPES})
        self._require(not bad, f"unsupported layer_types {bad}; supported: {', '.join(LAYER_TYPES)}")

    def rope_configs(self) -> dict[str, dict]:
        """The config dict of each layer type's rotary table."""
        p = self.rope_parameters or {}
        theta = self.rope_theta if self.rope_theta is not None else DEFAULT_THETA
        if any(t in p for t in LAYER_TYPES):
            tables = {t: dict(p.get(t) or {}) for t in LAYER_TYPES}
        else:  # old style: the scaling is the full-attention layers'
            tables = {"full_attention": dict(p or self.rope_scaling or {}), "sliding_attention": {}}
        base = {k: v for k, v in self.raw.items() if k not in ("rope_parameters", "rope_scaling", "rope_theta")}
        return {t: {**base, "rope_parameters": {"rope_theta": theta, **params}} for t, params in tables.items()}


class Model(llama.Model):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__(cfg, vb, fuse, layer_cls=olmo2.DecoderLayer, norm_kw=olmo2.NORM)
        self.rotaries = nn.ModuleDict({t: rotary_from_config(raw, cfg.head_dim, cfg.max_position_embeddings,
                                                             device=vb.device)
                                       for t, raw in cfg.rope_configs().items()})
        self.rotary = self.rotaries["full_attention"]
        self.layer_types = list(cfg.layer_types)

    def forward(self, input_ids: torch.Tensor, step: Step) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        tables = {t: rotary(step.position_ids, x.dtype) for t, rotary in self.rotaries.items()}
        for layer, t in zip(self.layers, self.layer_types):
            x = layer(x, *tables[t], step)
        return self.norm(x)


class ForCausalLM(CausalLM):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        self.config = cfg
        self.model = Model(cfg, vb.pp("model"), fuse)
        self.lm_head = tied_or_own_head(vb, cfg, self.model.embed_tokens.weight, cfg.hidden_size, cfg.vocab_size)
