"""Whisper's decoding, as transformers' WhisperGenerationMixin does it: one 30 s window decoded
after its prompt with the timestamp rules, temperature fallback, and the window's tokens cut into
timestamped segments (which also say where the next window starts, for long-form audio).

    rules = Rules(eos_ids=[50257], suppress=[...], begin_suppress=[220, 50257], timestamp_begin=50364, ...)
    out = decode_with_fallback(model, enc, prompt, 224, rules, temperatures=(0.0, 0.2, 0.4),
                               compression_ratio_threshold=1.35, logprob_threshold=-1.0)
    segments, advance = split_segments(out.tokens, rules.timestamp_begin, offset_s, window_frames)

Timestamp rules (transformers' WhisperTimeStampLogitsProcessor): <|notimestamps|> is never
generated; timestamps come in pairs except right before the end token; they never decrease (and
<|0.00|> is not repeated); the first token is a timestamp at most `max_initial_timestamp_index`;
when the timestamps' total probability beats every text token's, a timestamp is taken.
Fallback (transformers' generate_with_fallback): a window whose tokens compress too well (zlib over
the token ids, `compression_ratio_threshold`) or whose mean log-probability is too low
(`logprob_threshold`) is decoded again at the next temperature; the last try is kept.
Sampling is softmax + torch.multinomial over the processed logits divided by the temperature, then
top-k (transformers' default 50), as transformers' sampling loop.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..errors import GenerationError
from .whisper_words import Word

TIME_PRECISION = 0.02  # seconds per timestamp token
INPUT_STRIDE = 2  # log-mel frames per encoder position (conv2's stride)
TOP_K = 50  # transformers' GenerationConfig default, applied when it samples


@dataclass
class Rules:
    """What decoding a window needs from generation_config.json."""

    eos_ids: list[int]
    suppress: list[int] = field(default_factory=list)
    begin_suppress: list[int] = field(default_factory=list)
    timestamp_begin: int | None = None  # None: no timestamps (the prompt ends with <|notimestamps|>)
    no_timestamps_id: int | None = None
    max_initial_timestamp_index: int | None = None


@dataclass
class Decoded:
    tokens: list[int]  # generated ids, the end token (if reached) included
    temperature: float
    avg_logprob: float
    compression_ratio: float


def compression_ratio(tokens: Sequence[int], vocab_size: int) -> float:
    """Bytes of the token ids over their zlib-compressed bytes (transformers' _retrieve_compression_ratio)."""
    width = int(math.log2(vocab_size) / 8) + 1
    raw = b"".join(t.to_bytes(width, "little") for t in tokens)
    return len(raw) / len(zlib.compress(raw)) if raw else 0.0


def _process(logits: torch.Tensor, generated: list[int], rules: Rules) -> torch.Tensor:
    """The logits [1, V] after begin-suppress, suppress and the timestamp rules, in transformers' order."""
    s = logits.clone()
    V = s.shape[-1]
    if not generated:
        ids = [t for t in rules.begin_suppress if 0 <= t < V]
        if ids:
            s[:, ids] = float("-inf")
    ids = [t for t in rules.suppress if 0 <= t < V]
    if ids:
        s[:, ids] = float("-inf")
    tb = rules.timestamp_begin
    if tb is None:
        return s
    if rules.no_timestamps_id is not None and 0 <= rules.no_timestamps_id < V:
        s[:, rules.no_timestamps_id] = float("-inf")
    last_ts = len(generated) >= 1 and generated[-1] >= tb
    penultimate_ts = len(generated) < 2 or generated[-2] >= tb
    if last_ts:
        if penultimate_ts:  # a pair is closed: text (or the end) next
            s[:, tb:] = float("-inf")
        else:  # a single timestamp after text: another timestamp or the end, no text
            s[:, :rules.eos_ids[0]] = float("-inf")
    stamps = [t for t in generated if t >= tb]
    if stamps:  # timestamps never decrease; <|0.00|> is not repeated
        floor = stamps[-1] if last_ts and not penultimate_ts else stamps[-1] + 1
        s[:, tb:floor] = float("-inf")
    if not generated:
        s[:, :tb] = float("-inf")
        if rules.max_initial_timestamp_index is not None:
            s[:, tb + rules.max_initial_timestamp_index + 1:] = float("-inf")
    logp = torch.log_softmax(s.float(), dim=-1)
    if bool(logp[:, tb:].logsumexp(dim=-1) > logp[:, :tb].max(dim=-1).values):
        s[:, :tb] = float("-inf")
    return s


@torch.inference_mode()
def decode_window(model, enc: torch.Tensor, prompt: Sequence[int], max_tokens: int, rules: Rules,
                  temperature: float = 0.0, generator: torch.Generator | None = None) -> Decoded:
    """Decode one window's encoder states `enc` [1, S, d] after `prompt`: greedy at temperature 0,
    sampled (top-k 50) above it. The mean log-probability counts the end token, as transformers."""
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 2:
        raise GenerationError(f"temperature must be a number in [0, 2], got {temperature!r:.40}")
    cache = model.new_cache(1, len(prompt) + max_tokens)
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=enc.device)
    eos = set(rules.eos_ids)
    out: list[int] = []
    logprob = 0.0
    for _ in range(max_tokens):
        logits = model.decode(ids, enc, None, cache)[:, -1].float()
        s = _process(logits, out, rules)
        if temperature > 0:
            if s.shape[-1] > TOP_K:
                kth = torch.topk(s, TOP_K, dim=-1).values[:, -1:]
                s = s.masked_fill(s < kth, float("-inf"))
            tok = int(torch.multinomial(torch.softmax(s / temperature, dim=-1), 1, generator=generator))
        else:
            tok = int(s.argmax(dim=-1))
        logprob += float(torch.log_softmax(s, dim=-1)[0, tok])
        out.append(tok)
        if tok in eos:
            break
        ids = torch.tensor([[tok]], dtype=torch.long, device=enc.device)
    n = max(len(out), 1)
    return Decoded(out, float(temperature), logprob / n, compression_ratio(out, logits.shape[-1]) if out else 0.0)


def decode_with_fallback(model, enc: torch.Tensor, prompt: Sequence[int], max_tokens: int, rules: Rules, *,
                         temperatures: Sequence[float] = (0.0,), compression_ratio_threshold: float | None = None,
                         logprob_threshold: float | None = None, generator: torch.Generator | None = None) -> Decoded:
    """`decode_window` at each temperature in turn until the result passes both thresholds (the last
    try is kept whatever it scores)."""
    if not temperatures:
        raise GenerationError("temperatures must name at least one temperature")
    for i, t in enumerate(temperatures):
        d = decode_window(model, enc, prompt, max_tokens, rules, t, generator)
        bad = ((compression_ratio_threshold is not None and d.compression_ratio > compression_ratio_threshold)
               or (logprob_threshold is not None and d.avg_logprob < logprob_threshold))
        if not bad:
            break
    return d


@dataclass
class Segment:
    start: float  # seconds from the start of the audio
    end: float
    tokens: list[int]  # the segment's tokens, its timestamp tokens included
    window: int = 0  # log-mel frame at which its window starts (OpenAI's `seek`)
    text: str = ""
    temperature: float = 0.0
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0
    token_times: list[float] = field(default_factory=list)  # with word timestamps: seconds, one per token
    words: list[Word] = field(default_factory=list)  # with word timestamps


def split_segments(tokens: Sequence[int], timestamp_begin: int, offset: float,
                   window_frames: int) -> tuple[list[Segment], int]:
    """A window's tokens (end token removed) cut at its timestamp pairs, and how many log-mel frames
    the next window moves on (transformers' _retrieve_segment): the whole window when the tokens end
    with a single timestamp or have no pair, else up to the last complete segment's end."""
    tokens = list(tokens)
    is_ts = [t >= timestamp_begin for t in tokens]
    single_ending = is_ts[-2:] == [False, True]
    cuts = [i + 1 for i in range(len(is_ts) - 1) if is_ts[i] and is_ts[i + 1]]
    if cuts:
        if single_ending:
            cuts.append(len(tokens))
        else:
            cuts[-1] += 1  # the last pair's second timestamp stays with the last segment
        segments, last = [], 0
        for k, cut in enumerate(cuts):
            part = tokens[last:cut]
            end_i = -1 if k < len(cuts) - 1 or single_ending else -2
            segments.append(Segment(offset + (part[0] - timestamp_begin) * TIME_PRECISION,
                                    offset + (part[end_i] - timestamp_begin) * TIME_PRECISION, part))
            last = cut
        if single_ending:
            return segments, window_frames
        return segments, (tokens[last - 2] - timestamp_begin) * INPUT_STRIDE
    stamps = [t for t in tokens if t >= timestamp_begin]
    end = int(window_frames * 0.01 / TIME_PRECISION)  # in timestamp steps (a frame is 10 ms)
    if stamps and stamps[-1] != timestamp_begin:
        end = stamps[-1] - timestamp_begin
    return [Segment(offset, offset + end * TIME_PRECISION, tokens)], window_frames
