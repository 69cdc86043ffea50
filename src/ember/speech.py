"""Speech to text with Whisper: `ember.load(model)` returns a Transcriber.

    asr = ember.load("openai/whisper-tiny")
    asr.transcribe("speech.wav")                              # -> str (language detected)
    asr.transcribe("speech.wav", language="de", task="translate")
    asr.transcribe_ids(samples_16khz)                         # token ids after the decoder prompt

Audio is turned into log-mel features (ember.audio, as transformers' WhisperFeatureExtractor),
and each 30 s window is encoded once and decoded (ember.generation.whisper) after the decoder prompt
transformers builds: <|startoftranscript|>, then on multilingual models the language and task
tokens, then <|notimestamps|> unless timestamps are asked for; `suppress_tokens` and
`begin_suppress_tokens` from generation_config.json are never generated. Without a language, a
multilingual model's language is detected as transformers does (the most likely language token
after <|startoftranscript|>, on the first 30 s).

    asr.transcription("talk.mp3", timestamps=True)   # -> Transcription: text, language, segments
                                                      #    (start/end seconds, tokens, text each)
    asr.transcription("talk.mp3", word_timestamps=True).words   # -> [Word(word, start, end, tokens)]

Word timestamps are transformers' (return_timestamps="word"): the cross-attention of the
checkpoint's alignment heads over each window's final tokens, computed in a second decoder pass
only when asked (ember.generation.whisper_alignment), aligned to the audio by dynamic time warping,
and the tokens grouped into words as its tokenizer does (ember.generation.whisper_words).

Audio longer than 30 s is transcribed as transformers' long-form generation does: timestamps on,
features of the whole audio, each window starting where the previous one's last complete segment
ended. `temperature` may be a sequence: a window whose tokens compress too well or whose mean
log-probability is too low (`compression_ratio_threshold`, `logprob_threshold`) is decoded again at
the next temperature.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence, Union, cast

import torch

from .audio import LogMel, load_audio
from .errors import GenerationError, TokenizerError
from .generation.whisper import INPUT_STRIDE, TIME_PRECISION, Rules, Segment, decode_with_fallback, split_segments
from .generation.whisper_alignment import alignment_heads, token_timestamps
from .generation.whisper_words import Word, timed_words
from .loading import Loaded, eos_ids

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

TASKS = ("transcribe", "translate")
# what `transcription` takes: a path to WAV/FLAC/MP3/OGG, a file's bytes, or 16 kHz mono samples
Audio = Union[str, os.PathLike[str], bytes, "np.ndarray", torch.Tensor, Sequence[float]]


def _int_list(v: Any) -> list[int]:
    return [t for t in v if isinstance(t, int) and not isinstance(t, bool)] if isinstance(v, list) else []


class Transcriber:
    def __init__(self, loaded: Loaded) -> None:
        self._loaded = loaded
        self.config = loaded.config
        self.model: Any = cast(Any, loaded.model)  # models/whisper.py's model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.dtype = loaded.dtype
        gc = loaded.generation_config
        self.generation_config = gc
        self.features = LogMel.from_file(loaded.snapshot.file("preprocessor_config.json"), self.config.num_mel_bins)
        if self.features.frames != self.model.encoder.frames:
            from .errors import AudioError

            raise AudioError(f"{loaded.snapshot.root}: the feature extractor gives {self.features.frames} frames, "
                             f"the encoder takes {self.model.encoder.frames}")
        self.eos_token_ids = eos_ids(gc.get("eos_token_id"), *self.model.eos_token_ids)
        start = gc.get("decoder_start_token_id", self.model.decoder_start_token_id)
        self.start_token_id = start if isinstance(start, int) else self.model.decoder_start_token_id
        self.lang_to_id = {k: v for k, v in (gc.get("lang_to_id") or {}).items() if isinstance(v, int)}
        self.task_to_id = {k: v for k, v in (gc.get("task_to_id") or {}).items() if isinstance(v, int)}
        self.multilingual = bool(gc.get("is_multilingual", bool(self.lang_to_id)))
        nt = gc.get("no_timestamps_token_id")
        self.no_timestamps_token_id = nt if isinstance(nt, int) else None
        self.suppress_tokens = _int_list(gc.get("suppress_tokens"))
        self.begin_suppress_tokens = _int_list(gc.get("begin_suppress_tokens"))
        self.pad_token_id = self.model.pad_token_id
        mi = gc.get("max_initial_timestamp_index")
        self.max_initial_timestamp_index = mi if isinstance(mi, int) and not isinstance(mi, bool) and mi >= 0 else None

    def __repr__(self) -> str:
        return (f"Transcriber({self._loaded.snapshot.source!r}, multilingual={self.multilingual}, "
                f"dtype={self.dtype}, device={self.device})")

    @property
    def languages(self) -> list[str]:
        """Language codes this model knows ("en", "de", ...)."""
        return [k.strip("<|>") for k in self.lang_to_id]

    def _lang_token(self, language: str) -> int:
        if not isinstance(language, str):
            raise GenerationError(f"language must be a code such as 'en', got {language!r:.40}")
        key = language if language.startswith("<|") else f"<|{language.lower()}|>"
        if key not in self.lang_to_id:
            raise GenerationError(f"language {language!r:.40} is not one this model knows: "
                                  f"{', '.join(self.languages)[:400]}")
        return self.lang_to_id[key]

    @torch.inference_mode()
    def detect_language(self, features: torch.Tensor) -> list[str]:
        """The most likely language of each window [N, n_mels, frames] (multilingual models)."""
        if not self.lang_to_id:
            raise GenerationError("this model has no language tokens (generation_config.json lang_to_id)")
        enc = self.model.encode(features.to(self.device))
        ids = torch.full((features.shape[0], 1), self.start_token_id, dtype=torch.long, device=self.device)
        logits = self.model.decode(ids, enc)[:, -1]
        codes, tok = list(self.lang_to_id), torch.tensor(list(self.lang_to_id.values()), device=self.device)
        return [codes[i].strip("<|>") for i in logits[:, tok].argmax(dim=-1).tolist()]

    def prompt(self, language: str | None, task: str = "transcribe", timestamps: bool = False) -> list[int]:
        """The decoder prompt transformers builds for this language and task (<|notimestamps|> last
        unless `timestamps`)."""
        if task not in TASKS:
            raise GenerationError(f"task must be one of {', '.join(TASKS)}, got {task!r:.40}")
        ids = [self.start_token_id]
        if self.multilingual:
            if language is not None:
                ids.append(self._lang_token(language))
            if task not in self.task_to_id:
                raise GenerationError(f"this model's generation_config.json has no task token for {task!r}")
            ids.append(self.task_to_id[task])
        elif language is not None and language.strip("<|>").lower() not in ("en", "english"):
            raise GenerationError(f"this is an English-only model; it cannot take language {language!r:.40}")
        elif task != "transcribe":
            raise GenerationError("this is an English-only model; it only transcribes")
        if self.no_timestamps_token_id is not None and not timestamps:
            ids.append(self.no_timestamps_token_id)
        return ids

    def _rules(self, timestamps: bool) -> Rules:
        if timestamps and self.no_timestamps_token_id is None:
            raise GenerationError("timestamps need generation_config.json's no_timestamps_token_id (timestamp "
                                  "tokens follow it)")
        nt = self.no_timestamps_token_id
        return Rules(self.eos_token_ids, self.suppress_tokens, self.begin_suppress_tokens,
                     nt + 1 if timestamps and nt is not None else None, self.no_timestamps_token_id,
                     self.max_initial_timestamp_index)

    def transcription(self, audio: Audio, *, language: str | None = None, task: str = "transcribe",
                      timestamps: bool = False, word_timestamps: bool = False, max_tokens: int | None = None,
                      temperature: float | Sequence[float] = 0.0, compression_ratio_threshold: float | None = None,
                      logprob_threshold: float | None = None, seed: int | None = None) -> "Transcription":
        """`audio` (a path to WAV/FLAC/MP3/OGG, or 16 kHz mono samples) as text and segments.

        timestamps: segments with the model's own start/end times (always on past 30 s, as
        transformers); word_timestamps: each segment's words with their times too (timestamps on, as
        transformers' pipeline with return_timestamps="word"; needs the checkpoint's alignment_heads);
        max_tokens: per 30 s window; temperature: one, or several to fall back through (with the
        thresholds, as transformers' generate); seed: for the sampled tries."""
        temps = _temperatures(temperature)
        heads = None
        if word_timestamps:
            c = self.config
            heads = alignment_heads(self.generation_config, c.decoder_layers, c.decoder_attention_heads)
            if self.tokenizer is None:
                raise TokenizerError("word timestamps need the model's tokenizer.json (words are decoded text)")
        for name, v in (("compression_ratio_threshold", compression_ratio_threshold),
                        ("logprob_threshold", logprob_threshold)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise GenerationError(f"{name} must be a finite number, got {v!r:.40}")
        samples = load_audio(audio)
        feats = self.features.whole(samples)
        total, W = feats.shape[-1], self.features.frames
        timestamps = bool(timestamps) or bool(word_timestamps) or total > W
        real_frames = -(-len(samples) // self.features.hop_length)  # transformers' attention mask's length
        rules = self._rules(timestamps)
        tb = None if self.no_timestamps_token_id is None else self.no_timestamps_token_id + 1
        lang = language
        if lang is None and self.multilingual:
            lang = self.detect_language(feats[None, :, :W].to(self.dtype))[0]
        prompt = self.prompt(lang, task, timestamps)
        room = self.model.max_target_positions - len(prompt)
        n = room if max_tokens is None else max_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise GenerationError(f"max_tokens must be a non-negative integer, got {n!r:.60}")
        if n > room:
            raise GenerationError(f"max_tokens {n} with a {len(prompt)}-token prompt passes the decoder's "
                                  f"{self.model.max_target_positions} positions")
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(int(seed))
        segments: list[Segment] = []
        windows: list[list[int]] = []
        seek = 0
        while seek < total:
            frames = min(W, total - seek)
            x = torch.nn.functional.pad(feats[:, seek:seek + frames], (0, W - frames))  # zeros, as transformers
            with torch.inference_mode():
                enc = self.model.encode(x[None].to(device=self.device, dtype=self.dtype))
            d = decode_with_fallback(self.model, enc, prompt, n, rules, temperatures=temps,
                                     compression_ratio_threshold=compression_ratio_threshold,
                                     logprob_threshold=logprob_threshold, generator=gen)
            windows.append(d.tokens)
            toks = d.tokens[:-1] if d.tokens and d.tokens[-1] in self.eos_token_ids else d.tokens
            offset = seek * TIME_PRECISION / INPUT_STRIDE
            if tb is not None and toks:  # (also without timestamps, as transformers: a real model makes none)
                segs, advance = split_segments(toks, tb, offset, frames)
            else:
                segs, advance = [Segment(offset, offset + frames * TIME_PRECISION / INPUT_STRIDE, toks)], frames
            for sg in segs:
                sg.window, sg.temperature, sg.avg_logprob, sg.compression_ratio = (
                    seek, d.temperature, d.avg_logprob, d.compression_ratio)
                sg.text = self._text(sg.tokens, tb)
            if heads is not None:
                times = token_timestamps(self.model, enc, prompt, d.tokens, heads, real_frames - seek)
                self._words(segs, prompt, times, offset, lang)
            segments += [sg for sg in segs if sg.tokens]
            seek += advance if advance > 0 else frames  # (a window that would not move on is passed)
        text_ids = [t for sg in segments for t in sg.tokens if tb is None or t < tb]
        text = self.tokenizer.decode(text_ids).strip() if self.tokenizer is not None else ""
        return Transcription(text, lang, len(samples) / self.features.sampling_rate, segments, windows)

    def _words(self, segments: list[Segment], prompt: list[int], times: list[float], offset: float,
               language: str | None) -> None:
        """Each of one window's segments given its words. A text token spans from the time of the
        token before it (the prompt's are 0) to its own, as transformers' pipeline; times rounded to
        10 ms as there."""
        assert self.tokenizer is not None
        full = [offset] * len(prompt) + [offset + t for t in times]
        first_special = min(self.eos_token_ids + [self.start_token_id])
        i = len(prompt)  # the segments are consecutive runs of the window's tokens
        for sg in segments:
            text, starts, ends = [], [], []
            for k, t in enumerate(sg.tokens, i):
                if t < first_special:
                    text.append(t)
                    starts.append(round(full[k - 1], 2))
                    ends.append(round(full[k], 2))
            sg.token_times = full[i:i + len(sg.tokens)]
            i += len(sg.tokens)
            sg.words = timed_words(self.tokenizer.decode, text, starts, ends,
                                   language.strip("<|>").lower() if language else None)

    def _text(self, tokens: list[int], timestamp_begin: int | None) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode([t for t in tokens if timestamp_begin is None or t < timestamp_begin])

    def transcribe_ids(self, audio: Audio, **kw: Any) -> list[list[int]]:
        """The token ids each 30 s window decoded (end token included), after its prompt; the
        arguments are `transcription`'s."""
        return self.transcription(audio, **kw).windows

    def transcribe(self, audio: Audio, **kw: Any) -> str:
        """The text of `audio` (a path to WAV/FLAC/MP3/OGG, or 16 kHz mono samples); the arguments
        are `transcription`'s."""
        if self.tokenizer is None:
            raise TokenizerError("this model has no tokenizer.json; use transcribe_ids")
        return self.transcription(audio, **kw).text

    __call__ = transcribe


@dataclass
class Transcription:
    text: str
    language: str | None  # the code given or detected (None on English-only models)
    duration: float  # seconds of audio
    segments: list[Segment]
    windows: list[list[int]]  # the tokens each 30 s window decoded, end token included

    @property
    def words(self) -> list[Word]:
        """Every segment's words in order (filled with word_timestamps=True)."""
        return [w for s in self.segments for w in s.words]


def _temperatures(t: object) -> tuple[float, ...]:
    ts = (t,) if isinstance(t, (int, float)) and not isinstance(t, bool) else t
    if not isinstance(ts, (list, tuple)) or not ts or len(ts) > 16 or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x <= 2 for x in ts):
        raise GenerationError(f"temperature must be a number in [0, 2] or a list of up to 16 of them, got {t!r:.60}")
    return tuple(float(x) for x in ts)
