"""Fuzzing the GGUF reader and loader with hostile files (see tests/hostile.py for budgets and guards).

Property, for every file: parsing (`GGUFFile`), reading and dequantising every tensor, and
`ember.load` + a two-token generation + tokenizing text either raise an `EmberError` or work; never
another exception type, never a hang, never an allocation sized by a number the file claims (RLIMIT_DATA
caps growth while an example runs; tracemalloc bounds the parser's Python allocations).

Targets: byte flips, u64 overwrites and truncations of tiny synthetic GGUFs (a Q8_0 Llama, one in
i-quants and MXFP4, a Qwen2-MoE with stacked experts; written with the `gguf` package's GGUFWriter,
tests/ggufmake.py); any bytes dequantised as any shape of any block type; typed metadata values
replaced by hostile ones (wrong types, absurd numbers, nested arrays, broken vocabularies); raw
headers with absurd counts and lengths; and (slow) byte flips and truncations of the real SmolLM2
GGUF.
"""
from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ember.errors import CheckpointError, EmberError
from hostile import fuzz_settings, memory_cap, peak_python_bytes, time_limit

gguf_mod = pytest.importorskip("ember.io.gguf", reason="ember.io.gguf (the GGUF reader) is not on this branch yet")
pytest.importorskip("gguf", reason="the gguf package writes the synthetic GGUF files")
from ember.io import ggml  # noqa: E402
from ember.io.gguf import GGUFFile  # noqa: E402

import ggufmake as gm  # noqa: E402

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
SCALAR_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q",
              I64: "<q", F64: "<d"}


# ---- the tiny synthetic file ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(bytes of a tiny Q8_0 Llama GGUF with a tokenizer, its parsed GGUFFile, a scratch path)."""
    import transformers as tf

    from parity import tiny_hf_model

    cfg = tf.LlamaConfig(vocab_size=265, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    d = tmp_path_factory.mktemp("fuzz_gguf")
    p = gm.hf_to_gguf(tiny_hf_model(cfg), d / "tiny.gguf", qtype=ggml.Q8_0)
    return p.read_bytes(), GGUFFile(p), d / "m.gguf"


def _check(path: Path, full: bool = True) -> None:
    """The property. full: also ember.load the file and generate."""
    import ember

    with time_limit(30), memory_cap(1 << 30):
        try:
            f = GGUFFile(path)
        except EmberError as e:
            assert path.name in str(e)
            return
        for name, t in f.tensors.items():
            try:
                x = ggml.dequantize(f.raw(name), t.ggml_type, t.shape)
            except EmberError:
                continue
            assert tuple(x.shape) == t.shape
        f.close()
        if not full:
            return
        try:
            llm = ember.load(str(path), dtype=torch.float32, device="cpu")
        except EmberError:
            return
        try:
            llm.generate([1, 2, 3], max_tokens=2)
            if llm.tokenizer is not None:
                llm.tokenizer.decode(llm.tokenizer.encode("hello there"))
                if llm.tokenizer.chat_template:
                    llm.tokenizer.encode_chat([{"role": "user", "content": "hi"}])
        except EmberError:
            pass


MUTATIONS = st.sampled_from(["flip", "flip", "set", "u64", "u32", "truncate"])
INTERESTING_U64 = st.sampled_from([0, 1, 7, 255, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63, 2**64 - 1])


@pytest.fixture(scope="module")
def tiny_iquants(tmp_path_factory):
    """Like `tiny`, its weights in i-quants, ternary and MXFP4 blocks (rows of 256)."""
    import transformers as tf

    from parity import tiny_hf_model

    cfg = tf.LlamaConfig(vocab_size=265, hidden_size=256, intermediate_size=256, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    types = dict(zip(("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "token_embd", "output"),
                     (16, 17, 18, 19, 20, 21, 22, 23, 29)))
    d = tmp_path_factory.mktemp("fuzz_gguf_iq")
    p = gm.hf_to_gguf(tiny_hf_model(cfg), d / "tiny.gguf", qtype=lambda name: types.get(name.split(".")[-2], 39))
    return p.read_bytes(), GGUFFile(p), d / "m.gguf"


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    """A tiny Qwen2-MoE GGUF (router, stacked Q8_0 experts, shared expert and its gate)."""
    import transformers as tf

    from parity import tiny_hf_model

    cfg = tf.Qwen2MoeConfig(vocab_size=265, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                            shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    d = tmp_path_factory.mktemp("fuzz_gguf_moe")
    p = gm.hf_to_gguf(tiny_hf_model(cfg), d / "tiny.gguf", qtype=ggml.Q8_0)
    return p.read_bytes(), GGUFFile(p), d / "m.gguf"


@fuzz_settings(100, deadline_ms=None)
@given(data=st.data())
def test_fuzz_mutated_tiny_gguf(tiny, data):
    _fuzz_mutated(tiny, data)


@fuzz_settings(40, deadline_ms=None)
@given(data=st.data())
def test_fuzz_mutated_tiny_iquant_gguf(tiny_iquants, data):
    _fuzz_mutated(tiny_iquants, data)


@fuzz_settings(40, deadline_ms=None)
@given(data=st.data())
def test_fuzz_mutated_tiny_moe_gguf(tiny_moe, data):
    _fuzz_mutated(tiny_moe, data)


@fuzz_settings(300, deadline_ms=None)
@given(qtype=st.sampled_from(ggml.BLOCK_TYPES + tuple(ggml.FLOAT_TYPES)),
       rows=st.integers(0, 5), row_elems=st.integers(0, 600), nbytes=st.integers(0, 3000), seed=st.integers(0, 2**32 - 1))
def test_fuzz_dequantize_any_bytes(qtype, rows, row_elems, nbytes, seed):
    """Any bytes claimed to be any shape of any block type: the values of that shape, or a
    CheckpointError (never another exception)."""
    data = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8))
    shape = (rows, row_elems)
    with time_limit(10), memory_cap(256 << 20):
        try:
            x = ggml.dequantize(data, qtype, shape)
        except CheckpointError:
            n, _ = ggml.block_size(qtype)
            assert row_elems % n or nbytes != ggml.tensor_bytes(qtype, shape)
            return
    assert tuple(x.shape) == shape and x.dtype == torch.float32


def _fuzz_mutated(tiny, data):
    base, f, scratch = tiny
    buf = bytearray(base)
    header = f.data_start  # mutate the header region (where the parser works), sometimes anywhere
    for _ in range(data.draw(st.integers(1, 4), label="n")):
        op = data.draw(MUTATIONS, label="op")
        end = header if data.draw(st.integers(0, 4), label="where") else len(buf)
        i = data.draw(st.integers(0, max(min(end, len(buf)) - 9, 0)), label="at")
        if op == "flip":
            buf[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set":
            buf[i] = data.draw(st.integers(0, 255))
        elif op == "u64":
            buf[i:i + 8] = data.draw(INTERESTING_U64).to_bytes(8, "little")
        elif op == "u32":
            buf[i:i + 4] = (data.draw(INTERESTING_U64) % 2**32).to_bytes(4, "little")
        else:
            del buf[i:]
            break
    scratch.write_bytes(bytes(buf))
    _check(scratch)


# ---- typed metadata values ----------------------------------------------------------------------------
def _enc(vtype: int, v) -> bytes:
    if vtype in SCALAR_FMT:
        return struct.pack(SCALAR_FMT[vtype], v)
    if vtype == STR:
        b = v.encode("utf-8", "surrogatepass") if isinstance(v, str) else v
        return struct.pack("<Q", len(b)) + b
    etype, items = v
    return struct.pack("<IQ", etype, len(items)) + b"".join(_enc(etype, x) for x in items)


def _rewrite(f: GGUFFile, base: bytes, meta: dict[str, tuple[int, object]], path: Path, align: int = 32) -> Path:
    """The file again with metadata `meta` ({key: (type, value)}), same tensor table and data (which
    starts at the header's end padded to `align`)."""
    out = [b"GGUF", struct.pack("<IQQ", 3, len(f.tensors), len(meta))]
    for k, (vt, v) in meta.items():
        out.append(_enc(STR, k) + struct.pack("<I", vt) + _enc(vt, v))
    for t in sorted(f.tensors.values(), key=lambda t: t.offset):
        dims = list(reversed(t.shape))
        out.append(_enc(STR, t.name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, t.ggml_type,
                                                    t.offset - f.data_start))
    head = b"".join(out)
    head += b"\0" * (-len(head) % align)
    path.write_bytes(head + base[f.data_start:])
    return path


def _typed_meta(f: GGUFFile) -> dict[str, tuple[int, object]]:
    meta = {}
    for k, v in f.metadata.items():
        vt = f.value_types[k]
        meta[k] = (ARR, (vt[1], v)) if isinstance(vt, tuple) else (vt, v)
    return meta


ints = st.one_of(st.integers(-3, 300), st.sampled_from([2**31 - 1, 2**32 - 1, 2**40, 2**63 - 1, 2**64 - 1]))
floats = st.one_of(st.floats(width=32), st.sampled_from([0.0, -1.0, 1e-30, 1e30, math.nan, math.inf]))
texts = st.one_of(st.text(max_size=12), st.sampled_from(["", "llama", "gpt2", "qwen2", "yarn", "linear", "\ud800",
                                                         "{{ messages }}", "{% for %}", "<|im_end|>"]))


def typed_value(depth: int = 0):
    scalars = st.one_of(
        st.tuples(st.sampled_from([U8, U16, U32, U64]), ints).map(lambda t: (t[0], t[1] % (1 << (8 * [1, 2, 4, 8][
            [U8, U16, U32, U64].index(t[0])])))),
        st.tuples(st.sampled_from([I8, I16, I32, I64]), st.integers(-100, 100)),
        st.tuples(st.sampled_from([F32, F64]), floats),
        st.tuples(st.just(BOOL), st.booleans()),
        st.tuples(st.just(STR), texts),
    )
    if depth >= 2:
        return scalars
    arrays = st.one_of(
        st.lists(st.integers(0, 300), max_size=8).map(lambda xs: (ARR, (U32, xs))),
        st.lists(st.integers(-5, 300), max_size=8).map(lambda xs: (ARR, (I32, xs))),
        st.lists(texts, max_size=8).map(lambda xs: (ARR, (STR, xs))),
        st.lists(floats, max_size=4).map(lambda xs: (ARR, (F32, xs))),
        st.lists(typed_value(depth + 1).filter(lambda tv: tv[0] == ARR), max_size=2).map(
            lambda xs: (ARR, (ARR, [v for _, v in xs]))),
    )
    return st.one_of(scalars, scalars, arrays)


META_KEYS = ["llama.context_length", "llama.embedding_length", "llama.block_count", "llama.feed_forward_length",
             "llama.attention.head_count", "llama.attention.head_count_kv", "llama.attention.layer_norm_rms_epsilon",
             "llama.rope.freq_base", "llama.rope.dimension_count", "llama.vocab_size", "llama.attention.key_length",
             "llama.rope.scaling.type", "llama.rope.scaling.factor", "llama.rope.scaling.original_context_length",
             "general.architecture", "general.alignment", "tokenizer.ggml.model", "tokenizer.ggml.pre",
             "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.scores",
             "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id",
             "tokenizer.ggml.add_bos_token", "tokenizer.ggml.eot_token_id", "tokenizer.chat_template"]


@st.composite
def vocab_mutation(draw, tokens: list[str]):
    """A broken vocabulary: duplicates, empty or huge tokens, too few entries, non-text."""
    toks = list(tokens)
    kind = draw(st.integers(0, 4))
    if kind == 0:
        toks[draw(st.integers(0, len(toks) - 1))] = toks[draw(st.integers(0, len(toks) - 1))]
    elif kind == 1:
        toks[draw(st.integers(0, len(toks) - 1))] = ""
    elif kind == 2:
        toks = toks[: draw(st.integers(0, len(toks)))]
    elif kind == 3:
        toks[draw(st.integers(0, len(toks) - 1))] = "x" * 100_000
    else:
        toks.append(draw(texts))
    return ARR, (STR, toks)


@fuzz_settings(50, deadline_ms=None)
@given(data=st.data())
def test_fuzz_gguf_metadata_values(tiny, data):
    base, f, scratch = tiny
    meta = _typed_meta(f)
    for _ in range(data.draw(st.integers(1, 3), label="n")):
        key = data.draw(st.sampled_from(META_KEYS), label="key")
        choice = data.draw(st.integers(0, 6), label="how")
        if choice == 0:
            meta.pop(key, None)
        elif choice == 1 and key == "tokenizer.ggml.tokens":
            meta[key] = data.draw(vocab_mutation(f.metadata[key]), label="vocab")
        else:
            meta[key] = data.draw(typed_value(), label="value")
    _check(_rewrite(f, base, meta, scratch))


def test_rewrite_round_trips(tiny):
    """The metadata fuzz starts from a file that loads."""
    import ember

    base, f, scratch = tiny
    p = _rewrite(f, base, _typed_meta(f), scratch)
    assert GGUFFile(p).metadata == f.metadata
    llm = ember.load(str(p), dtype=torch.float32, device="cpu")
    assert llm.tokenizer is not None
    text = llm.generate([1, 2, 3], max_tokens=2, ignore_eos=True)
    assert isinstance(text, str)
    events = list(llm.events([llm.request([1, 2, 3], 2, ignore_eos=True)]))
    ids = [ev.token_id for ev in events if ev.token_id is not None]
    assert len(ids) == 2 and events[-1].finished and events[-1].finish_reason == "length"  # ignore_eos: exactly 2
    assert all(isinstance(t, int) and 0 <= t < llm.config.vocab_size for t in ids)
    assert "".join(ev.text for ev in events) == text  # greedy: the same tokens as generate()


# ---- raw headers with absurd counts and lengths ----------------------------------------------------------
@st.composite
def raw_headers(draw):
    """Small files whose counts, lengths, types, dims and offsets are drawn from absurd values."""
    big = st.one_of(st.integers(0, 40), INTERESTING_U64)
    kvs = [gm.raw_kv("general.architecture", STR, gm.gguf_string("llama"))]
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.integers(0, 3))
        if kind == 0:  # a string with a claimed length
            kvs.append(gm.gguf_string("k") + struct.pack("<IQ", STR, draw(big)) + b"abc")
        elif kind == 1:  # an array with a claimed count and element type
            kvs.append(gm.gguf_string("a") + struct.pack("<IIQ", ARR, draw(st.integers(0, 14)), draw(big)) + b"\0" * 16)
        elif kind == 2:  # nested arrays
            depth = draw(st.integers(1, 8))
            kvs.append(gm.gguf_string("n") + struct.pack("<I", ARR) + struct.pack("<IQ", ARR, 1) * depth
                       + struct.pack("<IQ", U8, 1) + b"\1")
        else:  # a key with a claimed length
            kvs.append(struct.pack("<Q", draw(big)) + b"key" + struct.pack("<I", U8) + b"\1")
    infos = []
    for _ in range(draw(st.integers(0, 3))):
        dims = draw(st.lists(big, min_size=0, max_size=6))
        infos.append(gm.gguf_string("t") + struct.pack("<I", draw(st.sampled_from([len(dims), 0, 5, 2**32 - 1])))
                     + b"".join(struct.pack("<Q", d % 2**64) for d in dims)
                     + struct.pack("<IQ", draw(st.sampled_from([0, 1, 2, 8, 12, 16, 30, 99, 2**32 - 1])), draw(big) % 2**64))
    n_tensors = draw(st.one_of(st.none(), big))
    n_kv = draw(st.one_of(st.none(), big))
    head = gm.raw_header(len(infos) if n_tensors is None else n_tensors % 2**64,
                         len(kvs) if n_kv is None else n_kv % 2**64, version=draw(st.sampled_from([3, 3, 2, 1, 2**32 - 1])))
    body = head + b"".join(kvs) + b"".join(infos)
    return body + b"\0" * (-len(body) % 32) + draw(st.binary(max_size=256))


@fuzz_settings(200, deadline_ms=None)
@given(raw=raw_headers())
def test_fuzz_raw_gguf_headers(tiny, raw):
    scratch = tiny[2]
    scratch.write_bytes(raw)
    with time_limit(10), memory_cap(256 << 20):
        f, peak = peak_python_bytes(GGUFFile, scratch)
    assert peak < (4 << 20), f"parsing a {len(raw)}-byte file allocated {peak} bytes"
    if isinstance(f, BaseException) and not isinstance(f, EmberError):
        raise f
    if not isinstance(f, EmberError):
        _check(scratch, full=False)


def test_header_claiming_more_than_the_file_is_refused_before_allocating(tmp_path):
    """Counts and sizes beyond the file: refused while parsing, with no allocation sized by them."""
    arch = gm.raw_kv("general.architecture", STR, gm.gguf_string("llama"))
    cases = [
        gm.raw_file(tmp_path / "t.gguf", [arch], [], n_tensors=1 << 62),
        gm.raw_file(tmp_path / "k.gguf", [arch], [], n_kv=1 << 60),
        gm.raw_file(tmp_path / "s.gguf", [struct.pack("<Q", 1 << 50)], [], n_kv=1, data=b"\0" * 64),
        gm.raw_file(tmp_path / "a.gguf", [arch, gm.raw_kv("x", ARR, struct.pack("<IQ", U32, 1 << 61))], []),
        gm.raw_file(tmp_path / "as.gguf", [arch, gm.raw_kv("x", ARR, struct.pack("<IQQ", STR, 2, 1 << 40))], []),
        gm.raw_file(tmp_path / "d.gguf", [arch], [gm.raw_tensor_info("w", [1 << 20, 1 << 20], 0, 0)]),  # 4 TiB of F32
        gm.raw_file(tmp_path / "o.gguf", [arch], [gm.raw_tensor_info("w", [32, 4], 0, 1 << 62)], data=b"\0" * 512),
    ]
    for p in cases:
        with memory_cap(64 << 20):
            err, peak = peak_python_bytes(GGUFFile, p)
        assert isinstance(err, CheckpointError), (p.name, err)
        assert peak < 1 << 20, (p.name, peak)


# ---- the real SmolLM2 file (slow) ---------------------------------------------------------------------
@pytest.mark.slow
def test_fuzz_real_smollm2_gguf(smollm2_gguf, tmp_path):
    """Byte flips in the header (metadata and a 49k-token vocabulary, then the tensor table) of the real
    file, changed in place on a copy and restored; and truncations. Parse, tokenizer and config."""
    import random
    import shutil

    from ember.loading import gguf_config as config_dict
    from ember.gguf_tokenizer import tokenizer_from_gguf

    p = tmp_path / "smollm2.gguf"
    shutil.copyfile(smollm2_gguf, p)
    head = GGUFFile(p).data_start
    rng = random.Random(0)
    n = 40 if not __import__("hostile").LONG_CAMPAIGN else __import__("hostile").FUZZ_EXAMPLES
    for _ in range(n):
        at = sorted(rng.randrange(head) for _ in range(rng.randint(1, 3)))
        with open(p, "r+b") as fh:
            saved = []
            for i in at:
                fh.seek(i)
                saved.append(fh.read(1))
                fh.seek(i)
                fh.write(bytes([rng.randrange(256)]))
        try:
            with time_limit(60), memory_cap(1 << 30):
                try:
                    f = GGUFFile(p)
                    config_dict(f)
                    if isinstance(f.metadata.get("tokenizer.ggml.tokens"), list):
                        tok = tokenizer_from_gguf(f.metadata, path=p)
                        tok.decode(tok.encode("Hello, world"))
                except EmberError:
                    pass
        finally:
            with open(p, "r+b") as fh:
                for i, b in zip(at, saved):
                    fh.seek(i)
                    fh.write(b)
    for cut in sorted(rng.randrange(head + 4096) for _ in range(10)):
        q = tmp_path / "cut.gguf"
        with open(smollm2_gguf, "rb") as src:
            q.write_bytes(src.read(cut))
        with pytest.raises(CheckpointError):
            GGUFFile(q)


# ---- regressions --------------------------------------------------------------------------------------
def test_regression_misaligned_float_tensor_with_small_alignment(tiny, tmp_path):
    """Bug: general.alignment = 2 (a legal power of two) puts F32 tensors at offsets that are not
    multiples of 4; viewing their mapped bytes as float32 raised a torch RuntimeError."""
    import ember

    base, f, _ = tiny
    for pad in range(4):  # a general.name whose length puts the data section at 2 mod 4
        meta = {**_typed_meta(f), "general.alignment": (U32, 2), "general.name": (STR, "x" * pad)}
        p = _rewrite(f, base, meta, tmp_path / "a.gguf", align=2)
        g = GGUFFile(p)
        if g.data_start % 4:
            break
    floats = [t for t in g.tensors.values() if t.ggml_type in ggml.FLOAT_TYPES]
    assert floats and all(t.offset % 4 for t in floats)
    for t in floats:
        assert torch.equal(ggml.dequantize(g.raw(t.name), t.ggml_type, t.shape),
                           ggml.dequantize(f.raw(t.name), t.ggml_type, t.shape))
    llm = ember.load(str(p), dtype=torch.float32, device="cpu")
    ref = ember.load(str(f.path), dtype=torch.float32, device="cpu")
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(llm.model(ids), ref.model(ids))


def test_regression_nested_array_where_a_per_layer_int_is_expected(tiny, tmp_path):
    """Bug: llama.feed_forward_length given as an array of arrays raised TypeError (unhashable list)."""
    import ember

    base, f, _ = tiny
    meta = _typed_meta(f)
    meta["llama.feed_forward_length"] = (ARR, (ARR, [(U32, [64]), (U32, [64])]))
    p = _rewrite(f, base, meta, tmp_path / "n.gguf")
    with pytest.raises(ember.ConfigError, match="llama.feed_forward_length"):
        ember.load(str(p))


@pytest.mark.parametrize("etype", [0, BOOL, 1, F32])
def test_regression_numeric_metadata_arrays_stay_compact(tmp_path, etype):
    """Bug: u8/bool metadata arrays came back as Python lists, ~17x their bytes in the file (f32: ~10x):
    a 64 MB file of them took over 1 GB. Past MAX_LIST_ELEMENTS list elements per file, numeric
    arrays are compact `array.array`s; small arrays (per-layer flags, scores) are still lists."""
    import array

    size = {0: 1, BOOL: 1, 1: 1, F32: 4}[etype]
    n = 16 << 20  # elements per array (16 MiB or 64 MiB each); four of them
    arch = gm.raw_kv("general.architecture", STR, gm.gguf_string("llama"))
    small = gm.raw_kv("llama.flags", ARR, struct.pack("<IQ", BOOL, 3) + b"\1\0\1")
    big = [gm.raw_kv(f"x.{i}", ARR, struct.pack("<IQ", etype, n) + b"\1" * (n * size)) for i in range(4)]
    p = gm.raw_file(tmp_path / "big.gguf", [arch, small, *big], [])
    with time_limit(20), memory_cap((4 * n * size) + (256 << 20)):
        f, peak = peak_python_bytes(GGUFFile, p)
    assert isinstance(f, GGUFFile), f
    assert f.metadata["llama.flags"] == [True, False, True]
    assert all(isinstance(f.metadata[f"x.{i}"], array.array) and len(f.metadata[f"x.{i}"]) == n for i in range(4))
    assert f.metadata["x.3"].tobytes()[:64] == b"\1" * 64
    assert peak < 4 * n * size + (32 << 20), peak  # the arrays themselves, little more


# ---- fuzz: GGUF vocabularies (tokens, scores, merges, types) --------------------------------------------
_PIECE = st.one_of(st.text(alphabet=st.sampled_from("ab \u2581<>\u0120\u00e9"), max_size=6),
                   st.sampled_from(["<unk>", "<s>", "</s>", "<0x41>", "<0xZZ>", "", " ", "a" * 300]),
                   st.integers(0, 3).map(lambda k: "x" * (10 ** k)))


@st.composite
def gguf_vocabulary(draw):
    tokens = draw(st.lists(_PIECE, min_size=1, max_size=40))
    if draw(st.booleans()):  # a long ladder: merges derived from it are costly
        tokens += ["a" * k for k in range(1, draw(st.sampled_from([10, 200, 3000])))]
    meta = {"general.architecture": draw(st.sampled_from(["llama", "gemma3", "phi3", "qwen2"])),
            "tokenizer.ggml.model": draw(st.sampled_from(["llama", "gpt2", "bert", None])),
            "tokenizer.ggml.tokens": tokens}
    n = len(tokens)
    if draw(st.booleans()):
        meta["tokenizer.ggml.scores"] = draw(st.one_of(
            st.lists(st.floats(allow_nan=True), min_size=n, max_size=n),
            st.lists(st.floats(-10, 10), max_size=5), st.just([float(-i) for i in range(n)])))
    if draw(st.booleans()):
        meta["tokenizer.ggml.token_type"] = draw(st.one_of(
            st.lists(st.integers(-1, 7), min_size=n, max_size=n), st.lists(st.integers(0, 7), max_size=3)))
    if draw(st.booleans()):
        pair = st.tuples(st.sampled_from(tokens), st.sampled_from(tokens)).map(" ".join)
        meta["tokenizer.ggml.merges"] = draw(st.lists(st.one_of(pair, st.sampled_from(["a", "a b c", "", " "])),
                                                      max_size=20))
    for key in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"):
        if draw(st.booleans()):
            meta[f"tokenizer.ggml.{key}"] = draw(st.sampled_from([0, 1, n - 1, n, -1, 2**40, True]))
    for key in ("add_bos_token", "add_eos_token"):
        if draw(st.booleans()):
            meta[f"tokenizer.ggml.{key}"] = draw(st.sampled_from([True, False, 1]))
    return meta


@fuzz_settings(60, deadline_ms=None)
@given(meta=gguf_vocabulary(), text=st.sampled_from(["hello", "ab ab", "x" * 1000, "\u2603 a\u00e9", ""]))
def test_fuzz_gguf_vocabularies(meta, text):
    """Any vocabulary a GGUF may carry: building the tokenizer, encoding and decoding give a
    TokenizerError (an EmberError) or work, within the time and memory caps."""
    from ember.gguf_tokenizer import tokenizer_from_gguf

    with time_limit(10), memory_cap(512 << 20):
        try:
            tok = tokenizer_from_gguf(meta)
            ids = tok.encode(text)
            assert all(isinstance(i, int) for i in ids)
            tok.decode(ids)
            tok.encode_batch([text, "b"])
        except EmberError:
            pass
