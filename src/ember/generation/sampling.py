"""Logits processors and the sampler, in transformers' order: repetition penalty (then OpenAI's
presence and frequency penalties and logit bias), temperature, top-k, top-p, min-p. Everything stays on the logits' device: no host sync per token."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import GenerationError


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 → greedy
    top_k: int = 0  # 0 → off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0  # OpenAI's: minus this for each token already generated ...
    frequency_penalty: float = 0.0  # ... minus this times how often it was generated
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]

    def validate(self) -> "SamplingParams":
        def num(name, lo=None, hi=None, integer=False):
            v = getattr(self, name)
            ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
            if isinstance(v, bool) or not ok_type or v != v:
                raise GenerationError(f"{name} must be a {'whole ' if integer else ''}number, got {v!r}")
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                raise GenerationError(f"{name} must be in [{lo}, {hi if hi is not None else 'inf'}], got {v}")

        num("temperature", 0.0, None)
        num("top_k", 0, None, integer=True)
        num("top_p", 0.0, 1.0)
        num("min_p", 0.0, 1.0)
        num("repetition_penalty", 0.0, None)
        if self.repetition_penalty == 0:
            raise GenerationError("repetition_penalty must be positive")
        if self.top_p == 0:
            raise GenerationError("top_p must be in (0, 1]")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise GenerationError(f"seed must be an integer, got {self.seed!r}")
        num("presence_penalty", -2.0, 2.0)
        num("frequency_penalty", -2.0, 2.0)
        lb = self.logit_bias
        if lb is not None:
            if not isinstance(lb, dict) or not all(
                    isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in lb):
                raise GenerationError(f"logit_bias must be a dict of token id -> bias, got {lb!r:.60}")
            for k, v in lb.items():
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
                    raise GenerationError(f"logit_bias must map token ids to numbers in [-100, 100], got {v!r:.40} "
                                          f"for token {k}")
        return self

    @property
    def penalised(self) -> bool:
        """Whether presence/frequency penalties apply (they need the generated tokens' counts)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' rule: for tokens already in the context, divide positive logits by the penalty
    and multiply negative ones. `seen` [B, V] is a boolean mask of tokens in each row's context."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's presence and frequency penalties: `counts` [B, V] is how often each token was generated."""
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def bias_vector(bias: dict[int, float], vocab: int, device) -> torch.Tensor:
    """logit_bias as a [vocab] tensor to add to the logits."""
    out = torch.zeros(vocab, dtype=torch.float32)
    for k, v in bias.items():
        out[k] = float(v)
    return out.to(device)


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p filtering (filtered entries become -inf)."""
    if p.temperature not in (0.0, 1.0):
        logits = logits / p.temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        # transformers: sort ascending, drop the tokens whose cumulative mass is <= 1 - top_p, keep at least one.
        sorted_logits, idx = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cum <= (1 - p.top_p)
        remove_sorted[..., -1:] = False
        remove = remove_sorted.scatter(-1, idx, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    if p.min_p > 0.0:
        probs = logits.softmax(dim=-1)
        top = probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < p.min_p * top, float("-inf"))
    return logits


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [B] from logits [B, V]."""
    if p.greedy:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float(), p).softmax(dim=-1)
    # Gumbel-style draw: argmax(p / E) with E ~ Exp(1) samples from p, with no host sync (unlike multinomial).
    e = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / e).argmax(dim=-1)


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, top: int = 0):
    """log-softmax of the chosen tokens [B] and, if top > 0, the top alternatives ([B, top] values, ids)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(-1, tokens[:, None]).squeeze(-1)
    if top:
        v, i = lp.topk(top, dim=-1)
        return chosen, v, i
    return chosen, None, None
