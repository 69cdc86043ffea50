"""Fuzzing the sentence-transformers files beside a tiny BERT: modules.json, 1_Pooling/config.json,
2_Dense/config.json, sentence_bert_config.json and config_sentence_transformers.json.

Property: with any mix of valid, missing, mutated, random-JSON or garbage files, `ember.load` (and
`embed` on what it returns) either raises an `EmberError` or embeds: a [2, dim] float tensor. Never
another exception, never a hang, never a big allocation (see tests/hostile.py for the guards and
budgets). And a module `path` that leads outside the model folder (or is absolute) never loads,
although a valid Dense module waits there.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ember
from ember.errors import EmberError
from hostile import fuzz_settings, memory_cap, time_limit

pytest.importorskip("transformers")

ST_FILES = ("modules.json", "1_Pooling/config.json", "2_Dense/config.json", "sentence_bert_config.json",
            "config_sentence_transformers.json")
TYPES = [f"sentence_transformers.models.{t}" for t in ("Transformer", "Pooling", "Dense", "Normalize")]


@pytest.fixture(scope="module")
def st_model(tmp_path_factory):
    """(folder to fuzz, {file: its valid contents}). A valid Dense module also sits outside the folder,
    at ../outside/2_Dense, for module paths that try to reach it."""
    import tinyencoders as T

    root = tmp_path_factory.mktemp("fuzz_st")
    folder = T.add_sentence_transformers(T.tiny_bert(root / "model"), pooling={"pooling_mode": "mean"},
                                         dense=[{"out_features": 16}], normalize=True, max_seq_length=32,
                                         prompts={"query": "query: ", "doc": ""})
    shutil.copytree(folder / "2_Dense", root / "outside" / "2_Dense")
    valid = {name: json.loads((folder / name).read_text()) for name in ST_FILES}
    return folder, valid


# ---- hostile values ---------------------------------------------------------------------------------
NUMBERS = [-(10**12), -1, 0, 1, 2, 16, 32, 64, 10**6, 10**12, 2**63, 10**30, 0.0, 0.5, 16.0, 32.0, 1e300,
           math.nan, math.inf, -math.inf]
PATHS = ["", ".", "..", "1_Pooling", "2_Dense", "3_Normalize", "../outside/2_Dense", "../model/2_Dense",
         "1_Pooling/../../outside/2_Dense", "/", "/etc", "/tmp", "C:\\x", "\\\\server\\share", "no_such_dir",
         "x" * 300, "a\0b", "2_Dense/", "./2_Dense"]
NAMES = ["cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken", "median", "", "query", "doc",
         "torch.nn.modules.activation.Tanh", "torch.nn.modules.activation.ReLU", "Identity", "os.system",
         "sentence_embedding", "token_embeddings", *TYPES, "sentence_transformers.models.WordEmbeddings"]
scalars = st.one_of(st.sampled_from(NUMBERS), st.none(), st.booleans(), st.integers(-3, 70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6), st.sampled_from(NAMES),
                    st.sampled_from(PATHS))
values = st.one_of(
    scalars, scalars, scalars,
    st.lists(scalars, max_size=4),
    st.lists(st.sampled_from(NAMES[:8]), max_size=4),
    st.dictionaries(st.sampled_from(["query", "doc", "", "x"]), scalars, max_size=3),
    st.just({}), st.just([]), st.just([[1]]), st.just({"a": {"b": [1, {"c": None}]}}), st.just([0] * 10_000),
)
json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
                           lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                  st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                           max_leaves=12)
# the fields each file has (a mutation sets, or deletes, some of them)
FIELDS = {
    "1_Pooling/config.json": ["pooling_mode", "pooling_mode_cls_token", "pooling_mode_mean_tokens",
                              "pooling_mode_max_tokens", "pooling_mode_lasttoken", "include_prompt",
                              "word_embedding_dimension"],
    "2_Dense/config.json": ["in_features", "out_features", "bias", "activation_function", "use_residual",
                            "module_input_name"],
    "sentence_bert_config.json": ["max_seq_length", "do_lower_case"],
    "config_sentence_transformers.json": ["prompts", "default_prompt_name", "similarity_fn_name"],
}
MODULE_FIELDS = ["idx", "name", "path", "type"]


@st.composite
def module_list(draw, valid: list[dict]):
    """modules.json mutated: entries dropped, duplicated, reordered or added; fields changed."""
    mods = [dict(m) for m in valid]
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.integers(0, 5))
        if op == 0 and mods:
            mods.pop(draw(st.integers(0, len(mods) - 1)))
        elif op == 1 and mods:
            mods.insert(draw(st.integers(0, len(mods))), dict(draw(st.sampled_from(mods))))
        elif op == 2:
            mods = draw(st.permutations(mods))
        elif op == 3:
            mods.append({"idx": draw(scalars), "name": "x", "path": draw(st.sampled_from(PATHS)),
                         "type": draw(st.sampled_from(TYPES))})
        elif mods:
            m = mods[draw(st.integers(0, len(mods) - 1))]
            key = draw(st.sampled_from(MODULE_FIELDS))
            if draw(st.integers(0, 5)) == 0:
                m.pop(key, None)
            else:
                m[key] = draw(st.one_of(st.sampled_from(PATHS), st.sampled_from(TYPES), values))
    return mods


@st.composite
def file_contents(draw, name: str, valid):
    """("keep"|"json"|"bytes"|"delete", what) for one file."""
    how = draw(st.sampled_from(["keep", "keep", "mutate", "mutate", "mutate", "random", "bytes", "delete"]))
    if how == "keep":
        return "json", valid
    if how == "delete":
        return "delete", None
    if how == "bytes":
        return "bytes", draw(st.one_of(st.binary(max_size=20), st.just(b"\xff\xfe{"), st.just(b"[" * 100_000),
                                       st.just(b"[" + b"9" * 5000 + b"]"), st.just(b"{\"a\": NaN}")))
    if how == "random":
        return "json", draw(json_values)
    if name == "modules.json":
        return "json", draw(module_list(valid))
    out = dict(valid)
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(FIELDS[name]))
        if draw(st.integers(0, 5)) == 0:
            out.pop(key, None)
        else:
            out[key] = draw(values)
    return "json", out


def _write(folder: Path, name: str, how: str, what) -> None:
    path = folder / name
    if how == "delete":
        path.unlink(missing_ok=True)
    elif how == "bytes":
        path.write_bytes(what)
    else:
        path.write_text(json.dumps(what, allow_nan=True))


def _escapes(folder: Path, rel) -> bool:
    """Whether module path `rel` names a folder outside `folder` (or is absolute)."""
    if not isinstance(rel, str) or "\0" in rel:
        return False
    if Path(rel).is_absolute():
        return True
    return not (folder / rel).resolve().is_relative_to(folder.resolve())


def _load_and_embed(folder: Path, prompt_name) -> None:
    """The property's body: EmberError, or an Embedder whose embed() gives [2, dim] float32."""
    try:
        enc = ember.load(folder, dtype=torch.float32, device="cpu")
        vecs = enc.embed(["hello world", "the quick brown fox"], prompt_name=prompt_name)
    except EmberError:
        return
    assert isinstance(enc, ember.Embedder)
    assert vecs.dtype == torch.float32 and tuple(vecs.shape) == (2, enc.dim)


@fuzz_settings(60, deadline_ms=None)
@given(data=st.data())
def test_fuzz_sentence_transformers_files(st_model, data):
    folder, valid = st_model
    written = {name: data.draw(file_contents(name, valid[name]), label=name) for name in ST_FILES}
    prompt_name = data.draw(st.sampled_from([None, None, "query", "doc", "nope"]), label="prompt_name")
    for name, (how, what) in written.items():
        _write(folder, name, how, what)
    mods = written["modules.json"][1] if written["modules.json"][0] == "json" else None
    outside = isinstance(mods, list) and any(isinstance(m, dict) and _escapes(folder, m.get("path")) for m in mods)
    try:
        with time_limit(20), memory_cap(1 << 30):
            if outside:  # a module folder outside the model folder is never read
                with pytest.raises(EmberError):
                    ember.load(folder, dtype=torch.float32, device="cpu")
            else:
                _load_and_embed(folder, prompt_name)
    finally:
        for name in ST_FILES:
            _write(folder, name, "json", valid[name])


def test_valid_files_load(st_model):
    """The fuzz starts from files that load and embed (and a Dense reached through ../ would too)."""
    folder, _ = st_model
    enc = ember.load(folder, dtype=torch.float32, device="cpu")
    assert enc.dim == 16 and enc.normalized and enc.max_length == 32 and enc.prompts == {"query": "query: ", "doc": ""}
    assert enc.embed(["hello world"], prompt_name="query").shape == (1, 16)
