"""POST /v1/audio/transcriptions through the official openai client against a uvicorn server over a
tiny random Whisper checkpoint (5 s windows, all timestamp tokens, a word-level tokenizer): every
response_format equal to Transcriber.transcription with the same options, segments in verbose_json,
translations, and bad audio (corrupt, empty, a header claiming hours) answered with a 400 that says
what is wrong while the server keeps serving."""
from __future__ import annotations

import io
import json
import wave

import numpy as np
import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("multipart")

from test_serve import running_server, TIMEOUT  # noqa: E402
from test_whisper_parity import _speech, _tiny  # noqa: E402

VOCAB = 107 + 251
NAME = "tiny-whisper"


def _wav(samples: np.ndarray, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


@pytest.fixture(scope="module")
def asr(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers.models.whisper.feature_extraction_whisper import WhisperFeatureExtractor

    import ember

    folder = tmp_path_factory.mktemp("whisper_srv")
    hf, _ = _tiny(folder, vocab_size=VOCAB, max_source_positions=250)
    hf.generation_config.max_initial_timestamp_index = 50
    hf.generation_config.save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=80, chunk_length=5).save_pretrained(folder)
    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(100)}, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|de|>", "<|translate|>",
                           "<|transcribe|>", "<|notimestamps|>"] + [f"<|{i * 0.02:.2f}|>" for i in range(251)])
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return ember.load(folder, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def srv(asr):
    from ember.serve import create_app

    app = create_app(transcriber=asr, transcription_model_name=NAME)
    with running_server(app) as url:
        yield url


@pytest.fixture
def client(srv):
    with openai.OpenAI(base_url=srv + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0) as c:
        yield c


def _fallback(**kw):
    from ember.serve.transcriptions import COMPRESSION_RATIO_THRESHOLD, FALLBACK, LOGPROB_THRESHOLD

    return dict(temperature=FALLBACK, compression_ratio_threshold=COMPRESSION_RATIO_THRESHOLD,
                logprob_threshold=LOGPROB_THRESHOLD, seed=0, **kw)


def test_json_and_text_match_the_python_api(client, asr):
    x = _speech(3.0, 6)
    want = asr.transcription(_samples(x), language="en", **_fallback())
    got = client.audio.transcriptions.create(model=NAME, file=("a.wav", _wav(x)), language="en")
    assert got.text == want.text and want.text
    text = client.audio.transcriptions.create(model=NAME, file=("a.wav", _wav(x)), language="en",
                                              response_format="text")
    assert text.strip() == want.text


def _samples(x):
    from ember.audio import load_audio

    return load_audio(_wav(x))  # the 16-bit rounding the upload goes through


def test_verbose_json_segments_srt_vtt(client, asr):
    x = _speech(8.0, 2)  # past one 5 s window: long-form, seeking at timestamps
    want = asr.transcription(_samples(x), language="de", timestamps=True, **_fallback())
    got = client.audio.transcriptions.create(model=NAME, file=("talk.wav", _wav(x)), language="de",
                                             response_format="verbose_json", timestamp_granularities=["segment"])
    assert got.text == want.text and got.language == "de" and abs(got.duration - 8.0) < 1e-3
    assert [(s.start, s.end, s.tokens, s.text) for s in got.segments] == [
        (round(s.start, 3), round(s.end, 3), s.tokens, s.text) for s in want.segments]
    assert len(got.segments) >= 2 and got.segments[-1].end > 5.0
    srt = client.audio.transcriptions.create(model=NAME, file=("talk.wav", _wav(x)), language="de",
                                             response_format="srt")
    cues = [c for c in srt.strip().split("\n\n") if c]
    assert len(cues) == len(want.segments) and cues[0].startswith("1\n00:00:")
    assert " --> " in cues[-1].split("\n")[1] and "," in cues[-1].split("\n")[1]
    vtt = client.audio.transcriptions.create(model=NAME, file=("talk.wav", _wav(x)), language="de",
                                             response_format="vtt")
    assert vtt.startswith("WEBVTT\n\n") and vtt.count(" --> ") == len(want.segments)


def test_sampled_temperature_and_translation(client, asr):
    x = _speech(2.0, 7)
    got = client.audio.transcriptions.create(model=NAME, file=("a.wav", _wav(x)), language="en", temperature=0.7,
                                             response_format="verbose_json")
    assert {s.temperature for s in got.segments} == {0.7}
    tr = client.audio.translations.create(model=NAME, file=("a.wav", _wav(x)))
    assert tr.text == asr.transcription(_samples(x), task="translate", **_fallback()).text


def test_bad_audio_is_a_400_and_the_server_keeps_serving(client, srv):
    import httpx

    good = _wav(_speech(1.0))
    slow = _wav(np.zeros(4000, np.float32), rate=1)  # 8 kB whose header says 1 sample a second: 4000 s
    cases = {"corrupt": (b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunkjunk" * 4, "not a readable"),
             "empty": (b"", "empty"), "noise": (bytes(range(256)) * 64, "not a readable"),
             "hours": (slow, "4,000 s of audio, more than the 3,600 s")}
    for name, (data, msg) in cases.items():
        with pytest.raises(openai.BadRequestError) as e:
            client.audio.transcriptions.create(model=NAME, file=(f"{name}.wav", data))
        assert msg in e.value.message, (name, e.value.message)
        assert e.value.body["param"] == "file"
    for kw, param in ((dict(language="xx"), "language"), (dict(response_format="docx"), "response_format"),
                      (dict(timestamp_granularities=["word"], response_format="verbose_json"),
                       "timestamp_granularities[]"), (dict(temperature=3), "temperature"),
                      (dict(prompt="earlier text"), "prompt")):
        with pytest.raises(openai.BadRequestError) as e:
            client.audio.transcriptions.create(model=NAME, file=("a.wav", good), **kw)
        assert e.value.body["param"] == param, kw
    with pytest.raises(openai.NotFoundError):
        client.audio.transcriptions.create(model="other", file=("a.wav", good))
    r = httpx.post(srv + "/v1/audio/transcriptions", json={"model": NAME, "file": "x"}, timeout=TIMEOUT)
    assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]["message"]
    r = httpx.post(srv + "/v1/audio/transcriptions", data={"model": NAME}, files={"other": ("a", b"x")},
                   timeout=TIMEOUT)
    assert r.status_code == 400 and r.json()["error"]["param"] is not None
    with pytest.raises(openai.NotFoundError, match="only a speech-to-text model"):  # no chat model on this server
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}])
    assert client.audio.transcriptions.create(model=NAME, file=("a.wav", good), language="en").text is not None
    assert [m.id for m in client.models.list()] == [NAME]
    assert httpx.get(srv + "/health", timeout=TIMEOUT).json()["status"] == "ok"


def test_malformed_multipart_bodies_are_4xx(srv):
    """Broken uploads (no boundary, a truncated body, a field past 64 KiB, two files, junk) are refused
    with OpenAI-style 4xx bodies, never a 5xx."""
    import httpx

    good = _wav(_speech(0.5))
    b = "XyZ"
    head = f'--{b}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{NAME}\r\n'
    part = f'--{b}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'.encode() + good + b"\r\n"
    bodies = [("multipart/form-data", head.encode() + part + f"--{b}--\r\n".encode()),  # no boundary parameter
              (f"multipart/form-data; boundary={b}", (head.encode() + part)[:-200]),  # cut short
              (f"multipart/form-data; boundary={b}", head.encode() + part + part + f"--{b}--\r\n".encode()),
              (f"multipart/form-data; boundary={b}", (f'--{b}\r\nContent-Disposition: form-data; name="language"'
                                                      f'\r\n\r\n' + "x" * 70000 + "\r\n").encode() + part),
              (f"multipart/form-data; boundary={b}", bytes(range(256)) * 10),
              (f"multipart/form-data; boundary={b}", b"")]
    for ctype, body in bodies:
        r = httpx.post(srv + "/v1/audio/transcriptions", content=body, headers={"content-type": ctype},
                       timeout=TIMEOUT)
        assert 400 <= r.status_code < 500, (ctype, body[:60], r.status_code, r.text[:200])
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
