"""Sparse mixture-of-experts feed-forward: a softmax top-k router over stacked SwiGLU experts.

Reference: transformers' MixtralSparseMoeBlock / Qwen3MoeSparseMoeBlock. The router takes the
softmax (in float32) over all experts first, then the top-k, then optionally renormalises the k
weights (`norm_topk_prob`; Mixtral always does). Each expert computes down(act(gate(x)) * up(x)).

Expert weights are held stacked: `gate_up` [E, 2F, H] (gate rows, then up rows) and `down`
[E, H, F], whichever layout the checkpoint has:
  - fused, as transformers 5 models hold them: `experts.gate_up_proj`, `experts.down_proj`
    (the fused tensors are used as they are: views on the checkpoint, no copy);
  - per expert, as the Hub checkpoints (and transformers' save_pretrained) store them:
    `experts.N.w1/w3/w2` (Mixtral) or `experts.N.gate_proj/up_proj/down_proj` (Qwen-MoE),
    stacked once at load;
  - stacked but unfused, as GGUF files store them (`ffn_gate_exps`, `ffn_up_exps`, `ffn_down_exps`,
    read as `experts.gate_proj.weight` [E, F, H] ...): gate and up concatenated once at load, or,
    when the source keeps them as GGUF blocks, one `Expert` of three quantised layers per expert
    (views on the file's bytes, which the loading transforms then put on their kernels).

The forward groups the (token, slot) pairs by expert with one sort, then runs one matmul pair per
expert that received tokens: a loop over experts, never over tokens, with a single host sync
(the per-expert counts) per layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ShapeMismatchError, UnsupportedModelError
from ..varbuilder import VarBuilder
from .layers import linear_from_weight

# (gate, up, down) names of one expert's projections in per-expert checkpoints
EXPERT_NAMES = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))


class Expert(nn.Module):
    """One expert as its own layers (weights kept quantised): down(act(gate(x)) * up(x))."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module, act):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act = gate_proj, up_proj, down_proj, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class SparseMoE(nn.Module):
    # True: each routing weight scales the expert's input instead of its output (Llama 4)
    weight_inputs = False

    def __init__(self, router: torch.Tensor, gate_up: torch.Tensor | None, down: torch.Tensor | None, top_k: int,
                 norm_topk_prob: bool, act, *, experts: list[Expert] | None = None, shape: tuple | None = None):
        """Stacked dense experts (gate_up, down), or `experts`: one Expert module each (quantised
        weights; `shape` = (experts, width, hidden))."""
        super().__init__()
        if experts is not None:
            self.num_experts, f, self.hidden = shape
            two_f = 2 * f
            self.experts = nn.ModuleList(experts)
            self.gate_up = self.down = None
        else:
            self.num_experts, two_f, self.hidden = gate_up.shape
            if down.shape != (self.num_experts, self.hidden, two_f // 2):
                raise ShapeMismatchError(f"inconsistent expert shapes: gate_up {list(gate_up.shape)}, "
                                         f"down {list(down.shape)}")
            self.gate_up = nn.Parameter(gate_up, requires_grad=False)
            self.down = nn.Parameter(down, requires_grad=False)
            self.experts = None
        if router.shape != (self.num_experts, self.hidden):
            raise ShapeMismatchError(f"router {list(router.shape)} does not match {self.num_experts} experts "
                                     f"of hidden size {self.hidden}")
        self.router = nn.Parameter(router, requires_grad=False)
        self.intermediate = two_f // 2
        self.top_k, self.norm_topk_prob, self.act = top_k, norm_topk_prob, act

    @classmethod
    def from_vb(cls, vb: VarBuilder, num_experts: int, hidden: int, intermediate: int, top_k: int,
                norm_topk_prob: bool, act, rows: tuple[int, int] | None = None, **kw) -> "SparseMoE":
        """From the MoE block's prefix (`...mlp` or `...block_sparse_moe`), either expert layout;
        `kw` goes to the constructor (a subclass's router options).
        rows: only [start, stop) of every expert's intermediate dimension (a tensor-parallel rank's
        part: its output is then a partial sum the caller all-reduces)."""
        E, H, F_ = num_experts, hidden, intermediate
        r0, r1 = rows if rows is not None else (0, F_)
        router = vb.get((E, H), "gate.weight")
        if vb.contains("experts.gate_up_proj"):
            gu, dn = vb, vb
            if rows is not None:
                gu, dn = vb.sharded(1, [(r0, r1), (F_ + r0, F_ + r1)]), vb.sharded(2, [(r0, r1)])
            gate_up = gu.get((E, 2 * F_, H), "experts.gate_up_proj")
            down = dn.get((E, H, F_), "experts.down_proj")
            return cls(router, gate_up, down, top_k, norm_topk_prob, act, **kw)
        if vb.contains("experts.gate_proj.weight"):  # GGUF: each projection's experts stacked in one 3-D tensor
            if rows is not None:
                raise UnsupportedModelError("tensor parallelism does not split a GGUF file's stacked 3-D expert "
                                            "tensors; load this MoE model without tp")
            gate = vb.get((E, F_, H), "experts.gate_proj.weight", quantized=True)
            up = vb.get((E, F_, H), "experts.up_proj.weight", quantized=True)
            down = vb.get((E, H, F_), "experts.down_proj.weight", quantized=True)
            if all(isinstance(w, torch.Tensor) for w in (gate, up, down)):
                return cls(router, torch.cat((gate, up), dim=1), down, top_k, norm_topk_prob, act, **kw)
            # kept as GGUF blocks: one layer per expert projection, each on a view of the file's bytes
            experts = [Expert(*(linear_from_weight(w[i] if isinstance(w, torch.Tensor) else w.select(i))
                                for w in (gate, up, down)), act) for i in range(E)]
            return cls(router, None, None, top_k, norm_topk_prob, act, experts=experts, shape=(E, F_, H),
                       **kw)
        names = next((n for n in EXPERT_NAMES if vb.contains(f"experts.0.{n[0]}.weight")), EXPERT_NAMES[0])
        g, u, d = names
        gate_up = down = None
        n = r1 - r0
        for i in range(E):
            e = vb.pp(f"experts.{i}")
            gu, dn = (e.sharded(0, [(r0, r1)]), e.sharded(1, [(r0, r1)])) if rows is not None else (e, e)
            wg, wu, wd = gu.get((F_, H), f"{g}.weight"), gu.get((F_, H), f"{u}.weight"), dn.get((H, F_), f"{d}.weight")
            if gate_up is None:  # allocate once, fill expert by expert: one copy of the weights in all
                gate_up = wg.new_empty(E, 2 * n, H)
                down = wd.new_empty(E, H, n)
            gate_up[i, :n].copy_(wg)
            gate_up[i, n:].copy_(wu)
            down[i].copy_(wd)
        return cls(router, gate_up, down, top_k, norm_topk_prob, act, **kw)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [N, k] float32, expert indices [N, k]) for tokens x [N, H]."""
        probs = torch.softmax(F.linear(x, self.router).float(), dim=-1)
        weights, idx = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, idx

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on its tokens x [n, H]."""
        if self.experts is not None:  # per-expert layers (GGUF blocks)
            return self.experts[e](x)
        gate, up = F.linear(x, self.gate_up[e]).chunk(2, dim=-1)
        return F.linear(self.act(gate) * up, self.down[e])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.hidden)
        return self.combine(x, *self.route(x)).reshape(shape)

    def combine(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The experts' weighted sum for tokens x [N, H] routed as (weights, idx) [N, k] (Gemma 4 routes
        on another input than the experts see)."""
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        token = order // self.top_k
        xs, w = x.index_select(0, token), weights.reshape(-1)[order, None]
        if self.weight_inputs:
            xs = xs * w.to(x.dtype)
        outs = []
        for e, chunk in enumerate(xs.split(counts)):
            if chunk.shape[0] == 0:
                continue
            outs.append(self.expert(e, chunk))
        y = torch.cat(outs) if self.weight_inputs else torch.cat(outs) * w
        return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, top_k={self.top_k}, hidden={self.hidden}, intermediate={self.intermediate}, "
                f"norm_topk_prob={self.norm_topk_prob}")


class TopLogitsMoE(SparseMoE):
    """A router that takes the top-k logits first (plus `router_bias`, if any), then the softmax over
    those k alone (GraniteMoE, GPT-OSS), or, with sigmoid=True, the sigmoid of each, which then scales
    the expert's input (Llama 4)."""

    def __init__(self, router, gate_up, down, top_k: int, act, router_bias: torch.Tensor | None = None,
                 sigmoid: bool = False, **kw):
        super().__init__(router, gate_up, down, top_k, False, act, **kw)
        self.router_bias = None if router_bias is None else nn.Parameter(router_bias, requires_grad=False)
        self.sigmoid = self.weight_inputs = sigmoid

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top, idx = torch.topk(F.linear(x, self.router, self.router_bias).float(), self.top_k, dim=-1)
        return (torch.sigmoid(top) if self.sigmoid else torch.softmax(top, dim=-1)), idx


class GroupLimitedMoE(SparseMoE):
    """DeepSeek's router over the same experts. Scores are sigmoid (V3, with `bias`, the
    e_score_correction_bias, added for the choice only) or softmax (V2) of the float32 logits. With
    `n_group` groups, only experts in the `topk_group` best groups compete: a group's score is the
    sum of its two best scores (group_score "top2", V3) or its best one ("max", V2). The weights are
    the chosen experts' scores (bias excluded), renormalised with norm_topk_prob, times
    `routed_scaling_factor`.

    Reference: transformers' DeepseekV3TopkRouter, DeepseekV2TopkRouter."""

    def __init__(self, router, gate_up, down, top_k: int, norm_topk_prob: bool, act, *, scoring: str = "sigmoid",
                 bias: torch.Tensor | None = None, n_group: int = 1, topk_group: int = 1, group_score: str = "top2",
                 routed_scaling_factor: float = 1.0, experts: list[Expert] | None = None, shape: tuple | None = None):
        super().__init__(router, gate_up, down, top_k, norm_topk_prob, act, experts=experts, shape=shape)
        if scoring not in ("sigmoid", "softmax") or group_score not in ("top2", "max"):
            raise ValueError(f"unknown scoring {scoring!r} or group score {group_score!r}")
        if bias is not None and bias.shape != (self.num_experts,):
            raise ShapeMismatchError(f"e_score_correction_bias has shape {list(bias.shape)}, expected [{self.num_experts}]")
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.scoring, self.n_group, self.topk_group, self.group_score = scoring, n_group, topk_group, group_score
        self.routed_scaling_factor = routed_scaling_factor

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.router.float())
        scores = logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)
        choice = scores + self.bias.float() if self.bias is not None else scores
        if self.n_group > 1:
            groups = choice.view(-1, self.n_group, self.num_experts // self.n_group)
            best = groups.topk(2, dim=-1)[0].sum(dim=-1) if self.group_score == "top2" else groups.amax(dim=-1)
            keep = torch.zeros_like(best, dtype=torch.bool)
            keep.scatter_(1, best.topk(self.topk_group, dim=-1)[1], True)
            keep = keep.unsqueeze(-1).expand_as(groups).reshape(-1, self.num_experts)
            # V2 zeroes the other groups' (positive) softmax scores, V3 rules them out
            choice = choice.masked_fill(~keep, float("-inf") if self.scoring == "sigmoid" else 0.0)
        idx = choice.topk(self.top_k, dim=-1)[1]
        weights = scores.gather(1, idx)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, idx


class SharedExpertMoE(nn.Module):
    """A routed MoE plus an expert every token goes through: moe(x) + shared(x), the shared output
    optionally scaled by sigmoid(shared_expert_gate(x)) (Qwen2-MoE's one-logit gate)."""

    def __init__(self, moe: nn.Module, shared: nn.Module, gate: nn.Module | None = None):
        super().__init__()
        self.moe, self.shared_expert, self.shared_expert_gate = moe, shared, gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.shared_expert(x)
        if self.shared_expert_gate is not None:
            s = torch.sigmoid(self.shared_expert_gate(x)) * s
        return self.moe(x) + s
