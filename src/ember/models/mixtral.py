"""Mixtral, and Qwen2-MoE and Qwen3-MoE as Mixtral with flags: Llama/Mistral attention with a sparse
MoE feed-forward (`ember.nn.SparseMoE`).

Reference: transformers/models/mixtral/modeling_mixtral.py, qwen2_moe/modeling_qwen2_moe.py and
qwen3_moe/modeling_qwen3_moe.py. Qwen2-MoE adds q/k/v biases and a shared expert: a SwiGLU MLP of
`shared_expert_intermediate_size` that every token goes through, scaled by
sigmoid(`shared_expert_gate`(x)) and added to the routed experts' output.
Qwen3-MoE differs only by flags the registry sets or its config.json carries: RMSNorm over each
head of q and k (`qk_norm`), `norm_topk_prob` (Mixtral always renormalises the top-k weights),
`decoder_sparse_step` / `mlp_only_layers` (dense Llama MLPs of `intermediate_size` in some layers,
the experts being `moe_intermediate_size` wide) and its expert tensor names. Both expert layouts
are read (see `ember.nn.moe`): fused `mlp.experts.gate_up_proj` and the per-expert Hub layout
(`block_sparse_moe.experts.N.w1/w2/w3`, `mlp.experts.N.gate_proj/up_proj/down_proj`).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .. import gguf_source as gguf
from ..distributed import layers as parallel
from ..nn import SharedExpertMoE, SparseMoE, activation, linear
from ..varbuilder import VarBuilder
from . import llama
from .base import CausalLM, tied_or_own_head


@dataclass
class Config(llama.Config):
    # Mixtral's defaults where they differ from Llama's
    intermediate_size: int = 14336
    num_key_value_heads: int | None = 8
    max_position_embeddings: int = 4096 * 32
    rms_norm_eps: float = 1e-5
    # MoE
    num_local_experts: int | None = None  # Mixtral's name (and transformers 5's for Qwen3-MoE)
    num_experts: int | None = None  # Qwen3-MoE's name on the Hub
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None  # expert width; Mixtral's experts are intermediate_size wide
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list | None = None
    shared_expert_intermediate_size: int | None = None  # Qwen2-MoE's shared expert (None: none)

    def __post_init__(self):
        super().__post_init__()
        if self.num_local_experts is None:
            self.num_local_experts = self.num_experts if self.num_experts is not None else 8
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        if self.mlp_only_layers is None:
            self.mlp_only_layers = []

    def validate(self) -> None:
        super().validate()
        self._positive("num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step",
                       "shared_expert_intermediate_size")
        self._positive("num_local_experts", allow_zero=True)
        if self.num_local_experts:
            self._require(self.num_experts_per_tok <= self.num_local_experts,
                          f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the number of experts "
                          f"({self.num_local_experts})")
        self._require(all(isinstance(i, int) and not isinstance(i, bool) for i in self.mlp_only_layers),
                      f"mlp_only_layers must list layer indices, got {self.mlp_only_layers!r:.80}")

    def sparse(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` has the MoE block (else a dense MLP)."""
        return (self.num_local_experts > 0 and layer_idx not in self.mlp_only_layers
                and (layer_idx + 1) % self.decoder_sparse_step == 0)


class DecoderLayer(llama.DecoderLayer):
    def make_mlp(self, cfg: Config, vb: VarBuilder, layer_idx: int, fuse: bool) -> nn.Module:
        if not cfg.sparse(layer_idx):
            return llama.MLP(cfg, vb.pp("mlp"), fuse)
        # transformers 5 renames Mixtral's block_sparse_moe to mlp; checkpoints may have either
        moe = vb.pp("block_sparse_moe") if vb.contains("block_sparse_moe.gate.weight") else vb.pp("mlp")
        # tensor parallel: every expert's intermediate dimension split, the block's output all-reduced
        rows = vb.tp.even(cfg.moe_intermediate_size, "moe_intermediate_size") if vb.tp is not None else None
        experts = parallel.row_parallel(SparseMoE.from_vb(moe, cfg.num_local_experts, cfg.hidden_size,
                                                          cfg.moe_intermediate_size, cfg.num_experts_per_tok,
                                                          cfg.norm_topk_prob, activation(cfg.hidden_act), rows), vb.tp)
        if not cfg.shared_expert_intermediate_size:
            return experts
        # the shared expert splits as a dense MLP does (its own all-reduce); its gate stays whole
        shared = llama.MLP(cfg, moe.pp("shared_expert"), fuse, intermediate=cfg.shared_expert_intermediate_size)
        return SharedExpertMoE(experts, shared, linear(cfg.hidden_size, 1, moe.pp("shared_expert_gate")))


class ForCausalLM(CausalLM):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        self.config = cfg
        self.model = llama.Model(cfg, vb.pp("model"), fuse, layer_cls=DecoderLayer)
        self.lm_head = tied_or_own_head(vb, cfg, self.model.embed_tokens.weight, cfg.hidden_size, cfg.vocab_size)


# ---- GGUF (llama.cpp's qwen2moe and qwen3moe; Mixtral is its llama architecture, in llama.py) ---
def _gguf_qwen2moe(meta: gguf.Meta) -> dict:
    cfg = gguf.decoder_config(meta, "qwen2_moe")
    cfg.update(gguf.moe_config(meta), qkv_bias="blk.0.attn_q.bias" in meta.names)
    cfg.setdefault("norm_topk_prob", False)  # llama.cpp's qwen2moe never renormalises the top k
    shared = meta.get("expert_shared_feed_forward_length", kind=int)
    if shared is None and "blk.0.ffn_gate_shexp.weight" in meta.names:
        shared = meta.f.tensors["blk.0.ffn_gate_shexp.weight"].shape[0]
    cfg["shared_expert_intermediate_size"] = shared
    return cfg


def _gguf_qwen3moe(meta: gguf.Meta) -> dict:
    cfg = gguf.decoder_config(meta, "qwen3_moe", head_dim=meta.get("attention.key_length", kind=int))
    cfg.update(gguf.moe_config(meta))
    cfg.setdefault("norm_topk_prob", True)  # llama.cpp's qwen3moe always renormalises the top k
    return cfg


MOE_LAYER = {**gguf.LLAMA_LAYER, **gguf.MOE_LAYER}
GGUF = {
    "qwen2moe": gguf.GGUFMapping(_gguf_qwen2moe, layer=MOE_LAYER),
    "qwen3moe": gguf.GGUFMapping(_gguf_qwen3moe, layer=MOE_LAYER),
}
