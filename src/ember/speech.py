"""Speech to text with Whisper: `ember.load(model)` returns a Transcriber.

    asr = ember.load("openai/whisper-tiny")
    asr.transcribe("speech.wav")                              # -> str (language detected)
    asr.transcribe("speech.wav", language="de", task="translate")
    asr.transcribe_ids(samples_16khz)                         # token ids after the decoder prompt

Each 30 s window of audio is turned into log-mel features (ember.audio, as transformers'
WhisperFeatureExtractor), encoded once, and decoded greedily (ember.generation.seq2seq) after the
decoder prompt transformers builds: <|startoftranscript|>, then on multilingual models the language
and task tokens, then <|notimestamps|>; `suppress_tokens` and `begin_suppress_tokens` from
generation_config.json are never generated. Without a language, a multilingual model's language is
detected as transformers does (the most likely language token after <|startoftranscript|>).
Audio longer than 30 s is cut into consecutive 30 s windows transcribed one after the other and
joined (no timestamps, so no seeking at segment boundaries as transformers' long-form mode does).
"""
from __future__ import annotations

from typing import Any

import torch

from .audio import LogMel, load_audio
from .errors import GenerationError, TokenizerError
from .generation.seq2seq import greedy
from .loading import Loaded, eos_ids

TASKS = ("transcribe", "translate")


def _int_list(v: Any) -> list[int]:
    return [t for t in v if isinstance(t, int) and not isinstance(t, bool)] if isinstance(v, list) else []


class Transcriber:
    def __init__(self, loaded: Loaded):
        self._loaded = loaded
        self.config = loaded.config
        self.model = loaded.model
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

    def prompt(self, language: str | None, task: str = "transcribe") -> list[int]:
        """The decoder prompt transformers builds for this language and task (without timestamps)."""
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
        if self.no_timestamps_token_id is not None:
            ids.append(self.no_timestamps_token_id)
        return ids

    def transcribe_ids(self, audio, *, language: str | None = None, task: str = "transcribe",
                       max_tokens: int | None = None) -> list[list[int]]:
        """Greedy token ids (end token included) after the prompt, one list per 30 s window."""
        samples = load_audio(audio)
        feats = self.features.windows(samples).to(self.dtype)
        out = []
        for w in feats.split(1):
            lang = language
            if lang is None and self.multilingual:
                lang = self.detect_language(w)[0]
            prompt = self.prompt(lang, task)
            room = self.model.max_target_positions - len(prompt)
            n = room if max_tokens is None else max_tokens
            if isinstance(n, int) and not isinstance(n, bool) and n > room:
                raise GenerationError(f"max_tokens {n} with a {len(prompt)}-token prompt passes the decoder's "
                                      f"{self.model.max_target_positions} positions")
            out += greedy(self.model, w.to(self.device), None, n, prompt, self.eos_token_ids, self.pad_token_id,
                          suppress=self.suppress_tokens, begin_suppress=self.begin_suppress_tokens)
        return out

    def transcribe(self, audio, *, language: str | None = None, task: str = "transcribe",
                   max_tokens: int | None = None) -> str:
        """The text of `audio` (a path to WAV/FLAC/MP3/OGG, or 16 kHz mono samples)."""
        if self.tokenizer is None:
            raise TokenizerError("this model has no tokenizer.json; use transcribe_ids")
        parts = self.transcribe_ids(audio, language=language, task=task, max_tokens=max_tokens)
        return " ".join(self.tokenizer.decode(p).strip() for p in parts).strip()

    __call__ = transcribe
