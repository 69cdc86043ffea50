"""Whisper against transformers on tiny random checkpoints: log-mel features (WhisperFeatureExtractor)
for short, exact and over-long audio, encoder states, decoder logits (whole and through the caches),
greedy tokens after the forced prompt (language and task tokens, suppressed tokens) and language
detection; audio files (WAV via the standard library or soundfile, resampling) and bad audio."""
from __future__ import annotations

import copy
import json
import wave

import numpy as np
import pytest
import torch

from parity import randomize_

VOCAB = 120
EOT, SOT, EN, DE, TRANSLATE, TRANSCRIBE, NOTS = 100, 101, 102, 103, 104, 105, 106


def _gen_config(multilingual=True):
    d = {"decoder_start_token_id": SOT, "eos_token_id": EOT, "pad_token_id": EOT, "bos_token_id": EOT,
         "no_timestamps_token_id": NOTS, "suppress_tokens": [7, 11, 13], "begin_suppress_tokens": [EOT, 9],
         "max_length": 64, "is_multilingual": multilingual}
    if multilingual:
        d.update(lang_to_id={"<|en|>": EN, "<|de|>": DE}, task_to_id={"translate": TRANSLATE, "transcribe": TRANSCRIBE})
    return d


def _tiny(folder, multilingual=True, **kw):
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration
    from transformers.models.whisper.feature_extraction_whisper import WhisperFeatureExtractor

    cfg = WhisperConfig(**{**dict(vocab_size=VOCAB, num_mel_bins=80, d_model=32, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                                  decoder_ffn_dim=48, max_source_positions=1500, max_target_positions=64,
                                  decoder_start_token_id=SOT, eos_token_id=EOT, pad_token_id=EOT, bos_token_id=EOT,
                                  tie_word_embeddings=False),  # a tied head repeats the input token
                            **kw})
    torch.manual_seed(0)
    hf = WhisperForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # weights large enough that greedy text varies
        for n, p in hf.named_parameters():
            if p.dim() >= 2 and "encoder.embed_positions" not in n:  # (the encoder's are sinusoids)
                p.normal_(0, 0.3)
    randomize_(hf, 0)
    hf.generation_config = GenerationConfig(**_gen_config(multilingual))
    hf.save_pretrained(folder)
    fe = WhisperFeatureExtractor(feature_size=80)
    fe.save_pretrained(folder)
    return hf, fe


def _speech(seconds: float, seed=0) -> np.ndarray:
    """Chirps and noise: a signal with structure in every mel band."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    x = 0.3 * np.sin(2 * np.pi * (200 + 900 * t) * t) + 0.05 * rng.standard_normal(t.shape)
    return (x * (0.5 + 0.5 * np.sin(2 * np.pi * 1.5 * t))).astype(np.float32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("whisper")
    hf, fe = _tiny(folder)
    import ember

    return hf, fe, ember.load(folder, dtype=torch.float32, device="cpu"), folder


@pytest.mark.parametrize("seconds", [0.5, 7.3, 30.0, 41.0])
def test_log_mel_matches_the_feature_extractor(tiny, seconds):
    hf, fe, asr, _ = tiny
    x = _speech(seconds)
    ref = torch.from_numpy(fe(x, sampling_rate=16000, return_tensors="np")["input_features"][0])
    got = asr.features(x)
    assert got.shape == ref.shape == (80, 3000)
    assert (got - ref).abs().max() < 1e-5
    assert asr.features.whole(x).shape[1] == (len(x) // 160 if seconds > 30 else 3000)


def test_whisper_matches_transformers(tiny):
    hf, fe, asr, _ = tiny
    feats = torch.from_numpy(fe([_speech(3.0), _speech(9.0, 1)], sampling_rate=16000, return_tensors="np")["input_features"])
    dec = torch.tensor([[SOT, EN, TRANSCRIBE, NOTS, 5, 17, 33, 2, 60, 61], [SOT, DE, TRANSLATE, NOTS, 8, 8, 9, 70, 1, 0]])
    with torch.no_grad():
        ref_enc = hf.model.encoder(feats).last_hidden_state
        enc = asr.model.encode(feats)
        assert (enc - ref_enc).abs().max() < 1e-4
        ref = hf(input_features=feats, decoder_input_ids=dec).logits
        exact = copy.deepcopy(hf).double()(input_features=feats.double(), decoder_input_ids=dec).logits
        tol = max(1e-4, 2 * float((ref.double() - exact).abs().max()))
        got = asr.model(feats, dec)
        assert got.shape == ref.shape and (got - ref).abs().max() < tol
        assert ref.std() > 0.5
        cache = asr.model.new_cache(2, 10)
        steps = [asr.model.decode(dec[:, :4], enc, None, cache)]
        steps += [asr.model.decode(dec[:, i:i + 1], enc, None, cache) for i in range(4, 10)]
        assert (torch.cat(steps, dim=1) - ref).abs().max() < tol


@pytest.mark.parametrize("language,task", [("en", "transcribe"), ("de", "translate"), (None, "transcribe")])
def test_whisper_greedy_matches_generate(tiny, language, task):
    hf, fe, asr, _ = tiny
    x = _speech(4.0, 2)
    feats = torch.from_numpy(fe(x, sampling_rate=16000, return_tensors="np")["input_features"])
    with torch.no_grad():
        out = hf.generate(feats, language=language, task=task, max_new_tokens=20, do_sample=False, num_beams=1,
                          return_dict_in_generate=True).sequences
    want = out[0].tolist()
    lang = language or asr.detect_language(feats)[0]
    prompt = asr.prompt(lang, task)
    assert want[:len(prompt)] == prompt, (want, prompt)  # the prompt transformers built
    want = want[len(prompt):]
    want = want[:want.index(EOT) + 1] if EOT in want else want
    got = asr.transcribe_ids(x, language=language, task=task, max_tokens=20)
    assert got == [want]
    assert len(set(want)) >= 4, want
    assert not set(want) & {7, 11, 13}


def test_english_only_prompt(tmp_path):
    import ember

    hf, fe = _tiny(tmp_path, multilingual=False, tie_word_embeddings=True)  # and proj_out tied to the embeddings
    asr = ember.load(tmp_path, dtype=torch.float32, device="cpu")
    assert asr.prompt(None) == [SOT, NOTS]
    x = _speech(2.0, 3)
    feats = torch.from_numpy(fe(x, sampling_rate=16000, return_tensors="np")["input_features"])
    with torch.no_grad():
        want = hf.generate(feats, max_new_tokens=12, do_sample=False, num_beams=1,
                           return_dict_in_generate=True).sequences[0].tolist()
    assert want[:2] == [SOT, NOTS]
    want = want[2:]
    want = want[:want.index(EOT) + 1] if EOT in want else want
    assert asr.transcribe_ids(x, max_tokens=12) == [want]
    with pytest.raises(ember.GenerationError):
        asr.transcribe_ids(x, language="de")


def _write_wav(path, samples, rate=16000, width=2, channels=1):
    a = np.clip(samples, -1, 1)
    a = np.repeat(a[:, None], channels, axis=1)
    data = (a * 32767).astype("<i2") if width == 2 else ((a + 1) * 127.5).astype(np.uint8)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(data.tobytes())


def test_audio_files(tiny, tmp_path, monkeypatch):
    """WAV through soundfile and through the standard library give the samples; 8 kHz stereo audio
    is mixed down and resampled (scipy's resample_poly) before the features."""
    from ember import audio

    _, _, asr, _ = tiny
    x = _speech(1.0)
    p = tmp_path / "a.wav"
    _write_wav(p, x)
    a = audio.load_audio(p)
    assert a.shape == x.shape and np.abs(a - x).max() < 1e-4
    monkeypatch.setattr(audio, "_read_soundfile", audio._read_wave)
    assert np.array_equal(audio.load_audio(p), a)
    monkeypatch.undo()
    from scipy.signal import resample_poly

    p8 = tmp_path / "b.wav"
    _write_wav(p8, _speech(1.0)[::2], rate=8000, channels=2)
    got = audio.load_audio(p8)
    with wave.open(str(p8)) as w:
        mono = np.frombuffer(w.readframes(8000), "<i2").reshape(-1, 2).mean(1) / 32768
    want = resample_poly(mono.astype(np.float32), 2, 1)
    assert got.shape == (16000,) and np.abs(got - want).max() < 1e-4
    assert asr.transcribe_ids(p, language="en", max_tokens=3) == asr.transcribe_ids(a, language="en", max_tokens=3)


def test_bad_audio_is_an_audio_error(tiny, tmp_path):
    import ember
    from ember import audio

    _, _, asr, _ = tiny
    (tmp_path / "junk.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    _write_wav(tmp_path / "empty.wav", np.zeros(0, np.float32))
    lying = bytearray((tmp_path / "empty.wav").read_bytes())  # a header claiming ~37 hours of samples
    lying[40:44] = (0x7FFFFFF0).to_bytes(4, "little")
    (tmp_path / "lying.wav").write_bytes(bytes(lying))
    for bad in (tmp_path / "junk.wav", tmp_path / "empty.wav", tmp_path / "missing.wav", np.zeros((2, 5)),
                np.array([0.0, np.nan], np.float32), np.zeros(0, np.float32), 3):
        with pytest.raises(ember.AudioError):
            asr.transcribe_ids(bad)
    for reader in (audio._read_wave, audio._read_soundfile):
        with pytest.raises(ember.AudioError, match="no samples|more than|not a readable"):
            reader(tmp_path / "lying.wav", "lying")
    with pytest.raises(ember.GenerationError):
        asr.transcribe_ids(_speech(1.0), language="fr")
    with pytest.raises(ember.GenerationError):
        asr.transcribe_ids(_speech(1.0), language="en", task="summarise")


def test_transcribe_text_and_cli(tiny, capsys):
    """Text through tokenizer.json: the greedy ids decoded without special tokens; `ember transcribe`."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    hf, fe, _, folder = tiny
    vocab = {f"w{i}": i for i in range(100)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|de|>", "<|translate|>",
                           "<|transcribe|>", "<|notimestamps|>"] + [f"<|x{i}|>" for i in range(107, VOCAB)])
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    import ember
    from ember.cli import main

    asr = ember.load(folder, dtype=torch.float32, device="cpu")
    x = _speech(2.0, 5)
    ids = asr.transcribe_ids(x, language="en", max_tokens=8)[0]
    text = asr.transcribe(x, language="en", max_tokens=8)
    assert text == tk.decode(ids, skip_special_tokens=True).strip() and text
    p = folder / "clip.wav"
    _write_wav(p, x)
    assert main(["transcribe", str(folder), str(p), "--language", "en", "-n", "8", "--dtype", "float32"]) == 0
    assert capsys.readouterr().out.strip() == asr.transcribe(p, language="en", max_tokens=8)
    assert main(["transcribe", str(folder), str(folder / "nope.wav")]) == 1
    capsys.readouterr()
    assert main(["run", str(folder), "hello"]) != 0
    assert "a speech model (whisper); use `ember transcribe`" in capsys.readouterr().err


def test_load_task_names_whispers_kind(tiny):
    import ember

    folder = tiny[3]
    assert isinstance(ember.load(folder, task="transcribe", dtype=torch.float32), ember.Transcriber)
    for wrong in ("generate", "embed"):
        with pytest.raises(ember.ArgumentError, match="task='transcribe'"):
            ember.load(folder, task=wrong, dtype=torch.float32)
