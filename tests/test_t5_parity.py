"""T5 (v1.0: relu, tied and scaled head; v1.1: gated-gelu) and mT5 against transformers on tiny random
checkpoints: encoder outputs on a padded batch, decoder logits (whole and through the caches,
token by token), greedy sequences of a padded batch; the encoder as a sentence-transformers
embedding model."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from parity import randomize_

VOCAB = 96


def _tiny(folder, cls="T5ForConditionalGeneration", cfg_cls="T5Config", **kw):
    import transformers

    base = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_decoder_layers=2, num_heads=4,
                relative_attention_num_buckets=8, relative_attention_max_distance=20, decoder_start_token_id=0,
                pad_token_id=0, eos_token_id=1)
    cfg = getattr(transformers, cfg_cls)(**{**base, **kw})
    torch.manual_seed(0)
    hf = getattr(transformers, cls)(cfg).eval()
    with torch.no_grad():  # weights large enough that greedy text varies (transformers' init gives ~0 logits)
        for p in hf.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.4)
    randomize_(hf, 0)
    hf.save_pretrained(folder)
    return hf


def _batch(lengths=(23, 9, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(2, VOCAB, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 0
    return ids, mask


def _hf_greedy(hf, ids, mask, n, eos=1):
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, num_beams=1)
    rows = []
    for r in out[:, 1:].tolist():  # drop the start token; stop at the first end token
        rows.append(r[:r.index(eos) + 1] if eos in r else r)
    return rows


CASES = {
    "t5-v1.0-relu": dict(feed_forward_proj="relu"),
    "t5-v1.1-gated-gelu": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "mt5": dict(cfg_cls="MT5Config", cls="MT5ForConditionalGeneration", feed_forward_proj="gated-gelu"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_t5_matches_transformers(tmp_path, case):
    import ember
    from ember.seq2seq import Seq2SeqLM

    hf = _tiny(tmp_path, **CASES[case])
    t5 = ember.load(tmp_path, dtype=torch.float32, device="cpu")
    assert isinstance(t5, Seq2SeqLM)
    ids, mask = _batch()
    dec = torch.randint(2, VOCAB, (3, 11), generator=torch.Generator().manual_seed(1))
    dec[:, 0] = 0
    with torch.no_grad():
        ref_enc = hf.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        enc = t5.model.encode(ids, mask)
        m = mask.bool()
        assert (enc[m] - ref_enc[m]).abs().max() < 1e-4
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        got = t5.model(ids, dec, mask)
        # unnormalised residual streams grow large (here to ~50): float32 rounding reaches 1e-3 in the logits,
        # so the bound is transformers' own float32 error against its float64 result, or 1e-4 if larger
        exact = copy.deepcopy(hf).double()(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        tol = max(1e-4, 2 * float((ref.double() - exact).abs().max()))
        assert got.shape == ref.shape and (got - ref).abs().max() < tol
        assert ref.std() > 0.2  # logits vary: the check can fail
        # through the caches: a 3-token prefix, then one token at a time
        cache = t5.model.new_cache(3, 11)
        steps = [t5.model.decode(dec[:, :3], enc, mask, cache)]
        steps += [t5.model.decode(dec[:, i:i + 1], enc, mask, cache) for i in range(3, 11)]
        assert (torch.cat(steps, dim=1) - ref).abs().max() < tol
    want = _hf_greedy(hf, ids, mask, 16)
    got = t5.generate_ids([ids[i, :n].tolist() for i, n in enumerate(mask.sum(1).tolist())], max_tokens=16)
    assert got == want
    assert len(set(want[0])) >= 5, f"greedy output is degenerate: {want[0]}"


def test_t5_stops_at_the_end_token(tmp_path):
    """Rows stop at their end token while the others run on, as transformers: the end token is made
    one this model emits (85) after a few tokens in some rows."""
    import ember

    hf = _tiny(tmp_path, feed_forward_proj="relu", eos_token_id=85)
    t5 = ember.load(tmp_path, dtype=torch.float32, device="cpu")
    ids, mask = _batch((12, 7, 5, 3), seed=3)
    want = _hf_greedy(hf, ids, mask, 24, eos=85)
    got = t5.generate_ids([ids[i, :n].tolist() for i, n in enumerate(mask.sum(1).tolist())], max_tokens=24)
    assert got == want
    assert sorted(len(r) for r in got) == [1, 1, 2, 24], got  # each row ends where it emits 85 (one never)


def test_t5_bad_generation_arguments(tmp_path):
    import ember

    _tiny(tmp_path)
    t5 = ember.load(tmp_path, dtype=torch.float32, device="cpu")
    for args in (([[5, 6]], -1), ([[5, VOCAB]], 4), ([[]], 4), ([], 4), ([[5, 6]], True)):
        with pytest.raises(ember.GenerationError):
            t5.generate_ids(*args)
    assert t5.generate_ids([[5, 6]], 0) == [[]]


def _tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(["a photo of a cat", "the quick brown fox jumps over the lazy dog", "hello world"] * 5,
                           trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"], show_progress=False))
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>", "eos_token": "</s>"}))
    return tk


def test_t5_generate_text(tmp_path, capsys):
    import ember
    from ember.cli import main

    hf = _tiny(tmp_path)
    tk = _tokenizer(tmp_path)
    t5 = ember.load(tmp_path, dtype=torch.float32, device="cpu")
    texts = ["a photo of a cat", "hello world"]
    out = t5.generate(texts, max_tokens=6)
    ids = [tk.encode(t).ids for t in texts]
    want = t5.generate_ids(ids, 6)
    assert out == [tk.decode(w) for w in want]
    assert t5.generate(texts[0], max_tokens=6) == out[0]
    assert main(["run", str(tmp_path), "hello world"]) != 0  # run/chat take causal LMs: a one-line error
    assert "an encoder-decoder (t5)" in capsys.readouterr().err
    del hf


def test_t5_encoder_as_sentence_embedding_model(tmp_path):
    """sentence-T5 / GTR layout: a T5EncoderModel checkpoint with modules.json (mean pooling,
    Normalize): ember.load gives an Embedder whose vectors are transformers' encoder states pooled."""
    import ember

    hf = _tiny(tmp_path, cls="T5EncoderModel")
    tk = _tokenizer(tmp_path)
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32,
                                                                     "pooling_mode_mean_tokens": True}))
    enc = ember.load(tmp_path, dtype=torch.float32, device="cpu")
    assert isinstance(enc, ember.Embedder)
    texts = ["a photo of a cat", "the quick brown fox jumps over the lazy dog", "hello"]
    got = enc.embed(texts)
    for i, t in enumerate(texts):
        ids = torch.tensor([tk.encode(t).ids])
        with torch.no_grad():
            h = hf(input_ids=ids).last_hidden_state[0]
        want = torch.nn.functional.normalize(h.mean(0), dim=-1)
        assert (got[i] - want).abs().max() < 1e-5


def test_decoder_cache_grows_as_tokens_arrive():
    """The cache holds what was decoded, not what max_tokens claims; growing keeps what it held."""
    from ember.nn.seq2seq_cache import Seq2SeqCache

    c = Seq2SeqCache(2, 1, 2, 4, 10**9)
    assert c.k[0].shape[2] == Seq2SeqCache.START
    g = torch.Generator().manual_seed(0)
    ks = [torch.randn(1, 2, n, 4, generator=g) for n in (200, 100, 300)]
    for k in ks:
        for layer in range(2):
            got, _ = c.update(layer, k, k)
        c.advance(k.shape[2])
    assert c.length == 600 and c.k[0].shape[2] == 1024  # 256, then doubled twice
    assert torch.equal(got, torch.cat(ks, dim=2))
    small = Seq2SeqCache(1, 1, 1, 1, 5)
    with pytest.raises(ValueError):
        small.update(0, torch.zeros(1, 1, 6, 1), torch.zeros(1, 1, 6, 1))


def test_load_task_names_t5s_kind(tmp_path):
    import ember

    _tiny(tmp_path, **CASES[next(iter(CASES))])
    assert isinstance(ember.load(tmp_path, task="text2text", dtype=torch.float32), ember.Seq2SeqLM)
    with pytest.raises(ember.ArgumentError, match="task='text2text'"):
        ember.load(tmp_path, task="generate", dtype=torch.float32)
