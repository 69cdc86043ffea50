"""Llama 4 (text): Llama's layers with
- rotary positions over adjacent pairs (the reference's complex form), on all layers but every
  `no_rope_layer_interval`-th (NoPE layers; or as listed by `no_rope_layers`: 1 = rotary);
- on the rotary layers, weightless RMS normalisation of q and k after the rotation (`use_qk_norm`)
  and attention within chunks of `attention_chunk_size` positions (`layer_types` "chunked_attention");
- on the NoPE layers, queries scaled by 1 + attn_scale * log(1 + floor((pos + 1) / floor_scale))
  (`attn_temperature_tuning`);
- MoE layers (every `interleave_moe_layer_step`-th, or `moe_layers`): a sigmoid of each of the top-k
  router logits scales the token going into its expert (`intermediate_size` wide), plus a shared
  expert of the same width; the other layers are dense MLPs of `intermediate_size_mlp`.

Temperature tuning counts each row's own positions, so a padded row gives what the row alone gives
(the reference counts cache slots, padding included).

Checkpoints come as Llama4ForCausalLM (model_type llama4_text) or, as on the Hub, as the image-text
Llama4ForConditionalGeneration (model_type llama4: text_config, weights under language_model.*);
its vision tower is not loaded.

Reference: transformers/models/llama4/modeling_llama4.py, configuration_llama4.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .. import gguf_source as gguf
from ..nn import SharedExpertMoE, TopLogitsMoE, activation
from ..varbuilder import VarBuilder
from . import llama, multimodal
from .base import CausalLM, tied_or_own_head

LAYER_TYPES = ("chunked_attention", "full_attention")


@dataclass
class Config(llama.Config):
    vocab_size: int = 202048
    hidden_size: int = 5120
    intermediate_size: int = 8192  # the experts' and the shared expert's width
    intermediate_size_mlp: int = 16384  # the dense layers' width
    num_hidden_layers: int = 48
    num_attention_heads: int = 40
    num_key_value_heads: int | None = 8
    head_dim: int | None = 128
    max_position_embeddings: int = 4096 * 32
    rms_norm_eps: float = 1e-5
    rope_theta: float | None = 500000.0
    bos_token_id: int | list | None = 1
    eos_token_id: int | list | None = 2
    num_local_experts: int = 16
    num_experts_per_tok: int = 1
    moe_layers: list | None = None
    interleave_moe_layer_step: int = 1
    use_qk_norm: bool = True
    no_rope_layers: list | None = None
    no_rope_layer_interval: int = 4
    attention_chunk_size: int | None = 8192
    attn_temperature_tuning: bool = True
    floor_scale: float = 8192
    attn_scale: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        n, k, step = self.num_hidden_layers, self.no_rope_layer_interval, self.interleave_moe_layer_step
        sane = isinstance(n, int) and 0 <= n <= 1 << 16
        if not self.no_rope_layers and sane and isinstance(k, int) and k > 0:
            self.no_rope_layers = [int((i + 1) % k != 0) for i in range(n)]
        if self.moe_layers is None and sane and isinstance(step, int) and step > 0:
            self.moe_layers = list(range(step - 1, n, step))
        if self.layer_types is None and self.no_rope_layers is not None:
            self.layer_types = ["chunked_attention" if r and self.attention_chunk_size is not None else "full_attention"
                                for r in self.no_rope_layers]

    def validate(self) -> None:
        self._positive("no_rope_layer_interval", "interleave_moe_layer_step")
        self._require(isinstance(self.no_rope_layers, list) and len(self.no_rope_layers) >= self.num_hidden_layers,
                      f"no_rope_layers must list {self.num_hidden_layers} flags, got {self.no_rope_layers!r:.80}")
        super().validate()
        self._positive("intermediate_size_mlp", "num_local_experts", "num_experts_per_tok", "attention_chunk_size",
                       "floor_scale")
        self._require(self.num_experts_per_tok <= self.num_local_experts,
                      f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the number of experts "
                      f"({self.num_local_experts})")
        self._require(isinstance(self.moe_layers, list) and all(isinstance(i, int) for i in self.moe_layers),
                      f"moe_layers must list layer indices, got {self.moe_layers!r:.80}")
        bad = sorted({str(t) for t in self.layer_types if t not in LAYER_TYPES})
        self._require(not bad, f"unsupported layer_types {bad}; supported: {', '.join(LAYER_TYPES)}")
        self._require(self.attention_chunk_size is not None or "chunked_attention" not in self.layer_types,
                      "chunked_attention layers need an attention_chunk_size")


def prepare(d: dict) -> dict:
    """config.json → the text config dict: a multimodal config's text_config, with the reference's
    rope_theta (500000) where it gives none."""
    d = multimodal.text_config(d, tie_default=False)
    rope = d.get("rope_parameters")
    if d.get("rope_theta") is None and not (isinstance(rope, dict) and "rope_theta" in rope):
        d = {**d, "rope_theta": 500000.0}
    return d


class MoE(TopLogitsMoE):
    """Llama 4's routed experts: the sigmoid of each top-k logit scales the token's input to its
    expert. Built by `from_vb` from the per-expert or GGUF layouts (SparseMoE's signature)."""

    def __init__(self, router, gate_up, down, top_k: int, norm_topk_prob: bool, act, **kw):
        super().__init__(router, gate_up, down, top_k, act, sigmoid=True, **kw)


def moe(cfg: Config, vb: VarBuilder) -> nn.Module:
    """The feed_forward block of an MoE layer: routed experts plus the shared expert."""
    E, H, F_, act = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size, activation(cfg.hidden_act)
    if vb.contains("experts.gate_up_proj"):  # transformers' layout: [E, H, 2F] and [E, F, H], used as views
        gate_up = vb.get((E, H, 2 * F_), "experts.gate_up_proj").transpose(1, 2)
        down = vb.get((E, F_, H), "experts.down_proj").transpose(1, 2)
        routed = MoE(vb.get((E, H), "router.weight"), gate_up, down, cfg.num_experts_per_tok, True, act)
    else:  # GGUF: `gate` (the router) and the stacked gate/up/down experts
        routed = MoE.from_vb(vb, E, H, F_, cfg.num_experts_per_tok, True, act)
    return SharedExpertMoE(routed, llama.MLP(cfg, vb.pp("shared_expert")))


class DecoderLayer(llama.DecoderLayer):
    def make_attention(self, cfg: Config, vb: VarBuilder, layer_idx: int, window: int | None, fuse: bool) -> nn.Module:
        rope = bool(cfg.no_rope_layers[layer_idx])
        chunked = cfg.layer_types[layer_idx] == "chunked_attention"
        tuning = cfg.attn_temperature_tuning and not rope
        return llama.Attention(cfg, vb.pp("self_attn"), layer_idx, window, fuse, rotary=rope, interleaved=True,
                               qk_norm="l2" if cfg.use_qk_norm and rope else None,
                               temperature=(cfg.attn_scale, cfg.floor_scale, 1.0) if tuning else None,
                               chunk=cfg.attention_chunk_size if chunked else None)

    def make_mlp(self, cfg: Config, vb: VarBuilder, layer_idx: int, fuse: bool) -> nn.Module:
        if layer_idx in cfg.moe_layers:
            return moe(cfg, vb.pp("feed_forward"))
        return llama.MLP(cfg, vb.pp("feed_forward"), fuse, intermediate=cfg.intermediate_size_mlp)


class ForCausalLM(CausalLM):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        vb = multimodal.language_model(vb)
        self.config = cfg
        self.model = llama.Model(cfg, vb.pp("model"), fuse, layer_cls=DecoderLayer)
        self.lm_head = tied_or_own_head(vb, cfg, self.model.embed_tokens.weight, cfg.hidden_size, cfg.vocab_size)


# ---- GGUF (llama.cpp's llama4 architecture) ---------------------------------------------------------
def _gguf_llama4(meta: gguf.Meta) -> dict:
    """llama.cpp writes the widths, the expert counts and the MoE interleave step; the rest it fixes as
    the released models have it: chunks of 8192 on three layers in four with rotary, the fourth NoPE
    with temperature tuning (attention.sliding_window 0: every layer rotary and full), q/k norm
    except with 128 experts (Maverick)."""
    heads = gguf.attention_heads(meta)
    head_dim = meta.get("attention.key_length", kind=int) or meta.get("rope.dimension_count", kind=int) or \
        meta.need("embedding_length") // heads
    cfg = gguf.decoder_config(meta, "llama4_text", head_dim=head_dim)
    llama.gguf_rope_freqs(meta, cfg)
    moe = gguf.moe_config(meta)
    cfg.update(num_local_experts=moe["num_local_experts"], num_experts_per_tok=moe["num_experts_per_tok"],
               intermediate_size_mlp=cfg["intermediate_size"], intermediate_size=meta.need("expert_feed_forward_length"),
               interleave_moe_layer_step=meta.get("interleave_moe_layer_step", 1, kind=int),
               use_qk_norm=moe["num_local_experts"] != 128, attention_bias="blk.0.attn_q.bias" in meta.names)
    if meta.get("attention.sliding_window", kind=int) == 0:
        cfg.update(attention_chunk_size=None, no_rope_layers=[1] * cfg["num_hidden_layers"])
    return cfg


GGUF = {"llama4": gguf.GGUFMapping(_gguf_llama4, layer={
    **{k: v for k, v in gguf.LLAMA_LAYER.items() if not k.startswith("ffn_") or k == "ffn_norm"},
    **{k: v.replace("mlp.", "feed_forward.") for k, v in gguf.MOE_LAYER.items() if k != "ffn_gate_inp_shexp"},
    "ffn_gate": "feed_forward.gate_proj", "ffn_up": "feed_forward.up_proj", "ffn_down": "feed_forward.down_proj"})}
