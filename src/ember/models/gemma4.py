"""Gemma 4 (text decoder): the Gemma decoder (sqrt(hidden) embedding scale, sandwich norms, GeGLU,
sliding and global layers with a rotary table each) with
- its own per-layer shapes: global layers have `global_head_dim` and, with `attention_k_eq_v`,
  `num_global_key_value_heads` heads whose values are the key projection (no v_proj); config.json
  gives them as `per_layer_config` ({layer: {head_dim, num_key_value_heads}}) or as those two keys;
- RMSNorm scaling by w (not Gemma's 1 + w), on q and k per head and weightless on v; attention
  scale 1; the global layers' "proportional" rotary (the first partial_rotary_factor of each
  half-head rotated);
- KV sharing: the last `num_kv_shared_layers` layers compute no keys or values of their own and
  attend over those of the last earlier layer of their type (their cache slots are empty);
- per-layer inputs (`hidden_size_per_layer_input`): an embedding of every token for every layer plus
  a projection of the embeddings, fed to each layer through a gate after its MLP;
- an optional MoE block beside the MLP (`enable_moe_block`): routed on the layer's input, run on it
  normalised, the two outputs normalised and summed; the router normalises its input, scales it, takes
  the softmax's renormalised top-k and scales each weight per expert;
- `layer_scalar`: each layer's output times a stored scalar; `use_double_wide_mlp`: twice the MLP
  width on the shared layers.

Checkpoints come as Gemma4ForCausalLM (model_type gemma4_text) or as the multimodal
Gemma4ForConditionalGeneration (model_type gemma4: text_config, weights under language_model);
its vision and audio towers are not loaded.

Reference: transformers/models/gemma4/modeling_gemma4.py, configuration_gemma4.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import layers as parallel
from ..errors import UnsupportedModelError
from ..nn import RMSNorm, SparseMoE, activation, apply_rotary, attention, linear, rotary_from_config
from ..nn.rope import rotate_half
from ..varbuilder import VarBuilder
from . import gemma, llama, multimodal
from .base import CausalLM, Step, tied_or_own_head

ROPE_DEFAULTS = {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                 "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                    "rope_theta": 1_000_000.0}}


@dataclass
class Config(gemma.Config):
    vocab_size: int = 262_144
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 30
    num_attention_heads: int = 8
    num_key_value_heads: int | None = 4
    head_dim: int | None = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 131_072
    sliding_window: int | None = 512
    global_head_dim: int = 512
    num_global_key_value_heads: int | None = None
    per_layer_config: dict | None = None
    attention_k_eq_v: bool = False
    num_kv_shared_layers: int = 0
    vocab_size_per_layer_input: int = 262_144
    hidden_size_per_layer_input: int | None = 256
    enable_moe_block: bool = False
    use_double_wide_mlp: bool = False
    num_experts: int | None = None
    top_k_experts: int | None = None
    moe_intermediate_size: int | None = None
    use_bidirectional_attention: str | bool | None = None
    sandwich_norms: bool = True

    def __post_init__(self):
        self.hidden_act = self.hidden_activation
        if self.use_bidirectional_attention == "vision":  # image tokens only: text attends causally
            self.use_bidirectional_attention = None
        super().__post_init__()
        n = self.num_hidden_layers
        if self.layer_types is None and isinstance(n, int) and 0 < n <= 1 << 16:
            self.layer_types = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n)]
        if self.layer_types:
            self.layer_types = [*self.layer_types[:-1], "full_attention"]  # as the reference: the last is global
        if self.per_layer_config is None and self.layer_types:
            over = {"head_dim": self.global_head_dim}
            if self.attention_k_eq_v and self.num_global_key_value_heads is not None:
                over["num_key_value_heads"] = self.num_global_key_value_heads
            self.per_layer_config = {str(i): over for i, t in enumerate(self.layer_types) if t == "full_attention"}

    def validate(self) -> None:
        super().validate()
        self._positive("global_head_dim", "num_global_key_value_heads", "vocab_size_per_layer_input", "num_experts",
                       "top_k_experts", "moe_intermediate_size")
        self._positive("num_kv_shared_layers", "hidden_size_per_layer_input", allow_zero=True)
        self._require(self.num_kv_shared_layers <= self.num_hidden_layers,
                      f"num_kv_shared_layers ({self.num_kv_shared_layers}) exceeds the layer count")
        if self.enable_moe_block:
            self._require(None not in (self.num_experts, self.top_k_experts, self.moe_intermediate_size),
                          "enable_moe_block needs num_experts, top_k_experts and moe_intermediate_size")
            self._require(self.top_k_experts <= self.num_experts,
                          f"top_k_experts ({self.top_k_experts}) exceeds num_experts ({self.num_experts})")
        self._require(isinstance(self.per_layer_config, dict), "per_layer_config must be an object")
        for i, over in self.per_layer_config.items():
            self._require(str(i).isdigit() and int(i) < self.num_hidden_layers and isinstance(over, dict),
                          f"per_layer_config entry {i!r:.20}: {over!r:.60} is not {{layer: {{...}}}}")
            bad = sorted(set(over) - {"head_dim", "num_key_value_heads"})
            self._require(not bad, f"per_layer_config sets {bad}; ember reads head_dim and num_key_value_heads")
            for k in ("head_dim", "num_key_value_heads"):
                v = over.get(k)
                self._require(v is None or (isinstance(v, int) and 0 < v <= 1 << 16),
                              f"per_layer_config[{i}].{k} must be a positive integer, got {v!r:.20}")
        for i in range(self.num_hidden_layers):
            H, KV = self.num_attention_heads, self.layer_shape(i)[0]
            self._require(H % KV == 0, f"layer {i}: {H} heads are not a multiple of {KV} key/value heads")
        shared = self.kv_sources()
        for i, src in enumerate(shared):
            self._require(src is not None, f"layer {i} shares the keys and values of an earlier "
                                           f"{self.layer_types[i]} layer, and there is none")
        self.rope_configs()

    def layer_shape(self, i: int) -> tuple[int, int]:
        """(kv_heads, head_dim) of layer i."""
        over = self.per_layer_config.get(str(i), {})
        return over.get("num_key_value_heads", self.num_key_value_heads), over.get("head_dim", self.head_dim)

    def kv_sources(self) -> list[int | None]:
        """The layer whose keys and values each layer uses: its own, or for the last
        num_kv_shared_layers layers, the last earlier unshared layer of the same type (None: none)."""
        first = self.num_hidden_layers - self.num_kv_shared_layers
        out = list(range(first))
        for i in range(first, self.num_hidden_layers):
            same = [j for j in range(first) if self.layer_types[j] == self.layer_types[i]]
            out.append(same[-1] if same else None)
        return out

    def rope_configs(self) -> dict[str, dict]:
        params = self.rope_parameters or {}
        self._require(all(t in gemma.LAYER_TYPES and isinstance(p, dict) for t, p in params.items()),
                      f"rope_parameters must map layer types to rope dicts, got {params!r:.80}")
        base = {k: v for k, v in self.raw.items() if k not in ("rope_parameters", "rope_scaling", "rope_theta",
                                                               "partial_rotary_factor")}
        return {t: {**base, "rope_parameters": dict(params.get(t) or d)} for t, d in ROPE_DEFAULTS.items()}


def prepare(d: dict) -> dict:
    """config.json → the text config dict (a multimodal config's text_config)."""
    return multimodal.text_config(d, tie_default=True)


def norm(dim: int, eps: float, vb: VarBuilder) -> RMSNorm:
    """Gemma 4's RMSNorm: scales by w (in float32)."""
    return RMSNorm.from_vb(dim, eps, vb, scale_in_float=True)


def plain_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma 4's weightless RMSNorm (values, the router's input), in float32."""
    return F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int, window: int | None, source: int):
        super().__init__()
        self.layer_idx, self.window, self.source = layer_idx, window, source
        self.eps = cfg.rms_norm_eps
        KV, D = cfg.layer_shape(layer_idx)
        H, E = cfg.num_attention_heads, cfg.hidden_size
        self.num_heads, self.head_dim = H, D
        self.shared = source != layer_idx
        self.num_kv_heads = 0 if self.shared else KV  # a shared layer keeps no cache of its own
        bias = cfg.attention_bias
        self.q_proj = linear(E, H * D, vb.pp("q_proj"), bias=bias)
        self.o_proj = linear(H * D, E, vb.pp("o_proj"), bias=bias)
        self.q_norm = norm(D, self.eps, vb.pp("q_norm"))
        if not self.shared:
            self.k_proj = linear(E, KV * D, vb.pp("k_proj"), bias=bias)
            # attention_k_eq_v: the global layers' values are their key projection
            k_eq_v = cfg.attention_k_eq_v and window is None
            self.v_proj = None if k_eq_v else linear(E, KV * D, vb.pp("v_proj"), bias=bias)
            self.k_norm = norm(D, self.eps, vb.pp("k_norm"))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step: Step, kv: dict) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.num_heads, self.head_dim)).transpose(1, 2)
        if self.shared:
            k, v = kv[self.source]
            c, s = cos.unsqueeze(1), sin.unsqueeze(1)
            q = q * c + rotate_half(q) * s
        else:
            k = self.k_proj(x).view(B, T, -1, self.head_dim)
            v = self.v_proj(x).view(B, T, -1, self.head_dim) if self.v_proj is not None else k
            k = self.k_norm(k).transpose(1, 2)
            v = plain_norm(v, self.eps).transpose(1, 2)
            q, k = apply_rotary(q, k, cos, sin)
            if step.cache is not None:
                k, v = step.cache.update(self.layer_idx, k, v, step.position_ids, step.kv_len, step.cache_rows,
                                         fresh=step.fresh)
            kv[self.layer_idx] = k, v
        o = attention(q, k, v, step.mask(self.window), scale=1.0)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class MoE(SparseMoE):
    """Gemma 4's router over stacked GeGLU experts: RMS-normalised input times `scale` and
    hidden ** -0.5, softmax, top-k renormalised, each weight times its expert's `per_expert_scale`."""

    def __init__(self, cfg: Config, vb: VarBuilder):
        E, H, F_ = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        super().__init__(vb.get((E, H), "router.proj.weight"), vb.get((E, 2 * F_, H), "experts.gate_up_proj"),
                         vb.get((E, H, F_), "experts.down_proj"), cfg.top_k_experts, True, activation(cfg.hidden_act))
        self.scale = nn.Parameter(vb.get((H,), "router.scale"), requires_grad=False)
        self.per_expert_scale = nn.Parameter(vb.get((E,), "router.per_expert_scale"), requires_grad=False)
        self.eps = cfg.rms_norm_eps

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = plain_norm(x, self.eps) * self.scale * self.hidden ** -0.5
        weights, idx = super().route(h)  # softmax, top-k, renormalised
        return weights * self.per_expert_scale[idx], idx


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int, window: int | None, source: int):
        super().__init__()
        E, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = Attention(cfg, vb.pp("self_attn"), layer_idx, window, source)
        wide = cfg.use_double_wide_mlp and source != layer_idx
        self.mlp = llama.MLP(cfg, vb.pp("mlp"), intermediate=cfg.intermediate_size * (2 if wide else 1))
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            setattr(self, name, norm(E, eps, vb.pp(name)))
        self.moe = MoE(cfg, vb) if cfg.enable_moe_block else None
        if self.moe is not None:
            self.post_feedforward_layernorm_1 = norm(E, eps, vb.pp("post_feedforward_layernorm_1"))
            self.pre_feedforward_layernorm_2 = norm(E, eps, vb.pp("pre_feedforward_layernorm_2"))
            self.post_feedforward_layernorm_2 = norm(E, eps, vb.pp("post_feedforward_layernorm_2"))
        self.per_layer = bool(cfg.hidden_size_per_layer_input)
        if self.per_layer:
            P = cfg.hidden_size_per_layer_input
            self.act = activation(cfg.hidden_act)
            self.per_layer_input_gate = linear(E, P, vb.pp("per_layer_input_gate"))
            self.per_layer_projection = linear(P, E, vb.pp("per_layer_projection"))
            self.post_per_layer_input_norm = norm(E, eps, vb.pp("post_per_layer_input_norm"))
        scalar = vb.get((1,), "layer_scalar") if vb.contains("layer_scalar") else torch.ones(1, device=vb.device)
        self.layer_scalar = nn.Parameter(scalar, requires_grad=False)

    def forward(self, x, cos, sin, step: Step, kv: dict, per_layer_input: torch.Tensor | None):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, step, kv))
        h = self.mlp(self.pre_feedforward_layernorm(x))
        if self.moe is not None:
            flat = x.reshape(-1, x.shape[-1])
            routed = self.moe.combine(self.pre_feedforward_layernorm_2(flat), *self.moe.route(flat))
            h = self.post_feedforward_layernorm_1(h) + self.post_feedforward_layernorm_2(routed.view(x.shape))
        x = x + self.post_feedforward_layernorm(h)
        if self.per_layer:
            h = self.per_layer_projection(self.act(self.per_layer_input_gate(x)) * per_layer_input)
            x = x + self.post_per_layer_input_norm(h)
        return x * self.layer_scalar


class Model(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder):
        super().__init__()
        if vb.tp is not None:
            raise UnsupportedModelError("Gemma 4 does not support tensor parallelism in ember yet")
        E = cfg.hidden_size
        self.embed_tokens = parallel.embedding(cfg.vocab_size, E, vb.pp("embed_tokens"))
        dtype = self.embed_tokens.weight.dtype
        self.embed_scale = float(torch.tensor(E ** 0.5).to(dtype))  # rounded to the weights' dtype, as the reference
        windows, sources = cfg.layer_windows(), cfg.kv_sources()
        self.layers = nn.ModuleList(DecoderLayer(cfg, vb.pp(f"layers.{i}"), i, windows[i], sources[i])
                                    for i in range(cfg.num_hidden_layers))
        self.norm = norm(E, cfg.rms_norm_eps, vb.pp("norm"))
        self.layer_rope = list(cfg.layer_types)
        dims: dict[str, int] = {}  # each layer type's head_dim sizes its rotary table
        for t, layer in zip(self.layer_rope, self.layers):
            d = dims.setdefault(t, layer.self_attn.head_dim)
            cfg._require(d == layer.self_attn.head_dim, f"{t} layers differ in head_dim ({d}, {layer.self_attn.head_dim})")
        self.rotaries = nn.ModuleDict({t: rotary_from_config(raw, dims[t], cfg.max_position_embeddings, device=vb.device)
                                       for t, raw in cfg.rope_configs().items() if t in dims})
        self.P = cfg.hidden_size_per_layer_input
        if self.P:
            L, P = cfg.num_hidden_layers, self.P
            self.embed_tokens_per_layer = parallel.embedding(cfg.vocab_size_per_layer_input, L * P,
                                                                   vb.pp("embed_tokens_per_layer"))
            self.per_layer_embed_scale = float(torch.tensor(P ** 0.5).to(dtype))
            self.per_layer_model_projection = linear(E, L * P, vb.pp("per_layer_model_projection"))
            self.per_layer_projection_norm = norm(P, cfg.rms_norm_eps, vb.pp("per_layer_projection_norm"))

    def per_layer_inputs(self, input_ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """[B, T, layers, P]: each token's per-layer embedding joined with a projection of x."""
        shape = (*input_ids.shape, len(self.layers), self.P)
        token = (self.embed_tokens_per_layer(input_ids) * self.per_layer_embed_scale).reshape(shape)
        proj = self.per_layer_projection_norm((self.per_layer_model_projection(x) * x.shape[-1] ** -0.5).reshape(shape))
        return (proj + token) * 2 ** -0.5

    def forward(self, input_ids: torch.Tensor, step: Step) -> torch.Tensor:
        x = self.embed_tokens(input_ids) * self.embed_scale
        per_layer = self.per_layer_inputs(input_ids, x) if self.P else None
        tables = {t: rotary(step.position_ids, x.dtype) for t, rotary in self.rotaries.items()}
        kv: dict = {}  # each unshared layer's keys and values in this forward, for the layers sharing them
        for i, (layer, t) in enumerate(zip(self.layers, self.layer_rope)):
            x = layer(x, *tables[t], step, kv, per_layer[:, :, i] if per_layer is not None else None)
        return self.norm(x)


class ForCausalLM(CausalLM):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        vb = multimodal.language_model(vb)
        self.config = cfg
        self.model = Model(cfg, vb.pp("model"))
        self.lm_head = tied_or_own_head(vb, cfg, self.model.embed_tokens.weight, cfg.hidden_size, cfg.vocab_size)
        self.final_logit_softcapping = cfg.final_logit_softcapping
