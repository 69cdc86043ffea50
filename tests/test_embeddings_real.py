"""Real sentence-transformers checkpoints: ember's embeddings against sentence-transformers' `encode`
for 200 varied texts (short, past the max length, non-ASCII, empty), in float32 and in the default
dtype (bf16 matmuls with a float32 residual stream on CPUs with native bf16)."""
import random

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.slow

WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact be have do say get make go know take see come think "
         "look want give use find tell ask seem feel try leave call good new first last long great little own "
         "other old right big high different small large next early young important few public bad same able"
         ).split()
NON_ASCII = [
    "Ça va très bien, merci beaucoup !", "Größenwahn ist keine Lösung für Übermut.", "日本語の文章を埋め込みます。",
    "今天天气很好，我们去公园散步吧。", "Привет, как дела? Всё хорошо.", "مرحبا بالعالم، كيف حالك اليوم؟",
    "emoji 🙂🚀🔥 and symbols ∑∫√ ≠ ≤", "naïve café résumé coöperate façade", "Ελληνικά γράμματα: αβγδε",
    "한국어 문장도 잘 처리되어야 합니다.", "हिंदी में एक वाक्य", "ñandú pingüino acción",
]
ODD = ["", " ", "   \t ", ".", "?!", "1234567890", "a", "I", "[SEP] [CLS] <pad> </s> <s> [MASK]", "word\nnewline\ttab",
       "UPPER CASE SENTENCE", "https://example.com/path?q=1&x=2", "x" * 300]


def varied_texts(n: int = 200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = list(ODD) + list(NON_ASCII)

    def words(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    texts += [words(rng.randint(1, 4)) for _ in range(50)]  # short
    texts += [words(600) for _ in range(8)]  # far past 256 / 384 tokens: truncated
    texts += [words(rng.randint(180, 300)) + " " + rng.choice(NON_ASCII) for _ in range(10)]  # around the limit
    while len(texts) < n:
        texts.append(words(rng.randint(8, 40)).capitalize() + rng.choice([".", "?", "!", ""]))
    rng.shuffle(texts)
    return texts[:n]


_REFERENCES: dict = {}


def _reference(folder, texts):
    """sentence-transformers' embeddings and its tokenizer (computed once per model and texts)."""
    from sentence_transformers import SentenceTransformer

    key = (str(folder), tuple(texts))
    if key not in _REFERENCES:
        st = SentenceTransformer(str(folder), device="cpu")
        _REFERENCES[key] = (torch.as_tensor(st.encode(texts, batch_size=32)), st.tokenizer)
    return _REFERENCES[key]


def _compare(folder, texts, dtype, min_cos):
    import ember

    ref, tokenizer = _reference(folder, texts)
    enc = ember.load(folder, dtype=dtype, device="cpu")
    got, truncated = enc.embed(texts, return_truncated=True)
    assert got.shape == ref.shape and got.dtype == torch.float32
    cos = F.cosine_similarity(ref, got)
    worst = int(cos.argmin())
    assert cos.min().item() >= min_cos, f"cosine {cos.min().item():.6f} for text {worst}: {texts[worst][:80]!r}"
    # truncation is reported for exactly the texts sentence-transformers' tokenizer cuts
    full = [len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]]
    assert truncated.tolist() == [n > enc.max_length for n in full]
    assert truncated.any()
    return enc, ref, got


@pytest.fixture(scope="module")
def texts():
    return varied_texts()


@pytest.mark.parametrize("dtype", [torch.float32, None], ids=["float32", "default"])
def test_minilm_matches_sentence_transformers(texts, dtype):
    import realmodels

    enc, ref, got = _compare(realmodels.minilm_dir(), texts, dtype, 0.99999 if dtype == torch.float32 else 0.9999)
    assert enc.dim == 384 and enc.max_length == 256 and enc.normalized
    assert enc.pooling.modes == ("mean",) and enc.pooling_source.endswith("modules.json")
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(texts)), atol=1e-5)


def test_minilm_avx2_default_int16_matches_sentence_transformers(texts, monkeypatch):
    """On a CPU whose kernels run AVX2 (capped here), the default float32 path computes the Linears on
    16-bit integer codes (transform int16-f32): within cosine 0.99995 of sentence-transformers."""
    import realmodels

    from ember import kernels
    from ember.backends.int16 import Int16Linear

    if not (kernels.available() and "avx2" in kernels.isas()):
        pytest.skip("needs the native kernels on an AVX2 CPU")
    monkeypatch.setenv("EMBER_CPU_ISA", "avx2")
    enc, _, _ = _compare(realmodels.minilm_dir(), texts, None, 0.99995)
    assert "int16-f32" in enc._loaded.transforms
    lins = [m for m in enc.model.modules() if isinstance(m, Int16Linear)]
    assert len(lins) == 24 and all(m.w16 is not None for m in lins)  # 6 layers x (qkv, o, up, down), converted


def test_mpnet_matches_sentence_transformers(texts):
    """The default dtype only (float32 where the CPU lacks native bf16): mpnet-base is 10x MiniLM's
    compute, and float32 exactness is covered by MiniLM and the tiny-checkpoint parity tests."""
    import realmodels

    enc, _, _ = _compare(realmodels.mpnet_dir(), texts, None, 0.9999)
    assert enc.dim == 768 and enc.max_length == 384 and enc.normalized


def test_minilm_order_batch_size_and_options(texts):
    import realmodels

    import ember

    enc = ember.load(realmodels.minilm_dir(), dtype=torch.float32)
    a = enc.embed(texts[:40], batch_size=7)
    b = torch.cat([enc.embed([t]) for t in texts[:40]])  # each text alone: padding changes nothing
    assert (a - b).abs().max().item() < 1e-5
    raw = enc.embed(texts[:10], normalize=False)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(10), atol=1e-3)
    assert torch.allclose(F.normalize(raw, dim=-1), a[:10], atol=1e-5)
    enc.max_length = 16
    short, tr = enc.embed(texts[:40], return_truncated=True)
    assert tr.sum() > 0 and enc.tokenizer.tk.truncation["max_length"] == 16
    # the same prompt prepended by hand or by prompt=
    assert torch.allclose(enc.embed(["query: hello"]), enc.embed(["hello"], prompt="query: "))
