"""A repository with only a SentencePiece tokenizer.model gets a tokenizer: converted at load and
checked against sentencepiece itself (the reference implementation)."""
import io
import json

import pytest
import torch

import ember
from ember.errors import TokenizerError

spm = pytest.importorskip("sentencepiece")

TEXTS = ["The quick brown fox jumps over the lazy dog.", "  two leading spaces", "Héllo wörld, ça va? 🎉 日本語",
         "def add(a, b):\n    return a + b\n", "Paris is the capital of France.", "unseen wordsz qqq 12345"]


def _train(model_type: str, llama: bool = True) -> bytes:
    """A SentencePiece model; llama=True: Llama's settings (byte fallback, no normalisation, spaces kept)."""
    import tinymodels

    buf = io.BytesIO()
    kw = dict(byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False) if llama else {}
    spm.SentencePieceTrainer.train(sentence_iterator=iter(tinymodels.CORPUS), model_writer=buf,
                                   vocab_size=(600 if llama else 400) if model_type == "bpe" else 350,
                                   model_type=model_type, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0,
                                   pad_id=-1, minloglevel=2, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def spm_folder(tmp_path_factory):
    """The tiny chat model's weights with a SentencePiece BPE tokenizer.model instead of tokenizer.json."""
    from transformers import LlamaConfig

    from parity import save, tiny_hf_model

    folder = tmp_path_factory.mktemp("spm")
    (folder / "tokenizer.model").write_bytes(_train("bpe"))
    cfg = LlamaConfig(vocab_size=600, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, bos_token_id=1, eos_token_id=2)
    save(tiny_hf_model(cfg), folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}"}))
    return folder


def test_tokenizer_model_only_gives_sentencepieces_ids(spm_folder):
    llm = ember.load(spm_folder, dtype=torch.float32)
    sp = spm.SentencePieceProcessor(model_file=str(spm_folder / "tokenizer.model"))
    assert llm.tokenizer is not None
    for text in TEXTS:
        assert llm.tokenizer.encode(text) == [sp.bos_id()] + sp.encode(text), text  # BOS added, as Llama's does
        assert llm.tokenizer.decode(sp.encode(text)) == sp.decode(sp.encode(text))
    assert llm.tokenizer.eos_token_id == sp.eos_id() and llm.tokenizer.chat_template
    assert isinstance(llm.generate("The quick", max_tokens=4), str)


@pytest.mark.parametrize("model_type,llama", [("unigram", True), ("bpe", False)], ids=["unigram", "bpe-nfkc"])
def test_a_model_the_conversion_does_not_reproduce_is_refused(tmp_path, model_type, llama):
    """A Unigram model, or a BPE one that normalises text (NFKC, collapsed spaces), would tokenise differently."""
    (tmp_path / "tokenizer.model").write_bytes(_train(model_type, llama))
    from ember.spm_tokenizer import tokenizer_from_folder

    with pytest.raises(TokenizerError, match="UNIGRAM model, not BPE" if model_type == "unigram" else
                       "it normalises text .nmt_nfkc.; it collapses runs of spaces"):
        tokenizer_from_folder(tmp_path)


def test_a_broken_tokenizer_model_is_a_tokenizer_error(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x00not a model")
    from ember.spm_tokenizer import tokenizer_from_folder

    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        tokenizer_from_folder(tmp_path)


def test_without_sentencepiece_the_error_says_what_to_install(spm_folder, monkeypatch):
    import sys

    from ember.spm_tokenizer import tokenizer_from_folder

    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    with pytest.raises(TokenizerError, match=r"ember\[sentencepiece\]"):
        tokenizer_from_folder(spm_folder)


def test_a_hub_repo_with_only_tokenizer_model_downloads_it(spm_folder, tmp_path, monkeypatch):
    from fakehub import FakeHub

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with FakeHub({"acme/spm": spm_folder}) as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        llm = ember.load("acme/spm", dtype=torch.float32)
    assert any(r.endswith("/tokenizer.model") for r in fake.requests)
    assert llm.tokenizer.encode("The quick") == ember.load(spm_folder).tokenizer.encode("The quick")
