"""Quantised Hugging Face checkpoints as published on the Hub: compressed-tensors, GPTQ, AWQ, FP8, MXFP4.

The loading pipeline reads `quantization_config` here (`read_config`: config.json, or the side file
quantize_config.json) and wraps the checkpoint's tensor source (`QuantizedSource`): each quantised
linear `X` is then one tensor `X.weight` of its logical shape [out, in] whose value is a
`PackedWeight` over the file's own packed tensors (`ember.nn.packed`), and the packed tensors
themselves (qweight, scales, weight_scale...) are no longer listed. The model is built as for any
checkpoint; `ember.backends.hfquant` then moves what fits onto faster kernels.

One file per format: gptq.py (GPTQ and AWQ), compressed.py (compressed-tensors), fp8.py (the
block-wise `fp8` method), scaled.py (the codes-times-scale weight the last two share), mxfp4.py
(GPT-OSS's MXFP4 experts: 3-D, not linears, so a source of their own that dequantises them at load;
`open_source` picks the source for a config).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..errors import CheckpointError
from .config import SUPPORTED, AWQConfig, CompressedConfig, FP8Config, GPTQConfig, MXFP4Config, QuantConfig, parse

__all__ = ["SUPPORTED", "QuantConfig", "QuantizedSource", "open_source", "read_config"]


def read_config(raw: dict, side_file: Callable[[str], Path | None], where: str) -> QuantConfig | None:
    """The checkpoint's quantisation config (None for an unquantised checkpoint): config.json's
    `quantization_config`, or quantize_config.json beside it (older GPTQ checkpoints)."""
    from ..config import load_json

    qc = raw.get("quantization_config")
    if qc is not None:
        return parse(qc, where)
    side = side_file("quantize_config.json")
    if side is None:
        return None
    return parse(load_json(side), f"{where} (quantize_config.json)", side_file=True)


# per method: the tensor suffixes that mark a quantised linear, every suffix that belongs to one,
# and the function that builds its PackedWeight
def _builders():
    from .compressed import ACTIVATION_TENSORS as CT_ACT
    from .compressed import ct_weight
    from .fp8 import ACTIVATION_TENSORS as FP8_ACT
    from .fp8 import fp8_weight
    from .gptq import awq_weight, gptq_weight

    return {
        GPTQConfig: ((".qweight",), (".qweight", ".qzeros", ".scales", ".g_idx"), gptq_weight),
        AWQConfig: ((".qweight",), (".qweight", ".qzeros", ".scales"), awq_weight),
        CompressedConfig: ((".weight_packed", ".weight_scale"),
                           (".weight_packed", ".weight_shape", ".weight_scale", ".weight_zero_point", ".weight_g_idx")
                           + tuple(f".{a}" for a in CT_ACT), ct_weight),
        FP8Config: ((".weight_scale_inv",), (".weight_scale_inv",) + tuple(f".{a}" for a in FP8_ACT), fp8_weight),
    }


def open_source(inner, cfg: QuantConfig, where: str):
    """The TensorSource for a quantised checkpoint: `QuantizedSource` (packed linears), or for MXFP4
    `mxfp4.MXFP4Source` (experts dequantised at load)."""
    if isinstance(cfg, MXFP4Config):
        from .mxfp4 import MXFP4Source

        return MXFP4Source(inner, cfg, where)
    return QuantizedSource(inner, cfg, where)


class QuantizedSource:
    """A TensorSource over a quantised checkpoint: quantised linears appear as one `X.weight` each,
    a `PackedWeight`; everything else passes through. Every quantised linear is checked (shapes and
    dtypes from the headers, group indices) when the source is made, before the model is built."""

    always_dense = False  # True for a source that cannot keep its weights quantised (mxfp4.MXFP4Source)

    def __init__(self, inner, cfg: QuantConfig, where: str):
        self.inner, self.config = inner, cfg
        self.dense = False  # load() dequantises (keep_quantized=False)
        markers, parts, build = _builders()[type(cfg)]
        keys = list(inner.keys())
        keyset = set(keys)
        prefixes = dict.fromkeys(k[:-len(m)] for k in keys for m in markers if k.endswith(m) and len(k) > len(m))
        self.packed: dict[str, object] = {}
        hidden: set[str] = set()
        for p in prefixes:
            w, used = build(inner, keyset, p, cfg, where)
            self.packed[f"{p}.weight"] = w
            hidden.update(used)
        if not self.packed:
            raise CheckpointError(f"{where}: quantization_config says {cfg.method}, but no tensor is quantised "
                                  f"(no {' or '.join('*' + m for m in markers)} tensor)")
        for k in keys:
            if k in hidden or k in self.packed:
                continue
            if k.endswith(parts):
                raise CheckpointError(f"{where}: tensor {k!r} belongs to a quantised linear, but its layer has no "
                                      f"{' or '.join(m.lstrip('.') for m in markers)} tensor")
            dt = inner.dtype(k) if hasattr(inner, "dtype") else None
            if k.endswith(".weight") and dt in (torch.float8_e4m3fn, torch.float8_e5m2):
                raise CheckpointError(f"{where}: tensor {k!r} is {dt} with no scale beside it")
        # ordered, with set-speed membership (VarBuilder looks keys up by `in`)
        self._keys = dict.fromkeys([k for k in keys if k not in hidden or k in self.packed]
                                   + [k for k in self.packed if k not in keyset])

    def keys(self):
        return self._keys.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        w = self.packed.get(key)
        return tuple(w.shape) if w is not None else self.inner.shape(key)

    def dtype(self, key: str):
        w = self.packed.get(key)
        return next(iter(w.tensors.values())).dtype if w is not None else self.inner.dtype(key)

    def load(self, key: str):
        w = self.packed.get(key)
        if w is None:
            return self.inner.load(key)
        return w.dequantize(torch.float32) if self.dense else w

    def release(self, key: str) -> None:
        if key not in self.packed and hasattr(self.inner, "release"):
            self.inner.release(key)

    def describe(self) -> str:
        return self.inner.describe()

    def nbytes(self) -> int:
        """Bytes of the packed weights."""
        return sum(w.nbytes for w in self.packed.values())


def check_no_quantized_tensors(source, where: str) -> None:
    """A checkpoint without quantization_config must not hold quantised linears' tensors."""
    from .mxfp4 import PARTS

    suffixes = tuple(s for _, parts, _ in _builders().values() for s in parts) + PARTS
    k = next((k for k in source.keys() if k.endswith(suffixes)), None)
    if k is not None:
        raise CheckpointError(f"{where}: tensor {k!r} belongs to a quantised checkpoint, but config.json has no "
                              f"quantization_config saying which method (ember reads {', '.join(SUPPORTED)})")

