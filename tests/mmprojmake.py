"""Tiny transformers image+text models written as llama.cpp's GGUF pair: the decoder (ggufmake) and the
multimodal projector file (mmproj), laid out as llama.cpp's converters write them:

- Gemma 3: convert_hf_to_gguf.py --mmproj (MmprojModel.set_gguf_parameters + Gemma3VisionModel:
  projector_type gemma3, tensor names from gguf's MMPROJ tensor map, soft_emb_norm stored as 1 + w,
  the input projection F16, the embeddings F32);
- LLaVA: tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py --llava-projector (its
  get_tensor_name renames, fc1/fc2 written as ffn_down/ffn_up, the tower cut after its feature
  layer, post_layernorm dropped, 2-D weights F16 in an f16 file).

test_mmproj.py checks these against the converters themselves when EMBER_LLAMA_CPP names a tree.
"""
from __future__ import annotations

import numpy as np

import ggufmake as gm

OPENAI_MEAN, OPENAI_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def tokenizer_meta(tk, template: str) -> dict:
    """GGUF tokenizer metadata of a byte-level BPE `tokenizers.Tokenizer` (tinymodels.build_tokenizer)."""
    import json

    d = json.loads(tk.to_str())
    vocab = d["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    for a in d["added_tokens"]:
        if a["id"] >= len(tokens):
            tokens.extend([None] * (a["id"] + 1 - len(tokens)))
        tokens[a["id"]] = a["content"]
    special = {a["id"] for a in d["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in d["model"]["merges"]]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": ([3 if i in special else 1 for i in range(len(tokens))], gm.ARR),
            "tokenizer.ggml.merges": merges, "tokenizer.ggml.eos_token_id": tk.token_to_id("<|im_end|>"),
            "tokenizer.ggml.padding_token_id": tk.token_to_id("<|endoftext|>"),
            "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": template}


def decoder(hf, path, tk, template: str, qtype: int = 0):
    """The image+text model's decoder as a GGUF causal LM (its own family's converter)."""
    import torch
    from transformers import AutoModelForCausalLM

    text_cfg = hf.config.text_config
    lm = AutoModelForCausalLM.from_config(text_cfg, dtype=torch.float32)
    sd = {k.replace("model.language_model.", "model."): v for k, v in hf.state_dict().items()
          if k.startswith(("model.language_model.", "lm_head."))}
    lm.load_state_dict(sd, strict=False)
    lm.tie_weights()
    return gm.hf_to_gguf(lm, path, qtype, tokenizer=False, extra_meta=tokenizer_meta(tk, template))


def _vision_meta(v, text_hidden: int, f16: bool, mean, std) -> dict:
    return {"general.type": "mmproj", "general.file_type": int(f16), "clip.has_vision_encoder": True,
            "clip.vision.projection_dim": text_hidden, "clip.vision.image_size": v.image_size,
            "clip.vision.patch_size": v.patch_size, "clip.vision.embedding_length": v.hidden_size,
            "clip.vision.feed_forward_length": v.intermediate_size, "clip.vision.block_count": v.num_hidden_layers,
            "clip.vision.attention.head_count": v.num_attention_heads,
            "clip.vision.image_mean": [float(x) for x in mean], "clip.vision.image_std": [float(x) for x in std]}


# gguf's MMPROJ tensor map for a SigLIP tower and Gemma 3's projector (written out: the installed gguf
# package predates some of these names)
MMPROJ_NAMES = [
    (r"vision_tower\.vision_model\.embeddings\.patch_embedding", "v.patch_embd"),
    (r"vision_tower\.vision_model\.embeddings\.position_embedding", "v.position_embd"),
    (r"vision_tower\.vision_model\.post_layernorm", "v.post_ln"),
    (r"vision_tower\.vision_model\.encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj", r"v.blk.\1.attn_\2"),
    (r"vision_tower\.vision_model\.encoder\.layers\.(\d+)\.self_attn\.out_proj", r"v.blk.\1.attn_out"),
    (r"vision_tower\.vision_model\.encoder\.layers\.(\d+)\.layer_norm(1|2)", r"v.blk.\1.ln\2"),
    (r"vision_tower\.vision_model\.encoder\.layers\.(\d+)\.mlp\.fc1", r"v.blk.\1.ffn_up"),
    (r"vision_tower\.vision_model\.encoder\.layers\.(\d+)\.mlp\.fc2", r"v.blk.\1.ffn_down"),
    (r"multi_modal_projector\.mm_input_projection", "mm.input_projection"),
    (r"multi_modal_projector\.mm_soft_emb_norm", "mm.soft_emb_norm"),
]


def _mmproj_name(base: str) -> str:
    import re

    for pat, rep in MMPROJ_NAMES:
        if re.fullmatch(pat, base):
            return re.sub(pat, rep, base)
    raise AssertionError(base)


def _blocks(name: str, w, q: int, qtype: int | None) -> int:
    """The type of a tower's 2-D weight in a file quantised to `qtype` (llama-quantize's choice for an
    mmproj file: the encoder's linear weights whose rows are whole blocks), else `q`."""
    if qtype and w.ndim == 2 and name.startswith("v.blk.") and name.endswith(".weight") \
            and w.shape[-1] % gm._block_elems(qtype) == 0:
        return qtype
    return q


def gemma3_mmproj(hf, path, f16: bool = False, image_seq_length: int | None = None, meta: dict | None = None,
                  drop: tuple = (), qtype: int | None = None):
    """As convert_hf_to_gguf.py --mmproj writes a Gemma3ForConditionalGeneration."""
    c, v = hf.config, hf.config.vision_config
    m = _vision_meta(v, c.text_config.hidden_size, f16, [0.5] * 3, [0.5] * 3)
    m["clip.projector_type"] = "gemma3"
    m["clip.vision.attention.layer_norm_epsilon"] = float(v.layer_norm_eps)
    m["clip.use_gelu"] = True
    side = v.image_size // v.patch_size
    scale = side // int((image_seq_length or c.mm_tokens_per_image) ** 0.5)
    if scale > 0 and scale != 4:
        m["clip.vision.projector.scale_factor"] = scale
    m.update(meta or {})
    tensors = {}
    for name, t in hf.state_dict().items():
        if not name.startswith(("model.vision_tower.", "model.multi_modal_projector.")):
            continue
        name = name[len("model."):].replace("vision_tower.", "vision_tower.vision_model.")
        name = name.replace("_weight", ".weight")
        w = t.detach().float().numpy().copy()
        if "soft_emb_norm.weight" in name:
            w = w + 1
        base, suffix = name.rsplit(".", 1)
        gname = f"{_mmproj_name(base)}.{suffix}"
        if gname in drop:
            continue
        q = 1 if f16 and w.ndim >= 2 else 0
        if "input_projection" in name:
            q = 1
        elif ".embeddings." in name:
            q = 0
        tensors[gname] = gm.quantize(w, _blocks(gname, w, q, qtype))
    return gm.write(path, "clip", m, tensors)


def _legacy_name(name: str) -> str:
    # convert_image_encoder_to_gguf.get_tensor_name
    if name.startswith("multi_modal_projector"):
        return name.replace("multi_modal_projector", "mm").replace("linear_1", "0").replace("linear_2", "2")
    return (name.replace("text_model", "t").replace("vision_model", "v").replace("encoder.layers", "blk")
            .replace("embeddings.", "").replace("_proj", "").replace("self_attn.", "attn_").replace("layer_norm", "ln")
            .replace("layernorm", "ln").replace("mlp.fc1", "ffn_down").replace("mlp.fc2", "ffn_up")
            .replace("embedding", "embd").replace("final", "post").replace("layrnorm", "ln"))


def llava_mmproj(hf, path, f16: bool = True, meta: dict | None = None, drop: tuple = (), qtype: int | None = None):
    """As convert_image_encoder_to_gguf.py --llava-projector writes a LLaVA's tower (from the model's
    config.json, as llava_surgery_v2 leaves it) and projector."""
    c, v = hf.config, hf.config.vision_config
    n = v.num_hidden_layers
    layers = c.vision_feature_layer if isinstance(c.vision_feature_layer, list) else [c.vision_feature_layer]
    layers = [i if i >= 0 else n + i + 1 for i in layers]
    m = {"clip.has_text_encoder": False, "clip.has_vision_encoder": True, "clip.has_llava_projector": True,
         "general.file_type": int(f16), "general.description": "image encoder for LLaVA", "clip.projector_type": "mlp",
         "clip.vision.image_size": v.image_size, "clip.vision.patch_size": v.patch_size,
         "clip.vision.embedding_length": v.hidden_size, "clip.vision.feed_forward_length": v.intermediate_size,
         "clip.vision.projection_dim": v.projection_dim, "clip.vision.attention.head_count": v.num_attention_heads,
         "clip.vision.attention.layer_norm_epsilon": float(v.layer_norm_eps), "clip.vision.block_count": max(layers),
         "clip.vision.image_mean": OPENAI_MEAN,
         "clip.vision.image_std": OPENAI_STD, "clip.use_gelu": v.hidden_act == "gelu"}
    if layers != [n - 1]:  # written when the config it reads names the feature layers (not the usual -2)
        m["clip.vision.feature_layer"] = (layers, gm.ARR)
    m.update(meta or {})
    tensors = {}
    for name, t in hf.state_dict().items():
        if name.startswith("model.multi_modal_projector."):
            name = name[len("model."):]
        elif name.startswith("model.vision_tower."):
            name = "vision_model." + name[len("model.vision_tower."):]
            if name.startswith("vision_model.post_layernorm"):
                continue
            if name.startswith("vision_model.encoder.layers.") and int(name.split(".")[3]) >= max(layers):
                continue
        else:
            continue
        gname = _legacy_name(name)
        if gname in drop:
            continue
        w = t.detach().float().numpy().squeeze().copy()
        # the projector's 2-D weights and the 4-D patch weights are F16 in any file; the rest by ftype
        q = 1 if w.ndim == 4 or (w.ndim == 2 and (gname.startswith("mm.") or (f16 and gname.endswith(".weight")))) else 0
        tensors[gname] = gm.quantize(np.ascontiguousarray(w), _blocks(gname, w, q, qtype))
    return gm.write(path, "clip", m, tensors)


# ---- Qwen2.5-VL: convert_hf_to_gguf.py (Qwen2VLModel for the decoder, Qwen2VLVisionModel --mmproj) ----
QWEN_LAYER = {"attn.proj": "attn_out", "norm1": "ln1", "norm2": "ln2", "mlp.gate_proj": "ffn_gate",
              "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
QWEN_TOP = {"merger.ln_q": "v.post_ln", "merger.mlp.0": "mm.0", "merger.mlp.2": "mm.2"}


def qwen2vl_decoder(hf, path, tk, template: str):
    """The Qwen2 decoder as llama.cpp's qwen2vl architecture (rope.dimension_sections: M-RoPE's t, h, w, 0)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    t = hf.config.text_config
    rope = t.rope_parameters
    cfg = Qwen2Config(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                      num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                      num_key_value_heads=t.num_key_value_heads, rms_norm_eps=t.rms_norm_eps,
                      max_position_embeddings=t.max_position_embeddings, rope_theta=rope["rope_theta"],
                      tie_word_embeddings=hf.config.tie_word_embeddings)
    lm = Qwen2ForCausalLM(cfg).to(torch.float32)
    sd = {k.replace("model.language_model.", "model."): v for k, v in hf.state_dict().items()
          if k.startswith(("model.language_model.", "lm_head."))}
    lm.load_state_dict(sd, strict=False)
    lm.tie_weights()
    meta = {"qwen2vl.rope.dimension_sections": ([*rope["mrope_section"], 0], gm.ARR),
            **tokenizer_meta(tk, template)}
    return gm.hf_to_gguf(lm, path, tokenizer=False, extra_meta=meta, arch="qwen2vl")


def qwen25vl_mmproj(hf, path, f16: bool = False, meta: dict | None = None, drop: tuple = (),
                    qtype: int | None = None):
    """As convert_hf_to_gguf.py --mmproj writes a Qwen2_5_VLForConditionalGeneration: q/k/v split, the
    Conv3D split into its two temporal halves, image_size 560 (the converter's default)."""
    import re

    c, v = hf.config, hf.config.vision_config
    m = {"general.type": "mmproj", "general.file_type": int(f16), "clip.has_vision_encoder": True,
         "clip.vision.projection_dim": c.text_config.hidden_size, "clip.vision.image_size": 560,
         "clip.vision.patch_size": v.patch_size, "clip.vision.embedding_length": v.hidden_size,
         "clip.vision.feed_forward_length": v.intermediate_size, "clip.vision.block_count": v.depth,
         "clip.vision.attention.head_count": v.num_heads, "clip.vision.image_mean": OPENAI_MEAN,
         "clip.vision.image_std": OPENAI_STD, "clip.projector_type": "qwen2.5vl_merger", "clip.use_silu": True,
         "clip.vision.n_wa_pattern": v.fullatt_block_indexes[0] + 1,
         "clip.vision.attention.layer_norm_epsilon": 1e-6}
    m.update(meta or {})
    tensors = {}

    def put(name, w):
        if name not in drop:
            tensors[name] = gm.quantize(np.ascontiguousarray(w), _blocks(name, w, 1 if f16 and w.ndim >= 2 else 0, qtype))

    for name, t in hf.state_dict().items():
        if not name.startswith("model.visual."):
            continue
        name = name[len("model.visual."):]
        w = t.detach().float().numpy()
        base, suffix = name.rsplit(".", 1)
        if name == "patch_embed.proj.weight":
            put("v.patch_embd.weight", w[:, :, 0])
            put("v.patch_embd.weight.1", w[:, :, 1])
        elif base in QWEN_TOP:
            put(f"{QWEN_TOP[base]}.{suffix}", w)
        elif (mt := re.fullmatch(r"blocks\.(\d+)\.(.+)", base)):
            bid, leaf = mt.groups()
            if leaf == "attn.qkv":
                for x, part in zip("qkv", np.split(w, 3)):
                    put(f"v.blk.{bid}.attn_{x}.{suffix}", part)
            else:
                put(f"v.blk.{bid}.{QWEN_LAYER[leaf]}.{suffix}", w)
        else:
            raise AssertionError(name)
    return gm.write(path, "clip", m, tensors)
