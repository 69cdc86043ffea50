"""Speculative decoding: cheap guesses of a sequence's next tokens, checked by the model in one
forward over all of them.

Each step, a proposer drafts up to `num_tokens` tokens per running sequence:
- prompt lookup (transformers' `prompt_lookup_num_tokens`): the tokens that followed the latest
  earlier occurrence of the sequence's last n tokens (n from `max_matching_ngram_size` down to 1),
  in its prompt or its own output. Free, and right often when the output copies the input (code
  editing, extraction, summaries that quote);
- a draft model (transformers' `assistant_model`): a smaller model with the same tokenizer decodes
  `num_assistant_tokens` tokens ahead in its own cache (greedily, or sampling with the request's
  settings).
The model then runs once over [last token, draft 1 .. draft k] per row (`verify`), which gives its
distribution after every prefix of the draft. Tokens are taken column by column, exactly as plain
decoding would take them from those distributions: a greedy row keeps a draft token while it equals
the model's argmax, so greedy output is the plain decode's, token for token; a sampling row keeps
draft d with probability min(1, p(d) / q(d)) and otherwise draws from max(0, p - q) renormalised
(Leviathan et al. 2023, Chen et al. 2023), so its tokens follow p exactly. The first token not
accepted (or the one after the whole draft) comes from the model itself, so each step emits between
1 and k + 1 tokens.

"Token for token" holds as far as the model gives the same logits for a token whether it is decoded
alone or verified among k + 1: true to rounding for float weights (a near-tie can still flip, as it
can between batch sizes). GGUF weights kept packed (`backends/native.py`) quantise activations to
int8 blocks, where a last-bit difference moves a rounding step, so their greedy text can part from
plain decoding's after a while (llama.cpp's speculative decoding behaves the same).

Full-attention layers need no rollback: row r's token at position p lives in column p
(kv_cache.py), so the keys of rejected tokens sit past the row's new length, hidden by the column <=
position mask until the next tokens overwrite them. A sliding-window layer's ring holds only the last
W positions, so a draft token written at p overwrote position p - W: `_RingUndo` keeps those columns
and puts back the ones whose draft was rejected (drafts are kept shorter than the smallest window).
A draft model with sliding-window layers is refused for now.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..errors import GenerationError
from .sampling import filter_logits, sample

if TYPE_CHECKING:  # pragma: no cover
    from .loop import Event, Generator, _Seq

MAX_DRAFT_TOKENS = 64  # a bound so that a typo is an error, not a [B, 10**6, vocab] forward


@dataclass
class Speculative:
    """Which speculative decoding a Generator does; transformers' argument names. Give exactly one of
    `prompt_lookup_num_tokens` (n-gram drafting of that many tokens) and `assistant_model` (a draft
    model: an `ember.LLM` or a CausalLM module with the same tokenizer, drafting
    `num_assistant_tokens` tokens)."""

    prompt_lookup_num_tokens: int | None = None
    max_matching_ngram_size: int = 3
    assistant_model: object | None = None
    num_assistant_tokens: int = 4

    def validate(self) -> "Speculative":
        def count(name, lo, hi):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise GenerationError(f"{name} must be an integer in [{lo}, {hi}], got {v!r:.60}")

        if (self.prompt_lookup_num_tokens is None) == (self.assistant_model is None):
            raise GenerationError("speculative decoding: give either prompt_lookup_num_tokens (n-gram drafting) "
                                  "or assistant_model (a draft model), not both")
        if self.prompt_lookup_num_tokens is not None:
            count("prompt_lookup_num_tokens", 1, MAX_DRAFT_TOKENS)
            count("max_matching_ngram_size", 1, 64)
        else:
            count("num_assistant_tokens", 1, MAX_DRAFT_TOKENS)
        return self

    @property
    def num_tokens(self) -> int:
        return self.prompt_lookup_num_tokens if self.assistant_model is None else self.num_assistant_tokens

    def build(self, gen: "Generator") -> "Speculator":
        """The speculator of this kind for a generator (checked against its model and cache)."""
        self.validate()
        if getattr(gen.cache, "recurrent", False):
            raise GenerationError("speculative decoding does not support models with recurrent state (SSM, "
                                  "linear attention) yet: a rejected draft cannot be taken back out of it")
        if self.assistant_model is None:
            proposer = PromptLookup(self.prompt_lookup_num_tokens, self.max_matching_ngram_size)
        else:
            proposer = DraftModel(self.assistant_model, gen)
        return Speculator(proposer, self.num_tokens)


# ---- proposers --------------------------------------------------------------------------------
def _tokens_from(s: "_Seq", start: int) -> list[int]:
    """The sequence's tokens (prompt, then output) from index `start` on."""
    p = s.req.prompt_ids
    if start >= len(p):
        return s.out[start - len(p):]
    return [*p[start:], *s.out]


def _length(s: "_Seq") -> int:
    return len(s.req.prompt_ids) + len(s.out)


class _Ngrams:
    """A sequence's n-grams → the start of their latest occurrence, kept up to date as tokens arrive
    (each n-gram is recorded once: a lookup costs O(new tokens), not O(length))."""

    def __init__(self, max_n: int):
        self.max_n = max_n
        self.tokens: list[int] = []
        self.starts = [dict() for _ in range(max_n + 1)]  # by n: n-gram tuple -> latest start
        self.recorded = [0] * (max_n + 1)  # by n: n-grams starting before this index are recorded

    def propose(self, k: int) -> list[int]:
        t, L = self.tokens, len(self.tokens)
        for n in range(min(self.max_n, L - 1), 0, -1):
            table = self.starts[n]
            for i in range(self.recorded[n], L - n):  # every n-gram that ends before the last token
                table[tuple(t[i:i + n])] = i
            self.recorded[n] = max(self.recorded[n], L - n)
            i = table.get(tuple(t[L - n:]))
            if i is not None:
                return t[i + n:i + n + k]
        return []


class PromptLookup:
    """n-gram drafting from the sequence itself (transformers' PromptLookupCandidateGenerator, with
    the latest match taken rather than the first)."""

    def __init__(self, num_tokens: int, max_ngram: int):
        self.num_tokens, self.max_ngram = num_tokens, max_ngram

    def propose(self, gen, seqs, budgets):
        drafts = []
        for s, b in zip(seqs, budgets):
            if s.draft is None:
                s.draft = _Ngrams(self.max_ngram)
            idx = s.draft
            idx.tokens += _tokens_from(s, len(idx.tokens))
            drafts.append(idx.propose(b) if b > 0 else [])
        return drafts, None


def _same_tokenizer(a, b) -> bool:
    if a is None or b is None:
        return True  # token ids only: the caller vouches for them
    ta, tb = getattr(a, "tk", None), getattr(b, "tk", None)
    if ta is None or tb is None:
        return True
    return ta.get_vocab(with_added_tokens=True) == tb.get_vocab(with_added_tokens=True)


class DraftModel:
    """A small model drafting in its own cache (same slots, same positions as the generator's).

    Per slot it remembers which tokens its cache holds: the sequence up to `upto`, then the draft
    tokens it fed after that. At the next step the accepted part of that draft is still valid; the
    rest, and every token since, is fed again (one forward for the short catch-ups of all rows, a
    chunked prefill per row for a new prompt)."""

    def __init__(self, assistant, gen: "Generator"):
        model = getattr(assistant, "model", assistant)
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "new_cache"):
            raise GenerationError(f"assistant_model must be an ember LLM or causal LM module, got "
                                  f"{type(assistant).__name__}")
        if not _same_tokenizer(getattr(assistant, "tokenizer", None), gen.tok):
            raise GenerationError("assistant_model has a different tokenizer from the model; the draft's token ids "
                                  "would mean other text")
        p = next(model.parameters())
        if p.device != gen.device:
            raise GenerationError(f"assistant_model is on {p.device}, the model on {gen.device}; load both on one "
                                  f"device")
        self.model = model
        self.vocab = gen.vocab
        self.max_len = gen.max_len
        self.chunk = gen.prefill_chunk
        self.cache = model.new_cache(gen.max_batch, gen.max_len, device=gen.device)
        if getattr(self.cache, "recurrent", False):
            raise GenerationError("assistant_model has recurrent state (SSM, linear attention), which speculative "
                                  "decoding does not support yet")
        if self.cache.smallest_ring is not None:
            raise GenerationError("assistant_model has sliding-window layers, which speculative decoding does not "
                                  "support yet")
        self.held: list[tuple | None] = [None] * gen.max_batch  # slot -> (request id, upto, fed draft)

    def _valid(self, s) -> int:
        """How many of the sequence's tokens the draft cache holds correctly."""
        h = self.held[s.slot]
        if h is None or h[0] != s.req.id:
            return 0
        _, upto, fed = h
        now = _tokens_from(s, upto)
        n = 0
        while n < len(fed) and n < len(now) and fed[n] == now[n]:
            n += 1
        return upto + n

    def _logits(self, ids, pos, rows: slice, kv_len: int, last=None) -> torch.Tensor:
        out = self.model(ids, position_ids=pos, cache=self.cache, kv_len=kv_len, cache_rows=rows, logits_index=last)
        return out[:, 0, : self.vocab]  # a draft vocabulary padded past the model's is cut to it

    def _catch_up(self, seqs, device) -> dict[int, torch.Tensor]:
        """Feed every sequence's tokens the draft cache lacks; each one's logits after its last token."""
        out, short = {}, []
        for s in seqs:
            start = self._valid(s)
            new = _tokens_from(s, start)
            if len(new) > 4:  # a (new) prompt: prefill this row alone, in chunks
                for c0 in range(0, len(new), self.chunk):
                    part = new[c0:c0 + self.chunk]
                    ids = torch.tensor([part], device=device)
                    pos = torch.arange(start + c0, start + c0 + len(part), device=device)[None]
                    logits = self._logits(ids, pos, slice(s.slot, s.slot + 1), start + c0 + len(part),
                                          torch.tensor([len(part) - 1], device=device))
                out[s.slot] = logits[0]
            else:
                short.append((s, start, new))
        if short:  # one forward for all: rows in range that are not here idle on the scratch column
            hi = max(s.slot for s, _, _ in short) + 1
            T = max(len(new) for _, _, new in short)
            ids = torch.zeros(hi, T, dtype=torch.long)
            pos = torch.full((hi, T), self.max_len - 1, dtype=torch.long)
            last = torch.zeros(hi, dtype=torch.long)
            for s, start, new in short:
                ids[s.slot, : len(new)] = torch.tensor(new)
                pos[s.slot, : len(new)] = torch.arange(start, start + len(new))
                last[s.slot] = len(new) - 1
            kv_len = max(start + len(new) for _, start, new in short)
            logits = self._logits(ids.to(device), pos.to(device), slice(0, hi), kv_len, last.to(device))
            for s, _, _ in short:
                out[s.slot] = logits[s.slot]
        return out

    def propose(self, gen, seqs, budgets):
        device = gen.device
        live = [(s, b) for s, b in zip(seqs, budgets) if b > 0]
        drafts = {s.slot: [] for s in seqs}
        probs = {s.slot: [] for s in seqs}
        if not live:
            return [[] for _ in seqs], None
        logits = self._catch_up([s for s, _ in live], device)
        hi = max(s.slot for s, _ in live) + 1
        k = max(b for _, b in live)
        length = {s.slot: _length(s) for s, _ in live}
        for j in range(k):
            for s, b in live:
                if j >= b:
                    continue
                row = logits[s.slot][None].float()
                sp = s.req.sampling
                if sp.greedy:
                    t = int(row.argmax())
                else:
                    q = filter_logits(row, sp).softmax(dim=-1)[0]
                    e = torch.empty_like(q).exponential_(1.0, generator=s.gen)
                    t = int((q / e).argmax())  # a draw from q (as sampling.sample draws)
                    probs[s.slot].append(q)
                drafts[s.slot].append(t)
            if j == k - 1:
                break
            # feed the tokens just drafted (rows done drafting idle on the scratch column)
            ids = torch.zeros(hi, 1, dtype=torch.long)
            pos = torch.full((hi, 1), self.max_len - 1, dtype=torch.long)
            for s, b in live:
                if j + 1 < b:
                    ids[s.slot, 0] = drafts[s.slot][j]
                    pos[s.slot, 0] = length[s.slot] + j
            kv_len = int(pos[pos < self.max_len - 1].max()) + 1
            out = self._logits(ids.to(device), pos.to(device), slice(0, hi), kv_len)
            logits = {s.slot: out[s.slot] for s, _ in live}
        for s, b in live:
            self.held[s.slot] = (s.req.id, length[s.slot], drafts[s.slot][: b - 1])
        qs = [torch.stack(probs[s.slot]) if probs[s.slot] else None for s in seqs]
        return [drafts[s.slot] for s in seqs], qs


# ---- verification -----------------------------------------------------------------------------
def accept_or_resample(p: torch.Tensor, draft: int, q: torch.Tensor | None, generator=None) -> tuple[int, bool]:
    """The rejection-sampling rule for one drafted token: `p` [V] is the model's distribution, `q` [V]
    the draft's (None: the draft was certain, as a prompt lookup is). Returns (token, accepted): the
    draft with probability min(1, p(d) / q(d)), else a draw from max(0, p - q) renormalised; the
    token that comes out follows p exactly."""
    qd = 1.0 if q is None else float(q[draft])
    u = float(torch.rand((), generator=generator, device=p.device))
    if u * qd < float(p[draft]):
        return draft, True
    if q is None:
        residual = p.clone()
        residual[draft] = 0.0
    else:
        residual = (p - q).clamp(min=0.0)
    if float(residual.sum()) <= 0.0:  # p == q up to rounding: any draw from p is right
        residual = p
    e = torch.empty_like(residual).exponential_(1.0, generator=generator)
    return int((residual / e).argmax()), False


class _RingUndo:
    """The ring columns a verify forward's draft tokens will overwrite in sliding-window layers, kept
    so that `restore()` can put back those of rejected drafts (positions at or past a row's new
    `pos`: the tokens the cache holds end before it)."""

    def __init__(self, cache, running, drafts):
        self.cache, self.saved = cache, []
        layers = [i for i, w in enumerate(getattr(cache, "windows", ())) if w is not None]
        for s, d in zip(running, drafts):
            if not d or not layers:
                continue
            pos = torch.arange(s.pos + 1, s.pos + 1 + len(d), device=cache.device)
            for i in layers:
                cols = pos % cache.windows[i]
                self.saved.append((i, s, pos, cols, cache.k[i][s.slot][:, cols].clone(),
                                   cache.v[i][s.slot][:, cols].clone()))

    def restore(self) -> None:
        for i, s, pos, cols, k, v in self.saved:
            bad = pos >= s.pos
            if bool(bad.any()):
                self.cache.k[i][s.slot][:, cols[bad]] = k[:, bad]
                self.cache.v[i][s.slot][:, cols[bad]] = v[:, bad]


class Speculator:
    """A generator's speculative step (see the module docstring); `stats` counts drafted and accepted
    tokens."""

    def __init__(self, proposer, num_tokens: int):
        self.proposer, self.num_tokens = proposer, num_tokens
        self.stats = {"steps": 0, "drafted": 0, "accepted": 0, "emitted": 0}

    @property
    def acceptance_rate(self) -> float:
        return self.stats["accepted"] / max(self.stats["drafted"], 1)

    def step(self, gen: "Generator", running: list["_Seq"]) -> list["Event"] | None:
        """Draft, verify and emit for the running sequences; None when nothing was drafted (the
        generator then takes a plain decode step)."""
        events = gen._flush()  # a pipelined plain step in flight: its tokens come first
        gen._synced = None  # the engine's input buffers no longer hold the next inputs
        running = [s for s in running if gen.slots[s.slot] is s]
        if not running:
            return events
        # a draft must leave room for the token after it, within the request's limit (and so the cache)
        k = self._longest(gen)
        budgets = [0 if s.matcher is not None else max(0, min(k, s.limit - len(s.out) - 1)) for s in running]
        drafts, qs = self.proposer.propose(gen, running, budgets) if any(budgets) else ([[]] * len(running), None)
        if not any(drafts):
            return events + gen._decode(running)
        undo = _RingUndo(gen.cache, running, drafts)
        logits = self._verify(gen, running, drafts)
        self.stats["steps"] += 1
        self.stats["drafted"] += sum(map(len, drafts))
        events += self._take(gen, running, drafts, qs, logits)
        undo.restore()
        return events

    def _longest(self, gen) -> int:
        """The most tokens a row drafts: num_tokens, and less than the smallest sliding window (the
        drafted positions' ring columns must not collide, see _RingUndo, and a ring layer keeps only
        the last window of a step's tokens)."""
        ring = getattr(gen.cache, "smallest_ring", None)
        return self.num_tokens if ring is None else min(self.num_tokens, ring - 1)

    def _verify(self, gen, running, drafts) -> torch.Tensor:
        """The model's logits [hi, T, vocab] over [last token, draft...] of every running row."""
        hi = max(s.slot for s in running) + 1
        static = getattr(gen.decode_step, "verify", None)  # the engine's: one captured shape per bucket
        T = 1 + (self._longest(gen) if static is not None else max(map(len, drafts)))
        ids = torch.zeros(hi, T, dtype=torch.long)
        pos = torch.full((hi, T), gen.max_len - 1, dtype=torch.long)  # padding and idle rows: the scratch column
        for s, d in zip(running, drafts):
            gen.reserve(s.slot, s.pos + 1 + len(d))
            ids[s.slot, : 1 + len(d)] = torch.tensor([s.out[-1], *d])
            pos[s.slot, : 1 + len(d)] = torch.arange(s.pos, s.pos + 1 + len(d))
        if static is not None:
            return static(ids.to(gen.device), pos.to(gen.device))
        kv_len = max(s.pos + len(d) for s, d in zip(running, drafts)) + 1
        return gen.model(ids.to(gen.device), position_ids=pos.to(gen.device), cache=gen.cache, kv_len=kv_len,
                         cache_rows=slice(0, hi))

    def _take(self, gen, running, drafts, qs, logits) -> list["Event"]:
        """Emit tokens column by column while each row's drafts hold (see the module docstring)."""
        events = []
        plain = all(s.req.sampling.greedy and not s.processed and s.matcher is None for s in running)
        rows = torch.tensor([s.slot for s in running], device=logits.device)
        logits = logits[rows]  # [n, T, vocab], in running's order
        argmax = logits.argmax(dim=-1).tolist() if plain else None  # one host read for the whole step
        active = list(range(len(running)))
        base = [s.pos for s in running]
        for j in range(logits.shape[1]):
            seqs = [running[i] for i in active]
            col = logits[active, j] if len(active) < len(running) else logits[:, j]
            if plain:
                toks = [argmax[i][j] for i in active]
                accepted = [j < len(drafts[i]) and t == drafts[i][j] for i, t in zip(active, toks)]
            else:
                col, toks, accepted = self._choose(gen, seqs, col, [drafts[i] for i in active],
                                                   [qs[i] if qs else None for i in active], j)
            for i in active:
                running[i].pos = base[i] + j + 1  # the cache holds the tokens up to the one just taken
            events += gen._emit(seqs, col, toks)
            self.stats["emitted"] += len(seqs)
            self.stats["accepted"] += sum(accepted)
            active = [i for i, a in zip(active, accepted) if a and gen.slots[running[i].slot] is running[i]]
            if not active:
                break
        return events

    def _choose(self, gen, seqs, col, drafts, qs, j):
        """Tokens of one column for rows with processing (penalties, sampling, a grammar): (the logits
        logprobs are read from, tokens, accepted)."""
        if any(s.matcher is not None for s in seqs):  # grammar rows never draft: only column 0 gets here
            from .grammar import mask_logits

            col = mask_logits(col, [s.matcher for s in seqs])
        toks, accepted = [], []
        for i, s in enumerate(seqs):
            row = gen._processed(s, col[i:i + 1].float())
            sp, d = s.req.sampling, drafts[i]
            if sp.greedy:
                t = int(row.argmax())
                a = j < len(d) and t == d[j]
            elif j < len(d):
                p = filter_logits(row, sp).softmax(dim=-1)[0]
                t, a = accept_or_resample(p, d[j], qs[i][j] if qs[i] is not None else None, s.gen)
            else:
                t, a = int(sample(row, sp, s.gen)), False
            toks.append(t)
            accepted.append(a)
        return col, toks, accepted
