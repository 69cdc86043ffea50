"""The generation loop: slots in a preallocated KV cache, batched prefill and decode, sampling,
stop conditions and streaming text.

A `Generator` owns a cache of `max_batch` rows ("slots"). Requests take free slots, are prefilled
(several at once when they arrive together), then every `step()` decodes one token for all running
slots in one forward. `run()` drives a fixed set of requests to completion (what `generate`,
`stream` and `chat` use); the server calls `add()` and `step()` itself so that new requests join
the running batch as slots free up (continuous batching).
"""
from __future__ import annotations

import itertools
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from ..errors import GenerationError
from .detokenize import StreamDecoder
from .sampling import SamplingParams, apply_penalties, apply_repetition_penalty, bias_vector, logprobs_of, sample
from .step import DecodeStep, EagerStep

_ids = itertools.count()

# Bounds on a request's stop strings (checked by Generator.check; the server refuses more with a 400).
# OpenAI allows 4 stop sequences; vLLM sets no bound. Matching is incremental (O(new text) per token
# and stop), these bounds keep the per-request setup and the held-back text small.
MAX_STOPS = 16
MAX_STOP_CHARS = 1024


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; 0: the chosen token's; k: plus the top k
    grammar: object | None = None  # a generation.grammar.Grammar the output must follow (constrained decoding)
    # image+text models: the features [n, hidden] of the prompt's n image tokens, in order (LLM.chat_prompt).
    # Such a prompt is prefilled alone and in one forward, and never enters the prefix cache (its image
    # tokens' ids are the same whatever the image).
    image_embeds: object | None = None
    # M-RoPE models (CausalLM.mrope): the prompt's rotary positions, a [3, T] integer tensor (t, h, w;
    # LLM.chat_inputs computes them). Decoding continues from their largest + 1: the slot's rope delta
    # (nn/kv_cache.RopeDeltas) is max + 1 - T. None: plain positions (delta 0).
    rope_positions: object | None = None
    id: int = field(default_factory=lambda: next(_ids))

    @property
    def cacheable(self) -> bool:
        """Whether the prefix cache may hold this prompt's keys: not an image prompt's (its image
        tokens' ids are the same whatever the image) nor one with its own rotary positions."""
        return self.image_embeds is None and self.rope_positions is None


@dataclass
class Event:
    """One step's news for one request: a token, the text it completed, and whether it ended."""

    request: Request
    token_id: int | None
    text: str
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


def _kmp_table(s: str) -> list[int]:
    """f[i]: the length of the longest proper prefix of s[:i + 1] that is also its suffix."""
    f = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = f[k - 1]
        if s[i] == s[k]:
            k += 1
        f[i] = k
    return f


class _StopMatcher:
    """Stop strings found in text that arrives piece by piece (one KMP automaton per stop string):
    `feed` costs O(len(piece)) amortised per stop, and `hold` says how much of the text's end could
    still be the start of a stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = list(dict.fromkeys(s for s in stops if s))
        self.tables = [_kmp_table(s) for s in self.stops]
        self.state = [0] * len(self.stops)  # characters of each stop matched by the end of the text

    def feed(self, piece: str) -> int | None:
        """Advance over `piece`; the start of the earliest stop string that ends in it, relative to
        piece (negative: it began in earlier text), or None."""
        best = None
        for j, s in enumerate(self.stops):
            f, k, m = self.tables[j], self.state[j], len(s)
            for i, c in enumerate(piece):
                while k and c != s[k]:
                    k = f[k - 1]
                if c == s[k]:
                    k += 1
                    if k == m:
                        if best is None or i - m + 1 < best:
                            best = i - m + 1
                        k = f[k - 1]
                        break
            self.state[j] = k
        return best

    @property
    def hold(self) -> int:
        return max(self.state, default=0)


class _Seq:
    """A request in a slot."""

    def __init__(self, req: Request, slot: int, tokenizer, eos_ids: set[int], vocab: int, device, max_len: int):
        self.req, self.slot = req, slot
        self.pos = len(req.prompt_ids)  # the cache column the next fed token goes to
        self.start = 0  # prompt tokens restored from the prefix cache (not prefilled)
        self.out: list[int] = []
        self.decoder = StreamDecoder(tokenizer) if tokenizer is not None else None  # None: token ids only
        stops = [s for s in req.stop if s]
        self.stops = _StopMatcher(stops) if stops else None
        self.tail = ""  # decoded text held back: it could be the start of a stop string
        self.stop_ids = set(req.stop_token_ids) | (set() if req.ignore_eos else eos_ids)
        self.limit = min(req.max_tokens, max_len - len(req.prompt_ids))
        self.matcher = req.grammar.matcher() if req.grammar is not None else None
        self.draft = None  # a speculative proposer's state for this sequence (speculative.py)
        rope = req.rope_positions
        self.rope_delta = 0 if rope is None else int(rope.max()) + 1 - len(req.prompt_ids)
        self.gen = None
        if req.sampling.seed is not None and not req.sampling.greedy:
            self.gen = torch.Generator(device=device)
            self.gen.manual_seed(req.sampling.seed)
        self.seen = None
        if req.sampling.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            self.seen[torch.tensor(req.prompt_ids, device=device)] = True
        sp = req.sampling
        self.counts = torch.zeros(vocab, device=device) if sp.penalised else None  # generated tokens
        self.bias = bias_vector(sp.logit_bias, vocab, device) if sp.logit_bias else None
        self.processed = self.seen is not None or self.counts is not None or self.bias is not None

    def push_text(self, piece: str, final: bool) -> tuple[str, bool]:
        """Add decoded text; return (text safe to emit now, whether a stop string ended it).

        Incremental: only `piece` is scanned (the stop matcher carries its state over from the text
        before), and the text held back is shorter than the longest stop string, so a call costs
        O(len(piece)) per stop string however long the text has grown."""
        m = self.stops
        if m is None:
            return piece, False
        held = len(self.tail)
        buf = self.tail + piece
        hit = m.feed(piece)  # where the earliest stop starts, relative to piece (>= -held)
        if hit is not None:
            self.tail = ""
            return buf[: held + hit], True
        if final:
            self.tail = ""
            return buf, False
        end = len(buf) - m.hold  # hold back a tail that could still grow into a stop string
        self.tail = buf[end:]
        return buf[:end], False


def kv_budget_bytes(device: torch.device) -> int:
    """The most a Generator's own KV cache may take: $EMBER_MAX_KV_BYTES, else a quarter of the
    machine's memory (CPU) or half of the GPU's."""
    env = os.environ.get("EMBER_MAX_KV_BYTES")
    if env:
        return int(env)
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory // 2
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError, RuntimeError):
        return 8 << 30


def kv_budget_len(model, batch: int, dtype, device) -> int:
    """The longest context a cache of `batch` rows can hold within `kv_budget_bytes`."""
    per = model.kv_bytes_per_token(dtype) * max(batch, 1)
    return max(2, kv_budget_bytes(torch.device(device)) // max(per, 1))


class Generator:
    """Continuous-batching generation over one model. Not thread-safe: one driver calls add/step."""

    def __init__(self, model, tokenizer, *, max_batch: int = 8, max_len: int | None = None,
                 eos_ids: Sequence[int] = (), device=None, dtype=None, prefill_chunk: int = 512, cache=None,
                 step: DecodeStep | None = None, prefix_cache=None):
        """cache: a persistent cache to run in (the engine's; CUDA graphs capture its addresses).
        step: the decode step over that cache (default: the model's plain forward).
        prefix_cache: a `PrefixCache` (prefix_cache.py) whose blocks prompts reuse (settable later)."""
        self.model, self.tok = model, tokenizer
        p = next(model.parameters())
        self.device = torch.device(device) if device is not None else p.device
        self.max_batch = max_batch
        self.max_len = min(max_len or model.max_context, model.max_context)
        if cache is None:  # a context the config merely claims must not size an allocation
            self.max_len = min(self.max_len, kv_budget_len(model, max_batch, dtype, self.device))
        self.eos_ids = set(eos_ids)
        self.prefill_chunk = prefill_chunk
        self.vocab = model.config.vocab_size
        self.cache = cache if cache is not None else model.new_cache(max_batch, self.max_len, dtype=dtype, device=self.device)
        if cache is not None:
            self.max_len = min(self.max_len, cache.max_len)
        self.slots: list[_Seq | None] = [None] * max_batch
        self.waiting: deque[Request] = deque()
        self.decode_step: DecodeStep = step if step is not None else EagerStep(model, self.cache)
        self._synced = None  # (rows, requests) whose next inputs the engine's device buffers already hold
        self._inflight = None  # (seqs, tokens handle) of a launched step not yet emitted
        self.prefix_cache = prefix_cache
        self.speculator = None  # a speculative.Speculator: decode steps draft and verify several tokens
        self._paged = hasattr(self.cache, "reserve")  # nn/paged_cache.py: blocks follow the positions written
        if self._paged and prefix_cache is not None:
            raise GenerationError("the prefix cache does not work with a paged KV cache yet")

    # ---- admission ----------------------------------------------------------------------------
    def check(self, req: Request) -> None:
        n = len(req.prompt_ids)
        if isinstance(req.max_tokens, bool) or not isinstance(req.max_tokens, int) or req.max_tokens < 0:
            raise GenerationError(f"max_tokens must be a non-negative integer, got {req.max_tokens!r}")
        if n == 0:
            raise GenerationError("the prompt is empty (no tokens); give some text or a chat message")
        if n >= self.max_len:
            raise GenerationError(f"the prompt has {n} tokens but the context holds {self.max_len}; shorten it")
        if any((not isinstance(t, int)) or t < 0 or t >= self.vocab for t in req.prompt_ids):
            raise GenerationError(f"prompt token ids must be integers in [0, {self.vocab})")
        stops = req.stop
        if isinstance(stops, str) or not all(isinstance(x, str) for x in stops):
            raise GenerationError(f"stop must be a list of strings, got {stops!r:.60}")
        if len(stops) > MAX_STOPS:
            raise GenerationError(f"stop: at most {MAX_STOPS} stop strings per request, got {len(stops)}")
        longest = max(map(len, stops), default=0)
        if longest > MAX_STOP_CHARS:
            raise GenerationError(f"stop strings must be at most {MAX_STOP_CHARS} characters long, got one of "
                                  f"{longest}")
        lb = req.sampling.logit_bias
        if lb and any(isinstance(k, int) and k >= self.vocab for k in lb):
            raise GenerationError(f"logit_bias: token ids must be in [0, {self.vocab}), got "
                                  f"{max(k for k in lb if isinstance(k, int))}")
        lp = req.logprobs
        if lp is not None and (isinstance(lp, bool) or not isinstance(lp, int) or not 0 <= lp <= self.vocab):
            raise GenerationError(f"logprobs must be None or an integer in [0, {self.vocab}], got {lp!r:.60}")
        rope = req.rope_positions
        if rope is not None and (not isinstance(rope, torch.Tensor) or tuple(rope.shape) != (3, n)
                                 or rope.is_floating_point() or rope.is_complex()):
            got = list(rope.shape) if isinstance(rope, torch.Tensor) else type(rope).__name__
            raise GenerationError(f"rope_positions must be an integer tensor of [3, {n}] (t, h, w per prompt token), "
                                  f"got {got}")
        if rope is not None and not getattr(self.model, "mrope", False):
            raise GenerationError("rope_positions are for M-RoPE models (Qwen2.5-VL ...); this model rotates by "
                                  "plain positions")
        req.sampling.validate()

    def add(self, req: Request) -> None:
        self.check(req)
        self.waiting.append(req)

    def abort(self, req_id: int) -> None:
        """Drop a request (a client went away): its slot frees at once."""
        self.waiting = deque(r for r in self.waiting if r.id != req_id)
        for i, s in enumerate(self.slots):
            if s is not None and s.req.id == req_id:
                self._free(i)

    def reserve(self, slot: int, length: int) -> None:
        """Make room for a slot's first `length` positions (a paged cache takes blocks; else nothing)."""
        if self._paged:
            self.cache.reserve(slot, length)

    def _free(self, slot: int) -> None:
        self.slots[slot] = None
        if self._paged:
            self.cache.release(slot)  # its blocks go back to the pool

    @property
    def running(self) -> int:
        return sum(s is not None for s in self.slots)

    def has_work(self) -> bool:
        return bool(self.waiting) or self.running > 0

    # ---- the loop -----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Admit waiting requests into free slots (prefill), then decode one token for the rest."""
        events: list[Event] = []
        new = self._admit(events)
        running = [s for s in self.slots if s is not None and s not in new]
        if running:
            events += self._decode(running) if self.speculator is None else self.speculator.step(self, running)
        return events

    def run(self, requests: Sequence[Request]) -> Iterator[Event]:
        for r in requests:
            self.check(r)  # all or nothing
        self.waiting.extend(requests)
        while self.has_work():
            yield from self.step()

    def _admit(self, events: list[Event]) -> list[_Seq]:
        free = [i for i, s in enumerate(self.slots) if s is None]
        batch: list[_Seq] = []
        while self.waiting and free:
            req = self.waiting.popleft()
            seq = _Seq(req, free.pop(0), self.tok, self.eos_ids, self.vocab, self.device, self.max_len)
            if seq.limit <= 0:
                events.append(Event(req, None, "", True, "length"))
                continue
            self.slots[seq.slot] = seq
            batch.append(seq)
        if not batch:
            return []
        deltas = getattr(self.cache, "rope_deltas", None)  # M-RoPE (nn/kv_cache.RopeDeltas)
        for s in batch:
            self.reserve(s.slot, len(s.req.prompt_ids))
            if deltas is not None:
                deltas.set(s.slot, s.rope_delta)  # the slot's previous sequence left its own
        recurrent = getattr(self.cache, "recurrent", False)  # a StateCache (nn/state_cache.py)
        if recurrent:
            for s in batch:  # the slot's previous sequence left its state behind
                self.cache.reset_rows(slice(s.slot, s.slot + 1))
        pc = self.prefix_cache
        if pc is not None and self._paged:
            raise GenerationError("the prefix cache does not work with a paged KV cache yet")
        if pc is not None:
            for s in batch:
                if s.req.cacheable:
                    s.start = pc.restore(self.cache, s.slot, s.req.prompt_ids)
        # Prefill runs of consecutive slots together (one forward each), long prompts in chunks.
        batch.sort(key=lambda s: s.slot)
        runs: list[list[_Seq]] = []
        for s in batch:
            if runs and runs[-1][-1].slot + 1 == s.slot:
                runs[-1].append(s)
            else:
                runs.append([s])
        ring = getattr(self.cache, "smallest_ring", None)
        if ring is not None or recurrent:
            # A row padded past a sliding window's ring would wrap its padding onto its own tokens
            # (kv_cache.py), and a padded row would scan its padding into its recurrent state
            # (state_cache.py): such runs are prefilled a row at a time.
            split = []
            for run in runs:
                lens = [len(s.req.prompt_ids) - s.start for s in run]
                wrap = len(set(lens)) > 1 and (recurrent or max(s.start for s in run) + max(lens) > ring)
                split += [[s] for s in run] if wrap else [run]
            runs = split
        # prompts with images (or their rotary positions) alone: their features replace the image
        # tokens' embeddings row by row
        runs = [r for run in runs for r in ([[s] for s in run] if any(
            s.req.image_embeds is not None or s.req.rope_positions is not None for s in run) else [run])]
        for run in runs:
            logits = self._prefill(run)
            if pc is not None:
                for s in run:
                    if s.req.cacheable:
                        pc.save(self.cache, s.slot, s.req.prompt_ids)
            events += self._emit(run, logits)
        return batch

    def _prefill(self, run: list[_Seq]) -> torch.Tensor:
        # each row feeds its prompt from s.start (the tokens before are in its cache row already)
        starts = [s.start for s in run]
        lens = [len(s.req.prompt_ids) - s.start for s in run]
        T, top = max(lens), max(starts)
        ids = torch.zeros(len(run), T, dtype=torch.long)
        for i, s in enumerate(run):
            ids[i, : lens[i]] = torch.tensor(s.req.prompt_ids[s.start:])
        ids = ids.to(self.device)
        rows = slice(run[0].slot, run[-1].slot + 1)
        last = torch.tensor([n - 1 for n in lens], device=self.device)
        first = torch.tensor(starts, device=self.device)[:, None]
        out = None
        images = run[0].req.image_embeds if len(run) == 1 else None
        # an image prompt in one forward: Gemma 3's images attend to their own later tokens
        chunk = T if images is not None else self.prefill_chunk
        extra = {"image_embeds": images} if images is not None else {}
        rope = run[0].req.rope_positions if len(run) == 1 else None
        if rope is not None:
            rope = rope[:, run[0].start:].to(self.device)[:, None]  # [3, 1, T]
        for c0 in range(0, T, chunk):
            c1 = min(T, c0 + chunk)
            if rope is not None:
                extra["rope_position_ids"] = rope[..., c0:c1]
            pos = torch.arange(c0, c1, device=self.device).expand(len(run), -1)
            if top:  # padding past the cache's end goes to the scratch column, which no row reads
                pos = (pos + first).clamp(max=self.max_len - 1)
            # rows whose prompt ends inside this chunk give their last-token logits now
            idx = (last - c0).clamp(0, c1 - c0 - 1)
            logits = self.model(ids[:, c0:c1], position_ids=pos, cache=self.cache, kv_len=min(top + c1, self.max_len),
                                cache_rows=rows, logits_index=idx, fresh=c0 == 0 and not top, **extra)
            if out is None:
                out = logits[:, 0]
            else:
                ends_here = (last >= c0) & (last < c1)
                out = torch.where(ends_here[:, None], logits[:, 0], out)
        return out

    def _flush(self) -> list[Event]:
        """Emit the tokens of the step still in flight (pipelined decoding), for live sequences."""
        if self._inflight is None:
            return []
        seqs, handle = self._inflight
        self._inflight = None
        toks = handle.result()
        alive = [s for s in seqs if self.slots[s.slot] is s]
        return self._emit(alive, None, [toks[s.slot] for s in alive]) if alive else []

    def _decode(self, running: list[_Seq]) -> list[Event]:
        for s in running:
            self.reserve(s.slot, s.pos + 1)
        hi = max(s.slot for s in running) + 1
        # constrained rows need their logits on the host side of the mask: no engine-side argmax
        greedy = all(s.req.sampling.greedy and not s.processed and s.matcher is None for s in running)
        step = self.decode_step
        feedback = step.feedback and greedy
        signature = (hi, tuple((s.slot, s.req.id) for s in running))
        if feedback and self._synced == signature and all(s.req.logprobs is None for s in running):
            # Pipelined: the device already holds every row's next input (last step's argmax,
            # position + 1). Launch this step, then hand out the previous step's tokens while it runs.
            handle = step.launch(hi)
            for s in running:
                s.pos += 1
            events = self._flush()
            self._inflight = (running, handle)
            return events
        events = self._flush()  # the batch changes: settle the step in flight first
        running = [s for s in running if self.slots[s.slot] is s]
        if not running:
            self._synced = None
            return events
        hi = max(s.slot for s in running) + 1
        signature = (hi, tuple((s.slot, s.req.id) for s in running))
        toks = None
        if feedback and self._synced == signature:
            # The device already holds every row's next input (last step's argmax, position + 1).
            logits, toks = step.replay(hi)
        else:
            # Rows in range that are not decoding (free, or prefilled this very step) write their dummy
            # token to the last column, which no live sequence reads before writing it itself.
            tok_col, pos_col = [0] * hi, [self.max_len - 1] * hi
            for s in running:
                tok_col[s.slot], pos_col[s.slot] = s.out[-1], s.pos
            kv_len = max(s.pos for s in running) + 1
            ids = torch.tensor(tok_col, dtype=torch.long).view(hi, 1)
            pos = torch.tensor(pos_col, dtype=torch.long).view(hi, 1)
            if self.device.type != "cpu":
                ids, pos = ids.to(self.device), pos.to(self.device)
            logits, toks = step(ids, pos, kv_len)
        self._synced = signature if feedback else None
        for s in running:
            s.pos += 1
        order = [s.slot for s in running]
        if order == list(range(hi)):
            return events + self._emit(running, logits, toks if greedy else None)
        # logits rows only for the running slots; greedy tokens are picked on the host by slot
        tok_rows = None
        if greedy and toks is not None:
            all_toks = toks.tolist()
            tok_rows = [all_toks[i] for i in order]
        return events + self._emit(running, logits[order] if (tok_rows is None or any(
            s.req.logprobs is not None for s in running)) else logits, tok_rows)

    def _emit(self, seqs: list[_Seq], logits: torch.Tensor, toks=None) -> list[Event]:
        """Sample one token per sequence from its logits row (unless `toks` came precomputed:
        greedy tokens from the engine, a tensor or host list aligned with seqs); advance,
        detokenise, check stops."""
        if logits is not None:
            logits = logits.float()
        if toks is None:
            if any(s.matcher is not None for s in seqs):
                from .grammar import mask_logits

                logits = mask_logits(logits, [s.matcher for s in seqs])
            toks = self._sample(seqs, logits)
        want_lp = [s.req.logprobs is not None for s in seqs]
        lp = top_v = top_i = None
        if any(want_lp):
            k = max(s.req.logprobs or 0 for s in seqs)
            tt = toks if isinstance(toks, torch.Tensor) else torch.tensor(toks, device=logits.device)
            lp, top_v, top_i = logprobs_of(logits, tt, k)
            lp = lp.tolist()
            if top_v is not None:
                top_v, top_i = top_v.tolist(), top_i.tolist()
        tok_list = toks.tolist() if isinstance(toks, torch.Tensor) else toks
        events = []
        for i, s in enumerate(seqs):
            t = tok_list[i]
            if s.seen is not None:
                s.seen[t] = True
            if s.counts is not None:
                s.counts[t] += 1
            s.out.append(t)
            stop_tok = t in s.stop_ids
            # a grammar that is complete ends the request (only the end of sequence could follow)
            grammar_end = s.matcher is not None and not stop_tok and (not s.matcher.advance(t) or s.matcher.done)
            piece = "" if stop_tok or s.decoder is None else s.decoder.push(t)
            length = len(s.out) >= s.limit
            final = stop_tok or length or grammar_end
            if final and not stop_tok and s.decoder is not None:
                piece += s.decoder.flush()
            text, stop_str = s.push_text(piece, final)
            ev = Event(s.req, t, text)
            if want_lp[i]:
                ev.logprob = lp[i]
                if s.req.logprobs:
                    ev.top_logprobs = list(zip(top_i[i][: s.req.logprobs], top_v[i][: s.req.logprobs]))
            if stop_tok or stop_str or length or grammar_end:
                ev.finished = True
                ev.finish_reason = "stop" if (stop_tok or stop_str or grammar_end) else "length"
                if self.prefix_cache is not None and s.req.cacheable:
                    # the row holds the first s.pos tokens (a pipelined step in flight may have fed the last one too)
                    self.prefix_cache.save(self.cache, s.slot, [*s.req.prompt_ids, *s.out][:s.pos], s.pos)
                self._free(s.slot)
            events.append(ev)
        return events

    def _sample(self, seqs: list[_Seq], logits: torch.Tensor) -> torch.Tensor:
        if all(s.req.sampling.greedy and not s.processed for s in seqs):
            return logits.argmax(dim=-1)
        return torch.cat([sample(self._processed(s, logits[i : i + 1]), s.req.sampling, s.gen)
                          for i, s in enumerate(seqs)])

    def _processed(self, s: _Seq, row: torch.Tensor) -> torch.Tensor:
        """A sequence's logits row [1, V] after its repetition, presence and frequency penalties and
        logit bias."""
        if s.seen is not None:
            row = apply_repetition_penalty(row, s.seen[None], s.req.sampling.repetition_penalty)
        if s.counts is not None:
            sp = s.req.sampling
            row = apply_penalties(row, s.counts[None], sp.presence_penalty, sp.frequency_penalty)
        if s.bias is not None:
            row = row + s.bias
        return row
