"""`quantization_config` (config.json, or the side file quantize_config.json that older GPTQ
checkpoints carry) → a typed, validated config per method. A bad field is a ConfigError naming it;
a method or variant ember does not read is an UnsupportedModelError listing what it reads."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, UnsupportedModelError

# the quant_method values ember reads (quant_method alone decides which format a checkpoint is)
SUPPORTED = ("compressed-tensors", "gptq", "awq", "fp8", "mxfp4")
SUPPORTED_TEXT = ("compressed-tensors (FP8 per-tensor/per-channel/block, W8A8 int8, W4A16/W8A16 pack-quantized), "
                  "gptq (2/4/8-bit), awq (4-bit GEMM), fp8 (block-wise, weight_scale_inv), "
                  "mxfp4 (GPT-OSS experts, dequantised at load)")
MAX_GROUP = 1 << 20  # the largest group / block size a config may claim


def _unsupported(where: str, what: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{where}: {what}. ember reads these quantised checkpoints: {SUPPORTED_TEXT}")


def _get(qc: dict, key: str, typ: type, default, where: str):
    v = qc.get(key, default)
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise ConfigError(f"{where}: quantization_config.{key} must be {typ.__name__}, got {v!r:.60}")
    return v


def _group_size(v: Any, where: str, field: str) -> int:
    """-1 (one group per row) or a positive size."""
    if not isinstance(v, int) or isinstance(v, bool) or not (v == -1 or 0 < v <= MAX_GROUP):
        raise ConfigError(f"{where}: {field} must be -1 or an integer in 1..{MAX_GROUP}, got {v!r:.60}")
    return v


@dataclass(frozen=True)
class GPTQConfig:
    bits: int
    group_size: int  # -1: one group over all input columns
    desc_act: bool
    sym: bool
    zero_offset: int  # 1 for the v1 checkpoint format (zeros stored minus one), 0 for gptq_v2
    method: str = "gptq"

    def describe(self) -> str:
        g = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        return (f"gptq int{self.bits} {g} {'sym' if self.sym else 'asym'}{' act-order' if self.desc_act else ''}"
                f"{'' if self.zero_offset else ' v2'}")


@dataclass(frozen=True)
class AWQConfig:
    bits: int
    group_size: int
    method: str = "awq"

    def describe(self) -> str:
        return f"awq int{self.bits} g{self.group_size} GEMM"


@dataclass(frozen=True)
class FP8Config:
    block: tuple[int, int] | None  # weight_block_size, or None (one scale per tensor)
    activation_scheme: str
    method: str = "fp8"

    def describe(self) -> str:
        b = f"block {self.block[0]}x{self.block[1]}" if self.block else "per-tensor"
        return f"fp8 e4m3 {b} (weight_scale_inv)"


@dataclass(frozen=True)
class CTScheme:
    """One compressed-tensors config group's weight quantisation."""

    format: str  # pack-quantized | int-quantized | naive-quantized | float-quantized
    type: str  # "int" | "float"
    bits: int
    strategy: str  # tensor | channel | group | block
    group_size: int | None
    block: tuple[int, int] | None
    symmetric: bool
    activations: str | None  # e.g. "float8 dynamic token", for describing only

    def describe(self) -> str:
        w = f"{'fp' if self.type == 'float' else 'int'}{self.bits} {self.strategy}"
        if self.strategy == "group":
            w += f" g{self.group_size}"
        if self.strategy == "block" and self.block:
            w += f" {self.block[0]}x{self.block[1]}"
        w += "" if self.symmetric else " asym"
        return f"{w} ({self.format}{', activations ' + self.activations if self.activations else ''})"


@dataclass(frozen=True)
class CompressedConfig:
    schemes: tuple[CTScheme, ...]
    method: str = "compressed-tensors"

    def describe(self) -> str:
        return "compressed-tensors " + "; ".join(dict.fromkeys(s.describe() for s in self.schemes))


@dataclass(frozen=True)
class MXFP4Config:
    """GPT-OSS: MoE experts as `*_blocks`/`*_scales` (ember.hfquant.mxfp4); the modules listed in
    modules_to_not_convert are plain (they are told apart by their tensors, the list is only read)."""

    not_converted: tuple[str, ...]
    method: str = "mxfp4"

    def describe(self) -> str:
        return "mxfp4 experts (E2M1 codes, an E8M0 scale per 32)"


QuantConfig = GPTQConfig | AWQConfig | FP8Config | CompressedConfig | MXFP4Config


def parse(qc: Any, where: str, side_file: bool = False) -> QuantConfig:
    """The typed config for a `quantization_config` dict (`side_file`: it came from
    quantize_config.json, where GPTQ is the default method)."""
    if not isinstance(qc, dict):
        raise ConfigError(f"{where}: quantization_config must be a JSON object, got {type(qc).__name__}")
    method = qc.get("quant_method", "gptq" if side_file else None)
    if not isinstance(method, str):
        raise ConfigError(f"{where}: quantization_config has no quant_method string (got {method!r:.40})")
    m = method.lower()
    if m == "gptq":
        return _gptq(qc, where)
    if m == "awq":
        return _awq(qc, where)
    if m == "fp8":
        return _fp8(qc, where)
    if m == "compressed-tensors":
        return _compressed(qc, where)
    if m == "bitsandbytes":
        kind = "nf4/fp4" if qc.get("load_in_4bit") else "int8" if qc.get("load_in_8bit") else "4/8-bit"
        raise _unsupported(where, f"a bitsandbytes {kind} checkpoint (quant_method 'bitsandbytes'), which ember does not "
                                  f"read; load the unquantised checkpoint with quantize='int8' or 'int4', or a GGUF file")
    if m == "mxfp4":
        return _mxfp4(qc, where)
    raise _unsupported(where, f"quant_method {method!r:.40} is not supported")


def _gptq(qc: dict, where: str) -> GPTQConfig:
    bits = _get(qc, "bits", int, 4, where)
    if bits == 3:
        raise _unsupported(where, "3-bit GPTQ (codes straddle int32 words) is not supported")
    if bits not in (2, 4, 8):
        raise ConfigError(f"{where}: quantization_config.bits must be 2, 4 or 8 for GPTQ, got {bits}")
    gs = _group_size(qc.get("group_size", 128), where, "quantization_config.group_size")
    desc_act = _get(qc, "desc_act", bool, False, where)
    sym = _get(qc, "sym", bool, True, where)
    fmt = _get(qc, "checkpoint_format", str, "gptq", where).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise _unsupported(where, f"GPTQ checkpoint_format {fmt!r:.40} (ember reads 'gptq' and 'gptq_v2')")
    return GPTQConfig(bits, gs, desc_act, sym, 1 if fmt == "gptq" else 0)


def _mxfp4(qc: dict, where: str) -> MXFP4Config:
    skip = qc.get("modules_to_not_convert") or []
    if not (isinstance(skip, list) and all(isinstance(x, str) for x in skip)):
        raise ConfigError(f"{where}: quantization_config.modules_to_not_convert must be a list of strings, got {skip!r:.60}")
    return MXFP4Config(tuple(skip[:4096]))


def _awq(qc: dict, where: str) -> AWQConfig:
    bits = _get(qc, "bits", int, 4, where)
    if bits != 4:
        raise ConfigError(f"{where}: quantization_config.bits must be 4 for AWQ, got {bits}")
    gs = _group_size(qc.get("group_size", 128), where, "quantization_config.group_size")
    version = _get(qc, "version", str, "gemm", where).lower()
    if version != "gemm":
        raise _unsupported(where, f"AWQ version {version!r:.40} (ember reads the GEMM packing)")
    if not _get(qc, "zero_point", bool, True, where):
        raise _unsupported(where, "AWQ without zero points (zero_point: false)")
    return AWQConfig(bits, gs)


def _pair(v: Any, where: str, field: str) -> tuple[int, int]:
    if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                        and 0 < x <= MAX_GROUP for x in v)):
        raise ConfigError(f"{where}: {field} must be two integers in 1..{MAX_GROUP}, got {v!r:.60}")
    return v[0], v[1]


def _fp8(qc: dict, where: str) -> FP8Config:
    block = qc.get("weight_block_size")
    block = None if block is None else _pair(block, where, "quantization_config.weight_block_size")
    fmt = _get(qc, "fmt", str, "e4m3", where)
    if fmt != "e4m3":
        raise _unsupported(where, f"FP8 format {fmt!r:.20} (ember reads e4m3)")
    act = _get(qc, "activation_scheme", str, "dynamic", where)
    return FP8Config(block, act)


CT_FORMATS = {"pack-quantized": ("int", (4, 8)), "int-quantized": ("int", (8,)), "naive-quantized": ("int", (8,)),
              "float-quantized": ("float", (8,))}
CT_STRATEGIES = ("tensor", "channel", "group", "block")


def _compressed(qc: dict, where: str) -> CompressedConfig:
    if qc.get("sparsity_config") not in (None, {}):
        raise _unsupported(where, "a sparse compressed-tensors checkpoint (sparsity_config)")
    if qc.get("transform_config") not in (None, {}):
        raise _unsupported(where, "a compressed-tensors checkpoint with transforms (transform_config)")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ConfigError(f"{where}: quantization_config.config_groups must be a non-empty object")
    top = qc.get("format")
    schemes = []
    for name, g in list(groups.items())[:256]:
        at = f"{where}: quantization_config.config_groups.{str(name)[:40]}"
        if not isinstance(g, dict):
            raise ConfigError(f"{at} must be an object")
        w = g.get("weights")
        if w is None:
            continue  # activations only: weights stay plain
        if not isinstance(w, dict):
            raise ConfigError(f"{at}.weights must be an object")
        fmt = g.get("format") or top
        if fmt == "dense":
            continue
        if fmt not in CT_FORMATS:
            raise _unsupported(at, f"compressed-tensors format {fmt!r:.40}")
        kind, bits_ok = CT_FORMATS[fmt]
        typ, bits = w.get("type", "int"), w.get("num_bits", 8)
        if typ != kind or bits not in bits_ok:
            raise _unsupported(at, f"{typ!r:.20} {bits!r:.10}-bit weights in format {fmt!r}")
        strategy = w.get("strategy", "tensor")
        if strategy not in CT_STRATEGIES:
            raise _unsupported(at, f"weight strategy {strategy!r:.40} (ember reads {', '.join(CT_STRATEGIES)})")
        gs = block = None
        if strategy == "group":
            gs = _group_size(w.get("group_size"), at, "weights.group_size")
            if gs == -1:
                raise ConfigError(f"{at}: weights.group_size must be positive for the group strategy")
        if strategy == "block":
            block = _pair(w.get("block_structure"), at, "weights.block_structure")
        sym = w.get("symmetric", True)
        if not isinstance(sym, bool):
            raise ConfigError(f"{at}.weights.symmetric must be a boolean, got {sym!r:.40}")
        a = g.get("input_activations")
        act = None
        if isinstance(a, dict):
            act = (f"{'float' if a.get('type') == 'float' else 'int'}{a.get('num_bits')} "
                   f"{'dynamic' if a.get('dynamic') else 'static'} {a.get('strategy')}")[:60]
        schemes.append(CTScheme(fmt, typ, bits, strategy, gs, block, sym, act))
    if not schemes:
        raise ConfigError(f"{where}: quantization_config.config_groups quantises no weights")
    return CompressedConfig(tuple(schemes))
