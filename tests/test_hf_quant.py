"""Quantised Hugging Face checkpoints (compressed-tensors, GPTQ, AWQ, FP8) against transformers.

Every case writes a tiny random Llama quantised as the Hub lays the format out (hfquant_make.py),
and a transformers model holding the same weights dequantised independently of ember (the format's
own library where one installs on CPU: compressed-tensors, transformers' FP8 code; else codes
packed bit by bit in the test). Claims:
- the packed path (PackedLinear: weights dequantised a slab at a time inside each forward) gives
  transformers' float32 logits within 1e-4;
- `ember.load` (with the CPU transforms: integer weights repacked as GGUF blocks for ember's native
  kernels, which round activations to int8 as llama.cpp does) stays within cosine 0.995 per position
  and keeps the weights quantised in memory.
"""
from __future__ import annotations

import json

import pytest
import torch

import ember
import hfquant_make as hq
from ember import hub, loading
from ember.errors import CheckpointError, ConfigError, EmberError, UnsupportedModelError
from ember.varbuilder import VarBuilder

pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

IDS = torch.tensor([[1, 5, 9, 77, 3, 100, 42, 8, 16, 31]])


def _gptq(bits, gs, sym, act, v1=True):
    return lambda name, w: hq.gptq(w, bits, gs, sym, act, v1, seed=len(name))


def _ct(**kw):
    scheme = hq.ct_scheme(**kw)
    return scheme, lambda name, w: hq.compressed(w, scheme)


def _gptq_qc(bits, gs, sym, act, fmt="gptq"):
    return {"quant_method": "gptq", "bits": bits, "group_size": gs, "sym": sym, "desc_act": act, "checkpoint_format": fmt}


def cases():
    out = {}
    for name, kw in {
        "ct-w4a16-g32": dict(fmt="pack-quantized", bits=4, typ="int", strategy="group", group_size=32),
        "ct-w4a16-g64-asym": dict(fmt="pack-quantized", bits=4, typ="int", strategy="group", group_size=64, symmetric=False),
        "ct-w4a16-channel": dict(fmt="pack-quantized", bits=4, typ="int", strategy="channel"),
        "ct-w8a16-channel-asym": dict(fmt="pack-quantized", bits=8, typ="int", strategy="channel", symmetric=False),
        "ct-w8a8-int8": dict(fmt="int-quantized", bits=8, typ="int", strategy="channel"),
        "ct-fp8-tensor": dict(fmt="float-quantized", bits=8, typ="float", strategy="tensor"),
        "ct-fp8-channel": dict(fmt="float-quantized", bits=8, typ="float", strategy="channel"),
        "ct-fp8-block": dict(fmt="float-quantized", bits=8, typ="float", strategy="block", block=[16, 32]),
    }.items():
        scheme, make = _ct(**kw)
        # integer codes repack into GGUF blocks, except 8-bit ones whose zero point pushes them out of int8
        repacks = kw["typ"] == "int" and (kw["bits"] == 4 or kw.get("symmetric", True))
        out[name] = (make, hq.ct_config({"group_0": scheme}, kw["fmt"]), None, repacks)
    for name, (bits, gs, sym, act, fmt) in {
        "gptq-4bit-g32-sym": (4, 32, True, False, "gptq"),
        "gptq-4bit-g32-asym-actorder": (4, 32, False, True, "gptq"),
        "gptq-8bit-channel-sym": (8, -1, True, False, "gptq"),
        "gptq-2bit-g64-asym": (2, 64, False, False, "gptq"),
        "gptq-4bit-g64-v2": (4, 64, False, False, "gptq_v2"),
    }.items():
        out[name] = (_gptq(bits, gs, sym, act, fmt == "gptq"), _gptq_qc(bits, gs, sym, act, fmt), None, bits < 8 or sym)
    side = {"bits": 4, "group_size": 32, "desc_act": False, "sym": False}  # older checkpoints: a side file
    out["gptq-side-file"] = (_gptq(4, 32, False, False), None, side, True)
    for gs in (32, 64):
        out[f"awq-g{gs}"] = (lambda name, w, gs=gs: hq.awq(w, gs),
                             {"quant_method": "awq", "bits": 4, "group_size": gs, "zero_point": True, "version": "gemm"},
                             None, True)
    for block in ([32, 32], [16, 64]):
        out[f"fp8-block-{block[0]}x{block[1]}"] = (lambda name, w, b=block: hq.fp8_block(w, b),
                                                   {"quant_method": "fp8", "activation_scheme": "dynamic",
                                                    "weight_block_size": block}, None, False)
    return out


CASES = cases()


@pytest.fixture(scope="module")
def model():
    return hq.tiny_llama()


@pytest.fixture(scope="module")
def written(model, tmp_path_factory):
    """written(case, folder) -> the dequantised weights: the case's checkpoint copied into folder
    (each case is quantised and written once per module)."""
    import shutil

    done = {}

    def copy(case, folder):
        if case not in done:
            make, qc, side, _ = CASES[case]
            src = tmp_path_factory.mktemp(case)
            done[case] = (src, hq.write(src, model, make, qc, side))
        src, deq = done[case]
        shutil.copytree(src, folder, dirs_exist_ok=True)
        return deq

    return copy


def packed_model(folder):
    """The model as the pipeline builds it, before any transform: PackedLinear layers."""
    ckpt = loading.open_checkpoint(hub.resolve(str(folder)))
    cfg = ckpt.entry.parse_config(ckpt.raw)
    source, _ = ckpt.source(torch.float32, torch.device("cpu"), None)
    return loading.build(ckpt.entry, cfg, VarBuilder(source, torch.float32, "cpu"))


@pytest.mark.parametrize("case", list(CASES))
def test_quantized_checkpoint_logits_match_transformers_dequantized(model, written, tmp_path, case):
    from ember.nn.packed import PackedLinear

    repacks = CASES[case][3]
    deq = written(case, tmp_path)
    with torch.no_grad():
        want = hq.dequantized_model(model, deq)(IDS).logits
    m = packed_model(tmp_path)
    assert sum(isinstance(x, PackedLinear) for x in m.modules()) == 14  # 7 linears x 2 layers; lm_head plain
    got = m(IDS)
    assert (got - want).abs().max() < 1e-4, case

    llm = ember.load(tmp_path, dtype=torch.float32)
    assert llm._loaded.quantized and llm._loaded.load_mode
    if repacks and "repack" not in llm._loaded.transforms:
        pytest.fail(f"{case}: expected the repack transform, got {llm._loaded.transforms}")
    if not repacks:
        assert "repack" not in llm._loaded.transforms
    fast = llm.model(IDS)
    cos = torch.nn.functional.cosine_similarity(fast[0], want[0], dim=-1)
    assert cos.min() > 0.995, (case, cos.min())


def test_repacked_qkv_and_gate_up_are_fused_into_one_block_linear(written, tmp_path):
    from ember.nn.layers import FusedLinears
    from ember.nn.packed import PackedConcatLinear

    written("awq-g32", tmp_path)
    llm = ember.load(tmp_path, dtype=torch.float32)
    fused = [m.fused for m in llm.model.modules() if isinstance(m, FusedLinears)]
    assert len(fused) == 4 and not any(isinstance(f, PackedConcatLinear) for f in fused)
    assert all(f.out_features in (64 + 32 + 32, 2 * 128) for f in fused)


def test_gptq_mixtral_experts_load(tmp_path):
    """Per-expert GPTQ weights (block_sparse_moe.experts.N.w1/w2/w3, as the Hub has them) and the
    attention: the MoE layer stacks the experts, dequantised at load; attention stays packed."""
    import re

    from transformers import AutoModelForCausalLM, MixtralConfig

    from parity import tiny_hf_model

    cfg = MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)
    moe = tiny_hf_model(cfg)
    pattern = re.compile(r"(self_attn\.\w+_proj|experts\.\d+\.w[123])\.weight$")
    deq = hq.write(tmp_path / "q", moe, _gptq(4, 32, False, True), _gptq_qc(4, 32, False, True), linear=pattern)
    ref = AutoModelForCausalLM.from_pretrained(hq.dequantized_folder(moe, deq, tmp_path / "ref")).float().eval()
    with torch.no_grad():
        want = ref(IDS).logits
    got = packed_model(tmp_path / "q")(IDS)
    assert (got - want).abs().max() < 1e-4


def test_weights_stay_packed_views_of_the_file(written, tmp_path):
    """The packed tensors are the file's own bytes (mmap views), not float copies."""
    written("gptq-4bit-g32-asym-actorder", tmp_path)
    m = packed_model(tmp_path)
    q = m.model.layers[0].mlp.down_proj
    assert q.qweight.dtype == torch.int32 and tuple(q.qweight.shape) == (128 * 4 // 32, 64)
    assert not any(p.dim() == 2 and p.shape == (64, 128) for p in m.model.layers[0].mlp.parameters())


@pytest.mark.parametrize("case", ["ct-fp8-block", "gptq-4bit-g32-asym-actorder"])
def test_keep_quantized_false_dequantizes_at_load(model, written, tmp_path, case):
    from ember.nn.packed import PackedLinear

    deq = written(case, tmp_path)
    with torch.no_grad():
        want = hq.dequantized_model(model, deq)(IDS).logits
    llm = ember.load(tmp_path, dtype=torch.float32, keep_quantized=False)
    assert not llm._loaded.quantized and "dequantised at load" in llm._loaded.load_mode
    assert not any(isinstance(x, PackedLinear) for x in llm.model.modules())
    assert (llm.model(IDS) - want).abs().max() < 1e-4


def test_quantize_option_on_a_quantized_checkpoint_is_an_argument_error(written, tmp_path):
    from ember.errors import ArgumentError

    written("awq-g32", tmp_path)
    with pytest.raises(ArgumentError, match=r"quantize='int8': .* is already quantised \(awq int4 g32 GEMM\)"):
        ember.load(tmp_path, quantize="int8")


def test_tensor_parallel_refuses_packed_weights_before_any_process_group(written, tmp_path):
    from ember.errors import UnsupportedModelError

    written("awq-g32", tmp_path)
    with pytest.raises(UnsupportedModelError, match=r"tp=2: .*packed weights.*awq int4 g32 GEMM.*keep_quantized=False"):
        ember.load(tmp_path, tp=2)


def test_greedy_generation_runs_on_a_gptq_checkpoint(model, written, tmp_path):
    deq = written("gptq-4bit-g32-sym", tmp_path)
    llm = ember.load(tmp_path, dtype=torch.float32)
    ref = hq.dequantized_model(model, deq)
    got = [ev.token_id for ev in llm.events([llm.request(IDS[0].tolist(), 4, ignore_eos=True)])]
    with torch.no_grad():
        want = ref.generate(IDS, max_new_tokens=4, do_sample=False)[0, IDS.shape[1]:].tolist()
    assert len(got) == 4 and got[:2] == want[:2]


def test_repacked_int8_codes_of_minus_128_compute_exactly():
    """W8A8 int8 codes at the edge of the range survive the repack into Q8_0 blocks."""
    from ember.backends.hfquant import to_blocks
    from ember.hfquant.scaled import ScaledWeight
    from ember.nn.packed import PackedLinear

    g = torch.Generator().manual_seed(0)
    q = torch.randint(-128, 128, (64, 64), generator=g, dtype=torch.int8)
    q[0, :5] = -128
    s = (torch.rand(64, 1, generator=g) * 0.01 + 0.001).half().float()  # float16 holds it: Q8_0 is exact
    w = ScaledWeight("x", (64, 64), {"weight": q, "weight_scale": s}, method="compressed-tensors", scheme="",
                     values="int8", bits=8, layout="channel")
    packed = PackedLinear(w)
    blocks = to_blocks(packed)
    assert type(blocks).__name__ == "QuantLinear"
    x = torch.randn(3, 64, generator=g)
    torch.testing.assert_close(blocks(x), packed(x), rtol=1e-5, atol=1e-5)


# ---- FP8 on torch._scaled_mm (CUDA); on CPU only its dispatch and its numbers are checked -------
def test_fp8_scaled_mm_is_planned_on_cuda_only(monkeypatch):
    from ember import transforms
    from ember.backends import hfquant as backend

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(backend, "scaled_mm_available", lambda d: d.type == "cuda")
    assert transforms.FP8_SCALED_MM in transforms.plan("causal-lm", torch.bfloat16, cuda, quantized=True)
    assert transforms.FP8_SCALED_MM not in transforms.plan("causal-lm", torch.bfloat16, cpu, quantized=True)


@pytest.mark.parametrize("case", ["ct-fp8-tensor", "ct-fp8-channel"])
def test_fp8_scaled_mm_linear_matches_fp8_activations_times_the_dequantized_weight(written, tmp_path, case):
    """torch._scaled_mm runs on CPU too, so the ScaledMMLinear's numbers are checked here: activations
    rounded to FP8 per token, times the dequantised weight."""
    from ember.backends.hfquant import FP8_MAX, ScaledMMLinear, to_scaled_mm

    written(case, tmp_path)
    m = packed_model(tmp_path)
    lin = m.model.layers[0].mlp.down_proj
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(0))
    a = x.abs().amax(-1, keepdim=True) / FP8_MAX
    want = torch.nn.functional.linear((x / a).to(torch.float8_e4m3fn).float() * a, lin.dequantized_weight())
    torch.testing.assert_close(ScaledMMLinear(lin)(x), want, rtol=1e-4, atol=1e-4)
    assert to_scaled_mm(m) == 14
    assert m(IDS).isfinite().all()


def test_fp8_block_scales_as_ue8m0_powers_of_two(model, tmp_path):
    """DeepSeek-V3.1 style: weight_scale_inv stored as float8_e8m0fnu (transformers' quantiser with scale_fmt ue8m0)."""
    from types import SimpleNamespace

    from transformers.integrations.finegrained_fp8 import Fp8Quantize, _dequantize_fp8_weight

    quantizer = SimpleNamespace(quantization_config=SimpleNamespace(weight_block_size=[32, 32], scale_fmt="ue8m0"))

    def make(name, w):
        out = Fp8Quantize(quantizer)._quantize_one("x.weight", w)
        t = {"weight": out["x.weight"], "weight_scale_inv": out["x.weight_scale_inv"]}
        assert t["weight_scale_inv"].dtype == torch.float8_e8m0fnu
        return t, _dequantize_fp8_weight(t["weight"], t["weight_scale_inv"].float(), [32, 32], torch.float32)

    deq = hq.write(tmp_path, model, make, {"quant_method": "fp8", "weight_block_size": [32, 32], "scale_fmt": "ue8m0"})
    with torch.no_grad():
        want = hq.dequantized_model(model, deq)(IDS).logits
    assert (packed_model(tmp_path)(IDS) - want).abs().max() < 1e-4


def test_fp8_block_checkpoint_is_not_scaled_mm_able(written, tmp_path):
    from ember.backends.hfquant import scaled_mm_able

    written("fp8-block-32x32", tmp_path)
    assert not any(scaled_mm_able(x) for x in packed_model(tmp_path).modules())


# ---- inspect ---------------------------------------------------------------------------------
def test_inspect_shows_the_quantisation(written, tmp_path, capsys):
    from ember import cli

    written("ct-w4a16-g64-asym", tmp_path)
    assert cli.main(["inspect", str(tmp_path), "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert "quantization: compressed-tensors int4 group g64 asym (pack-quantized)" in out
    assert "14 quantised linears" in out


# ---- bad checkpoints: clear errors naming the tensor or field ---------------------------------
def _gptq_folder(written, tmp_path, edit=None, qc=None):
    from safetensors.torch import load_file, save_file

    written("gptq-4bit-g32-asym-actorder", tmp_path)
    if qc is not None:
        cfg = json.loads((tmp_path / "config.json").read_text())
        cfg["quantization_config"] = qc
        (tmp_path / "config.json").write_text(json.dumps(cfg))
    if edit is not None:
        sd = load_file(tmp_path / "model.safetensors")
        edit(sd)
        save_file(sd, tmp_path / "model.safetensors")
    return tmp_path


L0 = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("edit, match", [
    (lambda sd: sd.update({f"{L0}.scales": torch.ones(3, 64, dtype=torch.float16)}), r"q_proj.scales' has shape \[3, 64\]"),
    (lambda sd: sd.update({f"{L0}.scales": sd[f"{L0}.scales"].int()}), "q_proj.scales' is torch.int32"),
    (lambda sd: sd.update({f"{L0}.g_idx": torch.full((64,), 7, dtype=torch.int32)}), r"q_proj.g_idx' holds group indices in \[7, 7\]"),
    (lambda sd: sd.update({f"{L0}.g_idx": torch.full((64,), -1, dtype=torch.int32)}), "q_proj.g_idx' holds group indices"),
    (lambda sd: sd.update({f"{L0}.qzeros": torch.zeros(2, 9, dtype=torch.int32)}), r"q_proj.qzeros' has shape \[2, 9\]"),
    (lambda sd: sd.pop(f"{L0}.qzeros"), "q_proj.qzeros' is missing"),
    (lambda sd: sd.pop(f"{L0}.g_idx"), r"desc_act .*q_proj.g_idx' is missing"),
    (lambda sd: sd.pop(f"{L0}.qweight"), "q_proj.* belongs to a quantised linear, but its layer has no qweight"),
    (lambda sd: sd.update({f"{L0}.qweight": sd[f"{L0}.qweight"].float()}), "q_proj.qweight' is torch.float32"),
])
def test_bad_gptq_tensors_are_checkpoint_errors_naming_them(written, tmp_path, edit, match):
    d = _gptq_folder(written, tmp_path, edit)
    with pytest.raises(CheckpointError, match=match):
        ember.load(d, dtype=torch.float32)


@pytest.mark.parametrize("qc, err, match", [
    ({"quant_method": "gptq", "bits": 3, "group_size": 32}, UnsupportedModelError, "3-bit GPTQ"),
    ({"quant_method": "gptq", "bits": 5, "group_size": 32}, ConfigError, "bits must be 2, 4 or 8"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 0}, ConfigError, "group_size must be -1 or"),
    ({"quant_method": "gptq", "bits": "4"}, ConfigError, "bits must be int"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 32, "checkpoint_format": "marlin"}, UnsupportedModelError, "marlin"),
    ({"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemv"}, UnsupportedModelError, "gemv"),
    ({"quant_method": "awq", "bits": 8}, ConfigError, "bits must be 4 for AWQ"),
    ({"quant_method": "fp8", "weight_block_size": [0, 128]}, ConfigError, "weight_block_size must be two integers"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, UnsupportedModelError, "bitsandbytes nf4/fp4"),
    ({"quant_method": "hqq"}, UnsupportedModelError, r"'hqq' is not supported.*compressed-tensors .*gptq .*awq .*fp8"),
    ({"quant_method": "mxfp4"}, CheckpointError, "mxfp4, but no tensor is quantised"),
    ({"load_in_4bit": True}, ConfigError, "no quant_method"),
    ({"quant_method": "compressed-tensors", "config_groups": {}}, ConfigError, "config_groups must be a non-empty"),
    ({"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
      "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "float"}}}},
     UnsupportedModelError, "nvfp4-pack-quantized"),
])
def test_bad_or_unsupported_quantization_configs_are_clear_errors(written, tmp_path, qc, err, match):
    d = _gptq_folder(written, tmp_path, qc=qc)
    with pytest.raises(err, match=match):
        ember.load(d, dtype=torch.float32)


def test_a_quantization_config_over_plain_weights_is_a_checkpoint_error(tiny_folder, tmp_path):
    import shutil

    d = tmp_path / "q"
    shutil.copytree(tiny_folder, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="says gptq, but no tensor is quantised"):
        ember.load(d)


def test_compressed_scale_of_the_wrong_shape_names_the_tensor(written, tmp_path):
    from safetensors.torch import load_file, save_file

    written("ct-w4a16-g32", tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd[f"{L0}.weight_scale"] = torch.ones(64, 3)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"q_proj.weight_scale' has shape \[64, 3\].*allow \[64, 2\]"):
        ember.load(tmp_path, dtype=torch.float32)


def test_compressed_weight_shape_claiming_a_huge_weight_is_refused(written, tmp_path):
    from safetensors.torch import load_file, save_file

    written("ct-w4a16-g32", tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd[f"{L0}.weight_shape"] = torch.tensor([1 << 40, 64])
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(EmberError, match="weight_shape' claims a weight of shape"):
        ember.load(tmp_path, dtype=torch.float32)
