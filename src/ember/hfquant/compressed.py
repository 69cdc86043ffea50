"""compressed-tensors checkpoints (what llm-compressor writes), per linear `X`:

  pack-quantized (W4A16, W8A16):  X.weight_packed int32 [N, K*bits/32], X.weight_shape [2] = (N, K),
                                  X.weight_scale [N, G] or [N, 1], X.weight_zero_point int32
                                  [N*bits/32, G] when asymmetric, X.weight_g_idx [K] with act-order
  int-quantized (W8A8 int8):      X.weight int8 [N, K], X.weight_scale [N, 1] or one value
  float-quantized (FP8):          X.weight float8_e4m3fn [N, K], X.weight_scale one value, [N, 1], or
                                  per block; X.input_scale when activations are static

Which config group a layer belongs to is read from its tensors (dtype, packed width, scale shape),
checked against the groups the config declares; the groups' `targets` are never evaluated (they
may be regular expressions, which a hostile config could make run for ever).
"""
from __future__ import annotations

import math

import torch

from ..errors import CheckpointError
from .config import CompressedConfig, CTScheme
from .gptq import FLOATS, check_g_idx
from .scaled import ScaledWeight

ACTIVATION_TENSORS = ("input_scale", "input_zero_point", "output_scale", "output_zero_point")
MAX_DIM = 1 << 24  # the largest N or K a weight_shape tensor may claim


def _scale_shape(s: CTScheme, n: int, k: int) -> tuple[int, ...] | None:
    if s.strategy == "channel":
        return (n, 1)
    if s.strategy == "group":
        return (n, math.ceil(k / s.group_size))
    if s.strategy == "block":
        return (math.ceil(n / s.block[0]), math.ceil(k / s.block[1]))
    return None  # tensor: any shape of one element


def _matches(s: CTScheme, shape: tuple[int, ...], n: int, k: int) -> bool:
    want = _scale_shape(s, n, k)
    if want is None:
        return math.prod(shape) == 1
    return tuple(shape) == want


def ct_weight(source, keys, prefix: str, cfg: CompressedConfig, where: str) -> tuple[ScaledWeight, list[str]]:
    """The compressed-tensors weight of linear `prefix`, its tensors checked against each other and the config."""
    used = []
    pk = f"{prefix}.weight_packed"
    if pk in keys:
        sk = f"{prefix}.weight_shape"
        if sk not in keys:
            raise CheckpointError(f"{where}: {pk!r} is a packed weight but tensor {sk!r} is missing")
        if source.dtype(sk) not in (torch.int32, torch.int64) or tuple(source.shape(sk)) != (2,):
            raise CheckpointError(f"{where}: tensor {sk!r} must be 2 integers (the weight's [out, in]), "
                                  f"got {source.dtype(sk)} {list(source.shape(sk))}")
        n, k = (int(x) for x in source.load(sk).tolist())
        if not (0 < n <= MAX_DIM and 0 < k <= MAX_DIM):
            raise CheckpointError(f"{where}: tensor {sk!r} claims a weight of shape [{n}, {k}]")
        if source.dtype(pk) != torch.int32:
            raise CheckpointError(f"{where}: tensor {pk!r} is {source.dtype(pk)}, packed codes must be int32")
        got = tuple(source.shape(pk))
        bits = next((s.bits for s in cfg.schemes if s.format == "pack-quantized" and got == (n, math.ceil(k * s.bits / 32))),
                    None)
        if bits is None:
            raise CheckpointError(f"{where}: tensor {pk!r} has shape {list(got)}, which packs a [{n}, {k}] weight at no "
                                  f"bit width the config declares for pack-quantized")
        values, kinds = "packed", [s for s in cfg.schemes if s.format == "pack-quantized" and s.bits == bits]
        used += [pk, sk]
    else:
        wk = f"{prefix}.weight"
        if wk not in keys:
            raise CheckpointError(f"{where}: {prefix}.weight_scale has no weight beside it ({wk!r} or {pk!r})")
        dt, shape = source.dtype(wk), tuple(source.shape(wk))
        if len(shape) != 2 or 0 in shape:
            raise CheckpointError(f"{where}: tensor {wk!r} has shape {list(shape)}, a quantised linear's weight is 2-D")
        n, k = shape
        bits = 8
        if dt == torch.int8:
            values, kinds = "int8", [s for s in cfg.schemes if s.type == "int" and s.format != "pack-quantized"]
        elif dt == torch.float8_e4m3fn:
            values, kinds = "fp8", [s for s in cfg.schemes if s.type == "float"]
        else:
            raise CheckpointError(f"{where}: tensor {wk!r} is {dt} beside a weight_scale; a compressed-tensors weight "
                                  f"is int8, float8_e4m3fn or packed int32 (weight_packed)")
        used.append(wk)
    scale = f"{prefix}.weight_scale"
    if scale not in keys:
        raise CheckpointError(f"{where}: quantised weight {prefix!r} has no tensor {scale!r}")
    if source.dtype(scale) not in FLOATS:
        raise CheckpointError(f"{where}: tensor {scale!r} is {source.dtype(scale)}, scales are floating point")
    sshape = tuple(source.shape(scale))
    scheme = next((s for s in kinds if _matches(s, sshape, n, k)), None)
    if scheme is None:
        expect = sorted({str(list(_scale_shape(s, n, k) or [1])) for s in kinds}) or ["(no config group of this kind)"]
        raise CheckpointError(f"{where}: tensor {scale!r} has shape {list(sshape)}; for a [{n}, {k}] {values} weight the "
                              f"config groups allow {', '.join(expect)}")
    used.append(scale)
    names = {("weight_packed" if values == "packed" else "weight"): used[0], "weight_scale": scale}
    zero = None
    zk = f"{prefix}.weight_zero_point"
    if zk in keys:
        if values == "fp8":
            raise CheckpointError(f"{where}: tensor {zk!r}: an FP8 weight has no zero point")
        groups = 1 if scheme.strategy == "channel" else sshape[-1] if scheme.strategy == "group" else None
        if values == "packed" and groups is not None:
            want, dts, zero = (math.ceil(n * bits / 32), groups), (torch.int32,), "packed"
        else:
            want, dts, zero = sshape, (torch.int8, torch.int32, torch.int64, torch.uint8), "dense"
        if source.dtype(zk) not in dts or tuple(source.shape(zk)) != tuple(want):
            raise CheckpointError(f"{where}: tensor {zk!r} is {source.dtype(zk)} {list(source.shape(zk))}, expected "
                                  f"{dts[0]} {list(want)}")
        names["weight_zero_point"] = zk
    elif not scheme.symmetric:
        raise CheckpointError(f"{where}: {prefix!r} is asymmetric ({scheme.describe()}) but tensor {zk!r} is missing")
    gk = f"{prefix}.weight_g_idx"
    if gk in keys:
        if scheme.strategy != "group" or source.dtype(gk) not in (torch.int32, torch.int64) or tuple(source.shape(gk)) != (k,):
            raise CheckpointError(f"{where}: tensor {gk!r} ({source.dtype(gk)} {list(source.shape(gk))}) must be "
                                  f"int32 [{k}] beside a group-quantised weight")
        names["weight_g_idx"] = gk
    for a in ACTIVATION_TENSORS:
        if f"{prefix}.{a}" in keys:
            names[a] = f"{prefix}.{a}"
    tensors = {s: source.load(key) for s, key in names.items()}
    if "weight_g_idx" in tensors:
        check_g_idx(tensors["weight_g_idx"], gk, sshape[-1], where)
    w = ScaledWeight(prefix, (n, k), tensors, method="compressed-tensors", scheme=scheme.describe(), values=values,
                     bits=bits, layout=scheme.strategy, group_size=scheme.group_size, block=scheme.block, zero=zero)
    return w, list(names.values()) + used[1:-1]  # + weight_shape (read once, not kept)
