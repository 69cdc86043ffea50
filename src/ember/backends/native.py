"""ember's own CPU kernels (`ember.kernels`: AVX2 / AVX-512 / VNNI paths, built on first use) behind
layers: the `native` transforms' backend.

- `NativeQuantLinear`: a GGUF linear computed on its blocks as they are in the file (activations
  quantised to int8 blocks and dotted in integer arithmetic, as llama.cpp does): weights stay
  quantised in memory at any model size, and decode streams them at memory bandwidth.
- `NativeBf16Linear`: a bf16 linear: decode rows stream the bf16 weight through the native GEMV
  (vdpbf16ps with AVX512-BF16, widen + FMA otherwise); prefill (many rows, compute-bound) runs on a
  oneDNN-prepacked copy on CPUs with native bf16, else multiplies in float32 (AVX2). Their
  weights live in one transparent-huge-page region (`huge_page_weights`).
- the decoder-layer op (`ops.decoder_layer`) as one native call per decode token, over GGUF-block
  projections (`quant_decoder_layer`) or bf16 ones (`bf16_decoder_layer`).
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels as _kernels
from ..io.ggml_weight import GGMLWeight
from ..nn import ops
from ..nn.layers import Linear
from ..nn.quantized import QuantLinear
from . import replace_modules


_F32_BF16 = (torch.float32, torch.bfloat16)
_ops: dict = {}


def _ggml_mm():
    """torch.ops.ember.ggml_mm.default, looked up once (the attribute chain costs ~1 us a call)."""
    op = _ops.get("ggml_mm")
    if op is None:
        op = _ops["ggml_mm"] = torch.ops.ember.ggml_mm.default
    return op


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether ember's native kernels run here (a CPU build of them loaded; EMBER_KERNELS=0 says no)."""
    import os

    if os.environ.get("EMBER_KERNELS", "1") == "0":
        return False
    from .. import kernels

    return kernels.available()


def isa() -> str:
    from .. import kernels

    return kernels.isa() if available() else "none"


class NativeQuantLinear(nn.Module):
    """y = x W^T + b with W as GGUF blocks, on ember's native kernel."""

    def __init__(self, q: QuantLinear):
        super().__init__()
        self.ggml_type, self.out_features, self.in_features = q.ggml_type, q.out_features, q.in_features
        self.compute_dtype = q.compute_dtype
        self.bias = q.bias
        data = q.qweight
        if data.dim() != 2 or not data.is_contiguous():
            data = data.reshape(self.out_features, -1).contiguous()
        self.register_buffer("qweight", data, persistent=False)
        from .. import kernels

        # the ISA the kernels run at, fixed when the model is built (EMBER_CPU_ISA / use_isa then)
        self.isa = kernels.ISAS.index(kernels.isa())

    @property
    def weight(self) -> GGMLWeight:
        return GGMLWeight(self.qweight, self.ggml_type, (self.out_features, self.in_features), dtype=self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if x.is_cpu and (dtype is torch.float32 or dtype is torch.bfloat16) and not torch.compiler.is_compiling():
            # the op straight away on x [..., K] (no reshape, no checks in Python): a 135M model makes
            # 121 of these calls a decode token, and each Python-side step costs about a microsecond
            y = _ggml_mm()(x, self.qweight, self.ggml_type, self.out_features, self.isa)
        else:
            from ..kernels import ggml_linear

            y = ggml_linear(x, self.qweight, self.ggml_type, self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        from ..io import ggml

        return (f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
                f"{ggml.type_name(self.ggml_type)} native")


class NativeBf16Linear(nn.Module):
    """A bf16 Linear computed per phase: decode rows (up to kernels.BF16_MAX_ROWS) stream the bf16
    weight through the native GEMV; more rows (prefill, compute-bound) go to `prefill` when set (a
    oneDNN-prepacked copy, on CPUs with native bf16, prepack=True), else to F.linear on the same
    weight: in bf16 where the CPU has native bf16 (AMX / AVX512-BF16), else in float32 (the bf16
    weight widened per call: AVX2 has no bf16 FMA, and this is cheap beside a many-row matmul)."""

    def __init__(self, lin: Linear, prepack: bool = False):
        super().__init__()
        from .onednn import bf16_native

        self.weight, self.bias = lin.weight, lin.bias
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.bf16_prefill = bf16_native()
        self.prefill = None
        if prepack:
            from .onednn import PrepackedLinear

            self.prefill = PrepackedLinear(lin, release=False)  # the plain weight stays: decode reads it
            self.prefill.decode_reads = False  # not streamed by a decode step (engine.bench.weight_bytes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..kernels import BF16_MAX_ROWS, bf16_linear

        rows = x.numel() // max(x.shape[-1], 1)
        if rows <= BF16_MAX_ROWS:
            y = bf16_linear(x, self.weight)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        if self.prefill is not None and x.dtype == self.weight.dtype:
            return self.prefill(x)
        if self.bf16_prefill and x.dtype == self.weight.dtype:
            return F.linear(x, self.weight, self.bias)
        y = F.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, bf16 native"
                + (", prefill prepacked" if self.prefill is not None else
                   ", prefill bf16" if self.bf16_prefill else ", prefill float32"))


def use_quant_kernels(model: nn.Module) -> int:
    """Every CPU QuantLinear of a type the native kernels run becomes a NativeQuantLinear."""
    from ..kernels import supported

    if not available():
        return 0
    return replace_modules(model, lambda m: isinstance(m, QuantLinear) and m.qweight.device.type == "cpu"
                    and supported(m.ggml_type), NativeQuantLinear)


def use_bf16_kernels(model: nn.Module, prepack: bool = False) -> int:
    """Every CPU bf16 Linear becomes a NativeBf16Linear (prepack: its prefill rows on a
    oneDNN-prepacked copy, where oneDNN has bf16 here)."""
    if not available():
        return 0
    if prepack:
        from .onednn import can_prepack

        prepack = can_prepack(torch.bfloat16)
    n = replace_modules(model, lambda m: isinstance(m, Linear) and m.weight.dtype == torch.bfloat16
                        and m.weight.device.type == "cpu", lambda m: NativeBf16Linear(m, prepack))
    if n:
        huge_page_weights(model)
    return n


def huge_page_weights(model: nn.Module) -> int:
    """The NativeBf16Linears' weights (what a decode step streams) copied into one region backed
    by transparent huge pages (`huge_page_copies`), every parameter or buffer of `model` that was
    one of them (a tied embedding) re-pointed at its copy as soon as it is made, and the original
    let go then: a checkpoint mapping's resident pages dropped (`io.safetensors.release_view`: the
    page cache keeps them), an anonymous one (a fused projection) freed. A load so holds both forms
    of one weight at a time, never of all. Returns the bytes moved; 0 where huge pages are not to
    be had here, the weights then staying where they are."""
    from ..io.safetensors import release_view

    tensors, refs = _decode_weights(model)

    def moved(old: torch.Tensor, new: torch.Tensor) -> None:
        param = None  # one Parameter per copy: tied weights stay one object
        for store, name in refs.pop(old.data_ptr()):
            if isinstance(store[name], nn.Parameter):
                param = param if param is not None else nn.Parameter(new, requires_grad=False)
                store[name] = param
            else:
                store[name] = new
        release_view(old)

    return huge_page_copies(tensors, moved)


def _decode_weights(model: nn.Module) -> tuple[list, dict]:
    """The NativeBf16Linears' distinct contiguous weights, and where each is held: {data_ptr:
    [(a module's _parameters or _buffers, name)]} (a tied embedding too)."""
    olds, refs = {}, {}
    for m in model.modules():
        w = m.weight if type(m) is NativeBf16Linear else None
        if w is not None and w.is_contiguous() and not w.requires_grad and w.data_ptr() not in olds:
            olds[w.data_ptr()] = w
    for m in model.modules():
        for store in (m._parameters, m._buffers):
            for name, t in store.items():  # (a oneDNN-prepacked copy is an opaque tensor: no data pointer)
                ptr = None if t is None or t.layout != torch.strided or t.is_mkldnn else t.data_ptr()
                if ptr in olds and t.shape == olds[ptr].shape and t.dtype == olds[ptr].dtype and t.is_contiguous():
                    refs.setdefault(ptr, []).append((store, name))
    return list(olds.values()), refs


def huge_page_copies(tensors: list, moved: Callable) -> int:
    """Each of `tensors` (contiguous CPU tensors, not needing grad) copied into one region backed by
    transparent huge pages, at a 64-byte boundary, and handed with its copy to `moved(old, new)`;
    the list's entries are cleared as they go (the caller's other references decide when an old
    one is freed). Returns the bytes copied; 0, with nothing done, where huge pages are not to be
    had here (ember.malloc.huge_pages) or the tensors fill less than one. A core streams weights
    through 4 KiB pages (a checkpoint's mmap, ordinary allocations) ~30% slower: its prefetcher
    stops at every page boundary, and each page costs a TLB walk (benchmarks/bench_bf16_gemv.py)."""
    from ..malloc import HUGE_PAGE, advise_huge, huge_pages

    if not tensors or not huge_pages():
        return 0
    offsets, total = [], 0
    for w in tensors:
        offsets.append(total)
        total += -(-w.numel() * w.element_size() // 64) * 64
    if total < HUGE_PAGE:
        return 0
    span = -(-total // HUGE_PAGE) * HUGE_PAGE  # whole huge pages (the last one partly filled)
    region = torch.empty(span + HUGE_PAGE, dtype=torch.uint8)  # untouched (a fresh mmap): advise first
    base = -region.data_ptr() % HUGE_PAGE
    if not advise_huge(region.data_ptr() + base, span):
        return 0
    import ctypes

    done = 0
    for i, o in enumerate(offsets):
        w, tensors[i] = tensors[i], None
        n = w.numel() * w.element_size()
        t = region[base + o:base + o + n].view(w.dtype).view(w.shape)
        # one memcpy on this thread: copy_ would be a parallel region per tensor, and a pool thread
        # that a busy machine has descheduled holds each one up (a load took a second longer so)
        ctypes.memmove(t.data_ptr(), w.data_ptr(), n)
        moved(w, t)
        done += n
        del w
    return done


# ---- the small ops of a decoder step (ember.nn.ops) on ember's native kernels ------------------
# Each wrapper takes what the default takes and hands anything the kernel does not cover (another
# device or dtype, autograd, an odd mask) to the pure-PyTorch default.
# (the checks run on every call, ~100 a decode token: x.is_cpu, not x.device.type, which makes a device object)
def _native_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype not in _F32_BF16 or weight.dtype not in _F32_BF16 or not x.is_cpu or (
            x.requires_grad and torch.is_grad_enabled()):
        return ops.default("rms_norm")(x, weight, eps)
    return torch.ops.ember.rms_norm.default(x, weight, eps, _kernels._isa_index())


def _native_add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    if (x.dtype not in _F32_BF16 or delta.dtype is not x.dtype or weight.dtype not in _F32_BF16 or not x.is_cpu
            or x.shape != delta.shape or (torch.is_grad_enabled() and (x.requires_grad or delta.requires_grad))):
        return ops.default("add_rms_norm")(x, delta, weight, eps)
    return torch.ops.ember.add_rms_norm.default(x, delta, weight, eps, _kernels._isa_index())


def _native_silu_mul(gu) -> torch.Tensor:
    if isinstance(gu, torch.Tensor):
        g, u = gu, None
    else:
        g, u = gu
    if (g.dtype not in _F32_BF16 or not g.is_cpu or (u is not None and (u.dtype != g.dtype or u.shape != g.shape))
            or (torch.is_grad_enabled() and (g.requires_grad or (u is not None and u.requires_grad)))):
        return ops.default("silu_mul")(gu)
    return torch.ops.ember.silu_mul.default(g, u, _kernels._isa_index())


def _native_decode_attention(q, k, v, mask, scale=None):
    if (q.dtype not in _F32_BF16 or k.dtype != q.dtype or v.dtype != q.dtype or q.device.type != "cpu"
            or (mask is not None and (mask.dim() > 4 or (mask.dim() >= 2 and mask.shape[-2] != 1)
                                      or (mask.dim() == 4 and mask.shape[1] != 1)
                                      or mask.dtype not in (torch.bool, torch.float32, torch.bfloat16)))
            or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))):
        return ops.default("decode_attention")(q, k, v, mask, scale)
    return torch.ops.ember.decode_attention.default(q, k, v, mask, q.shape[-1] ** -0.5 if scale is None else scale,
                                                    _kernels._isa_index())


def _native_rope_cache_attention(qkv, cos, sin, k_cache, v_cache, pos, heads, scale=None):
    if (qkv.dtype not in _F32_BF16 or k_cache.dtype != qkv.dtype or v_cache.dtype != qkv.dtype or qkv.device.type != "cpu"
            or cos.dtype not in _F32_BF16 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1
            or (torch.is_grad_enabled() and qkv.requires_grad)):
        return ops.default("rope_cache_attention")(qkv, cos, sin, k_cache, v_cache, pos, heads, scale)
    return torch.ops.ember.rope_cache_attention.default(qkv, cos, sin, k_cache, v_cache, pos, heads,
                                                        k_cache.shape[-1] ** -0.5 if scale is None else scale,
                                                        _kernels._isa_index())


def _quant_pair(a, b) -> bool:
    """Both layers NativeQuantLinears without bias, on one ISA: the fused native calls can run them."""
    return (type(a) is NativeQuantLinear and type(b) is NativeQuantLinear and a.bias is None and b.bias is None
            and a.isa == b.isa)


# a prefill's MLP runs in row chunks whose gate/up output stays under this many bytes: a 1.5B model's
# 512-token [512, 17920] float32 output would be 37 MB (and its SwiGLU 18 MB), each a fresh mapping
# faulted in page by page every layer (over glibc's mmap threshold, see ember.malloc); chunks of
# 8 MiB or less are reused from the heap, and the peak holds the smaller chunk instead of the whole
MLP_CHUNK_BYTES = 8 << 20


def _native_swiglu_mlp(x, gate_up, down) -> torch.Tensor:
    if (not _quant_pair(gate_up, down) or not x.is_cpu or x.dtype not in _F32_BF16 or torch.compiler.is_compiling()
            or (x.requires_grad and torch.is_grad_enabled())):
        return ops.default("swiglu_mlp")(x, gate_up, down)
    args = (gate_up.qweight, gate_up.ggml_type, gate_up.out_features, down.qweight, down.ggml_type, down.out_features,
            gate_up.isa, _kernels._isa_index())
    K = x.shape[-1]
    rows = x.numel() // max(K, 1)
    chunks = 1 if rows <= 32 else -(-rows // max(32, MLP_CHUNK_BYTES // (4 * gate_up.out_features)))
    if chunks == 1:  # a decode token, a short prompt
        return torch.ops.ember.quant_swiglu.default(x, *args)
    # equal chunks of at least 16 rows: each takes the many-row kernels, as the whole would (the same
    # values: rows are independent)
    x2, out = x.reshape(rows, K), torch.empty(rows, down.out_features, dtype=x.dtype)
    for c in range(chunks):
        r0, r1 = rows * c // chunks, rows * (c + 1) // chunks
        out[r0:r1] = torch.ops.ember.quant_swiglu.default(x2[r0:r1], *args)
    return out.view(*x.shape[:-1], down.out_features)


def _native_rope_cache_attention_block(x, qkv, o_proj, cos, sin, k_cache, v_cache, pos, heads, scale=None):
    if (not _quant_pair(qkv, o_proj) or not x.is_cpu or x.dtype not in _F32_BF16 or k_cache.dtype != x.dtype
            or v_cache.dtype != x.dtype or cos.dtype not in _F32_BF16 or k_cache.stride(-1) != 1
            or v_cache.stride(-1) != 1 or torch.compiler.is_compiling() or (x.requires_grad and torch.is_grad_enabled())):
        return ops.default("rope_cache_attention_block")(x, qkv, o_proj, cos, sin, k_cache, v_cache, pos, heads, scale)
    return torch.ops.ember.quant_rope_cache_attention.default(
        x, qkv.qweight, qkv.ggml_type, qkv.out_features, cos, sin, k_cache, v_cache, pos, heads,
        k_cache.shape[-1] ** -0.5 if scale is None else scale, o_proj.qweight, o_proj.ggml_type, o_proj.out_features,
        qkv.isa, _kernels._isa_index())


def _bf16_pair(a, b) -> bool:
    """Both layers NativeBf16Linears without bias: the fused native calls can run them."""
    return type(a) is NativeBf16Linear and type(b) is NativeBf16Linear and a.bias is None and b.bias is None


def _native_decoder_layer(x, pending, w1, eps1, qkv, o_proj, cos, sin, k_cache, v_cache, pos, heads, scale, w2, eps2,
                          gate_up, down):
    dtype = x.dtype
    quant = _quant_pair(qkv, o_proj) and _quant_pair(gate_up, down) and qkv.isa == gate_up.isa
    bf16 = not quant and _bf16_pair(qkv, o_proj) and _bf16_pair(gate_up, down)
    if (not (quant or bf16) or not x.is_cpu
            or dtype not in _F32_BF16 or pending.dtype is not dtype or x.shape != pending.shape
            or w1.dtype not in _F32_BF16 or w2.dtype not in _F32_BF16
            or k_cache.dtype is not dtype or v_cache.dtype is not dtype or cos.dtype not in _F32_BF16
            or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or torch.compiler.is_compiling()
            or (torch.is_grad_enabled() and (x.requires_grad or pending.requires_grad))):
        return ops.default("decoder_layer")(x, pending, w1, eps1, qkv, o_proj, cos, sin, k_cache, v_cache, pos, heads,
                                            scale, w2, eps2, gate_up, down)
    if scale is None:
        scale = k_cache.shape[-1] ** -0.5
    if bf16:
        return torch.ops.ember.bf16_decoder_layer.default(
            x, pending, w1, eps1, qkv.weight, cos, sin, k_cache, v_cache, pos, heads, scale, o_proj.weight, w2, eps2,
            gate_up.weight, down.weight, _kernels._isa_index())
    return torch.ops.ember.quant_decoder_layer.default(
        x, pending, w1, eps1, qkv.qweight, qkv.ggml_type, qkv.out_features, cos, sin, k_cache, v_cache, pos, heads,
        scale, o_proj.qweight, o_proj.ggml_type, o_proj.out_features,
        w2, eps2, gate_up.qweight, gate_up.ggml_type, gate_up.out_features, down.qweight, down.ggml_type,
        down.out_features, qkv.isa, _kernels._isa_index())


NATIVE_OPS = {
    "rms_norm": _native_rms_norm,
    "add_rms_norm": _native_add_rms_norm,
    "silu_mul": _native_silu_mul,
    "decode_attention": _native_decode_attention,
    "rope_cache_attention": _native_rope_cache_attention,
    "swiglu_mlp": _native_swiglu_mlp,
    "rope_cache_attention_block": _native_rope_cache_attention_block,
    "decoder_layer": _native_decoder_layer,
}


def register_ops() -> int:
    """Register the native implementations of ember.nn.ops (once per process; a no-op where the
    kernels do not build or EMBER_KERNELS=0). Returns how many ops were registered now."""
    if not available():
        return 0
    n = 0
    for name, fn in NATIVE_OPS.items():
        if ops.current(name) is not fn:
            ops.register(name, fn)
            n += 1
    return n


def use_native_ops(model: nn.Module) -> int:
    """register_ops(); the number of `model`'s modules that call the ops (plain-form RMSNorms and
    attention blocks), 0 when the kernels are unavailable."""
    from ..nn.layers import RMSNorm

    if not available():
        return 0
    register_ops()
    return sum(1 for m in model.modules()
               if (isinstance(m, RMSNorm) and not m.scale_in_float) or hasattr(m, "num_kv_heads"))
