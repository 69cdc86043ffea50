"""Tiny state-space and hybrid transformers models (Mamba-2, Nemotron-H, Falcon-H1) written as GGUF
the way llama.cpp's converter writes them (conversion/mamba.py, nemotron.py, falcon_h1.py): names
from gguf's tensor map, `A_log` stored as A = -exp(A_log) [H, 1], `D` as [H, 1], the conv weight
squeezed to [C, K], the group norm as [G, I / G], `dt_bias` as `ssm_dt.bias`; the ssm.* metadata."""
from __future__ import annotations

import torch

import ggufmake as gm

ARCH = {"mamba2": "mamba2", "nemotron_h": "nemotron_h", "falcon_h1": "falcon-h1", "lfm2": "lfm2"}


def _mixer_sizes(c) -> tuple[int, int, int, int, int, int]:
    """(inner, heads, state, groups, conv kernel, head dim) in each family's config names."""
    if c.model_type == "mamba2":
        return c.num_heads * c.head_dim, c.num_heads, c.state_size, c.n_groups, c.conv_kernel, c.head_dim
    if c.model_type == "nemotron_h":
        return (c.mamba_num_heads * c.mamba_head_dim, c.mamba_num_heads, c.ssm_state_size, c.n_groups, c.conv_kernel,
                c.mamba_head_dim)
    return c.mamba_d_ssm, c.mamba_n_heads, c.mamba_d_state, c.mamba_n_groups, c.mamba_d_conv, c.mamba_d_head


def _lfm2_metadata(c, arch: str) -> dict:
    from ember.models.lfm2 import Config

    ff = Config(intermediate_size=c.intermediate_size, block_multiple_of=c.block_multiple_of,
                block_ffn_dim_multiplier=c.block_ffn_dim_multiplier,
                block_auto_adjust_ff_dim=c.block_auto_adjust_ff_dim).ff_dim  # the converter's adjustment
    rope = getattr(c, "rope_parameters", None) or {}
    return {f"{arch}.block_count": c.num_hidden_layers, f"{arch}.embedding_length": c.hidden_size,
            f"{arch}.context_length": c.max_position_embeddings, f"{arch}.feed_forward_length": ff,
            f"{arch}.attention.head_count": c.num_attention_heads,
            f"{arch}.attention.head_count_kv": ([c.num_key_value_heads if t != "conv" else 0 for t in c.layer_types],
                                                gm.ARR),
            f"{arch}.shortconv.l_cache": c.conv_L_cache, f"{arch}.attention.layer_norm_rms_epsilon": float(c.norm_eps),
            f"{arch}.rope.freq_base": float(rope.get("rope_theta", 1e6))}


def metadata(c, arch: str) -> dict:
    if arch == "lfm2":
        return _lfm2_metadata(c, arch)
    inner, heads, state, groups, conv, _ = _mixer_sizes(c)
    eps = getattr(c, "layer_norm_epsilon", None) or getattr(c, "rms_norm_eps", None)
    m = {f"{arch}.block_count": c.num_hidden_layers, f"{arch}.embedding_length": c.hidden_size,
         f"{arch}.context_length": getattr(c, "max_position_embeddings", None) or 1 << 20,
         f"{arch}.ssm.conv_kernel": conv, f"{arch}.ssm.inner_size": inner, f"{arch}.ssm.state_size": state,
         f"{arch}.ssm.time_step_rank": heads, f"{arch}.ssm.group_count": groups,
         f"{arch}.attention.layer_norm_rms_epsilon": float(eps)}
    if arch == "mamba2":
        m.update({f"{arch}.feed_forward_length": 0, f"{arch}.attention.head_count": 0})
    if arch == "nemotron_h":  # per-layer arrays mark the attention and the MLP blocks
        types = c.layers_block_type
        m.update({f"{arch}.attention.head_count": c.num_attention_heads,
                  f"{arch}.attention.head_count_kv": ([c.num_key_value_heads if t == "full_attention" else 0
                                                        for t in types], gm.ARR),
                  f"{arch}.feed_forward_length": ([c.intermediate_size if t == "mlp" else 0 for t in types], gm.ARR),
                  f"{arch}.attention.key_length": c.head_dim, f"{arch}.attention.value_length": c.head_dim})
    if arch == "falcon-h1":
        rope = getattr(c, "rope_parameters", None) or {}
        head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        m.update({f"{arch}.feed_forward_length": c.intermediate_size,
                  f"{arch}.attention.head_count": c.num_attention_heads,
                  f"{arch}.attention.head_count_kv": c.num_key_value_heads,
                  f"{arch}.attention.key_length": head, f"{arch}.attention.value_length": head,
                  f"{arch}.rope.freq_base": float(rope.get("rope_theta", 10000.0))})
    return m


def _falcon_fold(c, name: str, t: torch.Tensor) -> torch.Tensor:
    """Falcon-H1's converter folds every µP multiplier into the weights."""
    attn_in = c.attention_in_multiplier
    if "down_proj" in name:
        return t * c.mlp_multipliers[1]
    if "gate_proj" in name:
        return t * c.mlp_multipliers[0]
    if "k_proj" in name:
        return t * c.key_multiplier * attn_in
    if "q_proj" in name or "v_proj" in name:
        return t * attn_in
    if "o_proj" in name:
        return t * c.attention_out_multiplier
    if "out_proj" in name:
        return t * c.ssm_out_multiplier
    if "in_proj" in name:
        t = t * c.ssm_in_multiplier
        z, x, b, cc, dt = c.ssm_multipliers
        inner, gn = c.mamba_d_ssm, c.mamba_n_groups * c.mamba_d_state
        t[:inner] *= z
        t[inner:2 * inner] *= x
        t[2 * inner:2 * inner + gn] *= b
        t[2 * inner + gn:2 * inner + 2 * gn] *= cc
        t[2 * inner + 2 * gn:] *= dt
        return t
    if "lm_head" in name:
        return t * c.lm_head_multiplier
    if "embed_tokens" in name:
        return t * c.embedding_multiplier
    return t


def gguf_tensors(model):
    import gguf

    c = model.config
    arch = ARCH[c.model_type]
    enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(enum, c.num_hidden_layers)
    inner, heads, state, groups, _, _ = _mixer_sizes(c) if arch != "lfm2" else (0,) * 6
    for name, t in model.state_dict().items():
        t = t.detach().float()
        if name == "lm_head.weight" and getattr(c, "tie_word_embeddings", False):
            continue
        if arch == "nemotron_h" and name.startswith("model."):  # the converter's filter_tensors
            name = "backbone." + name[len("model."):]
        if arch == "falcon-h1":
            t = _falcon_fold(c, name, t)
        if name.endswith(".dt_bias"):
            name = name.rpartition(".dt_bias")[0] + ".dt_proj.bias"
        if name.endswith(".A_log"):
            t = -torch.exp(t)
        if name.endswith((".A_log", ".D")):
            t = t.reshape(-1, 1)
        elif name.endswith("conv1d.weight") or name.endswith("conv.conv.weight"):
            t = t.squeeze(1)
        elif name.endswith("mixer.norm.weight") or name.endswith("mamba.norm.weight"):
            t = t.reshape(groups, inner // groups)
        base, _, suffix = name.rpartition(".")
        g = names.get_name(base)
        if g is None:  # keyed by the whole name, and written without a suffix as the converter does:
            g = names.get_name(name)  # A_log and D, and Falcon-H1's pre_ff_layernorm ("blk.N.ffn_norm")
            assert g is not None, (arch, name)
            yield g, t.numpy().copy()
            continue
        yield f"{g}.{suffix}", t.numpy().copy()


def convert(model, path, extra_meta: dict | None = None):
    c = model.config
    arch = ARCH[c.model_type]
    tensors = {name: gm.quantize(w, 0) for name, w in gguf_tensors(model)}
    meta = metadata(c, arch)
    meta.update(gm.tokenizer_meta())
    meta.update(extra_meta or {})
    return gm.write(path, arch, meta, tensors)
