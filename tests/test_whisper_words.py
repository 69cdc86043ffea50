"""Whisper word timestamps against transformers on a tiny random checkpoint (5 s windows, all
timestamp tokens, alignment_heads set) with a byte-level WhisperTokenizer whose 100 text tokens
hold words with and without a leading space, punctuation, and characters split over tokens:
token timestamps equal to generate(return_token_timestamps=True)'s segments (short and long-form
audio), words equal to what transformers' ASR pipeline makes of those (return_timestamps="word"),
the grouping of
tokens into words equal to transformers' tokenizer (_combine_tokens_into_words, spaced and
unspaced languages), the median filter and DTW equal to transformers' own, and clear errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from test_whisper_parity import _speech, _tiny

VOCAB = 107 + 251
HEADS = [[0, 1], [1, 0], [1, 3]]
SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|de|>", "<|translate|>", "<|transcribe|>",
            "<|notimestamps|>"]
PIECES = ["Ġthe", "Ġcat", "Ġsat", "s", "ing", "Ġon", "Ġa", "Ġmat", ".", ",", "!", "?", "Ġ\"", "\"", "'", "Ġ(", ")",
          "Ġ-", "-", "Ġ", "ĠÂ¿", "ä½", "ł", "å¥½", "ãĢĤ", "Ġhello", "Ġworld", "er", "ed", "Ġis", "Ġit", ":", "ĠI",
          "Ġdon", "'t", "Ġ[", "]", "ï¼Į", "Ġ'"]


def _tokenizer(folder):
    """A byte-level Whisper tokenizer: PIECES, then single letters up to 100 text tokens, the
    special tokens, and <|0.00|> .. <|5.00|>."""
    from transformers import WhisperTokenizer

    letters = [c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"]
    pieces = PIECES + [c for c in letters if c not in PIECES]
    vocab = {p: i for i, p in enumerate(pieces[:100])}
    tok = WhisperTokenizer(vocab=vocab, merges=[])
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    tok.add_tokens([f"<|{i * 0.02:.2f}|>" for i in range(251)])
    assert tok.convert_tokens_to_ids("<|notimestamps|>") == 106 and tok.convert_tokens_to_ids("<|5.00|>") == 357
    tok.save_pretrained(folder)
    return tok


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import ember
    from transformers.models.whisper.feature_extraction_whisper import WhisperFeatureExtractor

    folder = tmp_path_factory.mktemp("whisper_words")
    hf, _ = _tiny(folder, vocab_size=VOCAB, max_source_positions=250)
    fe = WhisperFeatureExtractor(feature_size=80, chunk_length=5)
    fe.save_pretrained(folder)
    hf.generation_config.max_initial_timestamp_index = 50
    hf.generation_config.alignment_heads = HEADS
    hf.generation_config.save_pretrained(folder)
    tok = _tokenizer(folder)
    return hf, fe, tok, ember.load(folder, dtype=torch.float32, device="cpu")


def _hf_segments(hf, fe, x, **kw):
    long = len(x) > 5 * 16000
    f = fe(x, sampling_rate=16000, truncation=not long, padding="longest" if long else "max_length",
           return_attention_mask=True, return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(f["input_features"], attention_mask=f["attention_mask"], return_timestamps=True,
                          return_token_timestamps=True, return_segments=True, max_new_tokens=24, **kw)
    return out["segments"][0]


@pytest.mark.parametrize("seconds,seed,language", [(3.0, 2, "en"), (4.9, 1, "de"), (12.0, 3, "en"),
                                                   (2.5, 2, "de")])  # (a second window past the audio's end)
def test_token_timestamps_match_transformers(tiny, seconds, seed, language):
    hf, fe, _, asr = tiny
    x = _speech(seconds, seed)
    want = _hf_segments(hf, fe, x, language=language)
    got = asr.transcription(x, language=language, word_timestamps=True, max_tokens=24)
    assert [s.tokens for s in got.segments] == [s["tokens"].tolist() for s in want]
    for g, w in zip(got.segments, want):
        assert np.allclose(g.token_times, w["token_timestamps"].tolist(), atol=1e-6), (g.token_times, w)
    if seconds != 2.5:
        assert sum(w.end > w.start for w in got.words) >= 2  # the alignment moved through the audio
    else:
        assert got.segments[-1].window * 160 > len(x)  # transformers crops such a window's weights twice


@pytest.mark.parametrize("seconds,seed,language", [(3.0, 2, "en"), (4.9, 2, "de"), (12.0, 1, "de")])
def test_words_match_transformers(tiny, seconds, seed, language):
    """Each segment's words as transformers' ASR pipeline makes them from generate's segments
    (_decode_asr: a text token spans from the previous token's time to its own, rounded to 10 ms;
    _collate_word_timestamps groups them)."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES, _collate_word_timestamps

    hf, fe, tok, asr = tiny
    x = _speech(seconds, seed)
    segments = _hf_segments(hf, fe, x, language=language)
    got = asr.transcription(x, language=language, word_timestamps=True, max_tokens=24)
    assert len(got.segments) == len(segments)
    special = set(tok.all_special_ids)
    for g, s in zip(got.segments, segments):
        tokens, ts = s["tokens"].tolist(), s["token_timestamps"].tolist()
        assert tokens[0] >= 107  # a segment opens with a timestamp: every text token has one before it
        text = [(t, (round(ts[i - 1], 2), round(ts[i], 2))) for i, t in enumerate(tokens) if t < 107 and t not in special]
        want = _collate_word_timestamps(tok, [t for t, _ in text], [span for _, span in text], LANGUAGES[language],
                                        False) if text else []
        assert [(w.word, (w.start, w.end)) for w in g.words] == [(c["text"], c["timestamp"]) for c in want]
    assert sum(w.end > w.start for w in got.words) >= 2 and len(got.words) >= 4


def _random_tokens(rng, n):
    return [int(t) for t in rng.integers(0, 100, n)]


@pytest.mark.parametrize("language,hf_language", [("en", "english"), ("de", "german"), (None, None),
                                                  ("zh", "chinese"), ("ja", "japanese")])
def test_word_grouping_matches_the_tokenizer(tiny, language, hf_language):
    from transformers.models.whisper.tokenization_whisper import _combine_tokens_into_words

    from ember.generation.whisper_words import group_words

    _, _, tok, asr = tiny
    rng = np.random.default_rng(0)
    cases = [_random_tokens(rng, int(n)) for n in rng.integers(1, 30, 200)]
    ids = {p: tok.convert_tokens_to_ids(p) for p in PIECES}
    cases += [[ids[p] for p in seq] for seq in (
        ["Ġ\"", "Ġhello", ",", "Ġworld", "!", "\""], ["ĠI", "Ġdon", "'t", "Ġsat", "."], ["ä½", "ł", "å¥½", "ãĢĤ"],
        ["Ġ(", "Ġcat", "s", ")", "?"], ["ä½", "Ġthe"], ["ł", "ł", "ä½"], ["Ġ-", "Ġ-", "Ġmat", "-", "ing"])]
    for tokens in cases:
        words, _, indices = _combine_tokens_into_words(tok, tokens, hf_language)
        assert group_words(asr.tokenizer.decode, tokens, language) == (words, indices), tokens


def test_median_filter_and_dtw_match_transformers():
    from transformers.models.whisper.generation_whisper import _dynamic_time_warping, _median_filter

    from ember.generation.whisper_alignment import dtw, median_filter

    rng = np.random.default_rng(1)
    for shape in ((3, 5, 40), (2, 1, 9), (1, 7, 3), (4, 12, 60)):
        x = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
        for width in (1, 3, 7):
            assert torch.equal(median_filter(x, width), _median_filter(x[None], width)[0])
        for m in (x[0].double().numpy(), np.round(x[0].double().numpy()), np.zeros(shape[1:])):  # ties too
            a, b = dtw(m), _dynamic_time_warping(m)
            assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_cli_and_errors(tiny, tmp_path, capsys):
    import ember
    from ember.cli import main
    from test_whisper_parity import _write_wav

    hf, fe, tok, asr = tiny
    x = _speech(3.0, 2)
    p = tmp_path / "a.wav"
    _write_wav(p, x)
    want = asr.transcription(p, language="en", word_timestamps=True, max_tokens=24)
    assert main(["transcribe", str(asr._loaded.snapshot.root), str(p), "--language", "en", "-n", "24",
                 "--word-timestamps", "--dtype", "float32"]) == 0
    lines = capsys.readouterr().out.strip().split("\n")
    assert [ln for ln in lines if not ln.startswith("[")] == [
        f"    {w.start:8.2f} {w.end:8.2f} {w.word.strip()}" for w in want.words]
    assert len(want.words) >= 2 and len([ln for ln in lines if ln.startswith("[")]) == len(want.segments)
    gc = dict(asr.generation_config)
    for bad in (None, [[5, 0]], [[0, 9]], "heads", [[0]], [[True, 0]]):
        asr.generation_config = {**gc, "alignment_heads": bad} if bad is not None else {
            k: v for k, v in gc.items() if k != "alignment_heads"}
        try:
            with pytest.raises(ember.GenerationError, match="alignment_heads|alignment heads"):
                asr.transcription(x, language="de", word_timestamps=True, max_tokens=4)
        finally:
            asr.generation_config = gc


def test_server_words_through_the_openai_client(tiny):
    """verbose_json with timestamp_granularities word (and segment) in OpenAI's shape, equal to the
    Python API; a bad granularity, word without verbose_json, and a checkpoint without alignment
    heads are 400s naming timestamp_granularities[]."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("multipart")
    from test_serve import TIMEOUT, running_server
    from test_serve_audio import _fallback, _samples, _wav

    from ember.serve import create_app

    _, _, _, asr = tiny
    x = _speech(3.0, 2)
    want = asr.transcription(_samples(x), language="en", word_timestamps=True, **_fallback())
    assert len(want.words) >= 2
    app = create_app(transcriber=asr, transcription_model_name="w")
    with running_server(app) as url, openai.OpenAI(base_url=url + "/v1", api_key="-", timeout=TIMEOUT,
                                                   max_retries=0) as client:
        kw = dict(model="w", file=("a.wav", _wav(x)), language="en", response_format="verbose_json")
        got = client.audio.transcriptions.create(timestamp_granularities=["word"], **kw)
        assert got.text == want.text and got.segments is None
        assert [(w.word, w.start, w.end) for w in got.words] == [(w.word.strip(), w.start, w.end) for w in want.words]
        both = client.audio.transcriptions.create(timestamp_granularities=["word", "segment"], **kw)
        assert both.words == got.words and [s.tokens for s in both.segments] == [s.tokens for s in want.segments]
        for extra in (dict(timestamp_granularities=["char"]), dict(timestamp_granularities=["word"],
                                                                   response_format="json")):
            with pytest.raises(openai.BadRequestError) as e:
                client.audio.transcriptions.create(**{**kw, **extra})
            assert e.value.body["param"] == "timestamp_granularities[]", extra
        gc = asr.generation_config
        asr.generation_config = {k: v for k, v in gc.items() if k != "alignment_heads"}
        try:
            with pytest.raises(openai.BadRequestError, match="alignment") as e:
                client.audio.transcriptions.create(timestamp_granularities=["word"], **kw)
            assert e.value.body["param"] == "timestamp_granularities[]"
        finally:
            asr.generation_config = gc
