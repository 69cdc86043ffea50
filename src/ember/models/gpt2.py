"""GPT-2: learned absolute position embeddings, LayerNorm, fused c_attn, GELU MLP, tied head.

Reference: transformers/models/gpt2/modeling_gpt2.py. GPT-2's projections are `Conv1D`s whose
weights are stored [in, out]; they are transposed once at load into ordinary Linears. Positions
come from `step.position_ids`, so a left-padded row embeds its tokens at the same positions as the
unpadded sequence. Checkpoints saved from GPT2LMHeadModel carry a `transformer.` prefix, those
saved from GPT2Model (the original `gpt2` repositories) do not: both are read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import gguf_source as gguf
from ..config import ModelConfig
from ..nn import Embedding, LayerNorm, Linear, activation, attention
from ..varbuilder import VarBuilder
from .base import CausalLM, Step, tied_or_own_head


@dataclass
class Config(ModelConfig):
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    add_cross_attention: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int | list | None = 50256
    eos_token_id: int | list | None = 50256
    pad_token_id: int | None = None

    # the names the rest of ember reads
    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def max_position_embeddings(self) -> int:
        return self.n_positions

    @property
    def intermediate_size(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    def validate(self) -> None:
        self._positive("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner")
        self._positive("layer_norm_epsilon", allow_zero=True)
        self._require(self.n_embd % self.n_head == 0,
                      f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        self._require(not self.add_cross_attention, "GPT-2 with cross-attention (an encoder-decoder) is not supported")
        activation(self.activation_function)


def conv1d(vb: VarBuilder, n_in: int, n_out: int) -> Linear:
    """A transformers `Conv1D` (weight [in, out]) as a Linear, transposed once here."""
    w = vb.get((n_in, n_out), "weight").t().contiguous()
    return Linear(w, vb.get((n_out,), "bias"))


class Attention(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int):
        super().__init__()
        E = cfg.n_embd
        self.layer_idx = layer_idx
        self.num_heads = self.num_kv_heads = cfg.n_head
        self.head_dim = E // cfg.n_head
        self.c_attn = conv1d(vb.pp("c_attn"), E, 3 * E)  # q, k, v rows
        self.c_proj = conv1d(vb.pp("c_proj"), E, E)
        self.scale = self.head_dim**-0.5 if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            self.scale /= float(layer_idx + 1)
        self.upcast = cfg.reorder_and_upcast_attn

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        B, T, E = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if step.cache is not None:
            k, v = step.cache.update(self.layer_idx, k, v, step.position_ids, step.kv_len, step.cache_rows)
        if self.upcast and q.dtype != torch.float32:  # scores and softmax in float32
            o = attention(q.float(), k.float(), v.float(), step.mask(), scale=self.scale).to(q.dtype)
        else:
            o = attention(q, k, v, step.mask(), scale=self.scale)
        return self.c_proj(o.transpose(1, 2).reshape(B, T, E))


class MLP(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder):
        super().__init__()
        self.c_fc = conv1d(vb.pp("c_fc"), cfg.n_embd, cfg.intermediate_size)
        self.c_proj = conv1d(vb.pp("c_proj"), cfg.intermediate_size, cfg.n_embd)
        self.act = activation(cfg.activation_function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder, layer_idx: int):
        super().__init__()
        eps = cfg.layer_norm_epsilon
        self.ln_1 = LayerNorm.from_vb(cfg.n_embd, eps, vb.pp("ln_1"))
        self.self_attn = Attention(cfg, vb.pp("attn"), layer_idx)  # named for cache_layout()
        self.ln_2 = LayerNorm.from_vb(cfg.n_embd, eps, vb.pp("ln_2"))
        self.mlp = MLP(cfg, vb.pp("mlp"))

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        x = x + self.self_attn(self.ln_1(x), step)
        return x + self.mlp(self.ln_2(x))


class Model(nn.Module):
    def __init__(self, cfg: Config, vb: VarBuilder):
        super().__init__()
        self.wte = Embedding.from_vb(cfg.vocab_size, cfg.n_embd, vb.pp("wte"))
        self.wpe = Embedding.from_vb(cfg.n_positions, cfg.n_embd, vb.pp("wpe"))
        self.layers = nn.ModuleList(Block(cfg, vb.pp(f"h.{i}"), i) for i in range(cfg.n_layer))
        self.ln_f = LayerNorm.from_vb(cfg.n_embd, cfg.layer_norm_epsilon, vb.pp("ln_f"))

    def forward(self, input_ids: torch.Tensor, step: Step) -> torch.Tensor:
        x = self.wte(input_ids) + self.wpe(step.position_ids)
        for layer in self.layers:
            x = layer(x, step)
        return self.ln_f(x)


class ForCausalLM(CausalLM):
    def __init__(self, cfg: Config, vb: VarBuilder, fuse: bool = True):
        super().__init__()  # c_attn is fused in the checkpoint itself: `fuse` has nothing to do
        self.config = cfg
        body = vb.pp("transformer") if vb.contains("transformer.wte.weight") else vb
        self.model = Model(cfg, body)
        self.lm_head = tied_or_own_head(vb, cfg, self.model.wte.weight, cfg.n_embd, cfg.vocab_size)


# ---- GGUF --------------------------------------------------------------------------------------
def _gguf_gpt2(meta: gguf.Meta) -> dict:
    ctx = meta.get("context_length", 1024, kind=int)
    return {
        "model_type": "gpt2",
        "vocab_size": gguf.vocab_size(meta),
        "n_embd": meta.need("embedding_length"),
        "n_layer": gguf.layer_count(meta),
        "n_head": gguf.attention_heads(meta),
        "n_inner": meta.get("feed_forward_length", kind=int),
        "n_positions": ctx,
        "n_ctx": ctx,
        "layer_norm_epsilon": float(meta.get("attention.layer_norm_epsilon", 1e-5, kind=(int, float))),
        "tie_word_embeddings": True,
        **gguf.token_ids(meta.m),
    }


GGUF = {"gpt2": gguf.GGUFMapping(
    _gguf_gpt2, layers_prefix="transformer.h",
    top={"token_embd": "transformer.wte", "position_embd": "transformer.wpe", "output_norm": "transformer.ln_f",
         "output": "lm_head"},
    layer={"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_norm": "ln_2",
           "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"},
    transpose=("attn_qkv", "attn_output", "ffn_up", "ffn_down"))}
