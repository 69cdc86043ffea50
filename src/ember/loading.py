"""From a resolved snapshot to (config, model, tokenizer): the steps behind `ember.load`."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import torch

from . import registry
from .config import load_json
from .errors import CheckpointError, ConfigError
from .hub import Snapshot
from .varbuilder import DictSource, SafetensorsSource, VarBuilder

log = logging.getLogger("ember")

# Checkpoint tensors that are fine to leave unused (buffers older transformers saved).
IGNORABLE_UNUSED = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias$|\.attn\.bias$|position_ids$)")


@dataclass
class Loaded:
    snapshot: Snapshot
    entry: registry.Entry
    config: Any
    model: torch.nn.Module
    tokenizer: Any
    generation_config: dict
    dtype: torch.dtype
    device: torch.device


def cpu_bf16_fast() -> bool:
    """Whether this CPU has native bf16 matmuls (AVX512-BF16/AMX): then bf16 is the fast CPU dtype."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def default_dtype(device: torch.device, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
    """bf16 on CUDA; on CPU the checkpoint's dtype, except 16-bit types the CPU computes slowly (→ f32)."""
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "mps":
        return torch.float16
    if checkpoint_dtype == torch.bfloat16 and not cpu_bf16_fast():
        return torch.float32
    if checkpoint_dtype == torch.float16:
        return torch.bfloat16 if cpu_bf16_fast() else torch.float32
    if checkpoint_dtype in (torch.float32, torch.bfloat16):
        return checkpoint_dtype
    return torch.float32


def _dtype_from_config(raw: dict) -> torch.dtype | None:
    name = raw.get("dtype") or raw.get("torch_dtype")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(name) if isinstance(name, str) else None


def _checkpoint_dtype(source) -> torch.dtype | None:
    for k in source.keys():
        dt = source.dtype(k) if hasattr(source, "dtype") else None
        if isinstance(dt, torch.dtype) and dt.is_floating_point:
            return dt
    return None


def tensor_source(snap: Snapshot):
    if snap.format == "safetensors":
        return SafetensorsSource(snap.weights)
    if snap.format == "pytorch":
        return _pickle_source(snap)
    raise CheckpointError(f"unsupported weight format {snap.format!r}")


def _pickle_source(snap: Snapshot) -> DictSource:
    """pytorch_model.bin: only when no safetensors exist, and only through weights_only unpickling."""
    tensors: dict[str, torch.Tensor] = {}
    for p in snap.weights:
        try:
            sd = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises UnpicklingError, RuntimeError, ... for hostile or corrupt files
            raise CheckpointError(f"{p}: refused or unreadable as a weights-only PyTorch checkpoint: "
                                  f"{type(e).__name__}: {str(e)[:200]}") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError(f"{p}: not a state dict of tensors")
        tensors.update(sd)
    return DictSource(tensors, name=", ".join(p.name for p in snap.weights))


def generation_config(snap: Snapshot) -> dict:
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


def build_model(entry: registry.Entry, cfg, vb: VarBuilder, prepack: bool | None = None, **kw) -> torch.nn.Module:
    """The model class for `entry` built from (cfg, vb). prepack: oneDNN-prepacked bf16 Linears on CPU
    (default: on for causal LMs; off when the model will be torch.compile'd, which packs itself)."""
    _, model_cls = entry.load()
    from .nn.packed import pack_all, packing

    # oneDNN-prepacked bf16 weights: faster CPU matmuls (ember.nn.packed); packed as layers are built
    pack = entry.task == "causal-lm" and vb.device.type == "cpu" and vb.dtype == torch.bfloat16 and prepack is not False
    with packing(pack):
        # .to() moves only what a family left elsewhere (buffers such as rotary tables); weights are already there.
        model = model_cls(cfg, vb, **kw).eval().to(vb.device)
    if pack:
        pack_all(model)  # whatever a family built outside ember.nn's constructors (tied heads...)
    unused = [k for k in vb.unused() if not IGNORABLE_UNUSED.search(k)]
    heads = getattr(model, "ignore_unused", None)  # task heads a model leaves unused on purpose (encoders)
    if heads is not None and any(heads.search(k) for k in unused):
        log.info("not used (task heads): %s", ", ".join(k for k in unused if heads.search(k))[:300])
        unused = [k for k in unused if not heads.search(k)]
    if unused:
        more = f" (+{len(unused) - 8} more)" if len(unused) > 8 else ""
        log.warning("%d checkpoint tensors were not used: %s%s", len(unused), ", ".join(unused[:8]), more)
    return model


def load_snapshot(snap: Snapshot, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                  **model_kw) -> Loaded:
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if snap.format == "gguf":
        from .io.gguf_loader import load_gguf

        return load_gguf(snap, dtype, device, **model_kw)
    if model_kw.get("packed") is not None:
        from .errors import ArgumentError

        raise ArgumentError(f"packed={model_kw['packed']!r} applies to GGUF files; {snap.root} holds "
                            f"{snap.format} weights")
    model_kw.pop("packed", None)
    if snap.config is None:
        raise ConfigError(f"{snap.root}: no config.json beside the weights")
    raw = load_json(snap.config)
    entry = registry.lookup(raw)
    if entry.task == "encoder":
        model_kw.pop("fuse", None)  # encoders have no fused projections to choose
    cfg = entry.parse_config(raw)
    source = tensor_source(snap)
    if dtype is None:
        dtype = default_dtype(device, _checkpoint_dtype(source) or _dtype_from_config(raw))
        if entry.task == "encoder" and device.type == "cpu" and dtype == torch.float32 and cpu_bf16_fast():
            # encoders keep their residual stream in float32 (see models/encoder.py): bf16 matmuls are
            # 2-3x faster and stay within cosine 0.9999 of float32 embeddings
            dtype = torch.bfloat16
    vb = VarBuilder(source, dtype, device)
    model = build_model(entry, cfg, vb, **model_kw)
    tokenizer = None
    if snap.file("tokenizer.json") is not None:
        from .tokenizer import Tokenizer

        tokenizer = Tokenizer.from_dir(snap.root)
    else:
        log.warning("%s has no tokenizer.json: text in/out is unavailable, token ids only", snap.root)
    return Loaded(snap, entry, cfg, model, tokenizer, generation_config(snap), dtype, device)
