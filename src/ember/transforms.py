"""Backend transforms: named steps the loading pipeline applies, in order, to a built model.

Layers are built plain from the checkpoint (`ember.nn`): Linear over a float weight, QuantLinear
over GGUF blocks (dequantised slab by slab: the pure-PyTorch reference that runs anywhere). What a
backend wants of them is done here, after the build, never inside a layer's constructor:

  quantize      float Linear -> QuantLinear over Q8_0 / Q4_1 blocks made at load (`quantize=`),
                the rest of the model cast to the compute dtype
  repack        PackedLinear (a quantised HF checkpoint's GPTQ/AWQ/compressed-tensors integer
                weight) -> QuantLinear over Q4_1 / Q8_0 blocks holding the same codes, where a
                kernel for them runs (ember.backends.hfquant)
  fp8-scaled-mm PackedLinear over FP8 (per-tensor/per-channel scales) -> torch._scaled_mm (CUDA 8.9+)
  native-quant  QuantLinear -> ember's native CPU kernel on the blocks (ember.backends.native)
  native-ops    ember.nn.ops (rms_norm, add_rms_norm, silu_mul, decode_attention, the decode blocks
                over GGUF-block projections) on ember's native CPU kernels: registered once per
                process; counts the model's modules that call them (none: the kernels stay unloaded)
  triton-ops    the same ops on CUDA through Triton kernels (ember.backends.triton_ops: decode
                attention that reads only the visible cache columns, fused norms, SiLU·up), in
                front of what was registered before; EMBER_TRITON=0 turns it off
  int4          QuantLinear -> torch's int4 kernel (CPUs with native bf16, when native-quant is off)
  dequantize    QuantLinear marked dense_fallback (no fast form) -> a dense Linear, once
  native-bf16   a bf16 Linear -> the native bf16 GEMV for decode rows (and a causal LM's whole
                decoder layer as one native call); prefill rows on the same plain weight: torch's
                bf16 matmul where the CPU has native bf16, float32 (widened per call) where not.
                One copy of the weights (the checkpoint's mapped pages where it is bf16)
  native-bf16-prepack
                the same, with a oneDNN-prepacked copy for prefill beside the plain weight
                (prepack=True on a CPU with native bf16: 1-4% faster prefill for twice the weights)
  prepack       bf16 Linear -> oneDNN's blocked layout (CPUs with native bf16)
  prepack-f32   an encoder's float32 Linears -> oneDNN's blocked layout, bias, GELU and residual add
                fused (any CPU)
  int16-f32     instead of prepack-f32 where ember's kernels run AVX2 without AVX-512 and the dtype
                was left to ember: an encoder's float32 Linears on 16-bit integer codes (AVX2
                vpmaddwd: 12-bit weights, 14-bit activations per row; ember.backends.int16)

Each step rewrites the module tree in place and says how many modules it changed;
`Loaded.transforms` records the steps that changed something. `EMBER_KERNELS=0` turns the native
steps off (the pure-PyTorch and torch-kernel forms remain).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class Transform:
    name: str
    apply: Callable[[nn.Module], int]  # rewrites the model in place; returns how many modules changed
    why: str = ""


def _native_quant(model: nn.Module) -> int:
    from .backends.native import use_quant_kernels
    from .malloc import reuse_temporaries

    n = use_quant_kernels(model)
    if n:
        reuse_temporaries()  # prefill's activations and MLP chunks (backends.native.MLP_CHUNK_BYTES)
    return n


def _native_ops(model: nn.Module) -> int:
    # a model with no module calling ember.nn.ops (a BERT-style encoder) never loads the native
    # library: its load and op registration are ~30 ms of a first embedding's ~160 ms in ember
    if not _op_callers(model) or not native_kernels(torch.device("cpu")):
        return 0
    from .backends.native import use_native_ops

    return use_native_ops(model)


def _triton_ops(model: nn.Module) -> int:
    from .backends.triton_ops import register_ops

    register_ops()
    return _op_callers(model)


def _op_callers(model: nn.Module) -> int:
    from .nn.layers import RMSNorm

    return sum(1 for m in model.modules()
               if (isinstance(m, RMSNorm) and not m.scale_in_float) or hasattr(m, "num_kv_heads"))


def _int4(model: nn.Module) -> int:
    from .backends.int4 import to_int4

    return to_int4(model)


def _repack(model: nn.Module) -> int:
    from .backends.hfquant import repack

    return repack(model)


def _scaled_mm(model: nn.Module) -> int:
    from .backends.hfquant import to_scaled_mm

    return to_scaled_mm(model)


def _dequantize(model: nn.Module) -> int:
    from .backends import replace_modules
    from .nn.layers import Linear
    from .nn.quantized import QuantLinear

    return replace_modules(model, lambda m: isinstance(m, QuantLinear) and m.dense_fallback,
                           lambda m: Linear(m.dequantized_weight(), m.bias))


def _native_bf16(model: nn.Module) -> int:
    from .backends.native import use_bf16_kernels
    from .malloc import reuse_temporaries

    n = use_bf16_kernels(model)
    if n:
        reuse_temporaries()  # prefill reorders (or widens) each plain bf16 weight per call
    return n


def _native_bf16_prepack(model: nn.Module) -> int:
    from .backends.native import use_bf16_kernels

    return use_bf16_kernels(model, prepack=True)


def _prepack(model: nn.Module) -> int:
    from .backends.onednn import prepack_all

    return prepack_all(model)


def _prepack_f32(model: nn.Module) -> int:
    from .backends.onednn import prepack_all

    return prepack_all(model, torch.float32)


def _int16_f32(model: nn.Module) -> int:
    from .backends.int16 import use_int16

    return use_int16(model)


def quantize_step(mode: str, dtype: torch.dtype) -> Transform:
    def run(model: nn.Module) -> int:
        from .quantize import quantize_linears

        n = quantize_linears(model, mode)
        model.to(dtype)  # norms, embeddings, biases: the compute dtype (the blocks are uint8 and stay)
        return n

    return Transform(f"quantize-{mode}", run, f"weights quantised at load ({mode})")


REPACK = Transform("repack", _repack, "quantised HF integer weights as GGUF blocks (the same codes) for the kernels")
FP8_SCALED_MM = Transform("fp8-scaled-mm", _scaled_mm, "FP8 weights on torch._scaled_mm (CUDA)")
NATIVE_QUANT = Transform("native-quant", _native_quant, "GGUF blocks on ember's native CPU kernels")
NATIVE_OPS = Transform("native-ops", _native_ops, "norms, SwiGLU and decode attention on ember's native CPU kernels")
TRITON_OPS = Transform("triton-ops", _triton_ops, "norms, SwiGLU and live-token decode attention as Triton kernels (CUDA)")
INT4 = Transform("int4", _int4, "GGUF blocks repacked for torch's int4 CPU kernel (native bf16 CPUs)")
DEQUANTIZE = Transform("dequantize", _dequantize, "quantised linears with no fast form dequantised once")
NATIVE_BF16 = Transform("native-bf16", _native_bf16, "bf16 weights on the native GEMV for decode, plain for prefill")
NATIVE_BF16_PREPACK = Transform("native-bf16-prepack", _native_bf16_prepack,
                                "bf16 weights per phase: decode on the native GEMV (one native call a layer), "
                                "prefill on a oneDNN-prepacked copy (CPUs with native bf16)")
PREPACK = Transform("prepack", _prepack, "oneDNN blocked-layout bf16 weights (CPUs with native bf16)")
PREPACK_F32 = Transform("prepack-f32", _prepack_f32, "an encoder's float32 weights in oneDNN's blocked layout, "
                        "bias, GELU and residual add fused")

INT16_F32 = Transform("int16-f32", _int16_f32, "an encoder's float32 Linears on 16-bit integer codes (AVX2 "
                      "vpmaddwd, CPUs without AVX-512)")


def scaled_mm_available(device: torch.device) -> bool:
    from .backends.hfquant import scaled_mm_available as f

    return f(device)


def native_kernels(device: torch.device) -> bool:
    """Whether ember's native CPU kernels serve `device` (a CPU where they build and load)."""
    if device.type != "cpu":
        return False
    from .backends.native import available

    return available()


def triton_kernels() -> bool:
    from .backends.triton_ops import available

    return available()


def bf16_native() -> bool:
    from .backends.onednn import bf16_native as f

    return f()


def int16_encoder() -> bool:
    from .backends.int16 import enabled

    return enabled()


def plan(task: str, dtype: torch.dtype, device: torch.device, *, prepack: bool | None = None,
         quantized: bool = False, quantize: str | None = None, int16: bool = False) -> list[Transform]:
    """The steps for a model of `task` computing in `dtype` on `device`.

    quantized: the model holds GGUF blocks or a quantised HF checkpoint's packed weights (the
    quantised steps are planned). quantize: "int8" or
    "int4", quantise the float Linears first (the model computes in `dtype` after). prepack: oneDNN
    prepacked bf16 Linears on CPU; None = where the CPU has native bf16; False when the model will
    be torch.compile'd (Inductor prepacks itself); for float32 encoders None means on.
    int16: a float32 encoder may compute on 16-bit integer codes where ember's kernels run AVX2
    without AVX-512 (the loader passes True when the dtype was not asked for: ember's default, as
    bf16 matmuls are on CPUs with native bf16).
    """
    steps = []
    cpu = device.type == "cpu"
    if quantize:
        steps.append(quantize_step(quantize, dtype))
        quantized = True
    if quantized:
        int4 = False
        if cpu and dtype == torch.bfloat16 and bf16_native():
            from .backends.int4 import int4_kernel_available

            int4 = int4_kernel_available()
        if native_kernels(device) or int4:
            steps.append(REPACK)
        if scaled_mm_available(device):
            steps.append(FP8_SCALED_MM)
        if native_kernels(device):
            steps.append(NATIVE_QUANT)
        if int4:
            steps.append(INT4)
        steps.append(DEQUANTIZE)
    if cpu:
        steps.append(NATIVE_OPS)  # loads the kernels only for a model that calls the ops
    if device.type == "cuda" and triton_kernels():
        steps.append(TRITON_OPS)
    if cpu and dtype == torch.bfloat16 and task in ("causal-lm", "encoder"):
        if bf16_native():
            if prepack is not False and task == "causal-lm" and native_kernels(device):
                # decode streams the plain weight; a prepacked prefill copy only when asked for
                # (measured on SmolLM2, 512-token prefill: 299 vs 312 ms best, 315 vs 319 median)
                steps.append(NATIVE_BF16_PREPACK if prepack else NATIVE_BF16)
            elif prepack is not False:
                steps.append(PREPACK)
        elif native_kernels(device):
            steps.append(NATIVE_BF16)
    if cpu and dtype == torch.float32 and task == "encoder" and prepack is not False:
        steps.append(INT16_F32 if int16 and int16_encoder() else PREPACK_F32)
    return steps


def apply(model: nn.Module, steps: list[Transform]) -> list[str]:
    """Run `steps` in order; the names of those that changed something."""
    done = []
    for step in steps:
        if step.apply(model):
            done.append(step.name)
    return done
