"""GGUF file → (config, model, tokenizer, generation config): `ember.load("model.gguf")`.

A GGUF carries no config.json: its metadata (`{arch}.block_count`, `{arch}.embedding_length`, ...)
is turned into the config dict the family's native model reads, its tensors (`blk.N.attn_q.weight`,
...) are exposed under the Hugging Face names the models use, and llama.cpp's value/layout changes
are undone: the Q/K row permutation of the llama converter (on the packed bytes: blocks never span
rows), Gemma's `w + 1` norms, GPT-2's transposed Conv1D weights. The normal `VarBuilder` machinery
(shape checks, used-tensor tracking, nearest-key errors) runs unchanged over `GGUFSource`.

Quantised weights either stay packed (`GGMLWeight`: GGUF blocks in memory, dequantised inside the
layer or run on torch's int4 kernel) or are dequantised at load; `plan_loading` documents what
`packed=None` (the default), `packed=True` and `packed=False` do.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .. import registry
from ..errors import CheckpointError, ConfigError, UnsupportedModelError
from . import ggml
from .gguf import GGUFFile

log = logging.getLogger("ember")

# Dequantise at load (packed=None) when the dequantised weights take at most this many bytes.
AUTO_DEQUANT_MAX_BYTES = int(os.environ.get("EMBER_GGUF_DEQUANT_MAX_BYTES", 2 << 30))


# ---- tensor names ------------------------------------------------------------------------------
LLAMA_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GEMMA_LAYER = {
    **LLAMA_LAYER,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
PHI3_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_up": "mlp.gate_up_proj",
    "ffn_down": "mlp.down_proj",
}
GPT2_LAYER = {
    "attn_norm": "ln_1",
    "attn_qkv": "attn.c_attn",
    "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2",
    "ffn_up": "mlp.c_fc",
    "ffn_down": "mlp.c_proj",
}
DECODER_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
GPT2_TOP = {"token_embd": "transformer.wte", "position_embd": "transformer.wpe", "output_norm": "transformer.ln_f",
            "output": "lm_head"}


def hf_name(gguf_name: str, top: dict[str, str], layer: dict[str, str], layers_prefix: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight` (None: no mapping)."""
    base, dot, suffix = gguf_name.rpartition(".")
    if not dot or suffix not in ("weight", "bias"):
        return None
    if base in top:
        return f"{top[base]}.{suffix}"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if m and m.group(2) in layer:
        return f"{layers_prefix}.{m.group(1)}.{layer[m.group(2)]}.{suffix}"
    return None


# ---- metadata → config --------------------------------------------------------------------------
class _Meta:
    """Typed access to `{arch}.*` metadata, with errors that name the file and the key."""

    def __init__(self, f: GGUFFile, arch: str):
        self.f, self.arch, self.m = f, arch, f.metadata

    def get(self, key: str, default=None, *, kind: type | tuple = (int, float, str, bool, list)):
        full = f"{self.arch}.{key}" if not key.startswith(("general.", "tokenizer.")) else key
        v = self.m.get(full, default)
        if v is default:
            return v
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):
            raise ConfigError(f"{self.f.path}: metadata {full!r} should be {getattr(kind, '__name__', kind)}, got {v!r:.80}")
        return v

    def need(self, key: str, kind=int):
        v = self.get(key, kind=kind)
        if v is None:
            raise ConfigError(f"{self.f.path}: GGUF metadata lacks {self.arch}.{key}, which a {self.arch} model needs")
        return v

    def int_or_uniform(self, key: str, default=None):
        """A per-layer array that must be uniform (ember's configs take one value), or a scalar."""
        v = self.get(key, default, kind=(int, list))
        if isinstance(v, list):
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
                raise ConfigError(f"{self.f.path}: metadata {self.arch}.{key} should be an integer or an array of "
                                  f"integers, got {v!r:.80}")
            if not v or len(set(v)) != 1:
                raise UnsupportedModelError(f"{self.f.path}: {self.arch}.{key} varies per layer ({v[:8]}...), "
                                            f"which ember's {self.arch} model does not support")
            v = v[0]
        return v


def _vocab_size(meta: _Meta) -> int:
    v = meta.get("vocab_size", kind=int)
    if v is None:
        toks = meta.m.get("tokenizer.ggml.tokens")
        if isinstance(toks, list):
            return len(toks)
        shape = meta.f.tensors.get("token_embd.weight")
        if shape is None:
            raise ConfigError(f"{meta.f.path}: cannot tell the vocabulary size (no {meta.arch}.vocab_size, "
                              f"no tokenizer.ggml.tokens, no token_embd.weight)")
        return shape.shape[0]
    return v


def _rope_scaling(meta: _Meta) -> dict | None:
    kind = meta.get("rope.scaling.type", kind=str)
    if kind in (None, "none"):
        factor = meta.get("rope.scale_linear", kind=(int, float))  # older files
        return {"rope_type": "linear", "factor": float(factor)} if factor and factor != 1 else None
    out: dict[str, Any] = {"rope_type": kind}
    factor = meta.get("rope.scaling.factor", kind=(int, float))
    if factor is not None:
        out["factor"] = float(factor)
    orig = meta.get("rope.scaling.original_context_length", kind=int)
    if orig is not None:
        out["original_max_position_embeddings"] = orig
    if kind == "yarn":
        mult = meta.get("rope.scaling.yarn_log_multiplier", kind=(int, float))
        if mult:
            out["mscale_all_dim"] = float(mult) / 0.1  # llama.cpp stores 0.1 * mscale_all_dim
    return out


def _token_ids(m: dict) -> dict:
    out = {}
    for key, name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("padding_token_id", "pad_token_id")):
        v = m.get(f"tokenizer.ggml.{key}")
        if isinstance(v, int) and not isinstance(v, bool):
            out[name] = v
    return out


def _decoder_config(meta: _Meta, model_type: str, *, head_dim: int | None = None) -> dict:
    heads = meta.int_or_uniform("attention.head_count")
    if heads is None:
        meta.need("attention.head_count")
    hidden = meta.need("embedding_length")
    cfg: dict[str, Any] = {
        "model_type": model_type,
        "vocab_size": _vocab_size(meta),
        "hidden_size": hidden,
        "intermediate_size": meta.int_or_uniform("feed_forward_length"),
        "num_hidden_layers": meta.need("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta.int_or_uniform("attention.head_count_kv", heads),
        "max_position_embeddings": meta.get("context_length", 2048, kind=int),
        "rms_norm_eps": float(meta.get("attention.layer_norm_rms_epsilon", 1e-6, kind=(int, float))),
        "tie_word_embeddings": "output.weight" not in meta.f.tensors,
        **_token_ids(meta.m),
    }
    if cfg["intermediate_size"] is None:
        raise ConfigError(f"{meta.f.path}: GGUF metadata lacks {meta.arch}.feed_forward_length")
    theta = meta.get("rope.freq_base", kind=(int, float))
    if theta is not None:
        cfg["rope_theta"] = float(theta)
    scaling = _rope_scaling(meta)
    if scaling is not None:
        cfg["rope_scaling"] = scaling
    if head_dim is not None:
        cfg["head_dim"] = head_dim
    return cfg


def _llama_config(meta: _Meta, names: set[str]) -> dict:
    heads = meta.int_or_uniform("attention.head_count") or meta.need("attention.head_count")
    # transformers maps rope.dimension_count to head_dim for llama; key_length is explicit when present
    head_dim = meta.get("attention.key_length", kind=int) or meta.get("rope.dimension_count", kind=int) or \
        meta.need("embedding_length") // heads
    cfg = _decoder_config(meta, "llama", head_dim=head_dim)
    cfg["attention_bias"] = "blk.0.attn_q.bias" in names
    cfg["mlp_bias"] = "blk.0.ffn_gate.bias" in names
    return cfg


def _qwen2_config(meta: _Meta, names: set[str]) -> dict:
    return _decoder_config(meta, "qwen2")


def _qwen3_config(meta: _Meta, names: set[str]) -> dict:
    return _decoder_config(meta, "qwen3", head_dim=meta.get("attention.key_length", kind=int))


def _gemma_layer_types(meta: _Meta, n_layers: int, default_pattern: int) -> list[str] | None:
    pattern = meta.get("attention.sliding_window_pattern", kind=(int, list))
    if isinstance(pattern, list):  # per-layer flags: true = sliding
        if len(pattern) != n_layers:
            raise ConfigError(f"{meta.f.path}: {meta.arch}.attention.sliding_window_pattern has {len(pattern)} "
                              f"entries for {n_layers} layers")
        return ["sliding_attention" if p else "full_attention" for p in pattern]
    pattern = pattern or default_pattern
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]


def _gemma2_config(meta: _Meta, names: set[str]) -> dict:
    cfg = _decoder_config(meta, "gemma2", head_dim=meta.get("attention.key_length", kind=int))
    cfg["tie_word_embeddings"] = True
    window = meta.get("attention.sliding_window", kind=int)
    if window is not None:
        cfg["sliding_window"] = window
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        v = meta.get(key, kind=(int, float))
        if v is not None:
            cfg[key] = float(v)
    return cfg


def _gemma3_config(meta: _Meta, names: set[str]) -> dict:
    cfg = _decoder_config(meta, "gemma3_text", head_dim=meta.get("attention.key_length", kind=int))
    cfg["tie_word_embeddings"] = "output.weight" not in names
    window = meta.get("attention.sliding_window", kind=int)
    if window is not None:
        cfg["sliding_window"] = window
    cfg["layer_types"] = _gemma_layer_types(meta, cfg["num_hidden_layers"], 6)
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        v = meta.get(key, kind=(int, float))
        if v is not None:
            cfg[key] = float(v)
    return cfg


def _phi3_config(meta: _Meta, names: set[str]) -> dict:
    cfg = _decoder_config(meta, "phi3")
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    rot = meta.get("rope.dimension_count", kind=int)
    if rot and rot != head_dim:
        cfg["partial_rotary_factor"] = rot / head_dim
    window = meta.get("attention.sliding_window", kind=int)
    if window:
        cfg["sliding_window"] = window
    orig = meta.get("rope.scaling.original_context_length", kind=int)
    if "rope_factors_long.weight" in names and "rope_factors_short.weight" in names:
        f = meta.f

        def factors(name):
            t = f.info(name)
            return ggml.dequantize(f.raw(name), t.ggml_type, t.shape).reshape(-1).tolist()

        scaling: dict[str, Any] = {"rope_type": "longrope", "long_factor": factors("rope_factors_long.weight"),
                                   "short_factor": factors("rope_factors_short.weight")}
        attn = meta.get("rope.scaling.attn_factor", kind=(int, float))
        if attn is not None:
            scaling["attention_factor"] = float(attn)
        cfg["rope_scaling"] = scaling
        if orig:
            cfg["original_max_position_embeddings"] = orig
    return cfg


def _gpt2_config(meta: _Meta, names: set[str]) -> dict:
    ctx = meta.get("context_length", 1024, kind=int)
    return {
        "model_type": "gpt2",
        "vocab_size": _vocab_size(meta),
        "n_embd": meta.need("embedding_length"),
        "n_layer": meta.need("block_count"),
        "n_head": meta.need("attention.head_count"),
        "n_inner": meta.get("feed_forward_length", kind=int),
        "n_positions": ctx,
        "n_ctx": ctx,
        "layer_norm_epsilon": float(meta.get("attention.layer_norm_epsilon", 1e-5, kind=(int, float))),
        "tie_word_embeddings": True,
        **_token_ids(meta.m),
    }


# ---- families -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """How one GGUF architecture maps onto a native ember family."""

    config: Callable[[_Meta, set[str]], dict]
    top: dict = field(default_factory=lambda: DECODER_TOP)
    layer: dict = field(default_factory=lambda: LLAMA_LAYER)
    layers_prefix: str = "model.layers"
    permute_qk: bool = False  # llama.cpp's llama converter permuted q/k rows for its rope layout
    norm_offset: bool = False  # Gemma: norms stored as w + 1
    transpose: tuple[str, ...] = ()  # GGUF leaves whose HF weight is transposed (GPT-2's Conv1D)


FAMILIES: dict[str, Family] = {
    "llama": Family(_llama_config, permute_qk=True),
    "qwen2": Family(_qwen2_config),
    "qwen3": Family(_qwen3_config),
    "gemma2": Family(_gemma2_config, layer=GEMMA_LAYER, norm_offset=True),
    "gemma3": Family(_gemma3_config, layer=GEMMA_LAYER, norm_offset=True),
    "phi3": Family(_phi3_config, layer=PHI3_LAYER),
    "gpt2": Family(_gpt2_config, top=GPT2_TOP, layer=GPT2_LAYER, layers_prefix="transformer.h",
                   transpose=("attn_qkv", "attn_output", "ffn_up", "ffn_down")),
}


def family_for(f: GGUFFile) -> tuple[str, Family]:
    arch = f.architecture
    if arch is None:
        raise CheckpointError(f"{f.path}: GGUF metadata has no general.architecture string")
    fam = FAMILIES.get(arch)
    if fam is None:
        raise UnsupportedModelError(f"{f.path}: GGUF architecture {arch!r} is not supported; ember reads GGUF files "
                                    f"of: {', '.join(sorted(FAMILIES))}")
    return arch, fam


def config_dict(f: GGUFFile) -> dict:
    """The Hugging Face style config dict for a GGUF file (what its config.json would say)."""
    arch, fam = family_for(f)
    return fam.config(_Meta(f, arch), set(f.tensors))


# ---- the tensor source --------------------------------------------------------------------------
@dataclass
class _Plan:
    gguf: str
    shape: tuple[int, ...]
    permute_heads: int | None = None  # undo llama.cpp's q/k permutation with this many heads
    minus_one: bool = False
    transpose: bool = False


def _qk_perm(rows: int, n_head: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's `permute` (HF rotate-half layout from interleaved pairs)."""
    if rows % (2 * n_head):
        raise CheckpointError(f"q/k rows ({rows}) do not split into {n_head} heads of pairs")
    return torch.arange(rows).reshape(n_head, rows // n_head // 2, 2).transpose(1, 2).reshape(-1)


class GGUFSource:
    """A `TensorSource` over a GGUF file, keyed by Hugging Face names."""

    def __init__(self, f: GGUFFile, fam: Family, cfg: dict, *, packed: bool, dtype: torch.dtype | None,
                 dense_fallback: bool = False):
        self.f = f
        self.packed = packed
        self.dense_fallback = dense_fallback
        self.dtype = dtype
        self.plans: dict[str, _Plan] = {}
        heads = cfg.get("num_attention_heads")
        kv_heads = cfg.get("num_key_value_heads") or heads
        for name, info in f.tensors.items():
            hf = hf_name(name, fam.top, fam.layer, fam.layers_prefix) or name
            plan = _Plan(name, info.shape)
            leaf = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else name.split(".")[0]
            if fam.permute_qk and leaf in ("attn_q", "attn_k"):
                plan.permute_heads = heads if leaf == "attn_q" else kv_heads
            if fam.norm_offset and name.endswith("norm.weight"):
                plan.minus_one = True
            if leaf in fam.transpose and name.endswith(".weight") and len(info.shape) == 2:
                plan.transpose = True
                plan.shape = info.shape[::-1]
            if hf in self.plans:
                raise CheckpointError(f"{f.path}: tensors {self.plans[hf].gguf!r} and {name!r} both map to {hf!r}")
            self.plans[hf] = plan

    def keys(self):
        return self.plans.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self.plans[key].shape

    def describe(self) -> str:
        return str(self.f.path)

    def gguf_name(self, key: str) -> str:
        return self.plans[key].gguf

    def load(self, key: str):
        plan = self.plans[key]
        info = self.f.check_supported(plan.gguf)
        if info.ggml_type in ggml.FLOAT_TYPES:
            t = self.f.raw(plan.gguf).reshape(-1).view(ggml.FLOAT_TYPES[info.ggml_type]).reshape(info.shape)
            return self._finish(t, plan)
        if self.packed and not plan.minus_one and not plan.transpose and len(info.shape) == 2:
            from ..nn.quantized import GGMLWeight

            name = plan.gguf
            w = GGMLWeight(self.f.raw(name), info.ggml_type, info.shape, dtype=self.dtype,
                           reader=lambda rows=None: self.f.read(name, rows), name=name, dense_fallback=self.dense_fallback)
            if plan.permute_heads:
                w = w.permute_rows(_qk_perm(info.shape[0], plan.permute_heads))
            return w
        # straight to the compute dtype unless a float32 fix-up follows (rounded once either way)
        dtype = torch.float32 if plan.minus_one or self.dtype is None or not self.dtype.is_floating_point else self.dtype
        t = ggml.dequantize(self.f.read(plan.gguf), info.ggml_type, info.shape, dtype)
        return self._finish(t, plan)

    def _finish(self, t: torch.Tensor, plan: _Plan) -> torch.Tensor:
        if plan.permute_heads:
            t = t[_qk_perm(t.shape[0], plan.permute_heads)]
        if plan.minus_one:
            t = t.float() - 1  # in float32, as transformers does (the file's norms are F32)
        if plan.transpose:
            t = t.t().contiguous()
        return t


# ---- loading ------------------------------------------------------------------------------------
def file_float_dtype(f: GGUFFile) -> torch.dtype | None:
    """The float type of an unquantised file (F16/BF16 over its F32 norms), None if it holds blocks."""
    types = {t.ggml_type for t in f.tensors.values()}
    if not types <= set(ggml.FLOAT_TYPES):
        return None
    if ggml.BF16 in types:
        return torch.bfloat16
    if ggml.F16 in types:
        return torch.float16
    return torch.float32


def dequantized_bytes(f: GGUFFile, dtype: torch.dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    return sum(t.numel * size for t in f.tensors.values() if t.ggml_type in ggml.QUANT_TYPES)


def choose_packed(f: GGUFFile, dtype: torch.dtype, device: torch.device) -> bool:
    """For `packed=None` with float32 (or GPU) compute: keep blocks only when dequantising would
    cost real memory, i.e. when the dequantised weights exceed AUTO_DEQUANT_MAX_BYTES (2 GiB; env
    EMBER_GGUF_DEQUANT_MAX_BYTES) or a quarter of the device's memory. Dequantised weights run at
    dense-matmul speed; packed ones dequantise on every forward (several times the matmul's cost).
    """
    need = dequantized_bytes(f, dtype)
    if need == 0:
        return False
    limit = AUTO_DEQUANT_MAX_BYTES
    total = _memory_bytes(device)
    if total:
        limit = min(limit, total // 4)
    return need > limit


def int4_fast_path(device: torch.device) -> bool:
    """Whether this machine runs packed 4/5/8-bit weights fast: a CPU with native bf16 and torch's
    int4 kernel."""
    from ..loading import cpu_bf16_fast
    from ..nn.quantized import int4_kernel_available

    return device.type == "cpu" and int4_kernel_available() and cpu_bf16_fast()


def plan_loading(f: GGUFFile, dtype: torch.dtype | None, device: torch.device, packed: bool | None
                 ) -> tuple[torch.dtype, bool, bool, str]:
    """(dtype, keep blocks, dense fallback for types with no int4 form, description) for a load.

    packed=None (default) on a CPU with native bf16: bf16 compute, Q4_0/Q4_1/Q4_K/Q5_0/Q5_1/Q5_K/Q8_0
    weights stay packed and run on the int4 kernel (faster than dense at decode, ~4-10 bits per
    weight), the others (Q6_K, Q2_K, Q3_K) are dequantised once to bf16, embeddings stay packed.
    Elsewhere (float32 compute, GPU): dequantise at load unless that costs too much memory
    (`choose_packed`). packed=True keeps every quantised weight packed; packed=False dequantises all.
    """
    from ..loading import default_dtype

    quantized = file_float_dtype(f) is None
    if dtype is None:
        dtype = default_dtype(device, file_float_dtype(f))
        if quantized and packed is not False and int4_fast_path(device):
            dtype = torch.bfloat16
    if not quantized:
        return dtype, False, False, "unquantised"
    if packed is None:
        if dtype == torch.bfloat16 and int4_fast_path(device):
            return dtype, True, True, "auto: int4-kernel types packed, others dequantised to bf16"
        keep = choose_packed(f, dtype, device)
        return dtype, keep, False, "auto: " + ("packed (dequantised weights would not fit)" if keep else "dequantised at load")
    return dtype, bool(packed), False, "packed" if packed else "dequantised at load"


def _memory_bytes(device: torch.device) -> int | None:
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError, RuntimeError):
        return None


def generation_config(f: GGUFFile) -> dict:
    """EOS ids (eos, end-of-turn, and the end-of-generation tokens llama.cpp recognises) and sampling
    defaults from the metadata."""
    from .gguf_tokenizer import eog_ids

    m = f.metadata
    out: dict[str, Any] = dict(_token_ids(m))
    eos = eog_ids(m)
    if eos:
        out["eos_token_id"] = eos if len(eos) > 1 else eos[0]
    for key, name in (("temp", "temperature"), ("top_k", "top_k"), ("top_p", "top_p"), ("min_p", "min_p"),
                      ("penalty_repeat", "repetition_penalty")):
        v = m.get(f"general.sampling.{key}")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[name] = v
    return out


def load_gguf(snap, dtype: torch.dtype | None, device: torch.device, *, packed: bool | None = None, **model_kw):
    """Load a GGUF snapshot (one .gguf file) into a `Loaded`. `packed`: keep quantised weights as
    GGUF blocks (True), dequantise them at load (False), or decide by size (None)."""
    from ..loading import Loaded, build_model
    from ..varbuilder import VarBuilder
    from .gguf_tokenizer import tokenizer_from_gguf

    if len(snap.weights) != 1:
        raise CheckpointError(f"{snap.root}: a GGUF model is one file, got {len(snap.weights)} "
                              f"(split GGUF files are not supported; merge them with llama-gguf-split)")
    f = GGUFFile(snap.weights[0])
    family_for(f)  # an architecture ember knows
    for info in f.tensors.values():  # refuse unknown/unsupported types before building anything
        f.check_supported(info.name)
    raw = config_dict(f)
    try:
        entry = registry.lookup(raw)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{f.path}: {e}") from None
    try:
        cfg = entry.parse_config(raw)
    except ConfigError as e:
        raise ConfigError(f"{f.path}: {e}") from None
    dtype, packed, dense_fallback, mode = plan_loading(f, dtype, device, packed)
    # The tokenizer first: building it from a large vocabulary (150k tokens and merges) needs ~70 MB
    # of temporaries, which then come and go before the weights are resident, not on top of them.
    tokenizer = None
    if isinstance(f.metadata.get("tokenizer.ggml.tokens"), list):
        tokenizer = tokenizer_from_gguf(f.metadata, path=f.path)
    else:
        log.warning("%s has no tokenizer in its metadata: text in/out is unavailable, token ids only", f.path)
    _release_free_memory()
    _, fam = family_for(f)
    source = GGUFSource(f, fam, raw, packed=packed, dtype=dtype, dense_fallback=dense_fallback)
    vb = VarBuilder(source, dtype, device)
    model = build_model(entry, cfg, vb, **model_kw)
    _apply_rope_freqs(model, source, vb)
    if not packed:
        f.close()  # nothing refers to the mapping any more
    _release_free_memory()
    loaded = Loaded(snap, entry, cfg, model, tokenizer, generation_config(f), dtype, device)
    loaded.packed = packed  # type: ignore[attr-defined]
    loaded.gguf_mode = mode  # type: ignore[attr-defined]
    return loaded


def _apply_rope_freqs(model, source: GGUFSource, vb) -> None:
    """llama.cpp stores Llama 3.1-style rope scaling as per-dimension frequency divisors
    (`rope_freqs.weight`) instead of metadata: divide the model's inverse frequencies by them."""
    if "rope_freqs.weight" not in source.keys():
        return
    rotary = getattr(getattr(model, "model", None), "rotary", None)
    inv = getattr(rotary, "inv_freq", None)
    factors = vb.get_unchecked("rope_freqs.weight", torch.float32).reshape(-1).float()
    if not isinstance(inv, torch.Tensor) or getattr(rotary, "type", "default") != "default" or inv.shape != factors.shape:
        log.warning("rope_freqs.weight present but the model's rotary embedding cannot take it; ignored")
        return
    rotary.inv_freq = inv / factors.to(inv.device)


def _release_free_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc): dequantising and repacking leave many
    freed temporaries behind that would otherwise stay in the process's resident memory."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
