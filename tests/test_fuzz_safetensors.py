"""Fuzzing the safetensors reader with hostile files (see tests/hostile.py for budgets and guards).

Property, for every file: `SafetensorsFile(path)` either raises an `EmberError` or succeeds, never
another exception type, never a hang, never an allocation beyond the file's size (tracemalloc for
Python objects, RLIMIT_DATA for everything else); and on success every tensor reads back with its
declared shape and dtype, holding exactly the bytes its data_offsets name.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ember.errors import CheckpointError, EmberError
from ember.io.safetensors import DTYPES, SafetensorsFile, read_header, save_file
from hostile import fuzz_settings, memory_cap, peak_python_bytes, time_limit

ITEMSIZE = {k: torch.empty((), dtype=v).element_size() for k, v in DTYPES.items()}
# Reading a hostile file of at most a few KB may allocate this much Python memory, no more.
PYTHON_PEAK_LIMIT = 4 << 20


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """One file, rewritten by every example (cheaper than a folder per example)."""
    return tmp_path_factory.mktemp("fuzz_st") / "f.safetensors"


def _check(path: Path) -> None:
    """The property: EmberError or a file whose every tensor reads back as declared."""
    size = path.stat().st_size
    file_bytes = path.read_bytes()
    with time_limit(10), memory_cap(256 << 20):
        f, peak = peak_python_bytes(SafetensorsFile, path)
        assert peak < PYTHON_PEAK_LIMIT + 64 * size, f"parsing a {size}-byte file allocated {peak} bytes"
        if isinstance(f, EmberError):
            assert str(path.name) in str(f)
            return
        if isinstance(f, BaseException):
            raise f
        for s in (*f.tensors, *f.metadata, *f.metadata.values()):
            s.encode("utf-8")  # names and metadata are real text (no lone surrogates)
        for name, info in f.tensors.items():
            t = f.tensor(name)
            assert tuple(t.shape) == info.shape and t.dtype == info.dtype, name
            assert 8 <= info.begin <= info.end <= size
            got = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
            assert got == file_bytes[info.begin:info.end], name
        f.close()


def _write(path: Path, header_bytes: bytes, data: bytes, header_len: int | None = None) -> Path:
    n = len(header_bytes) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n % (1 << 64)) + header_bytes + data)
    return path


# ---- strategies ---------------------------------------------------------------------------------
HUGE = [-1, -(2**63), 2**31, 2**32 - 1, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64, 2**64 + 7, 10**30, 10**300]
junk = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True, allow_infinity=True),
                 st.text(max_size=4), st.lists(st.integers(0, 3), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
                 st.sampled_from(HUGE))
dims = st.one_of(st.integers(0, 6), st.sampled_from(HUGE), junk)


# Strategies are built once: hypothesis validates each new strategy object, which costs more than
# running an example.
names = st.one_of(st.sampled_from(["w", "b", "model.embed_tokens.weight", ""]), st.text(max_size=6))
dtypes = st.sampled_from(sorted(DTYPES))
small_shapes = st.one_of(st.lists(st.integers(0, 4), max_size=3),  # mostly real shapes, sometimes huge dims
                         st.lists(st.one_of(st.integers(0, 2), st.sampled_from([h for h in HUGE if h > 0])), max_size=3))
gaps = st.sampled_from([0, 0, 0, 1, 3, -1, "back"])
fields = st.sampled_from(["dtype", "shape", "data_offsets"])
hostile_shapes = st.lists(dims, max_size=4)
hostile_offsets = st.lists(st.one_of(st.integers(-5, 300), st.sampled_from(HUGE), junk), max_size=3)
metadatas = st.one_of(st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2), junk)
header_lens = st.one_of(st.none(), st.none(), st.none(), st.integers(0, 1 << 12),
                        st.sampled_from([2**63, 2**64 - 1, 100_000_001, -1, 1]))


@st.composite
def coherent_then_perturbed(draw):
    """A header laid out like a real file, then some fields replaced by hostile values."""
    n = draw(st.integers(0, 4))
    header: dict = {}
    offset = 0
    for i in range(n):
        name = draw(names)
        dtype = draw(dtypes)
        shape = draw(small_shapes)
        nbytes = ITEMSIZE[dtype] * math.prod(shape)  # consistent offsets, even for absurd shapes
        gap = draw(gaps)
        begin = max(offset + (-nbytes if gap == "back" else gap), 0)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, begin + nbytes]}
        offset = max(offset, begin + nbytes)
    for entry in list(header.values()):
        if draw(st.integers(0, 3)) == 0:
            field = draw(fields)
            how = draw(st.integers(0, 4))
            if how == 0:
                entry.pop(field)
            elif field == "shape" and how < 3:
                entry["shape"] = draw(hostile_shapes)
            elif field == "data_offsets" and how < 3:
                entry["data_offsets"] = draw(hostile_offsets)
            else:
                entry[field] = draw(junk)
    if draw(st.booleans()):
        header["__metadata__"] = draw(metadatas)
    if draw(st.integers(0, 9)) == 0:
        header = draw(st.one_of(junk, st.just([header])))
    text = json.dumps(header, allow_nan=True).encode()
    if draw(st.booleans()):
        text += b" " * (-len(text) % 8)
    data = draw(st.binary(min_size=0, max_size=min(offset, 4096) + 8))
    if len(data) < offset <= 4096 and draw(st.integers(0, 3)):
        data += bytes(offset - len(data))  # mostly long enough, sometimes truncated
    header_len = draw(header_lens)
    if header_len == -1:
        header_len = len(text) + len(data) + 1
    return text, data, header_len


NASTY_KINDS = st.sampled_from(["dup-top", "dup-field", "deep", "deep-meta", "digits", "surrogate", "nan", "non-utf8",
                               "bom", "trailing", "empty", "nul"])
DEPTHS = st.sampled_from([50, 1000, 100_000])
DIGITS = st.sampled_from([20, 5000, 50_000])
MUTATIONS = st.sampled_from(["flip", "set", "truncate", "insert", "delete", "len"])
JSON_BYTES = st.sampled_from(b'{}[]",:0123456789-eE.\x00\xff ')


@st.composite
def nasty_json(draw):
    """JSON texts no well-behaved writer produces."""
    kind = draw(NASTY_KINDS)
    ok = '"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    depth = draw(DEPTHS)
    texts = {
        "dup-top": "{" + ok + "," + '"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}' + "}",
        "dup-field": '{"w":{"dtype":"F32","dtype":"I32","shape":[1],"data_offsets":[0,4]}}',
        "deep": "[" * depth + "]" * depth,
        "deep-meta": '{"__metadata__":' + '{"a":' * depth + "1" + "}" * depth + "}",
        "digits": '{"w":{"dtype":"F32","shape":[' + "9" * draw(DIGITS) + '],"data_offsets":[0,4]}}',
        "surrogate": '{"\\ud800":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
        "nan": '{"w":{"dtype":"F32","shape":[NaN],"data_offsets":[0,Infinity]}}',
        "non-utf8": None,
        "bom": "\ufeff{" + ok + "}",
        "trailing": "{" + ok + "} x",
        "empty": "",
        "nul": "{" + ok + "}\x00",
    }
    raw = texts[kind].encode("utf-8") if texts[kind] is not None else b'{"\xff\xfe":{}}'
    return raw, b"\x00" * 4


@st.composite
def mutated_valid_file(draw, base: bytes):
    """Byte flips, truncations, insertions and splices of a real file."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(MUTATIONS)
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[i] = draw(JSON_BYTES)
        elif op == "truncate":
            del data[i:]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[i:i + draw(st.integers(1, 8))]
        else:
            data[0:8] = struct.pack("<Q", draw(st.integers(0, 2**64 - 1)))
    return bytes(data)


def _valid_file_bytes(tmp: Path) -> bytes:
    ts = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([1, 2, 3], dtype=torch.int16),
          "c": torch.zeros(0, 5, dtype=torch.bfloat16), "d": torch.tensor(True), "e": torch.arange(4, dtype=torch.uint8)}
    save_file(ts, tmp / "valid.safetensors", metadata={"format": "pt"})
    return (tmp / "valid.safetensors").read_bytes()


# ---- targets ------------------------------------------------------------------------------------
@fuzz_settings(300)
@given(case=coherent_then_perturbed())
def test_fuzz_random_headers(scratch, case):
    text, data, header_len = case
    _check(_write(scratch, text, data, header_len))


@fuzz_settings(60)
@given(case=nasty_json())
def test_fuzz_nasty_json_headers(scratch, case):
    text, data = case
    _check(_write(scratch, text, data))


@pytest.fixture(scope="module")
def valid_bytes(tmp_path_factory) -> bytes:
    return _valid_file_bytes(tmp_path_factory.mktemp("fuzz_st_valid"))


@fuzz_settings(300)
@given(data=st.data())
def test_fuzz_mutated_valid_file(scratch, valid_bytes, data):
    scratch.write_bytes(data.draw(mutated_valid_file(valid_bytes)))
    _check(scratch)


# ---- explicit cases -----------------------------------------------------------------------------
def _raw(tmp_path, text: str | bytes, data: bytes = b"\x00" * 16, header_len=None) -> Path:
    return _write(tmp_path / "x.safetensors", text.encode() if isinstance(text, str) else text, data, header_len)


def test_header_claiming_more_than_the_file_is_refused_before_allocating(tmp_path):
    """A 1 KB file whose length field claims 2**60 header bytes, or whose offsets reach past the end."""
    p = _raw(tmp_path, '{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}', bytes(1000), header_len=1 << 60)
    err, peak = peak_python_bytes(read_header, p)
    assert isinstance(err, CheckpointError) and "header claims" in str(err)
    assert peak < 1 << 20
    big = 1 << 40  # 1 TiB of F32 claimed by a 1 KB file
    p = _raw(tmp_path, json.dumps({"w": {"dtype": "F32", "shape": [big // 4], "data_offsets": [0, big]}}), bytes(1000))
    with memory_cap(64 << 20):
        err, peak = peak_python_bytes(SafetensorsFile, p)
    assert isinstance(err, CheckpointError) and "truncated" in str(err)
    assert peak < 1 << 20


def test_regression_duplicate_json_keys_are_refused(tmp_path):
    """Bug: json.loads kept the last of two same-named tensors (or fields), silently: another reader
    (which keeps the first) would then see different weights in the same file."""
    p = _raw(tmp_path, '{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                       '"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}')
    with pytest.raises(CheckpointError, match="'w' appears twice"):
        read_header(p)
    p = _raw(tmp_path, '{"w":{"dtype":"F32","dtype":"I32","shape":[1],"data_offsets":[0,4]}}')
    with pytest.raises(CheckpointError, match="'dtype' appears twice"):
        read_header(p)


def test_regression_integer_with_too_many_digits(tmp_path):
    """Bug: a number of more than 4300 digits raised a plain ValueError (Python's int-parsing limit)."""
    p = _raw(tmp_path, '{"w":{"dtype":"F32","shape":[' + "9" * 5000 + '],"data_offsets":[0,4]}}')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_header(p)


@pytest.mark.parametrize("shape", [[0, 2**70], [0, 2**62, 2**62], [2**63, 0]], ids=["dim>int64", "stride-overflow", "first"])
def test_regression_empty_tensor_with_huge_dims(tmp_path, shape):
    """Bug: an empty tensor (a zero dim) with a dim beyond int64, or dims whose strides overflow
    int64, passed validation (0 bytes), then torch raised TypeError/RuntimeError when it was read."""
    p = _raw(tmp_path, json.dumps({"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}))
    with pytest.raises(CheckpointError, match="too large"):
        SafetensorsFile(p)


def test_regression_lone_surrogate_in_a_name(tmp_path):
    """Bug: a JSON escape "\\ud800" made a tensor name that is not valid Unicode: later printing or
    encoding it (logs, errors, the server) raised UnicodeEncodeError."""
    p = _raw(tmp_path, '{"\\ud800":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}')
    with pytest.raises(CheckpointError, match="not valid UTF-8"):
        read_header(p)
    p = _raw(tmp_path, '{"__metadata__":{"k":"\\udfff"}}')
    with pytest.raises(CheckpointError, match="not valid UTF-8"):
        read_header(p)


def test_regression_file_shrunk_after_the_header_was_read(tmp_path):
    """A file truncated between reading the header and mapping it is refused, not mapped short
    (a view past the end of the mapping would fault when touched)."""
    p = tmp_path / "s.safetensors"
    save_file({"w": torch.arange(64, dtype=torch.float32)}, p)
    f = SafetensorsFile(p)
    p.write_bytes(p.read_bytes()[:-64])
    with pytest.raises(CheckpointError, match="changed size"):
        f.tensor("w")


def test_regression_index_json_errors(tmp_path):
    """Bug: a deeply nested or huge-number model.safetensors.index.json raised RecursionError /
    ValueError instead of CheckpointError (both through read_index and through ember.load's resolver)."""
    from ember import hub
    from ember.io.safetensors import read_index

    idx = tmp_path / "model.safetensors.index.json"
    for text in ("[" * 100_000 + "]" * 100_000, '{"weight_map": {"a": ' + "1" * 5000 + "}}"):
        idx.write_text(text)
        with pytest.raises(CheckpointError):
            read_index(idx)
        with pytest.raises(CheckpointError):
            hub._expand_index(tmp_path, "safetensors", [idx.name])
