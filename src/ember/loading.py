"""The loading pipeline behind `ember.load`: one path for every weight format.

    hub.resolve ─► open the weights (safetensors | PyTorch pickle | GGUF): `open_checkpoint`
                ─► registry entry ─► config (typed, validated)
                ─► build Model(cfg, vb) through the VarBuilder: `build`
                ─► transforms, in order (ember.transforms: prepack ...)
                ─► Loaded

Each stage knows only the one below it. A GGUF file differs only in where its config dict, its
tokenizer and its generation defaults come from (the metadata, read by the family's own mapping)
and in whether its quantised weights stay as blocks; everything after that is shared.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import registry, transforms
from .config import load_json
from .errors import ArgumentError, CheckpointError, ConfigError, UnsupportedModelError
from .hub import Snapshot
from .varbuilder import DictSource, SafetensorsSource, TensorSource, VarBuilder

log = logging.getLogger("ember")

# Checkpoint tensors that are fine to leave unused (buffers older transformers saved).
IGNORABLE_UNUSED = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias$|\.attn\.bias$|position_ids$)")


@dataclass
class Loaded:
    """What the pipeline hands to `LLM` / `Embedder`."""

    snapshot: Snapshot
    entry: registry.Entry
    config: Any
    model: torch.nn.Module
    tokenizer: Any
    generation_config: dict
    dtype: torch.dtype
    device: torch.device
    quantized: bool = False  # GGUF blocks or a quantised HF checkpoint's packed tensors kept in memory
    load_mode: str = ""  # what was done with quantised weights, in words (GGUF) / the quantisation (HF)
    transforms: tuple[str, ...] = ()  # the backend transforms that ran, in order
    tp: Any = None  # the tensor-parallel group the model is split over (ember.distributed), or None


# ---- dtype -------------------------------------------------------------------------------------
def cpu_bf16_fast() -> bool:
    """Whether this CPU has native bf16 matmuls (AVX512-BF16/AMX): then bf16 is the fast CPU dtype."""
    return transforms.bf16_native()


def default_dtype(device: torch.device, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
    """bf16 on CUDA; on CPU the checkpoint's dtype, except 16-bit types the CPU computes slowly (→ f32).
    A bf16 checkpoint stays bf16 on a CPU without native bf16 when ember's native kernels run there:
    decode streams the bf16 weights (half the bytes of f32) and prefill widens them per matmul."""
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "mps":
        return torch.float16
    if checkpoint_dtype == torch.bfloat16 and not cpu_bf16_fast():
        return torch.bfloat16 if transforms.native_kernels(device) else torch.float32
    if checkpoint_dtype == torch.float16:
        return torch.bfloat16 if cpu_bf16_fast() else torch.float32
    if checkpoint_dtype in (torch.float32, torch.bfloat16):
        return checkpoint_dtype
    return torch.float32


def _dtype_from_config(raw: dict) -> torch.dtype | None:
    name = raw.get("dtype") or raw.get("torch_dtype")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(name) if isinstance(name, str) else None


def _first_float_dtype(source) -> torch.dtype | None:
    for k in source.keys():
        dt = source.dtype(k) if hasattr(source, "dtype") else None
        if isinstance(dt, torch.dtype) and dt.is_floating_point and dt.itemsize >= 2:  # not FP8 codes
            return dt
    return None


def int4_fast(device: torch.device) -> bool:
    """Whether torch's int4 kernel runs quantised 4/5/8-bit weights fast here: a CPU with native
    bf16 (used where ember's native kernels are unavailable)."""
    from .backends.int4 import int4_kernel_available

    return device.type == "cpu" and int4_kernel_available() and cpu_bf16_fast()


# ---- stage 1: the weights and what they say about the model ------------------------------------
@dataclass
class Checkpoint:
    """An opened checkpoint before the model is built: its config dict and registry entry, and how
    to get its tokenizer, generation defaults and tensor source."""

    snapshot: Snapshot
    raw: dict  # the config.json-style dict (from GGUF metadata for a GGUF file)
    entry: registry.Entry
    generation_config: dict
    tokenizer: Callable[[], Any]
    source: Callable[..., TensorSource]  # source(dtype, device, keep_quantized) -> (source, Loaded fields)
    checkpoint_dtype: torch.dtype | None = None
    close: Callable[[], None] = field(default=lambda: None)
    quantization: str = ""  # a quantised HF checkpoint's method and scheme, in words


def open_checkpoint(snap: Snapshot) -> Checkpoint:
    if snap.format == "gguf":
        return _open_gguf(snap)
    if snap.format in ("safetensors", "pytorch"):
        return _open_hf(snap)
    raise CheckpointError(f"unsupported weight format {snap.format!r}")


def _open_hf(snap: Snapshot) -> Checkpoint:
    from . import hfquant

    if snap.config is None:
        raise ConfigError(f"{snap.root}: no config.json beside the weights")
    raw = load_json(snap.config)
    entry = registry.lookup(raw)
    quant = hfquant.read_config(raw, snap.file, str(snap.root))  # GPTQ, AWQ, FP8, compressed-tensors, MXFP4
    if snap.format == "safetensors":
        source: TensorSource = SafetensorsSource(snap.weights)
    else:
        from .io.torch_pickle import read_state_dicts

        source = DictSource(read_state_dicts(snap.weights), name=", ".join(p.name for p in snap.weights))
    if quant is None:
        hfquant.check_no_quantized_tensors(source, str(snap.root))
        checkpoint_dtype = _first_float_dtype(source) or _dtype_from_config(raw)
    else:
        source = hfquant.open_source(source, quant, str(snap.root))
        checkpoint_dtype = _dtype_from_config(raw) or _first_float_dtype(source)

    def tokenizer():
        if snap.file("tokenizer.json") is None and snap.file("tokenizer.model") is not None:
            from .spm_tokenizer import tokenizer_from_folder

            return tokenizer_from_folder(snap.root)
        if snap.file("tokenizer.json") is None:
            log.warning("%s has no tokenizer.json: text in/out is unavailable, token ids only", snap.root)
            return None
        from .tokenizer import Tokenizer

        return Tokenizer.from_dir(snap.root)

    def make_source(dtype, device, keep_quantized):
        if quant is None:
            return source, {}
        if source.always_dense and keep_quantized:
            raise UnsupportedModelError(f"{snap.root}: keep_quantized=True, but ember dequantises this checkpoint's "
                                        f"weights at load ({quant.describe()}); leave keep_quantized unset")
        if keep_quantized is False or source.always_dense:  # dequantised at load: plain speed, plain memory
            source.dense = True
            return source, {"quantized": False, "load_mode": f"{quant.describe()}, dequantised at load"}
        return source, {"quantized": True, "load_mode": quant.describe()}

    return Checkpoint(snap, raw, entry, _generation_config(snap), tokenizer, make_source, checkpoint_dtype,
                      quantization=quant.describe() if quant is not None else "")


def gguf_config(f) -> dict:
    """The config dict ember derives from a GGUF file's metadata (what its config.json would say)."""
    from .gguf_source import Meta, architecture

    from .mmproj import refuse_alone

    refuse_alone(f)
    arch = architecture(f)
    entry = registry.lookup_gguf(arch, str(f.path))
    return entry.gguf_mapping(arch).config(Meta(f, arch))


def describe_gguf(path) -> dict:
    """What `ember inspect FILE.gguf` prints (ember.io.gguf.describe_gguf with ember's config)."""
    from .io.gguf import describe_gguf as describe

    return describe(path, config_of=gguf_config)


def _open_gguf(snap: Snapshot) -> Checkpoint:
    from . import gguf_source
    from .io.gguf import GGUFFile

    if len(snap.weights) != 1:
        raise CheckpointError(f"{snap.root}: a GGUF model is one file, got {len(snap.weights)} "
                              f"(split GGUF files are not supported; merge them with llama-gguf-split)")
    f = GGUFFile(snap.weights[0])
    from .mmproj import refuse_alone

    refuse_alone(f)
    arch = gguf_source.architecture(f)
    entry = registry.lookup_gguf(arch, str(f.path))
    for info in f.tensors.values():  # refuse unknown/unsupported types before building anything
        f.check_supported(info.name)
    mapping = entry.gguf_mapping(arch)
    try:
        raw = mapping.config(gguf_source.Meta(f, arch))
        entry = registry.lookup(raw)
    except (ConfigError, UnsupportedModelError) as e:
        raise type(e)(e if str(f.path) in str(e) else f"{f.path}: {e}") from None

    def tokenizer():
        if not isinstance(f.metadata.get("tokenizer.ggml.tokens"), list):
            log.warning("%s has no tokenizer in its metadata: text in/out is unavailable, token ids only", f.path)
            return None
        from .gguf_tokenizer import tokenizer_from_gguf

        tok = tokenizer_from_gguf(f.metadata, path=f.path)
        # building a large vocabulary's tokenizer needs ~70 MB of temporaries: hand them back before
        # the weights are resident, not on top of them
        gguf_source.release_free_memory()
        return tok

    def make_source(dtype, device, keep_quantized):
        plan = gguf_source.plan_quantized(f, dtype, device, keep_quantized, default_dtype, int4_fast(device),
                                          transforms.native_kernels(device))
        src = gguf_source.GGUFSource(f, mapping, raw, quantized=plan.keep, dtype=plan.dtype,
                                     dense_fallback=plan.dense_fallback)
        return src, {"dtype": plan.dtype, "quantized": plan.keep, "load_mode": plan.mode}

    def close():
        gguf_source.release_free_memory()

    return Checkpoint(snap, raw, entry, gguf_source.generation_config(f), tokenizer, make_source,
                      gguf_source.file_float_dtype(f), close)


def _generation_config(snap: Snapshot) -> dict:
    p = snap.file("generation_config.json")
    if p is None:
        return {}
    try:
        return load_json(p)
    except ConfigError as e:
        log.warning("ignoring generation_config.json: %s", e)
        return {}


def eos_ids(*sources: Any) -> list[int]:
    """EOS ids gathered from config/generation_config values (int or list) and the tokenizer."""
    out: list[int] = []
    for v in sources:
        vals = v if isinstance(v, list) else [v]
        for x in vals:
            if isinstance(x, int) and not isinstance(x, bool) and x >= 0 and x not in out:
                out.append(x)
    return out


# ---- stage 2: the model ------------------------------------------------------------------------
def build(entry: registry.Entry, cfg, vb: VarBuilder, **kw) -> torch.nn.Module:
    """The model class for `entry` built from (cfg, vb), plain (no backend transform), with the
    checkpoint tensors no layer used reported."""
    _, model_cls = entry.load()
    # .to() moves only what a family left elsewhere (buffers such as rotary tables); weights are already there.
    model = model_cls(cfg, vb, **kw).eval().to(vb.device)
    unused = [k for k in vb.unused() if not IGNORABLE_UNUSED.search(k)]
    heads = getattr(model, "ignore_unused", None)  # task heads a model leaves unused on purpose (encoders)
    if heads is not None and any(heads.search(k) for k in unused):
        log.info("not used (task heads): %s", ", ".join(k for k in unused if heads.search(k))[:300])
        unused = [k for k in unused if not heads.search(k)]
    if unused:
        more = f" (+{len(unused) - 8} more)" if len(unused) > 8 else ""
        log.warning("%d checkpoint tensors were not used: %s%s", len(unused), ", ".join(unused[:8]), more)
    return model


QUANTIZE_MODES = ("int8", "int4")


def load_snapshot(snap: Snapshot, dtype: torch.dtype | None = None, device: str | torch.device | None = None, *,
                  keep_quantized: bool | None = None, fuse: bool = True, prepack: bool | None = None,
                  quantize: str | None = None, tp: int | None = None, mmproj=None) -> Loaded:
    """The whole pipeline for a resolved snapshot.

    keep_quantized (GGUF, quantised HF checkpoints): keep quantised weights as blocks / packed tensors
    (True), dequantise at load (False), or decide (None; a quantised HF checkpoint stays packed).
    fuse (causal LMs): fuse q/k/v and gate/up at build. prepack: the oneDNN prepack
    transform on CPU bf16 (None = where the CPU has native bf16; False before torch.compile), and
    for float32 encoders on CPU (None = on).
    quantize: "int8" / "int4" weight-only quantisation of an unquantised checkpoint at load (CPU).
    tp: split the model over this many processes (tensor parallelism, `ember.distributed`).
    mmproj: a GGUF decoder's multimodal projector file (ember.mmproj): the image+text model.
    """
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if quantize is not None:
        if quantize not in QUANTIZE_MODES:
            raise ArgumentError(f"quantize must be one of {', '.join(map(repr, QUANTIZE_MODES))} (or None), "
                                f"got {quantize!r:.40}")
        if snap.format == "gguf":
            raise ArgumentError(f"quantize={quantize!r}: {snap.weights[0]} is a GGUF file, already quantised")
        if device.type != "cpu":
            raise ArgumentError(f"quantize={quantize!r} runs on CPU (ember's native kernels); on {device.type} "
                                f"load the model unquantised or a quantised GGUF")
    if tp is not None and (isinstance(tp, bool) or not isinstance(tp, int) or tp < 1):
        raise ArgumentError(f"tp must be a positive number of processes, got {tp!r:.40}")
    if tp is not None and tp > 1 and device.type == "cuda" and device.index is None:
        import os

        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))  # one GPU per rank
    if device.type == "cpu":
        from .malloc import tune

        tune()  # a load's large temporaries go back to the OS when freed (until malloc.reuse_temporaries)
    ckpt = open_checkpoint(snap)
    if mmproj is not None:
        if snap.format != "gguf":
            raise ArgumentError(f"mmproj={str(mmproj)!r:.200} goes with a GGUF decoder; {snap.root} holds {snap.format} "
                                f"weights (load their image+text checkpoint as it is)")
        from .mmproj import attach

        ckpt = attach(ckpt, mmproj)
    if keep_quantized is not None and snap.format != "gguf" and not ckpt.quantization:
        raise ArgumentError(f"keep_quantized={keep_quantized!r} applies to GGUF files and quantised checkpoints; "
                            f"{snap.root} holds unquantised {snap.format} weights")
    if quantize is not None and ckpt.quantization:
        raise ArgumentError(f"quantize={quantize!r}: {snap.root} is already quantised ({ckpt.quantization})")
    entry = ckpt.entry
    if quantize is not None and entry.task != "causal-lm":
        raise ArgumentError(f"quantize={quantize!r} applies to causal language models; {snap.root} is an "
                            f"{entry.task} ({entry.model_type})")
    try:
        cfg = entry.parse_config(ckpt.raw)
    except ConfigError as e:
        raise ConfigError(e if snap.format != "gguf" or str(snap.weights[0]) in str(e) else f"{snap.weights[0]}: {e}") from None
    int16 = dtype is None  # ember's choice of arithmetic, as bf16 below (transforms.plan: int16-f32)
    compute_dtype = None
    if quantize is not None:
        # built in the checkpoint's own dtype (zero-copy views, quantised from there); computes in
        # float32 (or the dtype asked for) once the linears are blocks
        compute_dtype = dtype or torch.float32
        dtype = ckpt.checkpoint_dtype or torch.float32
    elif dtype is None and snap.format != "gguf":
        dtype = default_dtype(device, ckpt.checkpoint_dtype)
        if entry.task == "encoder" and device.type == "cpu" and dtype == torch.float32 and cpu_bf16_fast():
            # encoders keep their residual stream in float32 (see models/encoder.py): bf16 matmuls are
            # 2-3x faster and stay within cosine 0.9999 of float32 embeddings
            dtype = torch.bfloat16
    group = None
    if tp is not None and tp > 1:
        from .distributed import init_tensor_parallel

        if entry.task != "causal-lm":
            raise ArgumentError(f"tp={tp}: tensor parallelism splits causal language models; {snap.root} is an "
                                f"{entry.task} ({entry.model_type}), load it with tp=1")
        if ckpt.quantization and keep_quantized is not False:
            raise UnsupportedModelError(f"tp={tp}: tensor parallelism does not split the packed weights of a "
                                        f"quantised checkpoint ({ckpt.quantization}); load it with "
                                        "keep_quantized=False (dequantised at load) or tp=1")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        group = init_tensor_parallel(tp, device)
    tokenizer = ckpt.tokenizer()  # (GGUF: before the weights; see Checkpoint.tokenizer)
    source, extra = ckpt.source(dtype, device, keep_quantized)
    dtype = extra.pop("dtype", dtype)
    vb = VarBuilder(source, dtype, device, tp=group)
    model = build(entry, cfg, vb, **({"fuse": fuse} if entry.task == "causal-lm" else {}))
    if group is not None:
        from .distributed.layers import check_split

        check_split(model, group, entry.model_type)
    if compute_dtype is not None:
        dtype = compute_dtype
    steps = transforms.plan(entry.task, dtype, device, prepack=prepack, quantized=bool(extra.get("quantized")),
                            quantize=quantize, int16=int16)
    done = transforms.apply(model, steps)
    if not extra.get("quantized", True):
        close = getattr(source, "close", None)
        if close is not None:
            close()  # nothing refers to the mapping any more
    ckpt.close()
    return Loaded(snap, entry, cfg, model, tokenizer, ckpt.generation_config, dtype, device,
                  transforms=(("shard",) if group is not None else ()) + tuple(done), tp=group, **extra)
