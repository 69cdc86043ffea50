"""Fuzzing quantised checkpoints.

1. A tiny valid unquantised Llama whose config gains a hostile `quantization_config` (any
   quant_method, or junk) and whose tensors are swapped for what quantised checkpoints hold (FP8 /
   int8 / int32 / bool weights, `*_scale`, `qweight`, `g_idx` tensors of any shape).
   Property: `ember.load` raises an EmberError (refusing the checkpoint by name, or the bad tensor by
   dtype and name), or, when nothing quantised was injected, loads a model that runs. Never another
   exception, a hang, or a model that silently computes with integer codes or unscaled FP8 values.
2. Valid quantised checkpoints (GPTQ act-order, AWQ, compressed-tensors asymmetric int4, FP8 per
   channel, block FP8) whose packed tensors are replaced (any shape, dtype, group indices, claimed
   weight_shape) or dropped and whose quantization_config fields are changed.
   Property: an EmberError naming the problem, or a model that loads and generates.
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


# ---- 2: valid quantised checkpoints, then hostile edits ----------------------------------------
FORMATS = ["gptq", "awq", "ct-int4-asym", "ct-fp8-channel", "fp8-block"]


@pytest.fixture(scope="module")
def quant_folders(tiny_folder, tmp_path_factory):
    """One tiny quantised checkpoint per format, written from the tiny Llama (K = 32 or 48)."""
    import hfquant_make as hq
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_folder).float().eval()
    ct4 = hq.ct_scheme(fmt="pack-quantized", bits=4, typ="int", strategy="group", group_size=16, symmetric=False)
    fp8c = hq.ct_scheme(fmt="float-quantized", bits=8, typ="float", strategy="channel")
    makers = {
        "gptq": (lambda n, w: hq.gptq(w, 4, 16, False, True), {"quant_method": "gptq", "bits": 4, "group_size": 16,
                                                                 "desc_act": True, "sym": False}),
        "awq": (lambda n, w: hq.awq(w, 16), {"quant_method": "awq", "bits": 4, "group_size": 16, "version": "gemm"}),
        "ct-int4-asym": (lambda n, w: hq.compressed(w, ct4), hq.ct_config({"group_0": ct4}, "pack-quantized")),
        "ct-fp8-channel": (lambda n, w: hq.compressed(w, fp8c), hq.ct_config({"group_0": fp8c}, "float-quantized")),
        "fp8-block": (lambda n, w: hq.fp8_block(w, [16, 16]), {"quant_method": "fp8", "weight_block_size": [16, 16]}),
    }
    out = {}
    for name, (make, qc) in makers.items():
        d = tmp_path_factory.mktemp(name)
        hq.write(d, model, make, qc)
        out[name] = d
    return out


PACKED_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx", ".weight_packed", ".weight_shape", ".weight_scale",
                   ".weight_zero_point", ".weight_scale_inv", "proj.weight")
EDIT = st.tuples(st.integers(0, 1 << 16),  # which packed tensor (modulo how many)
                 st.sampled_from(["shape", "dtype", "values", "drop"]),
                 st.lists(st.integers(0, 70), min_size=0, max_size=3),
                 st.sampled_from([torch.int32, torch.int64, torch.int8, torch.float16, torch.float32,
                                  torch.float8_e4m3fn, torch.uint8]),
                 st.integers(-(1 << 40), 1 << 40))
CONFIG_EDIT = st.one_of(st.none(), st.tuples(
    st.sampled_from(["bits", "group_size", "sym", "desc_act", "weight_block_size", "checkpoint_format", "version",
                     "config_groups"]),
    st.one_of(st.integers(-2, 1 << 20), st.booleans(), st.lists(st.integers(-1, 64), max_size=3),
              st.sampled_from(["gptq_v2", "gemm", "x", ""]), st.none())))


@fuzz_settings(40)
@given(fmt=st.sampled_from(FORMATS), edits=st.lists(EDIT, max_size=3), cedit=CONFIG_EDIT)
def test_fuzz_hostile_quantised_tensors_and_configs_fail_cleanly_or_load(quant_folders, tmp_path_factory, fmt, edits,
                                                                        cedit):
    from safetensors.torch import load_file, save_file

    d = tmp_path_factory.mktemp("qf")
    for f in quant_folders[fmt].iterdir():
        shutil.copy(f, d / f.name)
    sd = load_file(d / "model.safetensors")
    names = sorted(k for k in sd if k.endswith(PACKED_SUFFIXES))
    for which, kind, shape, dtype, value in edits:
        name = names[which % len(names)]
        if name not in sd:
            continue
        t = sd[name]
        if kind == "drop":
            del sd[name]
        elif kind == "shape":
            sd[name] = torch.zeros(shape, dtype=t.dtype) if t.dtype != torch.float8_e4m3fn else torch.zeros(shape).to(t.dtype)
        elif kind == "dtype":
            sd[name] = t.float().to(dtype) if dtype.is_floating_point else t.to(torch.int64).clamp(-100, 100).to(dtype)
        else:  # every value replaced (group indices, claimed shapes, scales, codes)
            fill = torch.full(t.shape, value, dtype=torch.int64)
            sd[name] = fill.to(t.dtype) if not t.dtype.is_floating_point else fill.double().clamp(-400, 400).to(t.dtype)
    save_file(sd, d / "model.safetensors")
    if cedit is not None:
        cfg = json.loads((d / "config.json").read_text())
        cfg["quantization_config"][cedit[0]] = cedit[1]
        (d / "config.json").write_text(json.dumps(cfg))
    with time_limit(30), memory_cap(1 << 30):
        try:
            llm = ember.load(d, dtype=torch.float32)
        except EmberError as e:
            assert str(e)
            return
        toks = [ev.token_id for ev in llm.events([llm.request([1, 2, 3], 3, ignore_eos=True)])]
    assert len(toks) == 3
