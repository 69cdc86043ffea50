"""The `fp8` method (DeepSeek-V3, Qwen3-FP8): per linear `X`, X.weight float8_e4m3fn [N, K] and
X.weight_scale_inv float32 [ceil(N/b0), ceil(K/b1)] for `weight_block_size` [b0, b1] (one value
without a block size); W = weight * scale_inv over each block."""
from __future__ import annotations

import math

import torch

from ..errors import CheckpointError
from .config import FP8Config
from .gptq import FLOATS

# scales: floats, or power-of-two exponents (ue8m0, "scale_fmt": "ue8m0")
SCALE_DTYPES = FLOATS + tuple(getattr(torch, n) for n in ("float8_e8m0fnu",) if hasattr(torch, n))
from .scaled import ScaledWeight

ACTIVATION_TENSORS = ("input_scale", "activation_scale")


def fp8_weight(source, keys, prefix: str, cfg: FP8Config, where: str) -> tuple[ScaledWeight, list[str]]:
    wk, sk = f"{prefix}.weight", f"{prefix}.weight_scale_inv"
    if wk not in keys:
        raise CheckpointError(f"{where}: tensor {sk!r} has no weight beside it ({wk!r} is missing)")
    shape = tuple(source.shape(wk))
    if source.dtype(wk) != torch.float8_e4m3fn or len(shape) != 2 or 0 in shape:
        raise CheckpointError(f"{where}: tensor {wk!r} is {source.dtype(wk)} {list(shape)}, an FP8 linear's weight is "
                              f"2-D float8_e4m3fn")
    n, k = shape
    sshape = tuple(source.shape(sk))
    if cfg.block is not None:
        want = (math.ceil(n / cfg.block[0]), math.ceil(k / cfg.block[1]))
        ok = sshape == want
    else:
        want, ok = (1,), math.prod(sshape) == 1
    if source.dtype(sk) not in SCALE_DTYPES or not ok:
        raise CheckpointError(f"{where}: tensor {sk!r} is {source.dtype(sk)} {list(sshape)}; for a [{n}, {k}] weight "
                              f"with weight_block_size {list(cfg.block) if cfg.block else None} it must be float {list(want)}")
    names = {"weight": wk, "weight_scale_inv": sk}
    for a in ACTIVATION_TENSORS:
        if f"{prefix}.{a}" in keys:
            names["input_scale"] = f"{prefix}.{a}"
    w = ScaledWeight(prefix, (n, k), {s: source.load(key) for s, key in names.items()}, method="fp8",
                     scheme=cfg.describe().removeprefix("fp8 "), values="fp8", bits=8,
                     layout="block" if cfg.block else "tensor", block=cfg.block, scale_key="weight_scale_inv")
    return w, list(names.values())
