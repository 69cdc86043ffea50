"""Fuzzing quantised checkpoints ember does not read (yet): a tiny valid Llama whose config gains a
hostile `quantization_config` (any quant_method, or junk) and whose tensors are swapped for what
quantised checkpoints hold (FP8 / int8 / int32 / bool weights, `*_scale`, `qweight`, `g_idx`
tensors of any shape).

Property: `ember.load` raises an EmberError (refusing the checkpoint by name, or the bad tensor by
dtype and name), or, when nothing quantised was injected, loads a model that runs. Never another
exception, a hang, or a model that silently computes with integer codes or unscaled FP8 values.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ember
from ember.errors import EmberError
from hostile import fuzz_settings, memory_cap, time_limit

pytest.importorskip("transformers")

LINEARS = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
           "model.layers.0.mlp.gate_proj.weight"]
SUFFIXES = [".weight_scale", ".weight_scale_inv", ".qweight", ".qzeros", ".g_idx", ".weight_packed", ".input_scale",
            ".scales"]
DTYPES = [torch.float8_e4m3fn, torch.float8_e5m2, torch.int8, torch.uint8, torch.int32, torch.bool]


QUANT_CONFIG = st.one_of(
    st.none(),
    st.fixed_dictionaries({"quant_method": st.sampled_from(["fp8", "gptq", "awq", "bitsandbytes", "compressed-tensors",
                                                            "mxfp4", "hqq", "eetq", "", "nope"])},
                          optional={"bits": st.integers(-8, 64), "group_size": st.integers(-1, 1 << 20),
                                    "weight_block_size": st.lists(st.integers(0, 1 << 16), max_size=3)}),
    st.dictionaries(st.text(max_size=8), st.integers(), max_size=3),
    st.sampled_from([[], "fp8", 7, None]),
)
TENSOR_EDITS = st.lists(st.tuples(st.sampled_from(LINEARS), st.sampled_from(["dtype", "extra"]),
                                  st.sampled_from(DTYPES), st.sampled_from(SUFFIXES)), max_size=3)


@fuzz_settings(40)
@given(qc=QUANT_CONFIG, edits=TENSOR_EDITS, side_file=st.booleans())
def test_fuzz_quantised_checkpoints_are_refused_or_load_clean(tiny_folder, tmp_path_factory, qc, edits, side_file):
    from safetensors.torch import load_file, save_file

    d = tmp_path_factory.mktemp("q")
    for f in tiny_folder.iterdir():
        shutil.copy(f, d / f.name)
    cfg = json.loads((d / "config.json").read_text())
    injected = False
    if qc is not None:
        cfg["quantization_config"] = qc
        injected = True
    (d / "config.json").write_text(json.dumps(cfg))
    if side_file:
        (d / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 128}))
        injected = True
    sd = load_file(d / "model.safetensors")
    orig = dict(sd)
    dtype_of = {}  # a tensor edited twice keeps its last dtype
    for name, kind, dtype, suffix in edits:
        if kind == "dtype":
            dtype_of[name] = dtype
        else:
            sd[name.removesuffix(".weight") + suffix] = torch.ones(2, dtype=torch.float32)
        injected = True
    for name, dtype in dtype_of.items():
        t = orig[name]
        sd[name] = (t > 0) if dtype == torch.bool else t.to(dtype) if dtype.is_floating_point else (t * 100).to(dtype)
    save_file(sd, d / "model.safetensors")
    with time_limit(30), memory_cap(1 << 30):
        try:
            llm = ember.load(d, dtype=torch.float32)
        except EmberError as e:
            assert str(e)
            return
    # loaded: only when nothing quantised was there (FP8 weights alone are float: they load as values)
    fp8_only = all(kind == "dtype" for _, kind, _, _ in edits) and all(dt.is_floating_point for dt in dtype_of.values()) \
        and qc is None and not side_file
    assert not injected or fp8_only, (qc, edits, side_file)
    toks = [ev.token_id for ev in llm.events([llm.request([1, 2, 3], 3, ignore_eos=True)])]
    assert len(toks) == 3
