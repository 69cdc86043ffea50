"""Tiny transformers models written as GGUF the way llama.cpp's convert_hf_to_gguf.py (its
`conversion/` package) writes the families ember gained in 2026: the metadata of
`TextModel.set_gguf_parameters` plus each family's own keys, tensor names from gguf's own tensor
map, and each family's `modify_tensors` rearrangements (llama's Q/K permutation, Bloom's and
Falcon's regrouped QKV, DeepSeek's kv_b split into k_b/v_b, GPT-OSS's de-interleaved gate/up,
GraniteMoE's split input_linear, experts stacked per projection).
"""
from __future__ import annotations

from pathlib import Path

import torch

import ggufmake as gm

# transformers model_type -> llama.cpp architecture
ARCH = {"deepseek_v2": "deepseek2", "deepseek_v3": "deepseek2", "gpt_oss": "gpt-oss", "glm4": "glm4",
        "glm4_moe": "glm4moe", "smollm3": "smollm3", "olmo2": "olmo2", "olmo3": "olmo2", "exaone4": "exaone4",
        "ernie4_5": "ernie4_5", "ernie4_5_moe": "ernie4_5-moe", "hunyuan_v1_dense": "hunyuan-dense",
        "seed_oss": "seed_oss", "cohere": "command-r", "cohere2": "cohere2", "granitemoe": "granitemoe",
        "granitemoeshared": "granitemoe", "olmoe": "olmoe", "minimax_m2": "minimax-m2", "bloom": "bloom",
        "falcon": "falcon", "gpt_bigcode": "starcoder"}
LLAMA_CONVERTER = ("smollm3", "granitemoe")  # LlamaModel subclasses: Q/K rows permuted


def _h(c, *keys, default=None):
    for k in keys:
        v = getattr(c, k, None)
        if v is not None:
            return v
    return default


def _rope(c) -> dict:
    p = getattr(c, "rope_parameters", None) or {}
    return p.get("full_attention", p) if isinstance(p, dict) else {}


def metadata(c, arch: str) -> dict:
    """TextModel.set_gguf_parameters, then the family's additions."""
    m: dict = {}

    def put(key, v):
        if v is not None:
            m[f"{arch}.{key}"] = v

    put("block_count", c.num_hidden_layers)
    put("context_length", _h(c, "max_position_embeddings", "n_positions"))
    put("embedding_length", _h(c, "hidden_size", "n_embd"))
    put("feed_forward_length", _h(c, "intermediate_size", "n_inner"))
    put("attention.head_count", _h(c, "num_attention_heads", "n_head"))
    put("attention.head_count_kv", _h(c, "num_key_value_heads"))
    rope = _rope(c)
    theta = rope.get("rope_theta")
    put("rope.freq_base", None if theta is None else float(theta))
    kind, factor = rope.get("rope_type"), rope.get("factor")
    if kind == "linear" and factor is not None:
        put("rope.scaling.type", "linear")
        put("rope.scaling.factor", float(factor))
    elif kind == "yarn" and factor is not None:
        put("rope.scaling.type", "yarn")
        put("rope.scaling.factor", float(factor))
        put("rope.scaling.original_context_length", rope["original_max_position_embeddings"])
        for key, name in (("yarn_ext_factor", "extrapolation_factor"), ("yarn_attn_factor", "attention_factor"),
                          ("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if rope.get(name) is not None:
                put(f"rope.scaling.{key}", float(rope[name]))
    eps = _h(c, "rms_norm_eps")
    put("attention.layer_norm_rms_epsilon", None if eps is None else float(eps))
    eps = _h(c, "layer_norm_eps", "layer_norm_epsilon")
    put("attention.layer_norm_epsilon", None if eps is None else float(eps))
    put("expert_count", _h(c, "num_local_experts", "num_experts", "n_routed_experts"))
    put("expert_used_count", _h(c, "num_experts_per_tok"))
    put("expert_group_count", _h(c, "n_group"))
    put("expert_group_used_count", _h(c, "topk_group"))
    if getattr(c, "head_dim", None) is not None and arch != "deepseek2":
        put("attention.key_length", c.head_dim)
        put("attention.value_length", c.head_dim)
    head = _h(c, "head_dim") or c.hidden_size // c.num_attention_heads
    if arch in LLAMA_CONVERTER:
        put("rope.dimension_count", head)
        put("vocab_size", c.vocab_size)
    if arch in ("glm4", "glm4moe"):
        put("rope.dimension_count", int(head * _rope(c).get("partial_rotary_factor", 0.5)))
    if arch == "olmo2" and getattr(c, "sliding_window", None) is not None:
        put("attention.sliding_window", c.sliding_window)
        put("attention.sliding_window_pattern", [t == "sliding_attention" for t in c.layer_types])
    if arch == "exaone4" and c.sliding_window is not None:
        put("vocab_size", c.vocab_size)
        put("attention.sliding_window", c.sliding_window)
        put("attention.sliding_window_pattern", [t == "sliding_attention" for t in c.layer_types])
    if arch in ("command-r", "cohere2"):
        put("logit_scale", float(c.logit_scale))
        if arch == "cohere2":
            put("attention.sliding_window", c.sliding_window)
    if arch == "glm4moe":
        put("expert_count", c.n_routed_experts)
        put("expert_feed_forward_length", c.moe_intermediate_size)
        put("expert_shared_count", c.n_shared_experts)
        put("leading_dense_block_count", c.first_k_dense_replace)
        put("expert_gating_func", 2)  # sigmoid
        put("expert_weights_scale", float(c.routed_scaling_factor))
        put("expert_weights_norm", bool(c.norm_topk_prob))
    if arch == "granitemoe":  # GraniteModel's keys
        put("attention.scale", float(c.attention_multiplier))
        put("embedding_scale", float(c.embedding_multiplier))
        put("residual_scale", float(c.residual_multiplier))
        put("logit_scale", float(c.logits_scaling))
        put("expert_shared_feed_forward_length", getattr(c, "shared_intermediate_size", None) or None)
    if arch == "olmoe":
        put("attention.layer_norm_rms_epsilon", 1e-5)
    if arch == "minimax-m2":
        put("expert_feed_forward_length", c.intermediate_size)
        put("rope.dimension_count", c.rotary_dim)
    if arch == "ernie4_5-moe":
        put("expert_count", c.moe_num_experts)
        put("expert_used_count", c.moe_k)
        put("interleave_moe_layer_step", c.moe_layer_interval)
        put("leading_dense_block_count", c.moe_layer_start_index)
        put("expert_feed_forward_length", c.moe_intermediate_size)
        if c.moe_num_shared_experts:
            put("expert_shared_count", c.moe_num_shared_experts)
    if arch == "gpt-oss":
        put("attention.sliding_window", c.sliding_window)
        put("expert_feed_forward_length", c.intermediate_size)
    if arch == "deepseek2":
        m[f"{arch}.attention.head_count_kv"] = 1  # MLA written as MQA
        dense = c.first_k_dense_replace if c.n_routed_experts is not None else c.num_hidden_layers
        put("leading_dense_block_count", dense)
        put("vocab_size", c.vocab_size)
        put("attention.q_lora_rank", c.q_lora_rank)
        put("attention.kv_lora_rank", c.kv_lora_rank)
        put("attention.key_length", c.kv_lora_rank + c.qk_rope_head_dim)
        put("attention.value_length", c.kv_lora_rank)
        put("attention.key_length_mla", c.qk_nope_head_dim + c.qk_rope_head_dim)
        put("attention.value_length_mla", c.v_head_dim)
        put("expert_feed_forward_length", c.moe_intermediate_size)
        put("expert_shared_count", c.n_shared_experts or 0)
        put("expert_weights_scale", float(c.routed_scaling_factor))
        if getattr(c, "norm_topk_prob", False):
            put("expert_weights_norm", True)
        put("rope.dimension_count", c.qk_rope_head_dim)
        if rope.get("mscale_all_dim") is not None:
            put("rope.scaling.yarn_log_multiplier", 0.1 * rope["mscale_all_dim"])
        if c.model_type == "deepseek_v3":
            put("expert_gating_func", 2)  # sigmoid (V3's scoring_func; V2 files leave it: softmax)
    if arch in ("bloom", "falcon", "starcoder"):  # their converters write their own short lists
        n_embd = _h(c, "hidden_size", "n_embd")
        kv = {"bloom": c.num_attention_heads, "starcoder": 1}.get(arch)
        if arch == "falcon":
            kv = c.num_kv_heads if c.new_decoder_architecture else 1
        m = {f"{arch}.context_length": {"bloom": n_embd, "falcon": 2048}.get(arch, _h(c, "n_positions")),
             f"{arch}.embedding_length": n_embd, f"{arch}.feed_forward_length": 4 * n_embd,
             f"{arch}.block_count": c.num_hidden_layers, f"{arch}.attention.head_count": c.num_attention_heads,
             f"{arch}.attention.head_count_kv": kv,
             f"{arch}.attention.layer_norm_epsilon": float(c.layer_norm_epsilon)}
    return m


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def modify(c, arch: str, name: str, t: torch.Tensor):
    """(HF-style name, tensor) pairs as the family's modify_tensors hands them to the tensor map."""
    if arch in LLAMA_CONVERTER and name.endswith(("q_proj.weight", "q_proj.bias")):
        t = _permute(t, c.num_attention_heads)
    if arch in LLAMA_CONVERTER and name.endswith(("k_proj.weight", "k_proj.bias")):
        t = _permute(t, c.num_key_value_heads)
    if arch == "deepseek2" and name.endswith("kv_b_proj.weight"):
        H, nope, v = c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim
        k_b, v_b = t.view(H, nope + v, t.shape[-1]).split([nope, v], dim=1)
        yield name.replace("kv_b_proj", "k_b_proj"), k_b.transpose(1, 2)
        yield name.replace("kv_b_proj", "v_b_proj"), v_b
        return
    if arch == "gpt-oss" and "mlp.experts." in name:
        if name.endswith("gate_up_proj_bias"):
            yield name.replace("gate_up_proj_bias", "gate_proj.bias"), t[..., ::2]
            yield name.replace("gate_up_proj_bias", "up_proj.bias"), t[..., 1::2]
        elif name.endswith("gate_up_proj"):
            t = t.transpose(-1, -2)
            yield name.replace("gate_up_proj", "gate_proj.weight"), t[:, ::2, :]
            yield name.replace("gate_up_proj", "up_proj.weight"), t[:, 1::2, :]
        elif name.endswith("down_proj_bias"):
            yield name.replace("down_proj_bias", "down_proj.bias"), t
        elif name.endswith("down_proj"):
            yield name + ".weight", t.transpose(-1, -2)
        return
    if arch == "gpt-oss" and name.endswith("sinks"):
        yield name + ".weight", t
        return
    if arch == "granitemoe" and name.endswith(("input_linear.weight", "experts.gate_up_proj")):
        # GraniteMoeModel.modify_tensors: the fused gate/up split, written under GGUF names directly
        gate, up = t.chunk(2, dim=-2)
        bid = name.split(".")[2]
        kind = "shexp" if "shared_mlp" in name else "exps"
        yield f"blk.{bid}.ffn_gate_{kind}.weight", gate
        yield f"blk.{bid}.ffn_up_{kind}.weight", up
        return
    if arch == "bloom" and "query_key_value" in name:
        n_head, n_embd = c.num_attention_heads, c.hidden_size
        qkv = t.reshape(n_head, 3, n_embd // n_head, *t.shape[1:])
        t = torch.cat([qkv[:, i].reshape(n_embd, *t.shape[1:]) for i in range(3)], dim=0)
    if arch == "falcon" and "query_key_value" in name and name.endswith(".weight") and c.new_decoder_architecture:
        # KV groups of (queries, key, value) to all queries, all keys, all values (7B's multi-query
        # layout is already that: one group)
        n_head, n_kv = c.num_attention_heads, c.num_kv_heads
        hd = c.hidden_size // n_head
        qkv = t.view(n_kv, n_head // n_kv + 2, hd, hd * n_head)
        q = qkv[:, :-2].reshape(n_head * hd, hd * n_head)
        k = qkv[:, [-2]].reshape(n_kv * hd, hd * n_head)
        v = qkv[:, [-1]].reshape(n_kv * hd, hd * n_head)
        t = torch.cat((q, k, v)).reshape_as(t)
    yield name, t


def gguf_tensors(model, arch: str | None = None):
    """(GGUF name, float32 array) of a transformers model, converted as llama.cpp does."""
    import gguf

    c = model.config
    arch = arch or ARCH[c.model_type]
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    name_map = gguf.get_tensor_name_map(arch_enum, c.num_hidden_layers)
    tied = getattr(c, "tie_word_embeddings", False) or arch in ("command-r", "cohere2")
    sd = model.state_dict()
    # GraniteMoE's and GPT-OSS's experts are split by modify_tensors; the others' stacked per projection
    items = sd.items() if arch in ("granitemoe", "gpt-oss") else gm._split_fused_experts(sd)
    for name, t in items:
        if "rotary_emb" in name or name.endswith((".attn.bias", "masked_bias")) or (name == "lm_head.weight" and tied):
            continue
        if arch == "cohere2" and name.endswith(".bias"):
            continue  # the converter drops Cohere2's (all-zero) biases
        for hf, w in modify(c, arch, name, t.detach().float()):
            hf = hf.replace("e_score_correction_bias", "e_score_correction.bias")  # as ModelBase does
            if hf.startswith("blk."):
                yield hf, w.numpy().copy()
                continue
            if arch == "granitemoe":  # the Hub checkpoints' names (transformers 5 renamed them)
                hf = hf.replace("block_sparse_moe.router.weight", "block_sparse_moe.router.layer.weight")
                hf = hf.replace("block_sparse_moe.experts.down_proj", "block_sparse_moe.output_linear.weight")
            if arch == "ernie4_5-moe":
                hf = hf.replace(".gate.moe_statics.", ".moe_statics.")
            if arch == "bloom":
                hf = hf.replace("transformer.", "")
            base, suffix = hf.rsplit(".", 1)
            gname = name_map.get_name(base)
            if gname is None and arch == "minimax-m2":  # the Hub checkpoints' block_sparse_moe names
                gname = name_map.get_name(base.replace(".mlp.", ".block_sparse_moe."))
            assert gname is not None, (arch, hf)
            yield f"{gname}.{suffix}", w.numpy().copy()


def convert(model, path, qtype=0, extra_meta: dict | None = None, drop: tuple[str, ...] = ()) -> Path:
    """Write `model` as llama.cpp's converter would (`qtype`: ggml type of the 2-D/3-D weights whose
    rows are whole blocks; norms, routers and 1-D tensors stay F32)."""
    c = model.config
    arch = ARCH[c.model_type]
    tensors = {}
    for name, w in gguf_tensors(model, arch):
        if name in drop:
            continue
        q = qtype(name) if callable(qtype) else qtype
        if w.ndim not in (2, 3) or "norm" in name or "ffn_gate_inp" in name or w.shape[-1] % gm._block_elems(q):
            q = 0
        tensors[name] = gm.quantize(w, q, seed=len(tensors))
    meta = metadata(c, arch)
    meta.update(gm.tokenizer_meta())
    meta.update(extra_meta or {})
    return gm.write(path, arch, meta, tensors)
