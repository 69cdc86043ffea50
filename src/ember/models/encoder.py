"""What the encoder families (BERT, RoBERTa, DistilBERT, MPNet, ModernBERT) share.

Every encoder's `Model` is called the same way and returns the last hidden states:

    h = model(input_ids)                            # [B, T] -> [B, T, hidden]
    h = model(input_ids, attention_mask=mask)       # right-padded batch: padding keys are masked

A padded row gives the same hidden states at its real tokens as the row alone: padding is only
ever a masked key, and positions count from the start of the row.

The BERT-style families differ in little but the names of their tensors, so they share one
post-LayerNorm layer (`PostLNLayer`) built from a table of checkpoint names.

Precision: matmuls and attention run in the load dtype; the residual stream, LayerNorms and
embedding tables stay float32 (what torch.autocast does; a float32 checkpoint's embedding tables
are then zero-copy views of the file). With float32 that is plain float32; with bfloat16 on a CPU
with native bf16 it is ~2x faster than float32, with sentence embeddings within cosine 0.9999 of
float32 (a pure-bf16 residual stream drifts further).
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import FusedLinears, LayerNorm, activation, linear
from ..varbuilder import VarBuilder

# Heads that task checkpoints (ForMaskedLM, ForSequenceClassification, ...) carry beside the
# encoder. An encoder loaded for its hidden states leaves them unused on purpose.
HEADS = re.compile(r"^(\w+\.)?pooler\.|^(cls|lm_head|classifier|pre_classifier|qa_outputs|vocab_transform|"
                   r"vocab_layer_norm|vocab_projector|head|decoder)\.")


def f32(vb: VarBuilder) -> VarBuilder:
    """The builder for LayerNorm parameters and embedding tables: float32, the residual stream's dtype."""
    return vb.to(dtype=torch.float32)


def key_padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """A boolean [B, 1, 1, T] mask (True = attend) from a [B, T] padding mask; None when nothing is
    padded. A row with no real token sees every key (its output is garbage, never NaN)."""
    if attention_mask is None:
        return None
    m = attention_mask.to(torch.bool)
    if bool(m.all()):
        return None
    m = m | ~m.any(dim=-1, keepdim=True)
    return m[:, None, None, :]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v for q, k, v [B, H, T, D]; mask None, boolean (True = attend)
    or additive float [.., T, T]. Returns q's dtype.

    SDPA reads q, k, v as the strided views of the projection they are and, on CPU, writes its
    output [B, T, H, D]-contiguous, so `out.transpose(1, 2).reshape(B, T, H * D)` is a view: no copy
    on either side. For sentence-length inputs that beat an explicit float32 matmul-softmax-matmul
    by 10% of MiniLM's whole forward in float32 (AVX2) and 18% in bf16 (AVX-512), measured under
    contention (benchmarks/bench_embeddings.py).
    """
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def residual_linear(x: torch.Tensor, lin: nn.Module, inp: torch.Tensor) -> torch.Tensor:
    """x + lin(inp), as one op where the Linear fuses the add into its matmul (a oneDNN-prepacked
    float32 Linear: `linear_add`). Otherwise a bf16 output is widened to x's float32 first: the same
    sums, but two vectorised passes cost less than one add that mixes the dtypes (~1.5-2.8x on
    MiniLM's shapes, measured under contention)."""
    fused = getattr(lin, "linear_add", None)
    if fused is not None:
        return fused(inp, x)
    return lin(inp).to(x.dtype).add_(x)


def padding_positions(input_ids: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """RoBERTa/MPNet positions: padding_idx + 1, 2, ... for real tokens and padding_idx for padding
    tokens (fairseq's make_positions, as transformers computes them from the ids)."""
    mask = input_ids.ne(padding_idx).int()
    return (torch.cumsum(mask, dim=1).type_as(mask) * mask).long() + padding_idx


def _identity(x):
    return x


class PostLNLayer(nn.Module):
    """x = LN(x + Wo·attn(x)); x = LN(x + down(act(up(x)))) — BERT, RoBERTa, DistilBERT, MPNet.

    `names` maps q, k, v, o, ln1, up, down, ln2 to the checkpoint's names under the layer prefix.
    """

    def __init__(self, vb: VarBuilder, names: dict[str, str], hidden: int, heads: int, intermediate: int, eps: float,
                 act: str, fuse: bool = True):
        super().__init__()
        if hidden % heads:
            from ..errors import ConfigError

            raise ConfigError(f"hidden size {hidden} is not a multiple of the number of attention heads {heads}")
        self.heads, self.head_dim = heads, hidden // heads
        self.qkv = FusedLinears(hidden, {"q": (hidden, vb.pp(names["q"])), "k": (hidden, vb.pp(names["k"])),
                                         "v": (hidden, vb.pp(names["v"]))}, bias=True, fuse=fuse)
        self.o = linear(hidden, hidden, vb.pp(names["o"]), bias=True)
        self.ln1 = LayerNorm.from_vb(hidden, eps, f32(vb).pp(names["ln1"]))
        self.up = linear(hidden, intermediate, vb.pp(names["up"]), bias=True)
        self.down = linear(intermediate, hidden, vb.pp(names["down"]), bias=True)
        self.ln2 = LayerNorm.from_vb(hidden, eps, f32(vb).pp(names["ln2"]))
        self.act, self.act_name = activation(act), act
        self.cdtype = self.o.weight.dtype  # the matmuls' dtype; x stays float32

    def fusable_gelu(self) -> str | None:
        """The Linear whose output goes through an exact GELU (a prepacking backend may fuse it)."""
        return "up" if self.act_name == "gelu" and self.act is not _identity else None

    def gelu_fused(self) -> None:
        self.act = _identity

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, E = x.shape
        q, k, v = self.qkv(x.to(self.cdtype))
        q = q.view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.heads, self.head_dim).transpose(1, 2)
        a = attend(q, k, v, mask).transpose(1, 2).reshape(B, T, E)
        x = self.ln1(residual_linear(x, self.o, a))
        return self.ln2(residual_linear(x, self.down, self.act(self.up(x.to(self.cdtype)))))


class EncoderModel(nn.Module):
    """Base of every encoder family's `Model`: forward(input_ids, attention_mask) -> hidden states.

    Subclasses set `config`, `hidden_size` and `max_tokens` (the longest input the position
    embeddings allow) and may set `pad_token_id` (what padding ids to use; 0 otherwise).
    """

    config = None
    hidden_size: int = 0
    max_tokens: int = 1 << 30
    pad_token_id: int = 0
    # checkpoint tensors a load may leave unused without a warning (task heads)
    ignore_unused = HEADS

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
