"""Embedder.encode takes sentence-transformers' argument names and gives its return types and numbers."""
import numpy as np
import pytest
import torch

import ember
import tinyencoders as T
from ember.errors import EmbeddingError

TEXTS = ["The quick brown fox jumps over the lazy dog.", "A man is eating food.", "fox", "ça va? 日本語のテキスト"]


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "normalize-module"])
def pair(request, tmp_path_factory):
    from sentence_transformers import SentenceTransformer

    folder = tmp_path_factory.mktemp("enc")
    T.add_sentence_transformers(T.tiny_bert(folder), normalize=request.param, prompts={"query": "query: "})
    return ember.load(folder, dtype=torch.float32), SentenceTransformer(str(folder), device="cpu")


@pytest.mark.parametrize("kw", [
    {}, {"normalize_embeddings": True}, {"truncate_dim": 5}, {"truncate_dim": 5, "normalize_embeddings": True},
    {"prompt_name": "query", "batch_size": 2}, {"prompt": "fox: ", "show_progress_bar": False},
], ids=lambda kw: ",".join(kw) or "defaults")
def test_encode_matches_sentence_transformers(pair, kw):
    enc, st = pair
    got, want = enc.encode(TEXTS, **kw), st.encode(TEXTS, **kw)
    assert isinstance(got, np.ndarray) and got.dtype == want.dtype and got.shape == want.shape
    assert np.abs(got - want).max() < 1e-5


def test_encode_return_types_follow_sentence_transformers(pair):
    enc, st = pair
    one, want = enc.encode("fox"), st.encode("fox")
    assert isinstance(one, np.ndarray) and one.shape == want.shape == (enc.dim,)
    t = enc.encode(TEXTS, convert_to_tensor=True)
    assert isinstance(t, torch.Tensor) and t.shape == (len(TEXTS), enc.dim)
    rows = enc.encode(TEXTS, convert_to_numpy=False)
    assert isinstance(rows, list) and len(rows) == len(TEXTS) and torch.equal(torch.stack(rows), t)
    assert torch.equal(t, enc.embed(TEXTS))  # the same numbers as embed


@pytest.mark.parametrize("kw,msg", [({"truncate_dim": 0}, "truncate_dim"), ({"normalize_embeddings": "yes"},
                                    "normalize_embeddings"), ({"show_progress_bar": 1}, "show_progress_bar"),
                                    ({"batch_size": 0}, "batch_size")])
def test_encode_refuses_bad_arguments(pair, kw, msg):
    with pytest.raises(EmbeddingError, match=msg):
        pair[0].encode(TEXTS, **kw)
