"""A GGUF file as a weight source: its metadata read into a family's config dict, its tensors under
the Hugging Face names the models use, and llama.cpp's value/layout changes undone.

Each family keeps its own mapping beside its model code (`GGUF = {arch: GGUFMapping(...)}` in
`ember/models/<family>.py`, as Candle keeps `quantized_qwen2.rs` beside `qwen2.rs`): how the
`{arch}.*` metadata becomes the config dict, which `blk.N.*` names are which HF tensors, and the
fix-ups (the Q/K row permutation of llama.cpp's llama converter and the fused QKV that Bloom's and
Falcon's converters regroup, both row orders applied to the quantised bytes since blocks never span
rows; Gemma's `w + 1` norms; GPT-2's transposed Conv1D weights; `Derived` tensors that a converter
split or rearranged, such as DeepSeek's kv_b_proj and GPT-OSS's experts, put back together from
their dequantised parts). This module holds what
those mappings share and the `GGUFSource` that applies one, so the normal `VarBuilder` machinery
(shape checks, used-tensor tracking, nearest-key errors) runs unchanged over a GGUF file.

Quantised weights either stay quantised (`GGMLWeight`: GGUF blocks in memory) or are dequantised
at load; `plan_quantized` says what `keep_quantized=None` (the default), True and False do.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .errors import CheckpointError, ConfigError, UnsupportedModelError
from .io import ggml
from .io.ggml_weight import GGMLWeight
from .io.gguf import GGUFFile

log = logging.getLogger("ember")

MAX_EXPERTS = 1 << 12
# Dequantise at load (keep_quantized=None) when the dequantised weights take at most this many bytes.
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
# mixture-of-experts blocks (Mixtral, Qwen2/3-MoE): the router, the experts stacked in 3-D tensors
# ([experts, rows, row] in torch order), and Qwen2-MoE's shared expert with its sigmoid gate
MOE_LAYER = {
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
DECODER_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
def hf_name(gguf_name: str, top: dict[str, str], layer: dict[str, str], layers_prefix: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight` (None: no mapping). A table
    entry keyed by the whole leaf (`exp_probs_b.bias`, `attn_sinks.weight`) names the whole HF tensor,
    for HF names that do not end in `.weight` / `.bias`."""
    base, dot, suffix = gguf_name.rpartition(".")
    if not dot or suffix not in ("weight", "bias"):
        return None
    if base in top:
        return f"{top[base]}.{suffix}"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if m and f"{m.group(2)}.{suffix}" in layer:
        return f"{layers_prefix}.{m.group(1)}.{layer[m.group(2) + '.' + suffix]}"
    if m and m.group(2) in layer:
        return f"{layers_prefix}.{m.group(1)}.{layer[m.group(2)]}.{suffix}"
    return None


# ---- metadata → config --------------------------------------------------------------------------
class Meta:
    """Typed access to `{arch}.*` metadata, with errors that name the file and the key; `names` is
    the set of the file's tensor names."""

    def __init__(self, f: GGUFFile, arch: str):
        self.f, self.arch, self.m = f, arch, f.metadata
        self.names = set(f.tensors)

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


def layer_count(meta: Meta) -> int:
    """`{arch}.block_count`, bounded before any per-layer list is built from it."""
    from .config import MAX_LAYERS

    n = meta.need("block_count")
    if not 0 < n <= MAX_LAYERS:
        raise ConfigError(f"{meta.f.path}: {meta.arch}.block_count is {n!r:.40}; a model has 1 to {MAX_LAYERS} layers")
    return n


def attention_heads(meta: Meta) -> int:
    """`{arch}.attention.head_count` (uniform over layers), positive and at most the embedding width."""
    heads = meta.int_or_uniform("attention.head_count")
    if heads is None:
        heads = meta.need("attention.head_count")
    hidden = meta.need("embedding_length")
    if not 0 < heads <= hidden:
        raise ConfigError(f"{meta.f.path}: {meta.arch}.attention.head_count is {heads!r:.40}; it must be between 1 "
                          f"and the embedding length ({hidden!r:.40})")
    return heads


def small_vector(meta: Meta, name: str, limit: int = 1 << 16) -> list[float]:
    """A small float tensor of the file (rope factors) as a list, for the config dict."""
    t = meta.f.info(name)
    if t.numel > limit:
        raise ConfigError(f"{meta.f.path}: {name} has {t.numel} values; at most {limit} are expected")
    return ggml.dequantize(meta.f.raw(name), t.ggml_type, t.shape).reshape(-1).tolist()


def vocab_size(meta: Meta) -> int:
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


def rope_scaling(meta: Meta) -> dict | None:
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
        for key, name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"),
                          ("yarn_attn_factor", "attention_factor")):
            v = meta.get(f"rope.scaling.{key}", kind=(int, float))
            if v is not None:
                out[name] = float(v)
    return out


def token_ids(m: dict) -> dict:
    out = {}
    for key, name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("padding_token_id", "pad_token_id")):
        v = m.get(f"tokenizer.ggml.{key}")
        if isinstance(v, int) and not isinstance(v, bool):
            out[name] = v
    return out


def decoder_config(meta: Meta, model_type: str, *, head_dim: int | None = None) -> dict:
    heads = attention_heads(meta)
    hidden = meta.need("embedding_length")
    cfg: dict[str, Any] = {
        "model_type": model_type,
        "vocab_size": vocab_size(meta),
        "hidden_size": hidden,
        "intermediate_size": meta.int_or_uniform("feed_forward_length"),
        "num_hidden_layers": layer_count(meta),
        "num_attention_heads": heads,
        "num_key_value_heads": meta.int_or_uniform("attention.head_count_kv", heads),
        "max_position_embeddings": meta.get("context_length", 2048, kind=int),
        "rms_norm_eps": float(meta.get("attention.layer_norm_rms_epsilon", 1e-6, kind=(int, float))),
        "tie_word_embeddings": "output.weight" not in meta.f.tensors,
        **token_ids(meta.m),
    }
    if cfg["intermediate_size"] is None:
        raise ConfigError(f"{meta.f.path}: GGUF metadata lacks {meta.arch}.feed_forward_length")
    theta = meta.get("rope.freq_base", kind=(int, float))
    if theta is not None:
        cfg["rope_theta"] = float(theta)
    scaling = rope_scaling(meta)
    if scaling is not None:
        cfg["rope_scaling"] = scaling
    if head_dim is not None:
        cfg["head_dim"] = head_dim
    return cfg


def head_dim(meta: Meta) -> int:
    """`{arch}.attention.key_length`, else the embedding width over the heads."""
    return meta.get("attention.key_length", kind=int) or meta.need("embedding_length") // attention_heads(meta)


def sliding_layer_types(meta: Meta, n_layers: int, default_pattern: int) -> list[str]:
    """Each layer's attention type from `{arch}.attention.sliding_window_pattern`: per-layer flags
    (true: sliding), or every `pattern`-th layer full (`default_pattern` when the key is absent)."""
    pattern = meta.get("attention.sliding_window_pattern", kind=(int, list))
    if isinstance(pattern, list):
        if len(pattern) != n_layers:
            raise ConfigError(f"{meta.f.path}: {meta.arch}.attention.sliding_window_pattern has {len(pattern)} "
                              f"entries for {n_layers} layers")
        return ["sliding_attention" if p else "full_attention" for p in pattern]
    pattern = pattern or default_pattern
    if pattern < 1:
        raise ConfigError(f"{meta.f.path}: {meta.arch}.attention.sliding_window_pattern must be positive")
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]


def partial_rotary(meta: Meta, head: int) -> dict:
    """`partial_rotary_factor` from `{arch}.rope.dimension_count` when rotary covers part of a head."""
    rot = meta.get("rope.dimension_count", kind=int)
    if rot is None or rot == head:
        return {}
    if not 0 < rot <= head:
        raise ConfigError(f"{meta.f.path}: {meta.arch}.rope.dimension_count is {rot!r:.40}; a head has {head} dims")
    return {"partial_rotary_factor": rot / head}


def moe_config(meta: Meta) -> dict:
    """The MoE fields of a config from `{arch}.expert_*` metadata: expert count, top-k, expert width
    (`expert_feed_forward_length`, else the experts' tensor) and `expert_weights_norm` when given.
    Every layer is sparse (llama.cpp's MoE architectures have no dense layers)."""
    experts = meta.need("expert_count")
    top_k = meta.need("expert_used_count")
    n = layer_count(meta)
    if not 0 < experts <= MAX_EXPERTS or not 0 < top_k <= experts:
        raise ConfigError(f"{meta.f.path}: {meta.arch}.expert_count {experts!r:.40} and expert_used_count {top_k!r:.40}: "
                          f"1 to {MAX_EXPERTS} experts, of which 1 to all are used")
    cfg: dict[str, Any] = {"num_local_experts": experts, "num_experts_per_tok": top_k}
    width = meta.get("expert_feed_forward_length", kind=int)
    if width is None:
        t = next((meta.f.tensors[f"blk.{i}.ffn_gate_exps.weight"] for i in range(n)
                  if f"blk.{i}.ffn_gate_exps.weight" in meta.names), None)
        width = t.shape[1] if t is not None and len(t.shape) == 3 else None
    if width is not None:
        cfg["moe_intermediate_size"] = width
    norm = meta.get("expert_weights_norm", kind=bool)
    if norm is not None:
        cfg["norm_topk_prob"] = norm
    return cfg


# Tensors that mappings read into the config dict rather than into a layer.
CONFIG_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


# ---- a family's mapping ---------------------------------------------------------------------------
@dataclass(frozen=True)
class GGUFMapping:
    """How one GGUF architecture maps onto a native ember family (declared in the family's module)."""

    config: Callable[[Meta], dict]  # metadata -> the config.json-style dict (with its model_type)
    top: dict = field(default_factory=lambda: DECODER_TOP)
    layer: dict = field(default_factory=lambda: LLAMA_LAYER)
    layers_prefix: str = "model.layers"
    permute_qk: bool = False  # llama.cpp's llama converter permuted q/k rows for its rope layout
    norm_offset: bool = False  # Gemma: norms stored as w + 1
    transpose: tuple[str, ...] = ()  # GGUF leaves whose HF weight is transposed (GPT-2's Conv1D)
    # (GGUF leaf, the tensor's row count, config dict) -> the row order that gives the HF rows back from
    # the file's (a fused QKV the converter regrouped), or None; applied to quantised blocks too, as
    # the Q/K permutation. It raises ValueError when the config cannot give that many rows.
    row_order: Callable[[str, int, dict], torch.Tensor | None] | None = None
    derived: tuple["Derived", ...] = ()  # HF tensors computed from several of the file's (layer-relative)
    layer_fn: Callable[[dict], dict] | None = None  # the layer table for a config, where the file decides it

    def layer_table(self, cfg: dict) -> dict:
        return self.layer_fn(cfg) if self.layer_fn is not None else self.layer


@dataclass(frozen=True)
class Derived:
    """An HF tensor of every layer that the converter split or rearranged into several GGUF tensors:
    `hf` (layer-relative, e.g. `self_attn.kv_b_proj.weight`) is `fn(parts, cfg)` of the layer's
    GGUF tensors `parts` (leaf.suffix names, e.g. `attn_k_b.weight`), dequantised. `fn` uses only
    shape operations, so the HF shape is known from the headers (run on meta tensors)."""

    hf: str
    parts: tuple[str, ...]
    fn: Callable[[list[torch.Tensor], dict], torch.Tensor]


def architecture(f: GGUFFile) -> str:
    arch = f.architecture
    if arch is None:
        raise CheckpointError(f"{f.path}: GGUF metadata has no general.architecture string")
    return arch


# ---- the tensor source --------------------------------------------------------------------------
@dataclass
class _Plan:
    gguf: str
    shape: tuple[int, ...]
    permute_heads: int | None = None  # undo llama.cpp's q/k permutation with this many heads
    minus_one: bool = False
    transpose: bool = False
    rows: torch.Tensor | None = None  # the row order of a regrouped fused tensor (row_order)
    parts: tuple[str, ...] = ()  # a Derived tensor: the GGUF tensors fn combines
    fn: Callable | None = None


def _qk_perm(rows: int, n_head: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's `permute` (HF rotate-half layout from interleaved pairs)."""
    if rows % (2 * n_head):
        raise CheckpointError(f"q/k rows ({rows}) do not split into {n_head} heads of pairs")
    return torch.arange(rows).reshape(n_head, rows // n_head // 2, 2).transpose(1, 2).reshape(-1)


class GGUFSource:
    """A `TensorSource` over a GGUF file, keyed by Hugging Face names."""

    def __init__(self, f: GGUFFile, fam: GGUFMapping, cfg: dict, *, quantized: bool, dtype: torch.dtype | None,
                 dense_fallback: bool = False):
        self.f = f
        self.quantized = quantized
        self.dense_fallback = dense_fallback
        self.dtype = dtype
        self.plans: dict[str, _Plan] = {}
        heads = cfg.get("num_attention_heads")
        kv_heads = cfg.get("num_key_value_heads") or heads
        self._cfg = cfg
        consumed = self._plan_derived(fam, cfg)
        layer = fam.layer_table(cfg)
        for name, info in f.tensors.items():
            if name in CONFIG_TENSORS or name in consumed:
                continue  # read into the config by the family's mapping (rope factors), or into a Derived tensor
            hf = hf_name(name, fam.top, layer, fam.layers_prefix) or name
            plan = _Plan(name, info.shape)
            leaf = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else name.split(".")[0]
            if fam.permute_qk and leaf in ("attn_q", "attn_k"):
                plan.permute_heads = heads if leaf == "attn_q" else kv_heads
            if fam.norm_offset and name.endswith("norm.weight"):
                plan.minus_one = True
            if leaf in fam.transpose and name.endswith(".weight") and len(info.shape) == 2:
                plan.transpose = True
                plan.shape = info.shape[::-1]
            if fam.row_order is not None:
                try:
                    plan.rows = fam.row_order(name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1],
                                              info.shape[0], cfg)
                except (RuntimeError, ValueError, ZeroDivisionError, KeyError, TypeError) as e:
                    raise CheckpointError(f"{f.path}: tensor {name!r}: the metadata's head counts do not split its "
                                          f"{info.shape[0]} rows ({e})") from None
                if plan.rows is not None and plan.rows.shape != info.shape[:1]:
                    raise CheckpointError(f"{f.path}: tensor {name!r} has {info.shape[0]} rows; the configuration "
                                          f"gives {plan.rows.shape[0]}")
            if hf in self.plans:
                raise CheckpointError(f"{f.path}: tensors {self.plans[hf].gguf!r} and {name!r} both map to {hf!r}")
            self.plans[hf] = plan

    def _plan_derived(self, fam: GGUFMapping, cfg: dict) -> set[str]:
        """Plans for the mapping's Derived tensors, layer by layer where all their parts are in the
        file; the GGUF names they consume."""
        consumed: set[str] = set()
        n = cfg.get("num_hidden_layers") or 0
        for d in fam.derived:
            for i in range(n):
                names = [f"blk.{i}.{p}" for p in d.parts]
                if not all(x in self.f.tensors for x in names):
                    continue
                meta = [torch.empty(self.f.tensors[x].shape, device="meta") for x in names]
                try:
                    shape = tuple(d.fn(meta, cfg).shape)
                except (RuntimeError, ValueError, IndexError, KeyError, TypeError) as e:
                    raise CheckpointError(f"{self.f.path}: tensors {', '.join(names)} have shapes "
                                          f"{[list(m.shape) for m in meta]}, which do not combine into "
                                          f"{fam.layers_prefix}.{i}.{d.hf} ({e})") from None
                self.plans[f"{fam.layers_prefix}.{i}.{d.hf}"] = _Plan(names[0], shape, parts=tuple(names), fn=d.fn)
                consumed.update(names)
        return consumed

    def keys(self):
        return self.plans.keys()

    def close(self) -> None:
        """Unmap the file (when no weight refers to its mapping any more)."""
        self.f.close()

    def shape(self, key: str) -> tuple[int, ...]:
        return self.plans[key].shape

    def describe(self) -> str:
        return str(self.f.path)

    def gguf_name(self, key: str) -> str:
        return self.plans[key].gguf

    def load(self, key: str):
        plan = self.plans[key]
        if plan.parts:
            parts = []
            for name in plan.parts:
                info = self.f.check_supported(name)
                parts.append(ggml.dequantize(self.f.read(name), info.ggml_type, info.shape, torch.float32))
            t = plan.fn(parts, self._cfg).contiguous()
            return t if self.dtype is None or not self.dtype.is_floating_point else t.to(self.dtype)
        info = self.f.check_supported(plan.gguf)
        if info.ggml_type in ggml.FLOAT_TYPES:
            t = self.f.raw(plan.gguf).reshape(-1).view(ggml.FLOAT_TYPES[info.ggml_type]).reshape(info.shape)
            return self._finish(t, plan)
        # 2-D weights, and the 3-D stacked experts of MoE blocks (`GGMLWeight.select` gives one expert)
        if self.quantized and not plan.minus_one and not plan.transpose and len(info.shape) in (2, 3):
            name = plan.gguf
            w = GGMLWeight(self.f.raw(name), info.ggml_type, info.shape, dtype=self.dtype,
                           reader=lambda rows=None: self.f.read(name, rows), name=name, dense_fallback=self.dense_fallback)
            if plan.permute_heads:
                w = w.permute_rows(_qk_perm(info.shape[0], plan.permute_heads))
            if plan.rows is not None:
                w = w.permute_rows(plan.rows)
            return w
        # straight to the compute dtype unless a float32 fix-up follows (rounded once either way)
        dtype = torch.float32 if plan.minus_one or self.dtype is None or not self.dtype.is_floating_point else self.dtype
        t = ggml.dequantize(self.f.read(plan.gguf), info.ggml_type, info.shape, dtype)
        return self._finish(t, plan)

    def _finish(self, t: torch.Tensor, plan: _Plan) -> torch.Tensor:
        if plan.permute_heads:
            t = t[_qk_perm(t.shape[0], plan.permute_heads)]
        if plan.rows is not None:
            t = t[plan.rows]
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
    return sum(t.numel * size for t in f.tensors.values() if t.ggml_type in ggml.BLOCK_TYPES)


def choose_quantized(f: GGUFFile, dtype: torch.dtype, device: torch.device) -> bool:
    """For `keep_quantized=None` with float32 (or GPU) compute: keep blocks only when dequantising
    would cost real memory, i.e. when the dequantised weights exceed AUTO_DEQUANT_MAX_BYTES (2 GiB;
    env EMBER_GGUF_DEQUANT_MAX_BYTES) or a quarter of the device's memory. Dequantised weights run
    at dense-matmul speed; quantised ones dequantise on every forward (several times the matmul's
    cost) unless a kernel computes with their blocks.
    """
    need = dequantized_bytes(f, dtype)
    if need == 0:
        return False
    limit = AUTO_DEQUANT_MAX_BYTES
    total = _memory_bytes(device)
    if total:
        limit = min(limit, total // 4)
    return need > limit


@dataclass(frozen=True)
class QuantPlan:
    """What a GGUF load does with quantised weights."""

    dtype: torch.dtype  # the compute dtype
    keep: bool  # weights stay as GGUF blocks
    dense_fallback: bool  # as Linears, types without a fast kernel are dequantised once instead
    mode: str  # a description for `ember bench` / `inspect`


def plan_quantized(f: GGUFFile, dtype: torch.dtype | None, device: torch.device, keep_quantized: bool | None,
                   default_dtype: Callable[[torch.device, torch.dtype | None], torch.dtype],
                   int4_fast: bool, native: bool = False) -> QuantPlan:
    """keep_quantized=None (default):
    - where ember's native kernels run (`native`: a CPU they build for): float32 compute, every
      quantised weight stays as its blocks and linears compute on them (the types the kernels lack,
      Q2_K, Q3_K, the i-quants, TQ1_0/TQ2_0 and MXFP4, are dequantised once);
    - else where torch's int4 kernel is fast (`int4_fast`: a CPU with native bf16): bf16 compute,
      Q4_0/Q4_1/Q4_K/Q5_0/Q5_1/Q5_K/Q8_0 weights run on the int4 kernel, the others are dequantised
      once to bf16;
    - elsewhere (GPU, or no fast kernel): dequantise at load unless that costs too much memory
      (`choose_quantized`).
    Embeddings stay quantised in every mode but False. keep_quantized=True keeps every quantised
    weight; False dequantises all.
    """
    quantized = file_float_dtype(f) is None
    if quantized and native and keep_quantized is not False:
        return QuantPlan(dtype or torch.float32, True, keep_quantized is None,
                         "native kernels on the blocks" + (" (others dequantised once)" if keep_quantized is None else ""))
    if dtype is None:
        dtype = default_dtype(device, file_float_dtype(f))
        if quantized and keep_quantized is not False and int4_fast:
            dtype = torch.bfloat16
    if not quantized:
        return QuantPlan(dtype, False, False, "unquantised")
    if keep_quantized is None:
        if dtype == torch.bfloat16 and int4_fast:
            return QuantPlan(dtype, True, True, "auto: int4-kernel types quantised, others dequantised to bf16")
        keep = choose_quantized(f, dtype, device)
        return QuantPlan(dtype, keep, False,
                         "auto: " + ("quantised (dequantised weights would not fit)" if keep else "dequantised at load"))
    return QuantPlan(dtype, bool(keep_quantized), False, "quantised" if keep_quantized else "dequantised at load")


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
    out: dict[str, Any] = dict(token_ids(m))
    eos = eog_ids(m)
    if eos:
        out["eos_token_id"] = eos if len(eos) > 1 else eos[0]
    for key, name in (("temp", "temperature"), ("top_k", "top_k"), ("top_p", "top_p"), ("min_p", "min_p"),
                      ("penalty_repeat", "repetition_penalty")):
        v = m.get(f"general.sampling.{key}")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[name] = v
    return out


def release_free_memory() -> None:
    """Hand the heap's free pages back to the OS (ember.malloc.trim)."""
    from .malloc import trim

    trim()
