"""The Embedder on tiny random BERTs with real tokenizers: the sentence-transformers pipeline
(pooling modes, Dense, Normalize, max_seq_length, do_lower_case, prompts) against
sentence-transformers itself, the defaults without its files, bad input, and `ember embed`."""
import json
import logging
import math
import re
import shutil
import sys

import pytest
import torch

import tinyencoders as T

TEXTS = ["The quick brown fox jumps over the lazy dog.", "", "ça va? 日本語のテキスト", "A man is eating food.",
         "word " * 100, "fox", "[CLS] [SEP] [PAD]", "Numbers 123 and punctuation !?"]


def _st_encode(folder, texts, **kw):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(folder), device="cpu")
    return torch.as_tensor(st.encode(texts, batch_size=3, **kw))


def _load(folder):
    import ember

    return ember.load(folder, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("pooling", [
    {"pooling_mode_cls_token": True},
    {"pooling_mode_max_tokens": True},
    {"pooling_mode_mean_sqrt_len_tokens": True},
    {"pooling_mode_weightedmean_tokens": True},
    {"pooling_mode_lasttoken": True},
    {"pooling_mode": "mean"},
    {"pooling_mode": ["cls", "max", "mean"]},
    {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True, "pooling_mode_weightedmean_tokens": True},
], ids=lambda p: "+".join(k.replace("pooling_mode_", "") for k in p) if "pooling_mode" not in p else str(p["pooling_mode"]))
def test_pooling_modes_match_sentence_transformers(tmp_path, pooling):
    T.add_sentence_transformers(T.tiny_bert(tmp_path), pooling=pooling)
    enc = _load(tmp_path)
    got = enc.embed(TEXTS, batch_size=3)
    ref = _st_encode(tmp_path, TEXTS)
    assert got.shape == ref.shape == (len(TEXTS), enc.dim)
    assert (got - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("dense", [
    [{"out_features": 16}],
    [{"out_features": 24, "bias": False, "activation_function": "torch.nn.modules.linear.Identity"},
     {"out_features": 8, "activation_function": "torch.nn.modules.activation.ReLU"}],
    [{"out_features": 32, "use_residual": True}],
    [{"out_features": 12, "use_residual": True, "activation_function": "torch.nn.modules.activation.GELU"}],
])
@pytest.mark.parametrize("normalize", [False, True])
def test_dense_and_normalize_match_sentence_transformers(tmp_path, dense, normalize):
    T.add_sentence_transformers(T.tiny_bert(tmp_path), pooling={"pooling_mode": "mean"}, dense=dense,
                                normalize=normalize)
    enc = _load(tmp_path)
    assert enc.dim == dense[-1]["out_features"] and enc.normalized == normalize
    got = enc.embed(TEXTS, batch_size=3)
    assert (got - _st_encode(tmp_path, TEXTS)).abs().max().item() < 1e-5
    if normalize:  # normalize=False skips the model's Normalize module, True adds one
        raw = enc.embed(TEXTS, normalize=False)
        assert torch.allclose(torch.nn.functional.normalize(raw, dim=-1), got, atol=1e-6)
    else:
        assert torch.allclose(enc.embed(TEXTS, normalize=True).norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)


def test_dense_weights_in_pytorch_model_bin(tmp_path):
    T.add_sentence_transformers(T.tiny_bert(tmp_path), dense=[{"out_features": 8}], dense_format="bin")
    assert (tmp_path / "2_Dense" / "pytorch_model.bin").is_file()
    got = _load(tmp_path).embed(TEXTS)
    assert (got - _st_encode(tmp_path, TEXTS)).abs().max().item() < 1e-5


def test_max_seq_length_lower_case_and_truncation(tmp_path):
    T.tiny_bert(tmp_path, lowercase=False)
    T.add_sentence_transformers(tmp_path, max_seq_length=12, do_lower_case=True, normalize=True)
    enc = _load(tmp_path)
    assert enc.max_length == 12 and enc.do_lower_case
    texts = TEXTS + ["THE QUICK BROWN FOX", "The Quick Brown Fox"]
    got, truncated = enc.embed(texts, return_truncated=True)
    assert (got - _st_encode(tmp_path, texts)).abs().max().item() < 1e-5
    assert torch.allclose(got[-1], got[-2], atol=1e-6)  # lowercased before tokenizing
    enc.tokenizer.tk.no_truncation()
    full = [len(e.ids) for e in enc.tokenizer.tk.encode_batch(texts)]
    enc.max_length = 12
    assert truncated.dtype == torch.bool and truncated.tolist() == [n > 12 for n in full]
    assert truncated.any() and not truncated.all()


def test_prompts_and_include_prompt_false_match_sentence_transformers(tmp_path):
    T.tiny_bert(tmp_path)
    T.add_sentence_transformers(tmp_path, pooling={"pooling_mode": "mean", "include_prompt": False},
                                prompts={"query": "query: the ", "doc": ""}, default_prompt_name="query")
    enc = _load(tmp_path)
    assert enc.prompts == {"query": "query: the ", "doc": ""} and enc.default_prompt_name == "query"
    got = enc.embed(TEXTS[:4])  # the default prompt applies, and is left out of the mean
    assert (got - _st_encode(tmp_path, TEXTS[:4])).abs().max().item() < 1e-5
    got = enc.embed(TEXTS[:4], prompt="fox ")
    assert (got - _st_encode(tmp_path, TEXTS[:4], prompt="fox ")).abs().max().item() < 1e-5


def test_no_sentence_transformers_files_means_mean_pooling(tmp_path, caplog):
    T.tiny_bert(tmp_path, model_cls="BertForMaskedLM")  # a task checkpoint: heads are left unused quietly
    with caplog.at_level(logging.INFO, logger="ember"):
        enc = _load(tmp_path)
    assert enc.pooling_source == "default" and enc.pooling.modes == ("mean",) and not enc.normalized
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("mean pooling" in w for w in warnings)
    assert not any("not used" in w for w in warnings), warnings  # cls.predictions.* is a known head
    assert any("task heads" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    assert enc.max_length == 64
    ids, _ = enc.tokenize(TEXTS[:2])
    x = torch.tensor([ids[0]])
    h = enc.model(x)  # power users: the last hidden states
    assert h.shape == (1, len(ids[0]), 32)
    assert torch.allclose(enc.embed(TEXTS[:1])[0], h[0].mean(0), atol=1e-5)


def test_order_restored_and_padding_invariant(tmp_path):
    T.add_sentence_transformers(T.tiny_bert(tmp_path))
    enc = _load(tmp_path)
    texts = [("fox " * k).strip() for k in (3, 1, 9, 2, 14, 5, 1)]
    together = enc.embed(texts, batch_size=4)
    alone = torch.cat([enc.embed(t) for t in texts])  # a str is one text: [1, dim]
    assert (together - alone).abs().max().item() < 1e-5


# ---- bad input ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_enc(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_enc")
    T.add_sentence_transformers(T.tiny_bert(d), prompts={"q": "query: "})
    return _load(d)


@pytest.mark.parametrize("texts,msg", [
    (None, "needs a string or a list of strings, got None"),
    ([], "empty list of texts"),
    ((), "empty list of texts"),
    ([1, "a"], "texts[0] is int"),
    (["a", None], "texts[1] is NoneType"),
    (["a", b"b"], "texts[1] is bytes"),
    (b"bytes", "got bytes"),
    (42, "got int"),
])
def test_bad_texts(tiny_enc, texts, msg):
    from ember import EmberError, EmbeddingError

    with pytest.raises(EmbeddingError, match=msg.replace("[", r"\[").replace("]", r"\]")) as e:
        tiny_enc.embed(texts)
    assert isinstance(e.value, EmberError)


@pytest.mark.parametrize("kw,msg", [
    (dict(batch_size=0), "batch_size must be a positive int, got 0"),
    (dict(batch_size=2.5), "batch_size must be a positive int"),
    (dict(normalize="yes"), "normalize must be True, False or None"),
    (dict(prompt_name="nope"), "no prompt named 'nope'; this model has: q"),
    (dict(prompt=3), "prompt must be a string"),
    (dict(prompt_name=[1]), r"prompt_name must be a string \(one of: q\), got list"),  # was: TypeError unhashable
    (dict(progress="yes"), "progress must be True or False"),
    (dict(return_truncated=1), "return_truncated must be True or False"),
])
def test_bad_options(tiny_enc, kw, msg):
    from ember import EmbeddingError

    with pytest.raises(EmbeddingError, match=msg):
        tiny_enc.embed(["a"], **kw)


def test_bad_max_length(tiny_enc):
    from ember import EmbeddingError

    with pytest.raises(EmbeddingError, match=r"max_length must be an int in \[2, 64\], got 100"):
        tiny_enc.max_length = 100


def test_bad_sentence_transformers_files(tmp_path):
    from ember import EmbeddingError

    T.add_sentence_transformers(T.tiny_bert(tmp_path))
    mods = json.loads((tmp_path / "modules.json").read_text())
    mods.append({"idx": 2, "name": "2", "path": "2_X", "type": "sentence_transformers.models.WeightedLayerPooling"})
    (tmp_path / "modules.json").write_text(json.dumps(mods))
    with pytest.raises(EmbeddingError, match="WeightedLayerPooling' is not supported"):
        _load(tmp_path)
    (tmp_path / "modules.json").write_text(json.dumps(mods[:2]))
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "median"}))
    with pytest.raises(EmbeddingError, match="unsupported pooling mode"):
        _load(tmp_path)


@pytest.fixture(scope="module")
def st_base(tmp_path_factory):
    """A tiny BERT with every sentence-transformers file (Pooling, Dense, Normalize, prompts): copy it to edit."""
    d = tmp_path_factory.mktemp("st_base") / "m"
    return T.add_sentence_transformers(T.tiny_bert(d), dense=[{"out_features": 16}], normalize=True, max_seq_length=32,
                                       prompts={"q": "query: "})


def _edit(folder, name, change):
    f = folder / name
    if isinstance(change, str):
        f.write_text(change)
    else:
        f.write_text(json.dumps(change(json.loads(f.read_text())), allow_nan=True))


HOSTILE_FILES = [
    # (file, change, message); the first five raised plain Python exceptions, the others loaded silently
    ("1_Pooling/config.json", lambda c: {**c, "pooling_mode": 5}, "'pooling_mode' must be a mode name"),  # TypeError
    ("modules.json", lambda ms: [dict(m, idx=str(m["idx"])) if i % 2 else m for i, m in enumerate(ms)],
     "module 1 'idx' must be an integer, got '1'"),  # TypeError in sorted()
    ("config_sentence_transformers.json", lambda c: {**c, "default_prompt_name": [1]},
     "'default_prompt_name' must be a string, got [1]"),  # TypeError (unhashable) at embed()
    ("2_Dense/config.json", lambda c: {**c, "in_features": math.inf},
     "'in_features' must be a positive integer, got inf"),  # OverflowError
    ("modules.json", "[" * 100_000, "nested too deeply"),  # RecursionError
    ("1_Pooling/config.json", lambda c: {**c, "pooling_mode_mean_tokens": "no"},
     "'pooling_mode_mean_tokens' must be true or false"),
    ("1_Pooling/config.json", lambda c: {**c, "include_prompt": "no"}, "'include_prompt' must be true or false"),
    ("2_Dense/config.json", lambda c: {**c, "out_features": 16.5}, "'out_features' must be a positive integer"),
    ("2_Dense/config.json", lambda c: {**c, "bias": "false"}, "'bias' must be true or false"),
    ("2_Dense/config.json", lambda c: {**c, "activation_function": "os.system"}, "'activation_function' 'system'"),
    ("sentence_bert_config.json", lambda c: {**c, "max_seq_length": "128"}, "'max_seq_length' must be a positive"),
    ("sentence_bert_config.json", lambda c: {**c, "do_lower_case": 1}, "'do_lower_case' must be true or false"),
    ("config_sentence_transformers.json", lambda c: {**c, "default_prompt_name": "doc"},
     "'default_prompt_name' 'doc' is not one of its prompts"),
    ("config_sentence_transformers.json", lambda c: {**c, "prompts": ["query: "]}, "'prompts' must map names"),
    ("modules.json", lambda ms: [dict(m, type=None) if i == 1 else m for i, m in enumerate(ms)],
     "module 1 'type' must be a class name string"),
]


@pytest.mark.parametrize("name,change,msg", HOSTILE_FILES,
                         ids=[f"{i}-{n}" for i, (n, _, _) in enumerate(HOSTILE_FILES)])
def test_hostile_sentence_transformers_files(st_base, tmp_path, name, change, msg):
    """Each is an EmbeddingError naming the file and the field, at load (never at embed, never another type)."""
    from ember import EmbeddingError

    d = shutil.copytree(st_base, tmp_path / "m")
    _edit(d, name, change)
    with pytest.raises(EmbeddingError, match=msg.replace("[", r"\[").replace("]", r"\]")) as e:
        _load(d)
    assert str(d / name) in str(e.value)


def test_module_paths_stay_inside_the_model_folder(st_base, tmp_path):
    """modules.json `path` entries that lead outside the model folder (or are absolute) are refused,
    although a valid Dense module waits there; one that goes up and comes back in is fine."""
    from ember import EmbeddingError

    d = shutil.copytree(st_base, tmp_path / "m")
    other = shutil.copytree(d / "2_Dense", tmp_path / "other" / "2_Dense")
    (d / "link").symlink_to(other, target_is_directory=True)
    valid = json.loads((d / "modules.json").read_text())
    assert valid[2]["path"] == "2_Dense"

    def with_dense_path(path):
        (d / "modules.json").write_text(json.dumps([dict(m, path=path) if i == 2 else m for i, m in enumerate(valid)]))

    for path, msg in [("../other/2_Dense", "leads outside the model folder"),
                      ("1_Pooling/../../other/2_Dense", "leads outside the model folder"),
                      ("link", "leads outside the model folder"),  # a symlink to a folder outside
                      (str(other), "is absolute"),
                      ("2_Dense\0", "NUL character"),
                      ([1], "must be a string")]:
        with_dense_path(path)
        with pytest.raises(EmbeddingError, match=f"module 2 'path' .*{msg}"):
            _load(d)
    with_dense_path("1_Pooling/../2_Dense")
    assert _load(d).dim == 16


def test_no_tokenizer_means_token_ids_only(tmp_path):
    from ember import TokenizerError

    T.tiny_bert(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    enc = _load(tmp_path)
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        enc.embed(["a"])
    assert enc.model(torch.tensor([[2, 7, 9, 3]])).shape == (1, 4, 32)


# ---- ember embed ------------------------------------------------------------------------------------
def test_cli_embed(tmp_path, capsys):
    import numpy as np

    from ember.cli import main

    d = T.add_sentence_transformers(T.tiny_bert(tmp_path / "m"), normalize=True)
    assert main(["embed", str(d), "The quick brown fox.", "ça va", "--dtype", "float32"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    want = _load(d).embed(["The quick brown fox.", "ça va"])
    assert torch.allclose(torch.tensor(rows), want, atol=1e-5)

    lines = tmp_path / "lines.txt"
    lines.write_text("The quick brown fox.\n\n" + "word " * 100 + "\n", encoding="utf-8")
    out = tmp_path / "v.npy"
    assert main(["embed", str(d), "--file", str(lines), "--out", str(out), "--progress", "--dtype", "float32"]) == 0
    err = capsys.readouterr().err
    assert "1 of 3 texts were longer than 64 tokens" in err and f"wrote 3 x {want.shape[1]}" in err
    arr = np.load(out)
    assert arr.shape == (3, want.shape[1]) and arr.dtype == np.float32
    assert np.allclose(arr[0], want[0].numpy(), atol=1e-5)

    assert main(["embed", str(d)]) == 1
    assert "no texts to embed" in capsys.readouterr().err
    assert main(["embed", str(d), "x", "--out", str(tmp_path / "v.txt")]) == 1
    # a folder that does not exist: refused before the model loads (it used to fail after all the work)
    assert main(["embed", str(d), "x", "--out", str(tmp_path / "nope" / "v.npy")]) == 1
    (tmp_path / "dir.npy").mkdir()
    assert main(["embed", str(d), "x", "--out", str(tmp_path / "dir.npy")]) == 1  # a folder, not a file
    err = capsys.readouterr().err
    assert "use a .npy, .pt or .jsonl" in err and "does not exist" in err and "cannot write there" in err
    assert "Traceback" not in err


def test_cli_embed_progress_bar(tmp_path, capsys, monkeypatch):
    """--progress draws a bar on stderr (stdout keeps only the vectors); without it the bar appears only
    for PROGRESS_MIN texts or more with stderr on a terminal; --no-progress never draws it."""
    from ember.cli import main
    from ember.cli_embed import PROGRESS_MIN

    d = T.add_sentence_transformers(T.tiny_bert(tmp_path / "m"))
    bar = re.compile(r"embedding: +100%\|.*\| (\d+)/\1 ")

    def run(*args):
        assert main(["embed", str(d), *args, "--dtype", "float32"]) == 0
        return capsys.readouterr()

    got = run("fox", "dog", "--progress")
    assert bar.search(got.err) and bar.search(got.err).group(1) == "2", got.err
    assert len(got.out.splitlines()) == 2 and "embedding:" not in got.out
    assert "embedding:" not in run("fox", "dog").err  # few texts, stderr not a terminal

    lines = tmp_path / "many.txt"
    lines.write_text("fox\n" * PROGRESS_MIN, encoding="utf-8")
    out = tmp_path / "v.npy"
    assert "embedding:" not in run("--file", str(lines), "--out", str(out)).err  # many texts, not a terminal
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    err = run("--file", str(lines), "--out", str(out)).err
    assert bar.search(err) and bar.search(err).group(1) == str(PROGRESS_MIN), err
    assert "embedding:" not in run("--file", str(lines), "--out", str(out), "--no-progress").err


def test_cli_embed_refuses_a_causal_lm(tiny_chat, capsys):
    from ember.cli import main

    assert main(["embed", str(tiny_chat), "hello"]) == 1
    assert "not an encoder" in capsys.readouterr().err


# ---- decoder-based embedders ----------------------------------------------------------------------
def test_causal_lm_with_sentence_transformers_files_embeds(tmp_path):
    """A Qwen3 causal LM packaged as a sentence-transformers model (last-token pooling, as
    Qwen3-Embedding): ember.load gives an Embedder that matches sentence-transformers."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    import ember
    import tinymodels
    from parity import randomize_

    tk = tinymodels.build_tokenizer()
    tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",  # tokenizer.json as is (not rebuilt as Qwen2Tokenizer)
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "model_max_length": 128}))
    cfg = Qwen3Config(vocab_size=tk.get_vocab_size(), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                      pad_token_id=tk.token_to_id("<|endoftext|>"), tie_word_embeddings=True)
    torch.manual_seed(0)
    randomize_(Qwen3ForCausalLM(cfg).float().eval()).save_pretrained(tmp_path)
    T.add_sentence_transformers(tmp_path, pooling={"pooling_mode": "lasttoken"}, normalize=True)
    enc = ember.load(tmp_path, dtype=torch.float32)
    assert isinstance(enc, ember.Embedder) and enc.dim == 64 and enc.max_length == 128
    texts = ["The quick brown fox jumps over the lazy dog.", "Héllo wörld", "a", "1234567890 " * 3]
    got = enc.embed(texts, batch_size=3)
    assert (got - _st_encode(tmp_path, texts)).abs().max().item() < 1e-4
    # an empty text has no tokens at all here (sentence-transformers fails on a batch of those)
    assert torch.isfinite(enc.embed(["", ""])).all()


def _tiny_embeddinggemma(tmp_path, **over):
    """A tiny Gemma3TextModel with use_bidirectional_attention, saved as transformers saves
    EmbeddingGemma (no "model." prefix, no lm_head)."""
    from transformers import Gemma3TextConfig, Gemma3TextModel

    import tinymodels
    from parity import randomize_

    tk = tinymodels.build_tokenizer()
    tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<|endoftext|>", "model_max_length": 128}))
    kw = dict(vocab_size=tk.get_vocab_size(), hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
              sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
              pad_token_id=tk.token_to_id("<|endoftext|>"), use_bidirectional_attention=True)
    kw.update(over)
    torch.manual_seed(0)
    model = randomize_(Gemma3TextModel(Gemma3TextConfig(**kw)).float().eval())
    model.save_pretrained(tmp_path)
    return model, tk


def test_bidirectional_gemma3_embeds_like_sentence_transformers(tmp_path):
    """EmbeddingGemma-style checkpoints (gemma3_text with use_bidirectional_attention): every token
    sees the whole text (global layers) or its window both ways (sliding layers, w // 2 + 1 as the
    reference), weights without the "model." prefix; ember.load gives an Embedder matching
    sentence-transformers."""
    import ember

    hf, tk = _tiny_embeddinggemma(tmp_path)
    T.add_sentence_transformers(tmp_path, pooling={"pooling_mode": "mean"}, normalize=True)
    enc = ember.load(tmp_path, dtype=torch.float32)
    assert isinstance(enc, ember.Embedder) and enc.model.lm.bidirectional
    texts = ["The quick brown fox jumps over the lazy dog, again and again.", "Héllo wörld", "a",
             "1234567890 " * 4]
    got = enc.embed(texts, batch_size=3)
    assert (got - _st_encode(tmp_path, texts)).abs().max().item() < 1e-4

    # hidden states of a right-padded batch against the reference model itself
    ids = [tk.encode(t).ids for t in texts[:2]]
    n = max(map(len, ids))
    pad = tk.token_to_id("<|endoftext|>")
    input_ids = torch.tensor([x + [pad] * (n - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in ids])
    with torch.no_grad():
        ref = hf(input_ids=input_ids, attention_mask=mask).last_hidden_state
        out = enc.model(input_ids, mask)
    real = mask.bool()
    assert n > 8 and (out[real] - ref[real]).abs().max().item() < 1e-4

    # the attention really is bidirectional: an early token's state depends on later tokens
    with torch.no_grad():
        cut = enc.model(input_ids[:1, :4], mask[:1, :4])
    assert (cut[0, 0] - out[0, 0]).abs().max().item() > 1e-3


def test_bidirectional_gemma3_without_sentence_transformers_files_still_embeds(tmp_path):
    """No modules.json: a bidirectional decoder is an encoder, so ember.load embeds (mean pooling)
    instead of handing back a generator that would decode with the wrong attention."""
    import ember

    _tiny_embeddinggemma(tmp_path)
    enc = ember.load(tmp_path, dtype=torch.float32)
    assert isinstance(enc, ember.Embedder) and enc.pooling_source == "default"
    assert enc.embed(["hello world"]).shape == (1, 64)
