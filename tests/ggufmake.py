"""Writing small GGUF files for tests: tiny transformers models converted as llama.cpp's
convert_hf_to_gguf.py does (names from gguf's own tensor map, Q/K permutation for llama, `w + 1`
norms for Gemma, transposed Conv1D for GPT-2), a tiny byte-level tokenizer, and raw files for the
bad-input tests.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

U32, I32, F32, BOOL, STR, ARR, U64 = 4, 5, 6, 7, 8, 9, 10


def write(path, arch: str, meta: dict, tensors: dict[str, tuple[np.ndarray, int | None]]) -> Path:
    """A GGUF file with `meta` ({key: value | (value, GGUFValueType) }) and tensors {name: (array, raw ggml type)}.
    Arrays are values in torch order (float), or raw uint8 block bytes when a raw type is given."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_string("general.architecture", arch)
    for k, v in meta.items():
        if isinstance(v, tuple):
            val, vt = v
            if vt == ARR:
                sub = gguf.GGUFValueType.get_type(val[0]) if val else gguf.GGUFValueType.INT32
                w.add_key_value(k, val, gguf.GGUFValueType.ARRAY, sub)
            else:
                w.add_key_value(k, val, gguf.GGUFValueType(vt))
        elif isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        elif isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, list):
            w.add_array(k, v)
        else:
            raise TypeError(k)
    for name, (arr, raw) in tensors.items():
        if raw is None:
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, arr, raw_dtype=gguf.GGMLQuantizationType(raw))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def quantize(values: np.ndarray, qtype: int, seed: int = 0) -> tuple[np.ndarray, int | None]:
    """(array, raw type) for add_tensor: float32/float16 as values, others quantised by gguf.quants;
    for the types gguf.quants cannot quantise (the i-quants), random blocks of about the values' scale
    (what they dequantise to is then the model's weight: compare against a reader of the file)."""
    import gguf

    if qtype == 0:
        return values.astype(np.float32), None
    if qtype == 1:
        return values.astype(np.float16), None
    t = gguf.GGMLQuantizationType(qtype)
    try:
        return gguf.quants.quantize(values.astype(np.float32), t), qtype
    except NotImplementedError:
        n, _ = gguf.GGML_QUANT_SIZES[t]
        rows = int(np.prod(values.shape[:-1]))
        raw = random_blocks(qtype, rows, values.shape[-1] // n, seed=seed, scale=float(np.abs(values).mean()))
        return raw.reshape(*values.shape[:-1], -1), qtype


# where each block type keeps its scale: fp16 fields (byte offsets); IQ1_M spreads its fp16 over the
# top nibbles of four words, MXFP4 has an E8M0 exponent byte
F16_FIELDS = {2: [0], 3: [0, 2], 6: [0], 7: [0, 2], 8: [0], 10: [80, 82], 11: [108], 12: [0, 2], 13: [0, 2],
              14: [208], 16: [0], 17: [0], 18: [0], 19: [0], 20: [0], 21: [0], 22: [0], 23: [0], 34: [52], 35: [64]}
IQ1_M, MXFP4 = 29, 39


def set_block_scales(blocks: np.ndarray, qtype: int, d: np.ndarray) -> None:
    """Write the fp16 scales `d` [n_blocks] into raw blocks [n_blocks, block_bytes] in place."""
    bits = d.astype(np.float16).view(np.uint16)
    if qtype == IQ1_M:
        words = blocks[:, 48:56].copy().view(np.uint16)
        for k in range(4):
            words[:, k] = (words[:, k] & 0x0FFF) | (((bits >> (4 * k)) & 0xF) << 12)
        blocks[:, 48:56] = words.view(np.uint8)
    for at in F16_FIELDS.get(qtype, []):
        blocks[:, at:at + 2] = bits.view(np.uint8).reshape(-1, 2)


def random_blocks(qtype: int, rows: int, blocks_per_row: int, seed: int = 0, scale: float = 0.05) -> np.ndarray:
    """Random raw blocks (uint8 [rows, row_bytes]) with finite scales, dequantising to values of
    mean magnitude about `scale` (every other bit pattern is a valid block)."""
    import gguf

    t = gguf.GGMLQuantizationType(qtype)
    rng = np.random.default_rng(seed)
    _, nb = gguf.GGML_QUANT_SIZES[t]
    raw = rng.integers(0, 256, size=(rows, blocks_per_row * nb), dtype=np.uint8)
    blocks = raw.reshape(-1, nb)
    if qtype == MXFP4:  # E8M0: the block's values are 2^(e-128) times codes of magnitude up to 12
        e = np.clip(np.round(np.log2(scale / 4)) + 128, 2, 250)
        blocks[:, 0] = (e + rng.integers(-1, 2, blocks.shape[0])).astype(np.uint8)
        return raw
    set_block_scales(blocks, qtype, np.ones(blocks.shape[0]))
    unit = float(np.abs(gguf.quants.dequantize(blocks, t)).mean()) or 1.0  # values are linear in the scale
    set_block_scales(blocks, qtype, (0.5 + rng.random(blocks.shape[0])) * scale / unit)
    return raw


# ---- a tiny byte-level tokenizer ----------------------------------------------------------------
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER = ["<think>"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def byte_vocab() -> tuple[list[str], list[int], list[str]]:
    """256 byte tokens, a few merged ones, the specials: (tokens, types, merges)."""
    from ember.gguf_tokenizer import bytes_to_unicode

    alphabet = [bytes_to_unicode()[b] for b in range(256)]
    merged = ["Ġt", "he", "Ġthe", "in", "Ġa"]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
    tokens = alphabet + merged + SPECIALS + USER
    types = [1] * (len(alphabet) + len(merged)) + [3] * len(SPECIALS) + [4] * len(USER)
    return tokens, types, merges


def tokenizer_meta(pre: str = "qwen2") -> dict:
    tokens, types, merges = byte_vocab()
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": (types, ARR),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": tokens.index("<|im_start|>"),
        "tokenizer.ggml.eos_token_id": tokens.index("<|im_end|>"),
        "tokenizer.ggml.padding_token_id": tokens.index("<|endoftext|>"),
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }


# ---- transformers model -> GGUF, as convert_hf_to_gguf.py writes it -----------------------------
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
             "gemma3_text": "gemma3", "phi3": "phi3", "gpt2": "gpt2", "mixtral": "llama", "qwen2_moe": "qwen2moe",
             "qwen3_moe": "qwen3moe", "llama4_text": "llama4", "phimoe": "phimoe"}


def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_metadata(cfg, arch: str) -> dict:
    c = cfg
    if arch == "gpt2":
        return {"gpt2.context_length": c.n_positions, "gpt2.embedding_length": c.n_embd, "gpt2.block_count": c.n_layer,
                "gpt2.feed_forward_length": c.n_inner or 4 * c.n_embd, "gpt2.attention.head_count": c.n_head,
                "gpt2.attention.layer_norm_epsilon": float(c.layer_norm_epsilon)}
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    m = {
        f"{arch}.context_length": c.max_position_embeddings,
        f"{arch}.embedding_length": c.hidden_size,
        f"{arch}.block_count": c.num_hidden_layers,
        f"{arch}.feed_forward_length": c.intermediate_size,
        f"{arch}.attention.head_count": c.num_attention_heads,
        f"{arch}.attention.head_count_kv": c.num_key_value_heads,
        f"{arch}.attention.layer_norm_rms_epsilon": float(c.rms_norm_eps),
    }
    rope = getattr(c, "rope_parameters", None) or {}
    if isinstance(rope, dict) and "full_attention" in rope:
        rope = rope["full_attention"]
    theta = rope.get("rope_theta", getattr(c, "rope_theta", None))
    if theta is not None:
        m[f"{arch}.rope.freq_base"] = float(theta)
    if arch == "llama":
        m["llama.rope.dimension_count"] = head_dim
        m["llama.vocab_size"] = c.vocab_size
    experts = getattr(c, "num_local_experts", None) or getattr(c, "num_experts", None)
    if experts:  # as convert_hf_to_gguf.py writes a MoE's hyperparameters
        m[f"{arch}.expert_count"] = experts
        m[f"{arch}.expert_used_count"] = c.num_experts_per_tok
        if getattr(c, "moe_intermediate_size", None):
            m[f"{arch}.expert_feed_forward_length"] = c.moe_intermediate_size
        if getattr(c, "shared_expert_intermediate_size", None):
            m[f"{arch}.expert_shared_feed_forward_length"] = c.shared_expert_intermediate_size
    if arch == "phimoe":  # as the phi3 converter writes it (0: no sliding window)
        m["phimoe.rope.dimension_count"] = head_dim
        m["phimoe.attention.sliding_window"] = c.sliding_window or 0
    if arch == "llama4":  # the dense layers' width; the experts' (intermediate_size) is the expert width
        m["llama4.feed_forward_length"] = c.intermediate_size_mlp
        m["llama4.expert_feed_forward_length"] = c.intermediate_size
        m["llama4.interleave_moe_layer_step"] = c.interleave_moe_layer_step
        m["llama4.rope.dimension_count"] = head_dim
        m["llama4.vocab_size"] = c.vocab_size
    if arch in ("qwen3", "qwen3moe", "gemma2", "gemma3"):
        m[f"{arch}.attention.key_length"] = head_dim
        m[f"{arch}.attention.value_length"] = head_dim
    if arch in ("gemma2", "gemma3") and getattr(c, "sliding_window", None):
        m[f"{arch}.attention.sliding_window"] = c.sliding_window
    if arch == "gemma2":
        m["gemma2.attn_logit_softcapping"] = float(c.attn_logit_softcapping)
        m["gemma2.final_logit_softcapping"] = float(c.final_logit_softcapping)
    if arch == "phi3":
        m["phi3.rope.dimension_count"] = int(head_dim * getattr(c, "partial_rotary_factor", 1.0))
        if c.sliding_window:
            m["phi3.attention.sliding_window"] = c.sliding_window
    return m


def _split_fused_experts(sd: dict):
    """(name, tensor) with transformers 5's fused experts (`mlp.experts.gate_up_proj` [E, 2F, H],
    `mlp.experts.down_proj`) as the converter splits them: stacked `experts.gate_proj.weight`,
    `experts.up_proj.weight`, `experts.down_proj.weight`."""
    for name, t in sd.items():
        if name.endswith("feed_forward.experts.gate_up_proj"):  # Llama 4: [E, H, 2F] and [E, F, H]
            gate, up = t.chunk(2, dim=-1)
            yield name.replace("gate_up_proj", "gate_proj.weight"), gate.transpose(1, 2)
            yield name.replace("gate_up_proj", "up_proj.weight"), up.transpose(1, 2)
        elif name.endswith("feed_forward.experts.down_proj"):
            yield name + ".weight", t.transpose(1, 2)
        elif name.endswith("experts.gate_up_proj"):
            gate, up = t.chunk(2, dim=-2)
            yield name.replace("gate_up_proj", "gate_proj.weight"), gate
            yield name.replace("gate_up_proj", "up_proj.weight"), up
        elif name.endswith("experts.down_proj"):
            yield name + ".weight", t
        else:
            yield name, t


def _block_elems(qtype: int) -> int:
    import gguf

    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)][0]


def _gguf_names(model):
    """(HF name, GGUF name, tensor) of a transformers model's weights as convert_hf_to_gguf.py names
    them (fused experts split, tied heads and buffers left out)."""
    import gguf

    cfg = model.config
    arch = GGUF_ARCH[cfg.model_type]
    n_layers = cfg.num_hidden_layers if arch != "gpt2" else cfg.n_layer
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    name_map = gguf.get_tensor_name_map(arch_enum, n_layers)
    tied = getattr(cfg, "tie_word_embeddings", False)
    for name, t in _split_fused_experts(model.state_dict()):
        if "rotary_emb" in name or name.endswith(".attn.bias") or name.endswith("masked_bias"):
            continue
        if name == "lm_head.weight" and tied:
            continue
        base, suffix = name.rsplit(".", 1)
        gname = name_map.get_name(base)
        assert gname is not None, name
        yield name, f"{gname}.{suffix}", t


def hf_to_gguf(model, path, qtype=0, tokenizer: bool = True, extra_meta: dict | None = None,
               drop: tuple[str, ...] = (), arch: str | None = None) -> Path:
    """Convert a (tiny) transformers causal LM to GGUF the way llama.cpp does. `qtype`: the ggml type of
    the 2-D and 3-D weights (those whose rows are whole blocks of it), or a function of the GGUF name
    giving it. `drop`: GGUF tensor names to leave out (for bad-file tests). `arch`: the file's
    architecture where it is not the model type's (a variant with the same tensors, e.g. qwen2vl)."""
    cfg = model.config
    arch = arch or GGUF_ARCH[cfg.model_type]
    tensors = {}
    for name, gname, t in _gguf_names(model):
        if gname in drop:
            continue
        suffix = name.rsplit(".", 1)[1]
        w = t.detach().float().numpy().copy()
        if arch == "llama" and gname.endswith(("attn_q.weight", "attn_q.bias")):
            w = _llama_permute(w, cfg.num_attention_heads)
        if arch == "llama" and gname.endswith(("attn_k.weight", "attn_k.bias")):
            w = _llama_permute(w, cfg.num_key_value_heads)
        if arch in ("gemma2", "gemma3") and gname.endswith("norm.weight"):
            w = w + 1
        if arch == "gpt2" and suffix == "weight" and any(k in gname for k in ("attn_qkv", "attn_output", "ffn_up", "ffn_down")):
            w = w.T.copy()
        q = qtype(gname) if callable(qtype) else qtype
        if w.ndim not in (2, 3) or gname.endswith(("norm.weight", "ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")) \
                or w.shape[-1] % _block_elems(q):
            q = 0  # as the converter: 1-D tensors, norms and MoE routers stay F32
        tensors[gname] = quantize(w, q, seed=len(tensors))
    meta = hf_metadata(cfg, arch)
    if tokenizer:
        meta.update(tokenizer_meta())
    meta.update(extra_meta or {})
    return write(path, arch, meta, tensors)


def with_gguf_weights(model, path):
    """A copy of the transformers model (as converted by hf_to_gguf, Llama/Qwen families) holding the
    GGUF file's weights, dequantised by gguf.quants: the reference for a quantised file that
    transformers' own GGUF reader cannot load (its MoE support reads no expert widths)."""
    import copy

    import gguf

    cfg = model.config
    arch = GGUF_ARCH[cfg.model_type]
    reader = gguf.GGUFReader(str(path))
    stored = {t.name: t for t in reader.tensors}
    fused: dict[str, list] = {}
    sd = {}
    for name, gname, t in _gguf_names(model):
        r = stored[gname]
        w = np.asarray(gguf.quants.dequantize(r.data, r.tensor_type), dtype=np.float32).reshape(t.shape)
        if arch == "llama" and gname.endswith(("attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias")):
            heads = cfg.num_attention_heads if ".attn_q." in gname else cfg.num_key_value_heads
            w = w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        w = torch.from_numpy(w.copy())
        if name.endswith(("experts.gate_proj.weight", "experts.up_proj.weight")) and \
                name.replace("gate_proj.weight", "gate_up_proj").replace("up_proj.weight", "gate_up_proj") in model.state_dict():
            fused.setdefault(name.rsplit(".", 2)[0] + ".gate_up_proj", []).append(w)
        elif name.endswith("experts.down_proj.weight") and name[:-len(".weight")] in model.state_dict():
            sd[name[:-len(".weight")]] = w
        else:
            sd[name] = w
    sd.update({k: torch.cat(v, dim=-2) for k, v in fused.items()})  # gate rows, then up rows
    out = copy.deepcopy(model)
    missing, unexpected = out.load_state_dict(sd, strict=False)
    assert not unexpected and all(k == "lm_head.weight" or "rotary" in k for k in missing), (missing, unexpected)
    return out.eval()


# ---- raw files for the bad-input tests ----------------------------------------------------------
def gguf_string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def raw_header(n_tensors: int, n_kv: int, version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def raw_kv(key: str, vtype: int, payload: bytes) -> bytes:
    return gguf_string(key) + struct.pack("<I", vtype) + payload


def raw_tensor_info(name: str, dims: list[int], ggml_type: int, offset: int) -> bytes:
    return gguf_string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack(
        "<IQ", ggml_type, offset)


def raw_file(path, kvs: list[bytes], infos: list[bytes], data: bytes = b"", n_tensors=None, n_kv=None, align=32) -> Path:
    head = raw_header(len(infos) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(infos)
    body += b"\0" * (-len(body) % align)
    Path(path).write_bytes(body + data)
    return Path(path)


def torch_seed(seed: int = 0):
    torch.manual_seed(seed)
    return np.random.default_rng(seed)
