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
    stacked once at load.

The forward groups the (token, slot) pairs by expert with one sort, then runs one matmul pair per
expert that received tokens: a loop over experts, never over tokens, with a single host sync
(the per-expert counts) per layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ShapeMismatchError
from ..varbuilder import VarBuilder

# (gate, up, down) names of one expert's projections in per-expert checkpoints
EXPERT_NAMES = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))


class SparseMoE(nn.Module):
    def __init__(self, router: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, top_k: int,
                 norm_topk_prob: bool, act):
        super().__init__()
        self.num_experts, two_f, self.hidden = gate_up.shape
        if router.shape != (self.num_experts, self.hidden) or down.shape != (self.num_experts, self.hidden, two_f // 2):
            raise ShapeMismatchError(f"inconsistent expert shapes: router {list(router.shape)}, "
                                     f"gate_up {list(gate_up.shape)}, down {list(down.shape)}")
        self.router = nn.Parameter(router, requires_grad=False)
        self.gate_up = nn.Parameter(gate_up, requires_grad=False)
        self.down = nn.Parameter(down, requires_grad=False)
        self.top_k, self.norm_topk_prob, self.act = top_k, norm_topk_prob, act

    @classmethod
    def from_vb(cls, vb: VarBuilder, num_experts: int, hidden: int, intermediate: int, top_k: int,
                norm_topk_prob: bool, act, **kw) -> "SparseMoE":
        """From the MoE block's prefix (`...mlp` or `...block_sparse_moe`), either expert layout;
        `kw` goes to the constructor (a subclass's router options)."""
        E, H, F_ = num_experts, hidden, intermediate
        router = vb.get((E, H), "gate.weight")
        if vb.contains("experts.gate_up_proj"):
            gate_up = vb.get((E, 2 * F_, H), "experts.gate_up_proj")
            down = vb.get((E, H, F_), "experts.down_proj")
            return cls(router, gate_up, down, top_k, norm_topk_prob, act, **kw)
        names = next((n for n in EXPERT_NAMES if vb.contains(f"experts.0.{n[0]}.weight")), EXPERT_NAMES[0])
        g, u, d = names
        gate_up = down = None
        for i in range(E):
            e = vb.pp(f"experts.{i}")
            wg, wu, wd = e.get((F_, H), f"{g}.weight"), e.get((F_, H), f"{u}.weight"), e.get((H, F_), f"{d}.weight")
            if gate_up is None:  # allocate once, fill expert by expert: one copy of the weights in all
                gate_up = wg.new_empty(E, 2 * F_, H)
                down = wd.new_empty(E, H, F_)
            gate_up[i, :F_].copy_(wg)
            gate_up[i, F_:].copy_(wu)
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
        gate, up = F.linear(x, self.gate_up[e]).chunk(2, dim=-1)
        return F.linear(self.act(gate) * up, self.down[e])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.hidden)
        weights, idx = self.route(x)
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        token = order // self.top_k
        xs = x.index_select(0, token).split(counts)
        outs = []
        for e, chunk in enumerate(xs):
            if chunk.shape[0] == 0:
                continue
            outs.append(self.expert(e, chunk))
        y = torch.cat(outs) * weights.reshape(-1)[order, None]
        out = torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))
        return out.reshape(shape)

    def extra_repr(self) -> str:
        E, two_f, H = self.gate_up.shape
        return f"experts={E}, top_k={self.top_k}, hidden={H}, intermediate={two_f // 2}, norm_topk_prob={self.norm_topk_prob}"


class TopLogitsMoE(SparseMoE):
    """A router that takes the top-k logits first (plus `router_bias`, if any), then the softmax over
    those k alone (GraniteMoE, GPT-OSS)."""

    def __init__(self, router, gate_up, down, top_k: int, act, router_bias: torch.Tensor | None = None):
        super().__init__(router, gate_up, down, top_k, False, act)
        self.router_bias = None if router_bias is None else nn.Parameter(router_bias, requires_grad=False)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top, idx = torch.topk(F.linear(x, self.router, self.router_bias).float(), self.top_k, dim=-1)
        return torch.softmax(top, dim=-1), idx


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
                 routed_scaling_factor: float = 1.0):
        super().__init__(router, gate_up, down, top_k, norm_topk_prob, act)
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
