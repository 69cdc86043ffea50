"""Audio in, log-mel features out: decoding, resampling, and Whisper's feature extractor.

    wave = load_audio("speech.wav")                   # float32 mono at 16 kHz
    fe = LogMel.from_file(root / "preprocessor_config.json")
    feats = fe(wave)                                  # [n_mels, 3000] float32 (30 s, zero-padded / cut)

The features match transformers' WhisperFeatureExtractor (its torch path): a periodic Hann window
STFT (n_fft 400, hop 160), power spectrum, Slaney mel filters (transformers' mel_filter_bank,
re-derived here in numpy), log10 clamped at 1e-10, floored at max - 8, then (x + 4) / 4.

Files are read with soundfile (libsndfile: WAV, FLAC, OGG, MP3) when it is installed, else WAV with
the standard library's `wave`; other rates are resampled to 16 kHz with scipy's polyphase filter.
Bad audio is an `AudioError`: unreadable or corrupt files, no samples, non-finite samples, files
over `MAX_FILE_BYTES`, or more than `MAX_SECONDS` of sound (checked from the header before the
samples are read).
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import AudioError

SAMPLE_RATE = 16000
MAX_FILE_BYTES = 1 << 30
MAX_SECONDS = 4 * 3600  # 4 hours: 921.6 M samples at 16 kHz would be 3.7 GB as float32


MAX_RATE = 384000  # Hz; past any real recording
BLOCK = 1 << 20  # frames read at a time: memory follows the samples a file holds, not the count it claims


def _check_frames(frames: int, rate: int, where: str, max_seconds: float = MAX_SECONDS) -> None:
    if not 0 < rate <= MAX_RATE:
        raise AudioError(f"{where}: sample rate {rate} Hz is not one ember reads (1..{MAX_RATE})")
    if frames <= 0:
        raise AudioError(f"{where}: the audio has no samples")
    if frames / rate > max_seconds:
        raise AudioError(f"{where}: {frames / rate:,.0f} s of audio, more than the {max_seconds:,.0f} s ember reads")


def _blocks(read, frames: int, where: str) -> np.ndarray:
    """[n, channels] float32 from `read(k)` calls of at most BLOCK frames, up to `frames` (the count
    the header claims, already bounded) or the end of the data, whichever comes first."""
    parts, got = [], 0
    while got < frames:
        a = read(min(BLOCK, frames - got))
        if a.shape[0] == 0:
            break
        parts.append(a)
        got += a.shape[0]
    if not got:
        raise AudioError(f"{where}: the audio has no samples")
    return np.concatenate(parts)


def _read_wave(src, where: str, max_seconds: float = MAX_SECONDS) -> tuple[np.ndarray, int]:
    import wave

    try:
        with wave.open(src if not isinstance(src, Path) else str(src), "rb") as w:
            ch, width, rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            _check_frames(n, rate, where, max_seconds)
            if ch < 1 or width not in (1, 2, 4):
                raise AudioError(f"{where}: {ch} channels of {8 * width}-bit samples; ember reads 8/16/32-bit PCM WAV "
                                 f"(install soundfile for other formats)")
            dtype = {1: np.uint8, 2: np.int16, 4: np.int32}[width]

            def read(k: int) -> np.ndarray:
                raw = w.readframes(k)
                return np.frombuffer(raw[: len(raw) - len(raw) % (width * ch)], dtype=dtype).reshape(-1, ch)

            a = _blocks(read, n, where).astype(np.float32)
    except AudioError:
        raise
    except (wave.Error, EOFError, OSError, ValueError) as e:
        raise AudioError(f"{where}: not a readable WAV file ({str(e)[:200]}); install soundfile for FLAC/MP3/OGG") from None
    if width == 1:
        a = (a - 128.0) / 128.0
    else:
        a /= float(1 << (8 * width - 1))
    return a.mean(axis=1), rate


def _read_soundfile(src, where: str, max_seconds: float = MAX_SECONDS) -> tuple[np.ndarray, int]:
    import soundfile

    try:
        with soundfile.SoundFile(src if not isinstance(src, Path) else str(src)) as f:
            rate = f.samplerate
            _check_frames(f.frames, rate, where, max_seconds)
            a = _blocks(lambda k: f.read(k, dtype="float32", always_2d=True), f.frames, where)
    except AudioError:
        raise
    except (soundfile.LibsndfileError, RuntimeError, OSError, ValueError, TypeError) as e:
        why = getattr(e, "error_string", None) or str(e)  # (libsndfile's, without the file object's repr)
        raise AudioError(f"{where}: not a readable audio file ({why[:200]})") from None
    return a.mean(axis=1), rate


def resample(a: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """`a` at `rate` Hz → `target` Hz (scipy.signal.resample_poly: a polyphase low-pass filter)."""
    if rate == target:
        return a
    try:
        from scipy.signal import resample_poly
    except ImportError:  # pragma: no cover - depends on the environment
        raise AudioError(f"the audio is at {rate} Hz; resampling to {target} Hz needs scipy "
                         f"(pip install 'ember[audio]')") from None
    from math import gcd

    g = gcd(rate, target)
    return resample_poly(a, target // g, rate // g).astype(np.float32)


def _reader():
    try:
        importlib.import_module("soundfile")
        return _read_soundfile
    except (ImportError, OSError):  # not installed, or libsndfile missing
        return _read_wave


def load_audio(item: Any, where: str = "audio", max_seconds: float = MAX_SECONDS) -> np.ndarray:
    """Mono float32 samples at 16 kHz from a path, the bytes of an audio file, or a 1-D array
    already at 16 kHz. Longer than `max_seconds` is an AudioError."""
    if isinstance(item, np.ndarray) or type(item).__name__ == "Tensor":
        a = np.asarray(item, dtype=np.float32)
        if a.ndim != 1:
            raise AudioError(f"{where}: expected mono samples (a 1-D array at {SAMPLE_RATE} Hz), got shape {a.shape}")
        _check_frames(a.shape[0], SAMPLE_RATE, where, max_seconds)
    elif isinstance(item, (bytes, bytearray, memoryview)):
        import io

        if len(item) > MAX_FILE_BYTES:
            raise AudioError(f"{where}: {len(item):,} bytes, more than the {MAX_FILE_BYTES:,} ember reads")
        if not len(item):
            raise AudioError(f"{where}: the file is empty")
        a, rate = _reader()(io.BytesIO(bytes(item)), where, max_seconds)
        a = resample(a, rate)
    elif isinstance(item, (str, os.PathLike)):
        path = Path(item)
        where = f"{where} ({str(path)[:200]})"
        try:
            size = path.stat().st_size
        except OSError as e:
            raise AudioError(f"{where}: cannot read: {e.strerror or e}") from None
        if not path.is_file():
            raise AudioError(f"{where}: not a file")
        if size > MAX_FILE_BYTES:
            raise AudioError(f"{where}: {size:,} bytes, more than the {MAX_FILE_BYTES:,} ember reads")
        a, rate = _reader()(path, where, max_seconds)
        a = resample(a, rate)
    else:
        raise AudioError(f"{where}: expected a file path, the bytes of a file or a 1-D array of samples, "
                         f"got {type(item).__name__}")
    if not np.isfinite(a).all():
        raise AudioError(f"{where}: the samples contain NaN or infinity")
    return np.ascontiguousarray(a, dtype=np.float32)


# ---- Whisper's log-mel features ------------------------------------------------------------------
def _hz_to_mel(f):
    """Slaney's mel scale: linear below 1 kHz, logarithmic above (transformers' hertz_to_mel)."""
    logstep = 27.0 / np.log(6.4)
    f = np.asarray(f, dtype=np.float64)
    mel = 3.0 * f / 200.0
    return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) * logstep, mel)


def _mel_to_hz(m):
    logstep = np.log(6.4) / 27.0
    m = np.asarray(m, dtype=np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp(logstep * (m - 15.0)), 200.0 * m / 3.0)


def mel_filters(n_freqs: int, n_mels: int, rate: int, fmax: float = 8000.0) -> np.ndarray:
    """[n_freqs, n_mels] Slaney-normalised triangular filters (transformers' mel_filter_bank with
    norm="slaney", mel_scale="slaney", from 0 Hz to fmax)."""
    filter_freqs = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(fmax), n_mels + 2))
    fft_freqs = np.linspace(0, rate // 2, n_freqs)
    diff = np.diff(filter_freqs)
    slopes = filter_freqs[None, :] - fft_freqs[:, None]
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    fb = np.maximum(np.zeros(1), np.minimum(down, up))
    return fb * (2.0 / (filter_freqs[2:n_mels + 2] - filter_freqs[:n_mels]))[None, :]


@dataclass
class LogMel:
    """WhisperFeatureExtractor: 30 s windows of log-mel features."""

    feature_size: int = 80
    sampling_rate: int = SAMPLE_RATE
    hop_length: int = 160
    chunk_length: int = 30
    n_fft: int = 400

    def __post_init__(self):
        self.n_samples = self.chunk_length * self.sampling_rate
        self.filters = mel_filters(1 + self.n_fft // 2, self.feature_size, self.sampling_rate).astype(np.float32)

    @classmethod
    def from_file(cls, path: Path | None, feature_size: int) -> "LogMel":
        """From preprocessor_config.json (each field checked); its defaults with `feature_size` mels."""
        d: dict = {}
        if path is not None and Path(path).is_file():
            from .config import load_json
            from .errors import ConfigError

            try:
                d = load_json(path)
            except ConfigError as e:
                raise AudioError(str(e)) from None
        kw = {}
        limits = {"feature_size": 512, "sampling_rate": 192000, "hop_length": 8192, "chunk_length": 60, "n_fft": 8192}
        for k, hi in limits.items():
            v = d.get(k)
            if v is None:
                continue
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= hi:
                raise AudioError(f"{path}: {k} must be an integer in [1, {hi}], got {v!r:.60}")
            kw[k] = v
        kw.setdefault("feature_size", feature_size)
        if kw["feature_size"] != feature_size:
            raise AudioError(f"{path}: feature_size {kw['feature_size']} differs from the model's num_mel_bins "
                             f"{feature_size}")
        if kw.get("sampling_rate", SAMPLE_RATE) != SAMPLE_RATE:
            raise AudioError(f"{path}: sampling_rate {kw['sampling_rate']}; ember's audio front end runs at "
                             f"{SAMPLE_RATE} Hz")
        return cls(**kw)

    @property
    def frames(self) -> int:
        return self.n_samples // self.hop_length

    def __call__(self, samples: np.ndarray):
        """[feature_size, frames] float32 torch tensor of one window: `samples` zero-padded or cut to
        chunk_length seconds (transformers' padding="max_length", truncation=True)."""
        x = np.zeros(self.n_samples, dtype=np.float32)
        n = min(len(samples), self.n_samples)
        x[:n] = samples[:n]
        return self._log_mel(x)

    def whole(self, samples: np.ndarray):
        """[feature_size, len // hop_length] features of all of `samples` (one window's worth at
        least), normalised together: transformers' truncation=False, padding="longest", the input of
        its long-form transcription. Computed a window at a time (the STFT of hours of audio at once
        would be gigabytes); only the max-8 floor needs them all."""
        import torch

        if len(samples) <= self.n_samples:
            return self(samples)
        half = self.n_fft // 2
        x = np.pad(np.asarray(samples, dtype=np.float32), half, mode="reflect")  # torch.stft's center=True
        frames = len(samples) // self.hop_length
        block = self.frames
        parts = [self._log10_mel(torch.from_numpy(x[a * self.hop_length:(min(a + block, frames) - 1) * self.hop_length
                                                    + self.n_fft]), center=False)
                 for a in range(0, frames, block)]
        return self._normalise(torch.cat(parts, dim=1))

    def _log10_mel(self, w, center: bool = True):
        import torch

        stft = torch.stft(w, self.n_fft, self.hop_length, window=torch.hann_window(self.n_fft), center=center,
                          return_complex=True)
        if center:
            stft = stft[..., :-1]  # transformers drops the last frame
        mel = torch.from_numpy(self.filters).T @ (stft.abs() ** 2).contiguous()
        return torch.clamp(mel, min=1e-10).log10()

    @staticmethod
    def _normalise(log):
        import torch

        log = torch.maximum(log, log.max() - 8.0)
        return (log + 4.0) / 4.0

    def _log_mel(self, x: np.ndarray):
        import torch

        return self._normalise(self._log10_mel(torch.from_numpy(x)))
