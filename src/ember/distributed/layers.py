"""The parallel layers, and the helpers model files build through (each returns the plain layer when
the builder has no tensor-parallel group, so one model file serves tp=1 unchanged)."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import DistributedError
from ..nn.layers import Embedding, linear, linear_from_weight
from ..varbuilder import VarBuilder
from .group import TensorParallel


class RowParallel(nn.Module):
    """A layer whose input is split over the ranks (o_proj, down_proj, a MoE block's experts): each
    rank's partial output is summed over the ranks (one all-reduce), then the bias is added once."""

    def __init__(self, inner: nn.Module, tp: TensorParallel):
        super().__init__()
        bias = getattr(inner, "bias", None)
        if bias is not None:
            inner.bias = None
        self.inner = inner
        self.bias = bias
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(self.inner(x))
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"world={self.tp.world}, bias={self.bias is not None}"


class VocabParallelEmbedding(nn.Module):
    """Rows [start, stop) of an embedding table: ids outside them look up zeros, and the ranks' rows
    are summed (one all-reduce), so every rank gets every id's embedding."""

    def __init__(self, inner: nn.Module, start: int, tp: TensorParallel):
        super().__init__()
        self.inner, self.start, self.tp = inner, start, tp
        self.rows = inner.weight.shape[0]

    @property
    def weight(self):
        """This rank's rows (what a tied LM head multiplies by)."""
        return self.inner.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        out = self.inner(local.masked_fill(outside, 0))
        return self.tp.all_reduce(out.masked_fill(outside.unsqueeze(-1), 0))

    def extra_repr(self) -> str:
        return f"rows=[{self.start}, {self.start + self.rows}), world={self.tp.world}"


class GatheredHead(nn.Module):
    """An LM head over this rank's vocabulary rows; the ranks' logits are all-gathered (padded to
    equal parts, then cut to the vocabulary), so every rank holds the same full logits."""

    def __init__(self, inner: nn.Module, vocab: int, tp: TensorParallel):
        super().__init__()
        self.inner, self.vocab, self.tp = inner, vocab, tp
        self.part = -(-vocab // tp.world)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = self.inner(h)
        if y.shape[-1] < self.part:
            y = torch.nn.functional.pad(y, (0, self.part - y.shape[-1]))
        return self.tp.all_gather(y, dim=-1)[..., : self.vocab]

    def extra_repr(self) -> str:
        return f"vocab={self.vocab}, world={self.tp.world}"


# ---- what model files call -------------------------------------------------------------------------
def row_parallel(module: nn.Module, tp: TensorParallel | None) -> nn.Module:
    """`module` (built from input-split weights) with its output all-reduced; itself when tp is None."""
    return module if tp is None else RowParallel(module, tp)


def embedding(num: int, dim: int, vb: VarBuilder) -> nn.Module:
    """The token embedding: whole, or this rank's vocabulary rows when the model is split."""
    tp = vb.tp
    if tp is None:
        return Embedding.from_vb(num, dim, vb)
    start, stop = tp.padded(num, "vocab_size")
    return VocabParallelEmbedding(Embedding.from_vb(num, dim, vb.sharded(0, [(start, stop)])), start, tp)


def head(vb: VarBuilder, embed_weight, hidden: int, vocab: int, bias: bool | None = False) -> nn.Module:
    """The LM head: tied to `embed_weight` (None: its own `lm_head`), split over the vocabulary
    when the model is split (a whole, unsplit embedding gives a whole head)."""
    tp = vb.tp
    if embed_weight is not None:
        inner = linear_from_weight(embed_weight)
        if tp is None or embed_weight.shape[0] == vocab:
            return inner
        return GatheredHead(inner, vocab, tp)
    if tp is None:
        return linear(hidden, vocab, vb.pp("lm_head"), bias=bias)
    start, stop = tp.padded(vocab, "vocab_size")
    return GatheredHead(linear(hidden, vocab, vb.pp("lm_head").sharded(0, [(start, stop)]), bias=bias), vocab, tp)


def fused_ranges(sizes: list[int], parts: list[list[tuple[int, int]]]) -> list[tuple[int, int]]:
    """The ranges of each part (`parts[i]` within a part of `sizes[i]` rows) as rows of the parts
    stored concatenated (Phi-3's qkv_proj, gate_up_proj)."""
    out, offset = [], 0
    for size, ranges in zip(sizes, parts):
        out += [(offset + a, offset + b) for a, b in ranges]
        offset += size
    return out


def check_split(model: nn.Module, tp: TensorParallel, model_type: str) -> None:
    """Refuse a model the build left whole on every rank (its family has no tensor-parallel layout)."""
    if not any(isinstance(m, RowParallel) for m in model.modules()):
        raise DistributedError(f"{model_type!r} models cannot be split for tensor parallelism yet (tp={tp.world}); "
                               f"the Llama family (Llama, Mistral, Qwen2/3, Phi-3, Granite), Gemma 1-3 and the "
                               f"MoE families (Mixtral, Qwen3-MoE) can")
