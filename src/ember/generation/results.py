"""What `generate(..., details=True)` and `stream(..., details=True)` return: the text with its token
ids, finish reason, usage, logprobs and timing (as mlx-lm's `GenerationResponse` and vLLM's
`RequestOutput` carry them)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from .loop import Event, Request


@dataclass(frozen=True)
class Usage:
    """Token counts, as the OpenAI API reports them (completion tokens include a stop token)."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Completion:
    """One finished generation.

    text: the generated text (stop strings cut off); token_ids: every generated token, an end-of-sequence
    or stop token included; finish_reason: "stop" (an end-of-sequence token, a stop token or a stop
    string) or "length" (max_tokens); logprobs / top_logprobs: per generated token, when the call asked
    for `logprobs=` (0: the chosen token's; k: plus the k most likely as (token id, logprob));
    ttft_s: seconds from the call to the first token; total_s: to the last."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    ttft_s: float = 0.0
    total_s: float = 0.0

    @property
    def usage(self) -> Usage:
        return Usage(len(self.prompt_token_ids), len(self.token_ids))

    @property
    def prompt_tps(self) -> float:
        """Prompt tokens per second of the time to the first token (prefill)."""
        return len(self.prompt_token_ids) / self.ttft_s if self.ttft_s > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        """Generated tokens per second after the first one (decoding)."""
        n, dt = len(self.token_ids) - 1, self.total_s - self.ttft_s
        return n / dt if n > 0 and dt > 0 else 0.0

    def __str__(self) -> str:
        return self.text


@dataclass
class Chunk:
    """One streamed token: the text it completed (may be empty while a stop string is pending), its
    id and logprobs; the last chunk has a finish_reason and the whole `completion`."""

    text: str
    token_id: int | None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None
    completion: Completion | None = None


@dataclass
class Collector:
    """Folds a request's events into its Completion (and Chunks, for streaming)."""

    request: Request
    start: float = field(default_factory=time.perf_counter)
    parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    first: float | None = None
    last: float | None = None
    finish_reason: str | None = None

    def add(self, ev: Event) -> Chunk:
        now = time.perf_counter()
        if ev.token_id is not None:
            self.token_ids.append(ev.token_id)
            self.first = self.first if self.first is not None else now
            self.last = now
            if ev.logprob is not None:
                self.logprobs.append(ev.logprob)
                self.top.append(list(ev.top_logprobs or []))
        if ev.text:
            self.parts.append(ev.text)
        chunk = Chunk(ev.text, ev.token_id, ev.logprob, ev.top_logprobs)
        if ev.finished:
            self.finish_reason = chunk.finish_reason = ev.finish_reason
            chunk.completion = self.completion()
        return chunk

    def completion(self) -> Completion:
        want = self.request.logprobs is not None
        first = self.first if self.first is not None else time.perf_counter()
        last = self.last if self.last is not None else first
        return Completion("".join(self.parts), list(self.token_ids), self.finish_reason,
                          list(self.request.prompt_ids), list(self.logprobs) if want else None,
                          [list(t) for t in self.top] if want and self.request.logprobs else None,
                          first - self.start, last - self.start)
