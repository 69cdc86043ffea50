"""Llama and the families that are Llama with flags: Mistral (sliding window), Qwen2 (q/k/v bias),
Qwen3 (q/k RMSNorm, explicit head_dim), Phi-3 (q/k/v and gate/up stored fused, partial rotary,
longrope), Granite (embedding / residual / attention / logits multipliers).

Reference: transformers/models/llama/modeling_llama.py (and mistral, qwen2, qwen3, phi3, granite).
Module and weight names are the checkpoint's own: model.layers.N.self_attn.q_proj, mlp.gate_proj, ...
The blocks take options (attention scale, soft-capping, q/k norm placement) that other families'
modules (Gemma, OLMo 2) pass when they reuse them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import gguf_source as gguf
from ..config import DecoderConfig, ModelConfig
from ..distributed import layers as parallel
from ..errors import DistributedError
from ..nn import (FusedLinears, RMSNorm, activation, apply_rotary, apply_rotary_bthd, apply_rotary_interleaved,
                  attention, linear, ops, rotary_from_config)
from ..varbuilder import VarBuilder
from .base import CausalLM, Step, tied_or_own_head


@dataclass
class Config(DecoderConfig):
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float | None = None
    rope_scaling: dict | None = None
    rope_parameters: dict | None = None
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    max_window_layers: int | None = None
    layer_types: list | None = None
    bos_token_id: int | list | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    # Granite's multipliers (config.json keys; the Llama values leave the computation unchanged)
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None  # the attention scale; None = head_dim ** -0.5
    logits_scaling: float = 1.0  # logits are divided by it

    def validate(self) -> None:
        super().validate()
        self._positive("intermediate_size", "sliding_window")
        self._positive("rms_norm_eps", allow_zero=True)
        self._positive("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling")
        if self.layer_types is not None:
            self._require(len(self.layer_types) == self.num_hidden_layers,
                          f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        check_partial_rotary(self)
        activation(self.hidden_act)

    def layer_windows(self) -> list[int | None]:
        """The sliding window of each layer (None = full attention)."""
        n, w = self.num_hidden_layers, self.sliding_window
        if w is None:
            return [None] * n
        if self.layer_types is not None:
            return [w if t == "sliding_attention" else None for t in self.layer_types]
        if self.max_window_layers is not None:  # Qwen2/3: sliding from layer max_window_layers on
            return [w if i >= self.max_window_layers else None for i in range(n)]
        return [w] * n  # Mistral: every layer


def projections(in_features: int, parts: dict[str, tuple[int, VarBuilder]], vb: VarBuilder, fused_name: str,
                bias: bool | None = False, fuse: bool = True, split: list | None = None) -> FusedLinears:
    """The Linears `parts` as one FusedLinears, or, when the checkpoint already stores them fused as
    `fused_name` (Phi-3's qkv_proj and gate_up_proj), that tensor split in the same order.
    split: a tensor-parallel rank's row ranges of each part, in order (column-parallel)."""
    sizes = [n for n, _ in parts.values()]
    if vb.contains(f"{fused_name}.weight"):
        if split is None:
            return FusedLinears.from_fused(in_features, sizes, vb.pp(fused_name), bias=bias)
        rows = parallel.fused_ranges(sizes, split)
        return FusedLinears.from_fused(in_features, sizes, vb.pp(fused_name).sharded(0, rows), bias=bias,
                                       split=[sum(b - a for a, b in r) for r in split])
    if split is not None:
        parts = {name: (n, p.sharded(0, r)) for (name, (n, p)), r in zip(parts.items(), split)}
    return FusedLinears(in_features, parts, bias=bias, fuse=fuse)


def check_partial_rotary(cfg: ModelConfig) -> None:
    """partial_rotary_factor (top level or in the rope dict) must be in (0, 1]."""
    rope = cfg.raw.get("rope_parameters") or cfg.raw.get("rope_scaling")
    for f in (cfg.raw.get("partial_rotary_factor"), rope.get("partial_rotary_factor") if isinstance(rope, dict) else None):
        if f is not None:
            cfg._require(isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f <= 1,
                         f"partial_rotary_factor must be in (0, 1], got {f!r}")


class Attention(nn.Module):
    """Self-attention with rotary positions and a KV cache.

    Options for the families that reuse it: `scale` (default head_dim ** -0.5), `softcap` (tanh
    soft-capping of the scores, Gemma 2), `qk_norm`: "head" normalises each head of q and k (Qwen3,
    Gemma 3), "full" the whole q and k projections (OLMo 2), with `norm_kw` for the RMSNorm variant;
    `rotary=False`: no positional rotation (SmolLM3's NoPE layers; cos/sin are ignored);
    `interleaved=True`: rotation of adjacent pairs rather than halves (GLM-4, Cohere, Llama 4);
    `qk_norm="l2"`: weightless RMS normalisation of each head of q and k after the rotation (Llama 4);
    `temperature=(beta, floor, offset)`: queries scaled by 1 + beta * log(1 + floor((pos + offset) /
    floor)), growing with the position (Llama 4's NoPE layers, Ministral 3);
    `chunk=C`: attention within chunks of C positions only (Llama 4's chunked layers).
    """

    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int, window: int | None, fuse: bool = True, *,
                 scale: float | None = None, softcap: float | None = None, qk_norm: str | None = None,
                 norm_kw: dict | None = None, rotary: bool = True, interleaved: bool = False,
                 temperature: tuple[float, float, float] | None = None, chunk: int | None = None):
        super().__init__()
        self.layer_idx, self.window, self.rotary, self.interleaved = layer_idx, window, rotary, interleaved
        self.temperature, self.chunk = temperature, chunk
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale, self.softcap = scale, softcap
        H, KV, D, E = self.num_heads, self.num_kv_heads, self.head_dim, cfg.hidden_size
        self.qk_norm = qk_norm if qk_norm is not None else ("head" if cfg.qk_norm else None)
        if self.qk_norm not in (None, "head", "full", "l2"):
            raise ValueError(f"qk_norm must be None, 'head', 'full' or 'l2', got {self.qk_norm!r}")
        qkv_bias = cfg.attention_bias or cfg.qkv_bias
        o, split = vb.pp("o_proj"), None
        if vb.tp is not None:  # tensor parallel: this rank's heads; q/k/v column-, o row-parallel
            if self.qk_norm == "full":
                raise DistributedError("attention that normalises the whole q/k projections (OLMo 2) cannot be "
                                       "split over heads for tensor parallelism")
            heads = vb.tp.attention(H, KV, D)
            self.num_heads, self.num_kv_heads = heads.heads, heads.kv_heads
            split, o = [heads.q, heads.kv, heads.kv], o.sharded(1, heads.q)
        self.qkv = projections(E, {"q_proj": (H * D, vb.pp("q_proj")), "k_proj": (KV * D, vb.pp("k_proj")),
                                   "v_proj": (KV * D, vb.pp("v_proj"))}, vb, "qkv_proj", bias=qkv_bias, fuse=fuse,
                               split=split)
        self.o_proj = parallel.row_parallel(linear(H * D, E, o, bias=cfg.attention_bias), vb.tp)
        self.q_norm = self.k_norm = None
        if self.qk_norm == "l2":  # weightless
            self.eps = cfg.rms_norm_eps
        elif self.qk_norm is not None:
            q_dim, k_dim = (D, D) if self.qk_norm == "head" else (H * D, KV * D)
            self.q_norm = RMSNorm.from_vb(q_dim, cfg.rms_norm_eps, vb.pp("q_norm"), **(norm_kw or {}))
            self.k_norm = RMSNorm.from_vb(k_dim, cfg.rms_norm_eps, vb.pp("k_norm"), **(norm_kw or {}))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step: Step) -> torch.Tensor:
        B, T, _ = x.shape
        H, KV, D = self.num_heads, self.num_kv_heads, self.head_dim
        if (self.qkv.fused is not None and self.qk_norm is None and self.rotary and not self.interleaved
                and self.temperature is None and self.chunk is None):
            # (a subclass with its own _attend, e.g. GPT-OSS's sinks, keeps the separate ops)
            fusable = T == 1 and self.softcap is None and type(self)._attend is Attention._attend
            slot = step.decode_slot(self.layer_idx, self.window) if fusable else None
            if slot is not None:  # one row's decode token: projections, rotary, cache write and attention
                return ops.rope_cache_attention_block(x, self.qkv.fused, self.o_proj, cos, sin, *slot, H, self.scale)
            # q and k rotated together as one view of the fused projection: half the small ops
            out = self.qkv.fused(x)
            qk = apply_rotary_bthd(out[..., : (H + KV) * D].view(B, T, H + KV, D), cos, sin)
            q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)
            v = out[..., (H + KV) * D:].view(B, T, KV, D).transpose(1, 2)
            return self._attend(q, k, v, step, B, T)
        q, k, v = self.qkv(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if self.rotary:
            q, k = (apply_rotary_interleaved if self.interleaved else apply_rotary)(q, k, cos, sin)
        if self.qk_norm == "l2":  # in float32, as the reference
            q = F.rms_norm(q.float(), (self.head_dim,), None, self.eps).to(q.dtype)
            k = F.rms_norm(k.float(), (self.head_dim,), None, self.eps).to(k.dtype)
        if self.temperature is not None:
            beta, floor, offset = self.temperature
            t = 1 + beta * torch.log1p(torch.floor((step.position_ids.float() + offset) / floor))
            q = q * t[:, None, :, None].to(q.dtype)
        return self._attend(q, k, v, step, B, T)

    def _attend(self, q, k, v, step: Step, B: int, T: int) -> torch.Tensor:
        if step.cache is not None:
            k, v = step.cache.update(self.layer_idx, k, v, step.position_ids, step.kv_len, step.cache_rows,
                                     fresh=step.fresh)
        mask = step.chunk_mask(self.chunk) if self.chunk is not None else step.mask(self.window)
        o = attention(q, k, v, mask, scale=self.scale, softcap=self.softcap)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU (or another gated activation); `intermediate` overrides the width (MoE shared experts)."""

    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True, intermediate: int | None = None):
        super().__init__()
        E, F_ = cfg.hidden_size, intermediate or cfg.intermediate_size
        down, split = vb.pp("down_proj"), None
        if vb.tp is not None:  # tensor parallel: gate/up column-, down row-parallel
            rows = [vb.tp.even(F_, "intermediate_size")]
            split, down = [rows, rows], down.sharded(1, rows)
        self.gate_up = projections(E, {"gate_proj": (F_, vb.pp("gate_proj")), "up_proj": (F_, vb.pp("up_proj"))},
                                   vb, "gate_up_proj", bias=cfg.mlp_bias, fuse=fuse, split=split)
        self.down_proj = parallel.row_parallel(linear(F_, E, down, bias=cfg.mlp_bias), vb.tp)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is F.silu:  # SwiGLU: the registered silu_mul, on the fused projection's output as is
            if self.gate_up.fused is not None:
                return ops.swiglu_mlp(x, self.gate_up.fused, self.down_proj)
            return self.down_proj(ops.silu_mul(self.gate_up(x)))
        g, u = self.gate_up(x)
        return self.down_proj(self.act(g) * u)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int, window: int | None, fuse: bool = True):
        super().__init__()
        self.self_attn = self.make_attention(cfg, vb, layer_idx, window, fuse)
        self.mlp = self.make_mlp(cfg, vb, layer_idx, fuse)
        self.input_layernorm = self.make_norm(cfg, vb.pp("input_layernorm"))
        self.post_attention_layernorm = self.make_norm(cfg, vb.pp("post_attention_layernorm"))
        self.residual_multiplier = cfg.residual_multiplier  # Granite

    def make_norm(self, cfg: Config, vb: VarBuilder) -> nn.Module:
        """The norm before attention and before the MLP (a subclass swaps in another, e.g. LayerNorm)."""
        return RMSNorm.from_vb(cfg.hidden_size, cfg.rms_norm_eps, vb)

    _plain: bool | None = None

    def plain_block(self) -> bool:
        """Whether this layer is Llama's own: plain RMSNorms, the fused-projection attention with
        rotate-half rotary and no extras, a SwiGLU MLP on fused gate/up, no residual multiplier (what
        `ops.decoder_layer` computes). Fixed once the model is built, so found on the first call."""
        if self._plain is None:
            a, f = self.self_attn, self.mlp
            self._plain = (
                a is not None and type(self).mix is DecoderLayer.mix
                and self.residual_multiplier == 1.0
                and all(type(n) is RMSNorm and not n.scale_in_float for n in (self.input_layernorm, self.post_attention_layernorm))
                and type(a).forward is Attention.forward and type(a)._attend is Attention._attend
                and a.qkv.fused is not None and a.qk_norm is None and a.rotary and not a.interleaved and a.softcap is None
                and a.temperature is None and a.chunk is None
                and type(f).forward is MLP.forward and f.act is F.silu and f.gate_up.fused is not None)
        return self._plain

    def make_attention(self, cfg: Config, vb: VarBuilder, layer_idx: int, window: int | None, fuse: bool) -> nn.Module:
        """The attention block (a subclass swaps in a variant)."""
        return Attention(cfg, vb.pp("self_attn"), layer_idx, window, fuse, scale=cfg.attention_multiplier)

    def make_mlp(self, cfg: Config, vb: VarBuilder, layer_idx: int, fuse: bool) -> nn.Module:
        """The feed-forward block (a subclass swaps in another, e.g. a sparse MoE)."""
        return MLP(cfg, vb.pp("mlp"), fuse)

    def mix(self, x, cos, sin, step: Step):
        """The token-mixing sublayer: attention (a hybrid's state-space layers mix otherwise)."""
        return self.self_attn(x, cos, sin, step)

    def forward(self, x, cos, sin, step: Step):
        x, h = self.forward_deferred(x, None, cos, sin, step)
        return x + h

    def forward_deferred(self, x, pending, cos, sin, step: Step):
        """The layer with its last residual add left to the caller: the input is x + pending (pending
        None: x), the output x' + h' is returned as (x', h'), so that the add fuses with the next
        norm (`RMSNorm.add_forward`). The same ops as forward(), in the same order."""
        if x.shape[-2] == 1 and not torch.compiler.is_compiling() and self.plain_block():
            slot = step.decode_slot(self.self_attn.layer_idx, self.self_attn.window)
            if slot is not None:  # one row's decode token: the whole layer as one op (ops.decoder_layer)
                if pending is None:  # the first layer: x + 0 is x (bit for bit), so its norm is too
                    pending = torch.zeros_like(x)
                a, f = self.self_attn, self.mlp
                n1, n2 = self.input_layernorm, self.post_attention_layernorm
                return ops.decoder_layer(x, pending, n1.weight, n1.eps, a.qkv.fused, a.o_proj, cos, sin, *slot,
                                         a.num_heads, a.scale, n2.weight, n2.eps, f.gate_up.fused, f.down_proj)
        m = self.residual_multiplier
        x, normed = self.input_layernorm.add_forward(x, pending)
        h = self.mix(normed, cos, sin, step)
        x, normed = self.post_attention_layernorm.add_forward(x, h * m if m != 1.0 else h)
        h = self.mlp(normed)
        return x, (h * m if m != 1.0 else h)


class Model(nn.Module):
    """Embeddings → decoder layers → final RMSNorm. Families with Llama's outer structure but their
    own layers (OLMo 2, the MoE families) pass `layer_cls` (built as layer_cls(cfg, vb, layer_idx, window,
    fuse)) and `norm_kw` for the final norm's variant."""

    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True, layer_cls=None, norm_kw: dict | None = None):
        super().__init__()
        layer_cls = layer_cls or DecoderLayer
        self.embed_tokens = parallel.embedding(cfg.vocab_size, cfg.hidden_size, vb.pp("embed_tokens"))
        windows = cfg.layer_windows()
        self.layers = nn.ModuleList(
            layer_cls(cfg, vb.pp(f"layers.{i}"), i, windows[i], fuse) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm.from_vb(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("norm"), **(norm_kw or {}))
        self.rotary = rotary_from_config(cfg.raw, cfg.head_dim, cfg.max_position_embeddings, device=vb.device)
        self.embedding_multiplier = cfg.embedding_multiplier  # Granite
        # layers that keep Llama's forward hand their last residual add on to the next norm
        self.deferred = all(isinstance(layer, DecoderLayer) and type(layer).forward is DecoderLayer.forward
                            and type(layer).forward_deferred is DecoderLayer.forward_deferred for layer in self.layers)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The token embeddings an image+text model merges image features into (transformers'
        get_input_embeddings()(input_ids))."""
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, step: Step, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if self.embedding_multiplier != 1.0:
            x = x * self.embedding_multiplier
        cos, sin = self.rotary(step.rope_positions, x.dtype)
        if self.deferred:
            pending = None
            for layer in self.layers:
                x, pending = layer.forward_deferred(x, pending, cos, sin, step)
            return self.norm.add_forward(x, pending)[1]
        for layer in self.layers:
            x = layer(x, cos, sin, step)
        return self.norm(x)


class ForCausalLM(CausalLM):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        self.config = cfg
        self.model = Model(cfg, vb.pp("model"), fuse)
        self.lm_head = tied_or_own_head(vb, cfg, self.model.embed_tokens.weight, cfg.hidden_size, cfg.vocab_size)
        self.logits_scaling = cfg.logits_scaling  # Granite


# ---- GGUF (llama.cpp's llama, qwen2, qwen3 and phi3 architectures) -----------------------------
def _gguf_llama(meta: gguf.Meta) -> dict:
    """llama.cpp's llama architecture: Llama, Mistral, and Mixtral (with `llama.expert_count`)."""
    heads = gguf.attention_heads(meta)
    # transformers maps rope.dimension_count to head_dim for llama; key_length is explicit when present
    head_dim = meta.get("attention.key_length", kind=int) or meta.get("rope.dimension_count", kind=int) or \
        meta.need("embedding_length") // heads
    cfg = gguf.decoder_config(meta, "llama", head_dim=head_dim)
    cfg["attention_bias"] = "blk.0.attn_q.bias" in meta.names
    cfg["mlp_bias"] = "blk.0.ffn_gate.bias" in meta.names
    gguf_rope_freqs(meta, cfg)
    if meta.get("expert_count", kind=int):  # Mixtral: every layer a sparse MoE, top-k renormalised
        cfg.update(gguf.moe_config(meta), model_type="mixtral")
    return cfg


def gguf_rope_freqs(meta: gguf.Meta, cfg: dict) -> None:
    """Llama 3.1-style scaling that llama.cpp stores as per-frequency divisors (`rope_freqs.weight`)
    instead of metadata, into cfg's rope_scaling (llama, llama4)."""
    if "rope_freqs.weight" in meta.names:
        if cfg.get("rope_scaling") is not None:
            raise gguf.UnsupportedModelError(f"{meta.f.path}: rope_freqs.weight together with rope scaling "
                                             f"{cfg['rope_scaling'].get('rope_type')!r} is not supported")
        cfg["rope_scaling"] = {"rope_type": "default", "freq_factors": gguf.small_vector(meta, "rope_freqs.weight")}


def _gguf_qwen2(meta: gguf.Meta) -> dict:
    return gguf.decoder_config(meta, "qwen2")


def _gguf_qwen3(meta: gguf.Meta) -> dict:
    return gguf.decoder_config(meta, "qwen3", head_dim=meta.get("attention.key_length", kind=int))


def gguf_phi3(meta: gguf.Meta, model_type: str = "phi3") -> dict:
    """llama.cpp's phi3 metadata (partial rotary, sliding window, longrope factors); PhiMoE's too."""
    cfg = gguf.decoder_config(meta, model_type)
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    rot = meta.get("rope.dimension_count", kind=int)
    if rot and rot != head_dim:
        cfg["partial_rotary_factor"] = rot / head_dim
    window = meta.get("attention.sliding_window", kind=int)
    if window:
        cfg["sliding_window"] = window
    orig = meta.get("rope.scaling.original_context_length", kind=int)
    if "rope_factors_long.weight" in meta.names and "rope_factors_short.weight" in meta.names:
        scaling = {"rope_type": "longrope", "long_factor": gguf.small_vector(meta, "rope_factors_long.weight"),
                   "short_factor": gguf.small_vector(meta, "rope_factors_short.weight")}
        attn = meta.get("rope.scaling.attn_factor", kind=(int, float))
        if attn is not None:
            scaling["attention_factor"] = float(attn)
        cfg["rope_scaling"] = scaling
        if orig:
            cfg["original_max_position_embeddings"] = orig
    return cfg


PHI3_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_up": "mlp.gate_up_proj",
    "ffn_down": "mlp.down_proj",
}

GGUF = {
    "llama": gguf.GGUFMapping(_gguf_llama, layer={**gguf.LLAMA_LAYER, **gguf.MOE_LAYER}, permute_qk=True),
    "qwen2": gguf.GGUFMapping(_gguf_qwen2),
    "qwen3": gguf.GGUFMapping(_gguf_qwen3),
    "phi3": gguf.GGUFMapping(gguf_phi3, layer=PHI3_LAYER),
}


# ---- GGUF: Seed-OSS (llama.cpp's seed_oss: no Q/K permutation, a post-attention norm name) -------
def _gguf_seed_oss(meta: gguf.Meta) -> dict:
    cfg = gguf.decoder_config(meta, "seed_oss", head_dim=gguf.head_dim(meta))
    # the registry's prepare reads attention_bias as the q/k/v bias, attention_out_bias as o_proj's
    cfg.update(attention_bias="blk.0.attn_q.bias" in meta.names, attention_out_bias="blk.0.attn_output.bias" in meta.names)
    return cfg


GGUF["seed_oss"] = gguf.GGUFMapping(_gguf_seed_oss, layer={**gguf.LLAMA_LAYER, "post_attention_norm": "post_attention_layernorm"})
