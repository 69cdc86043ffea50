"""Tiny quantised Hugging Face checkpoints, laid out as the Hub has them (tensor names, dtypes, shapes,
quantization_config), written from a tiny random transformers Llama.

Each maker returns the checkpoint's tensors for one linear and the weight they stand for
(dequantised independently of ember): compressed-tensors' own compressors (quantise, pack,
decompress), transformers' FP8 quantiser and dequantiser, and for GPTQ and AWQ the packing written
out here directly, bit by bit, from the integer codes whose dequantised values are the reference.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's WQLinear_GEMM.from_linear


def tiny_llama(seed: int = 0, **kw):
    from transformers import LlamaConfig

    from parity import tiny_hf_model

    args = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)
    args.update(kw)
    return tiny_hf_model(LlamaConfig(**args), seed=seed)


def _int32(words: np.ndarray) -> torch.Tensor:
    """uint32 words (held in int64) as the int32 tensor a checkpoint stores."""
    return torch.from_numpy((words & 0xFFFFFFFF).astype(np.uint32).view(np.int32).copy())


def _pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """[R, C] codes -> [R*bits/32, C] words; code of row r*per + i at bits i*bits of word row r."""
    per = 32 // bits
    c = codes.astype(np.int64).reshape(codes.shape[0] // per, per, codes.shape[1])
    out = np.zeros((c.shape[0], c.shape[2]), dtype=np.int64)
    for i in range(per):
        out |= c[:, i, :] << (bits * i)
    return out


def _pack_cols(codes: np.ndarray, bits: int, order=None) -> np.ndarray:
    """[R, C] codes -> [R, C*bits/32] words; word j holds columns j*per + order[i] at bits i*bits."""
    per = 32 // bits
    order = order or list(range(per))
    c = codes.astype(np.int64).reshape(codes.shape[0], codes.shape[1] // per, per)
    out = np.zeros(c.shape[:2], dtype=np.int64)
    for i in range(per):
        out |= c[:, :, order[i]] << (bits * i)
    return out


def _minmax_codes(w: torch.Tensor, groups: torch.Tensor, n_groups: int, bits: int, sym: bool):
    """Per (group, output) scale (float16) and integer zero, and the codes [N, K], round to nearest."""
    maxq = (1 << bits) - 1
    n, _ = w.shape
    scale = torch.empty(n_groups, n)
    zero = torch.empty(n_groups, n, dtype=torch.int64)
    for g in range(n_groups):
        cols = w[:, groups == g]
        lo, hi = cols.amin(1).clamp(max=0), cols.amax(1).clamp(min=0)
        if sym:
            s = torch.maximum(lo.abs(), hi) * 2 / maxq
            z = torch.full((n,), (maxq + 1) // 2)
        else:
            s = (hi - lo) / maxq
            z = torch.round(-lo / s).long()
        scale[g] = s.half().float()
        zero[g] = z
    s_k, z_k = scale[groups].t(), zero[groups].t()  # [N, K]
    q = torch.clamp(torch.round(w / s_k) + z_k, 0, maxq).long()
    return scale, zero, q, (q - z_k) * s_k


def gptq(w: torch.Tensor, bits: int, group_size: int, sym: bool, act_order: bool, v1: bool = True, seed: int = 0):
    """GPTQ tensors {qweight, qzeros, scales, g_idx} for w [N, K], and the weight they dequantise to."""
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    n_groups = -(-k // gs)
    if act_order:  # columns quantised in a shuffled order: group of column perm[i] is i // gs
        perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[perm] = (torch.arange(k) // gs).int()
    else:
        g_idx = (torch.arange(k) // gs).int()
    scale, zero, q, deq = _minmax_codes(w.float(), g_idx.long(), n_groups, bits, sym)
    stored_zero = zero - 1 if v1 else zero
    t = {"qweight": _int32(_pack_rows(q.t().numpy(), bits)),
         "qzeros": _int32(_pack_cols(stored_zero.numpy() & ((1 << bits) - 1), bits)),
         "scales": scale.half(), "g_idx": g_idx}
    return t, deq


def awq(w: torch.Tensor, group_size: int):
    """AWQ GEMM tensors {qweight, qzeros, scales} for w [N, K] (4-bit, asymmetric), and the dequantised weight."""
    n, k = w.shape
    groups = torch.arange(k) // group_size
    scale, zero, q, deq = _minmax_codes(w.float(), groups, k // group_size, 4, sym=False)
    t = {"qweight": _int32(_pack_cols(q.t().numpy(), 4, AWQ_ORDER)),
         "qzeros": _int32(_pack_cols(zero.numpy(), 4, AWQ_ORDER)), "scales": scale.half()}
    return t, deq


def ct_scheme(fmt: str, bits: int, typ: str, strategy: str, group_size=None, symmetric=True, block=None, act=None):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=bits, type=typ, symmetric=symmetric, strategy=strategy, group_size=group_size,
                            block_structure=block)
    return QuantizationScheme(targets=["Linear"], weights=args, input_activations=act, format=fmt)


def compressed(w: torch.Tensor, scheme):
    """compressed-tensors tensors for w (quantised and packed by compressed-tensors itself), and
    the weight its decompressor gives back."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization.utils import calculate_qparams

    a = scheme.weights
    n, k = w.shape
    if a.strategy == "group":
        v = w.reshape(n, k // a.group_size, a.group_size)
        lo, hi = v.amin(-1), v.amax(-1)
    elif a.strategy == "channel":
        lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    elif a.strategy == "block":
        b0, b1 = a.block_structure
        v = w.reshape(n // b0, b0, k // b1, b1)
        lo, hi = v.amin((1, 3)), v.amax((1, 3))
    else:
        lo, hi = w.amin().reshape(1), w.amax().reshape(1)
    scale, zp = calculate_qparams(lo, hi, a)
    sd = {"weight": w, "weight_scale": scale, "weight_zero_point": zp}
    comp = BaseCompressor.load_from_registry(scheme.format)
    out = comp.compress(sd, scheme)
    deq = comp.decompress(dict(out), scheme)["weight"]
    return out, deq.float()


def ct_config(schemes: dict, fmt: str) -> dict:
    from compressed_tensors.quantization import QuantizationConfig

    cfg = QuantizationConfig(config_groups=schemes, format=fmt, quantization_status="compressed", ignore=["lm_head"])
    return cfg.model_dump(mode="json")


def fp8_block(w: torch.Tensor, block: list[int]):
    """transformers' FP8 quantiser (weight float8_e4m3fn + weight_scale_inv) and its dequantiser."""
    from types import SimpleNamespace

    from transformers.integrations.finegrained_fp8 import Fp8Quantize, _dequantize_fp8_weight

    quantizer = SimpleNamespace(quantization_config=SimpleNamespace(weight_block_size=block, scale_fmt=None))
    out = Fp8Quantize(quantizer)._quantize_one("x.weight", w)
    t = {"weight": out["x.weight"], "weight_scale_inv": out["x.weight_scale_inv"]}
    return t, _dequantize_fp8_weight(t["weight"], t["weight_scale_inv"], block, torch.float32)


def saved_tensors(model) -> dict:
    """The tensors `save_pretrained` writes (the Hub's names: per-expert w1/w2/w3 for Mixtral)."""
    import tempfile

    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return load_file(Path(tmp) / "model.safetensors")


def write(folder: Path, model, make, qc: dict | None, side_file: dict | None = None, skip=(), linear=LINEAR) -> dict:
    """Write `model` quantised by `make(name, w) -> (tensors, dequantised)` for every tensor matching
    `linear` (except names matching `skip`) into `folder`; returns the dequantised weights by name."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = saved_tensors(model)
    out, deq = {}, {}
    for name, w in sd.items():
        if linear.search(name) and not any(s in name for s in skip):
            t, d = make(name, w)
            prefix = name.removesuffix(".weight")
            out.update({f"{prefix}.{k}": v.contiguous() for k, v in t.items()})
            deq[name] = d
        else:
            out[name] = w
    save_file(out, folder / "model.safetensors")
    cfg = model.config.to_dict()
    if qc is not None:
        cfg["quantization_config"] = qc
    (folder / "config.json").write_text(json.dumps(cfg))
    if side_file is not None:
        (folder / "quantize_config.json").write_text(json.dumps(side_file))
    return deq


def dequantized_folder(model, deq: dict, folder: Path):
    """`model` saved with the dequantised weights in place of the quantised ones (load it with
    transformers: the reference for families whose saved names differ from their parameters)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = saved_tensors(model)
    sd.update({k: v.to(sd[k].dtype).contiguous() for k, v in deq.items()})
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(model.config.to_dict()))
    return folder


def dequantized_model(model, deq: dict):
    """A copy of `model` whose linears hold the dequantised weights (the transformers reference)."""
    import copy

    ref = copy.deepcopy(model)
    with torch.no_grad():
        sd = ref.state_dict()
        for name, d in deq.items():
            sd[name].copy_(d)
    return ref
