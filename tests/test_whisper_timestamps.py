"""Whisper's timestamps, long-form transcription and temperature fallback against transformers'
WhisperForConditionalGeneration.generate on a tiny random checkpoint with 5 s windows
(max_source_positions 250, the feature extractor's chunk_length 5: six times less work than 30 s)
whose vocabulary holds all 251 timestamp tokens (<|0.00|> .. <|5.00|>): segments (start, end,
tokens) with return_timestamps=True on short audio, long-form audio (14 s: features of the whole
audio, windows moved on to the last timestamp), and the fallback through sampled temperatures (the same draws of
torch's global generator) when the thresholds reject a window; the compression ratio against
transformers' own."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from test_whisper_parity import _speech, _tiny

VOCAB = 107 + 251  # text, specials up to <|notimestamps|> (106), then the timestamps


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import ember

    folder = tmp_path_factory.mktemp("whisper_ts")
    from transformers.models.whisper.feature_extraction_whisper import WhisperFeatureExtractor

    hf, _ = _tiny(folder, vocab_size=VOCAB, max_source_positions=250)
    fe = WhisperFeatureExtractor(feature_size=80, chunk_length=5)
    fe.save_pretrained(folder)
    hf.generation_config.max_initial_timestamp_index = 50
    hf.generation_config.save_pretrained(folder)
    return hf, fe, ember.load(folder, dtype=torch.float32, device="cpu")


def _segments(out) -> list[tuple[float, float, list[int]]]:
    return [(float(s["start"]), float(s["end"]), s["tokens"].tolist()) for s in out["segments"][0]]


def _ours(t) -> list[tuple[float, float, list[int]]]:
    return [(s.start, s.end, s.tokens) for s in t.segments]


def _check(got, want):
    assert [g[2] for g in got] == [w[2] for w in want]
    assert np.allclose([g[:2] for g in got], [w[:2] for w in want], atol=1e-9)


@pytest.mark.parametrize("language,task", [("de", "transcribe"), ("en", "translate"), (None, "transcribe")])
def test_short_audio_timestamps_match_transformers(tiny, language, task):
    hf, fe, asr = tiny
    x = _speech(2.5, 2)
    feats = torch.from_numpy(fe(x, sampling_rate=16000, return_tensors="np")["input_features"])
    with torch.no_grad():
        out = hf.generate(feats, language=language, task=task, return_timestamps=True, max_new_tokens=24,
                          return_segments=True)  # (with neither, transformers leaves out the task token)
    want = _segments(out)
    got = asr.transcription(x, language=language, task=task, timestamps=True, max_tokens=24)
    _check(_ours(got), want)
    assert len(want) >= 2 and any(t >= 107 for s in want for t in s[2])  # timestamps were generated
    starts = [s[0] for s in want]
    assert starts == sorted(starts)
    assert asr.prompt(got.language, timestamps=True)[-1] != 106  # no <|notimestamps|>


def test_long_form_matches_transformers(tiny):
    """14 s of audio: transformers' long-form generation (whole-audio features with its attention
    mask; each window starts at the previous one's last complete segment)."""
    hf, fe, asr = tiny
    x = _speech(14.0, 3)
    f = fe(x, sampling_rate=16000, truncation=False, padding="longest", return_attention_mask=True,
           return_tensors="pt")
    assert f["input_features"].shape[-1] == 1400
    assert (asr.features.whole(x) - f["input_features"][0]).abs().max() < 1e-5
    with torch.no_grad():
        out = hf.generate(f["input_features"], attention_mask=f["attention_mask"], language="de", task="translate",
                          return_timestamps=True, max_new_tokens=24, return_segments=True)
    want = _segments(out)
    got = asr.transcription(x, language="de", task="translate", max_tokens=24)  # timestamps on by itself
    _check(_ours(got), want)
    assert want[-1][1] > 8.0 and len(got.windows) >= 3  # it went past the first windows
    seeks = [s.window for s in got.segments]
    assert seeks == sorted(seeks) and seeks[-1] < 1400 and len(set(seeks)) == len(got.windows)


@pytest.mark.parametrize("logprob_threshold", [-1.0, -50.0])
def test_temperature_fallback_matches_transformers(tiny, logprob_threshold):
    """-1: every try is rejected, the last (sampled at 1.0) is kept; -50: greedy passes."""
    hf, fe, asr = tiny
    x = _speech(3.0, 4)
    feats = torch.from_numpy(fe(x, sampling_rate=16000, return_tensors="np")["input_features"])
    kw = dict(temperature=(0.0, 0.5, 1.0), logprob_threshold=logprob_threshold, compression_ratio_threshold=2.5)
    torch.manual_seed(5)
    with torch.no_grad():
        out = hf.generate(feats, language="en", max_new_tokens=20, return_segments=True, return_timestamps=True, **kw)
    torch.manual_seed(5)
    got = asr.transcription(x, language="en", max_tokens=20, timestamps=True, **kw)
    _check(_ours(got), _segments(out))
    temps = {s.temperature for s in got.segments}
    assert temps == ({1.0} if logprob_threshold == -1.0 else {0.0})
    if logprob_threshold == -1.0:
        assert all(s.avg_logprob < -1.0 for s in got.segments)
        greedy = asr.transcription(x, language="en", max_tokens=20, timestamps=True)
        assert _ours(greedy) != _ours(got)


def test_compression_ratio_is_transformers(tiny):
    from transformers import WhisperForConditionalGeneration

    from ember.generation.whisper import compression_ratio

    for toks in ([5, 6, 7, 8], [9] * 40, list(range(100, 1600, 7))):
        want = WhisperForConditionalGeneration._retrieve_compression_ratio(torch.tensor(toks), VOCAB)
        assert compression_ratio(toks, VOCAB) == want


def test_seeded_sampling_repeats_and_bad_arguments(tiny):
    import ember

    _, _, asr = tiny
    x = _speech(2.0, 5)
    a = asr.transcription(x, language="en", max_tokens=12, temperature=0.8, seed=3)
    b = asr.transcription(x, language="en", max_tokens=12, temperature=0.8, seed=3)
    assert a.windows == b.windows and a.segments[0].temperature == 0.8
    for bad in (dict(temperature=-1), dict(temperature=[]), dict(temperature="hot"), dict(temperature=[0.0] * 40),
                dict(logprob_threshold=float("nan")), dict(compression_ratio_threshold="x"), dict(max_tokens=-1)):
        with pytest.raises(ember.GenerationError):
            asr.transcription(x, language="en", **bad)


def test_cli_prints_segments(tiny, tmp_path, capsys):
    from ember.cli import main
    from test_whisper_parity import _write_wav

    _, _, asr = tiny
    x = _speech(8.0, 3)
    p = tmp_path / "talk.wav"
    _write_wav(p, x)
    want = asr.transcription(p, language="en", max_tokens=12)
    assert main(["transcribe", str(asr._loaded.snapshot.root), str(p), "--language", "en", "-n", "12",
                 "--timestamps", "--dtype", "float32"]) == 0
    lines = capsys.readouterr().out.strip().split("\n")
    assert len(lines) == len(want.segments) >= 2
    assert lines[0].startswith(f"[{want.segments[0].start:8.2f} --> {want.segments[0].end:8.2f}]")
