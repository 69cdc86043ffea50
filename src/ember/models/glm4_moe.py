"""GLM-4.5 / GLM-4.6 (`glm4_moe`): Llama's pre-norm layers with q/k/v bias, optional RMSNorm over each
head of q and k (`use_qk_norm`), rotary over the first half of each head (`partial_rotary_factor`,
default 0.5, halves not pairs), and from `first_k_dense_replace` on DeepSeek-V3's MoE: sigmoid
routing with e_score_correction_bias, group-limited top-k, `routed_scaling_factor`, shared experts.

Reference: transformers/models/glm4_moe/modeling_glm4_moe.py, configuration_glm4_moe.py.
The multi-token-prediction layer of released checkpoints (model.layers.{num_hidden_layers}.*) is unused.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .. import gguf_source as gguf
from ..varbuilder import VarBuilder
from . import deepseek, glm4, llama
from .base import CausalLM, tied_or_own_head


@dataclass
class Config(deepseek.Config):
    vocab_size: int = 151552
    hidden_size: int = 4096
    intermediate_size: int = 10944
    num_hidden_layers: int = 46
    num_attention_heads: int = 96
    num_key_value_heads: int | None = 8
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    bos_token_id: int | list | None = None
    eos_token_id: int | list | None = None
    moe_intermediate_size: int = 1408
    n_shared_experts: int | None = 1
    n_routed_experts: int | None = 128
    routed_scaling_factor: float = 1.0
    n_group: int | None = 1
    topk_group: int | None = 1
    num_experts_per_tok: int | None = 8
    first_k_dense_replace: int = 1
    use_qk_norm: bool = False

    def __post_init__(self):
        llama.Config.__post_init__(self)  # Llama's attention shape, not MLA's
        self.qk_norm = self.use_qk_norm


def prepare(d: dict) -> dict:
    return {**glm4.prepare(d), "scoring_func": "sigmoid"}


class DecoderLayer(llama.DecoderLayer):
    def make_mlp(self, cfg: Config, vb: VarBuilder, layer_idx: int, fuse: bool) -> nn.Module:
        if layer_idx < cfg.first_k_dense_replace:
            return llama.MLP(cfg, vb.pp("mlp"), fuse)
        return deepseek.moe(cfg, vb.pp("mlp"), fuse)


class ForCausalLM(CausalLM):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()
        self.config = cfg
        self.model = llama.Model(cfg, vb.pp("model"), fuse, layer_cls=DecoderLayer)
        self.lm_head = tied_or_own_head(vb, cfg, self.model.embed_tokens.weight, cfg.hidden_size, cfg.vocab_size)


# ---- GGUF (llama.cpp's glm4moe: DeepSeek-V3's routing over GLM's attention; the multi-token-
# prediction layer, when the file keeps it, is unused) --------------------------------------------
def _gguf_glm4_moe(meta: gguf.Meta) -> dict:
    head = gguf.head_dim(meta)
    cfg = gguf.decoder_config(meta, "glm4_moe", head_dim=head)
    cfg.update(deepseek.gguf_moe_config(meta))
    # block_count counts the multi-token-prediction layers the converter appends (unused here)
    nextn = meta.get("nextn_predict_layers", 0, kind=int)
    if not 0 <= nextn < cfg["num_hidden_layers"]:
        raise gguf.ConfigError(f"{meta.f.path}: glm4moe.nextn_predict_layers is {nextn!r:.40}, for "
                               f"{cfg['num_hidden_layers']} blocks")
    cfg["num_hidden_layers"] -= nextn
    cfg["attention_bias"] = "blk.0.attn_q.bias" in meta.names  # prepare reads it as the q/k/v bias
    cfg["use_qk_norm"] = "blk.0.attn_q_norm.weight" in meta.names
    cfg["partial_rotary_factor"] = gguf.partial_rotary(meta, head).get("partial_rotary_factor", 1.0)
    return cfg


GGUF = {"glm4moe": gguf.GGUFMapping(_gguf_glm4_moe, layer={
    **deepseek.GGUF_MOE_LAYER, "post_attention_norm": "post_attention_layernorm"})}
