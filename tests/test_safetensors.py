"""The safetensors reader: round trips, zero-copy mmap views, and refusal of corrupt files."""
import json
import struct

import pytest
import torch

from ember.errors import CheckpointError
from ember.io.safetensors import SafetensorsFile, read_header, read_index, save_file


def _write_raw(path, header: dict, data: bytes = b"", header_len: int | None = None):
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if header_len is None else header_len))
        f.write(raw)
        f.write(data)
    return path


DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool]
if hasattr(torch, "float8_e4m3fn"):
    DTYPES += [torch.float8_e4m3fn, torch.float8_e5m2]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_every_dtype_matches_safetensors_library(tmp_path, dtype):
    from safetensors.torch import load_file

    t = (torch.randn(3, 5) * 10).to(dtype)
    save_file({"x": t, "empty": torch.zeros(0, 4, dtype=dtype)}, tmp_path / "a.safetensors")
    f = SafetensorsFile(tmp_path / "a.safetensors")
    got = f.tensor("x")
    assert got.dtype == dtype and got.shape == (3, 5)
    ref = load_file(tmp_path / "a.safetensors")["x"]  # the reference library reads our file identically
    assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8))
    assert f.tensor("empty").shape == (0, 4)


def test_reads_files_written_by_the_reference_library(tmp_path):
    from safetensors.torch import save_file as ref_save

    ts = {"a": torch.randn(7, 3), "b": torch.arange(10, dtype=torch.int64), "c": torch.randn(2).bfloat16()}
    ref_save(ts, tmp_path / "r.safetensors", metadata={"format": "pt"})
    f = SafetensorsFile(tmp_path / "r.safetensors")
    assert f.metadata == {"format": "pt"}
    for k, v in ts.items():
        assert torch.equal(f.tensor(k), v)


def test_tensors_are_zero_copy_views_on_a_private_mapping(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file({"w": torch.arange(1024, dtype=torch.float32)}, p)
    f = SafetensorsFile(p)
    a, b = f.tensor("w"), f.tensor("w")
    assert a.data_ptr() == b.data_ptr()  # both views of the same mapped page, no copy
    a[0] = 123.0  # copy-on-write: the file is untouched
    assert SafetensorsFile(p).tensor("w")[0] == 0.0


def _valid_header():
    return {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}


@pytest.mark.parametrize("mutate, message", [
    (lambda h: h["a"].update(dtype="F13"), "unsupported dtype 'F13'"),
    (lambda h: h["a"].update(shape=[2, -2]), "shape must be a list of non-negative integers"),
    (lambda h: h["a"].update(shape="2x2"), "shape must be a list"),
    (lambda h: h["a"].update(data_offsets=[0, 12]), "needs 16 bytes but data_offsets span 12"),
    (lambda h: h["b"].update(data_offsets=[8, 16], shape=[2]), "overlap"),
    (lambda h: h["b"].update(data_offsets=[16, 40], shape=[6]), "data section has only 24 bytes"),
    (lambda h: h["a"].update(data_offsets=[16, 0]), "bad data_offsets"),
    (lambda h: h["a"].update(data_offsets=[0]), "data_offsets must be two integers"),
    (lambda h: h.update(__metadata__={"k": 1}), "__metadata__ must map strings to strings"),
    (lambda h: h.update(c=[1, 2]), "entry must be an object"),
], ids=["dtype", "negative-dim", "shape-type", "span", "overlap", "out-of-range", "reversed", "offsets-len",
        "metadata", "entry-type"])
def test_corrupt_header_fields_are_refused_with_the_field_named(tmp_path, mutate, message):
    h = _valid_header()
    mutate(h)
    p = _write_raw(tmp_path / "bad.safetensors", h, bytes(24))
    with pytest.raises(CheckpointError) as e:
        read_header(p)
    assert message in str(e.value) and "bad.safetensors" in str(e.value)


def test_truncated_file_is_refused(tmp_path):
    p = tmp_path / "t.safetensors"
    save_file({"w": torch.randn(64, 64)}, p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated file"):
        SafetensorsFile(p)
    p.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="too short"):
        SafetensorsFile(p)


def test_header_length_beyond_the_file_is_refused_before_reading(tmp_path):
    p = _write_raw(tmp_path / "h.safetensors", _valid_header(), bytes(24), header_len=1 << 60)
    with pytest.raises(CheckpointError, match="header claims"):
        read_header(p)


def test_bad_json_and_non_utf8_headers_are_refused(tmp_path):
    p = tmp_path / "j.safetensors"
    p.write_bytes(struct.pack("<Q", 5) + b"{oops")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_header(p)
    p.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{}")
    with pytest.raises(CheckpointError, match="not UTF-8"):
        read_header(p)
    p.write_bytes(struct.pack("<Q", 2) + b"[]")
    with pytest.raises(CheckpointError, match="must be a JSON object"):
        read_header(p)


def test_index_with_a_missing_shard_names_it(tmp_path):
    save_file({"a": torch.zeros(2)}, tmp_path / "model-00001-of-00002.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        read_index(tmp_path / "model.safetensors.index.json")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../etc/passwd"}}))
    with pytest.raises(CheckpointError, match="plain file name"):
        read_index(tmp_path / "model.safetensors.index.json")
