"""A llama.cpp multimodal projector file (`mmproj-*.gguf`, what libmtmd's `--mmproj` reads) beside a
GGUF decoder: together they make the same image+text model as the Hugging Face checkpoint.

    llm = ember.load("model.gguf", mmproj="mmproj-model-f16.gguf")

The mmproj file (general.architecture "clip") holds the vision tower and the projector: its
`clip.*` metadata becomes the family's vision_config (image and patch size, widths, layers, eps,
activation, mean/std), its `v.*` / `mm.*` tensors are renamed onto the Hugging Face names the
family's vision modules read (`vision_tower.vision_model.*`, `multi_modal_projector.*`), and the
decoder's GGUF config becomes text_config. The model is then built by the family's own class
(models/llava.py, models/gemma3.py) over both files at once.

Projector types (clip.projector_type):
- `mlp`: LLaVA (CLIP tower, linear_1 → GELU → linear_2) as llama.cpp's
  legacy-models/convert_image_encoder_to_gguf.py writes it: the tower cut after the feature layer
  (clip.vision.feature_layer, else all its blocks), no post-layernorm, and fc1/fc2 stored as
  `ffn_down`/`ffn_up` (libmtmd swaps them back by shape, as ember does).
- `gemma3`: Gemma 3 (SigLIP tower, pooled to mm_tokens_per_image by clip.vision.projector.scale_factor,
  default 4; `mm.soft_emb_norm` stored as 1 + w) as convert_hf_to_gguf.py --mmproj writes it.
- `qwen2.5vl_merger`: Qwen2.5-VL (its own tower under `visual`, window attention with every
  clip.vision.n_wa_pattern-th block full, windows of clip.vision.window_size pixels, default 112 as
  libmtmd's) as convert_hf_to_gguf.py --mmproj writes it: q/k/v split and the Conv3D patch embedding
  split into its two temporal halves, both put back together here. Its decoder is llama.cpp's
  `qwen2vl` GGUF architecture (models/qwen2_5_vl.py: a Qwen2 decoder with rope.dimension_sections).
Image placeholder tokens are the decoder vocabulary's (`<image>`; `<start_of_image>`,
`<image_soft_token>`, `<end_of_image>`; `<|vision_start|>`, `<|image_pad|>`, `<|vision_end|>`), as
the family's processor writes them. Pixel bounds (Qwen2.5-VL's min/max pixels), absent from mmproj
files, come from a preprocessor_config.json beside the model file, else transformers' defaults.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .errors import CheckpointError, ConfigError, UnsupportedModelError

# clip.projector_type -> the ember family it builds
PROJECTORS = {"mlp": "llava", "gemma3": "gemma3", "qwen2.5vl_merger": "qwen2_5_vl"}
MAX_VISION_LAYERS = 1 << 10
MAX_IMAGE_SIZE = 1 << 14

# the tower's tensors, GGUF leaf -> Hugging Face name under vision_tower.vision_model (CLIP / SigLIP)
TOWER_TOP = {
    "v.patch_embd": "embeddings.patch_embedding",
    "v.position_embd": "embeddings.position_embedding",
    "v.pre_ln": "pre_layrnorm",
    "v.post_ln": "post_layernorm",
}
TOWER_LAYER = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_out": "self_attn.out_proj",
    "ln1": "layer_norm1",
    "ln2": "layer_norm2",
    "ffn_up": "mlp.fc1",
    "ffn_down": "mlp.fc2",
}
PROJECTOR = {
    "mlp": {"mm.0": "linear_1", "mm.2": "linear_2"},
    "gemma3": {"mm.soft_emb_norm": "mm_soft_emb_norm"},
}
TOWER, PROJ = "vision_tower.vision_model", "multi_modal_projector"
# Qwen2.5-VL's tower (under `visual`): GGUF leaf -> Hugging Face name; its q/k/v (split by the
# converter) and its Conv3D's two temporal halves (`v.patch_embd.weight` / `.weight.1`) put back together
QWEN_TOP = {"v.post_ln": "merger.ln_q", "mm.0": "merger.mlp.0", "mm.2": "merger.mlp.2"}
QWEN_LAYER = {"attn_out": "attn.proj", "ln1": "norm1", "ln2": "norm2", "ffn_gate": "mlp.gate_proj",
              "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


@dataclass
class _Tensor:
    gguf: str
    shape: tuple[int, ...]
    minus_one: bool = False  # stored as 1 + w (Gemma 3's soft_emb_norm)
    parts: tuple[str, ...] = ()  # tensors joined into this one: concatenated (q, k, v) or stacked (dim 2)
    stack: bool = False


class MmprojSource:
    """A TensorSource over an mmproj GGUF file, keyed by the Hugging Face names of the vision tower
    and the projector."""

    def __init__(self, f, kind: str):
        self.f = f
        self.plans: dict[str, _Tensor] = {}
        if kind == "qwen2.5vl_merger":
            self._plan_qwen()
            return
        layer_re = re.compile(r"v\.blk\.(\d+)\.(\w+)\.(weight|bias)")
        swap = kind == "mlp" and _legacy_ffn(f)
        for name, info in f.tensors.items():
            hf = None
            base, _, suffix = name.rpartition(".")
            if name == "v.class_embd":
                hf = f"{TOWER}.embeddings.class_embedding"
            elif name == "mm.input_projection.weight" and kind == "gemma3":
                hf = f"{PROJ}.mm_input_projection_weight"
            elif base in TOWER_TOP:
                hf = f"{TOWER}.{TOWER_TOP[base]}.{suffix}"
            elif base in PROJECTOR[kind]:
                hf = f"{PROJ}.{PROJECTOR[kind][base]}.{suffix}"
            elif (m := layer_re.fullmatch(name)) and m.group(2) in TOWER_LAYER:
                leaf = m.group(2)
                if swap and leaf in ("ffn_up", "ffn_down"):
                    leaf = "ffn_down" if leaf == "ffn_up" else "ffn_up"
                hf = f"{TOWER}.encoder.layers.{m.group(1)}.{TOWER_LAYER[leaf]}.{m.group(3)}"
            if hf is None:
                continue  # reported by the builder as an unused tensor
            self.plans[hf] = _Tensor(name, info.shape, minus_one=name == "mm.soft_emb_norm.weight")

    def _plan_qwen(self) -> None:
        t = self.f.tensors
        layer_re = re.compile(r"v\.blk\.(\d+)\.(\w+)\.(weight|bias)")
        for name, info in t.items():
            base, _, suffix = name.rpartition(".")
            if base in QWEN_TOP:
                self.plans[f"visual.{QWEN_TOP[base]}.{suffix}"] = _Tensor(name, info.shape)
            elif (m := layer_re.fullmatch(name)) and m.group(2) in QWEN_LAYER:
                self.plans[f"visual.blocks.{m.group(1)}.{QWEN_LAYER[m.group(2)]}.{m.group(3)}"] = _Tensor(name, info.shape)
            elif (m := layer_re.fullmatch(name)) and m.group(2) == "attn_q":
                parts = tuple(name.replace("attn_q", f"attn_{x}") for x in "qkv")
                shapes = [t[p].shape for p in parts if p in t]
                if len(shapes) != 3 or len({s[1:] for s in shapes}) != 1:
                    raise CheckpointError(f"{self.f.path}: {', '.join(parts)} are not three tensors of one width "
                                          f"({[list(s) for s in shapes]})")
                shape = (sum(s[0] for s in shapes), *shapes[0][1:])
                self.plans[f"visual.blocks.{m.group(1)}.attn.qkv.{m.group(3)}"] = _Tensor(name, shape, parts=parts)
        w0, w1 = t.get("v.patch_embd.weight"), t.get("v.patch_embd.weight.1")
        if w0 is not None and w1 is not None:
            if w0.shape != w1.shape or len(w0.shape) != 4:
                raise CheckpointError(f"{self.f.path}: v.patch_embd.weight {list(w0.shape)} and .weight.1 "
                                      f"{list(w1.shape)} are not the two halves of one Conv3D")
            shape = (*w0.shape[:2], 2, *w0.shape[2:])
            self.plans["visual.patch_embed.proj.weight"] = _Tensor(w0.name, shape, parts=(w0.name, w1.name), stack=True)

    def keys(self):
        return self.plans.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self.plans[key].shape

    def describe(self) -> str:
        return str(self.f.path)

    def _read(self, name: str) -> torch.Tensor:
        from .io import ggml

        info = self.f.check_supported(name)
        return ggml.dequantize(self.f.read(name), info.ggml_type, info.shape, torch.float32)

    def load(self, key: str) -> torch.Tensor:
        plan = self.plans[key]
        if plan.parts:
            parts = [self._read(p) for p in plan.parts]
            return torch.stack(parts, dim=2) if plan.stack else torch.cat(parts)
        t = self._read(plan.gguf)
        return t - 1 if plan.minus_one else t

    def close(self) -> None:
        self.f.close()


def _legacy_ffn(f) -> bool:
    """True where fc1 is stored as `ffn_down` and fc2 as `ffn_up` (the legacy LLaVA converter), told by
    shape as libmtmd does: `ffn_down`'s input is the tower's width."""
    down = f.tensors.get("v.blk.0.ffn_down.weight")
    return down is not None and len(down.shape) == 2 and \
        down.shape[1] == f.metadata.get("clip.vision.embedding_length")


class UnionSource:
    """Two TensorSources as one (the decoder's GGUF and the mmproj file); their keys must not meet."""

    def __init__(self, *sources):
        self.sources = sources
        self.where: dict[str, object] = {}
        for s in sources:
            for k in s.keys():
                if k in self.where:
                    raise CheckpointError(f"tensor {k!r} is in both {self.where[k].describe()} and {s.describe()}")
                self.where[k] = s

    def keys(self):
        return self.where.keys()

    def shape(self, key: str):
        return self.where[key].shape(key)

    def load(self, key: str):
        return self.where[key].load(key)

    def describe(self) -> str:
        return " + ".join(s.describe() for s in self.sources)

    def close(self) -> None:
        for s in self.sources:
            close = getattr(s, "close", None)
            if close is not None:
                close()


# ---- metadata -> the family's config.json ---------------------------------------------------------
def _int(f, key: str, lo: int, hi: int, default=None) -> int:
    v = f.metadata.get(key, default)
    if v is None:
        raise ConfigError(f"{f.path}: mmproj metadata lacks {key}")
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ConfigError(f"{f.path}: mmproj metadata {key} is {v!r:.40}; expected an integer in [{lo}, {hi}]")
    return v


def _floats(f, key: str, n: int, default=None) -> list[float]:
    v = f.metadata.get(key, default)
    if not isinstance(v, list) or len(v) != n or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                         for x in v):
        raise ConfigError(f"{f.path}: mmproj metadata {key} should be {n} numbers, got {v!r:.80}")
    return [float(x) for x in v]


def _token(tokens: list, text: str, where) -> int:
    try:
        return tokens.index(text)
    except ValueError:
        raise ConfigError(f"{where}: the decoder's vocabulary has no {text!r} token, which the image prompts of "
                          f"this model need") from None


def vision_config(f) -> dict:
    """The tower's config.json dict from the file's clip.vision.* metadata."""
    hidden = _int(f, "clip.vision.embedding_length", 1, 1 << 16)
    heads = _int(f, "clip.vision.attention.head_count", 1, hidden)
    if hidden % heads:
        raise ConfigError(f"{f.path}: clip.vision.embedding_length ({hidden}) is not a multiple of "
                          f"clip.vision.attention.head_count ({heads})")
    eps = f.metadata.get("clip.vision.attention.layer_norm_epsilon", 1e-6)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 1:
        raise ConfigError(f"{f.path}: clip.vision.attention.layer_norm_epsilon is {eps!r:.40}")
    image = _int(f, "clip.vision.image_size", 1, MAX_IMAGE_SIZE)
    patch = _int(f, "clip.vision.patch_size", 1, image)
    if image % patch:
        raise ConfigError(f"{f.path}: clip.vision.image_size ({image}) is not a multiple of clip.vision.patch_size "
                          f"({patch})")
    return {"hidden_size": hidden, "num_attention_heads": heads, "layer_norm_eps": float(eps),
            "intermediate_size": _int(f, "clip.vision.feed_forward_length", 1, 1 << 18),
            "num_hidden_layers": _int(f, "clip.vision.block_count", 1, MAX_VISION_LAYERS),
            "image_size": image, "patch_size": patch}


def projector_type(f) -> str:
    if f.architecture != "clip":
        raise CheckpointError(f"{f.path}: not a multimodal projector file (general.architecture is "
                              f"{f.architecture!r:.40}, an mmproj file's is 'clip')")
    if f.metadata.get("clip.has_vision_encoder") is not True:
        raise UnsupportedModelError(f"{f.path}: this mmproj file has no vision encoder (ember reads images only)")
    kind = f.metadata.get("clip.projector_type", "mlp" if f.metadata.get("clip.has_llava_projector") else None)
    if kind not in PROJECTORS:
        raise UnsupportedModelError(f"{f.path}: clip.projector_type {kind!r:.40} is not supported; ember reads "
                                    f"{', '.join(map(repr, PROJECTORS))} ({', '.join(PROJECTORS.values())})")
    return kind


def multimodal_config(f, kind: str, text: dict, tokens: list) -> dict:
    """The image+text config.json dict (text_config: the decoder GGUF's config dict)."""
    if kind == "qwen2.5vl_merger":
        return _qwen_config(f, text, tokens)
    v = vision_config(f)
    processor = {"image_mean": _floats(f, "clip.vision.image_mean", 3), "image_std": _floats(f, "clip.vision.image_std", 3)}
    where = f.path
    if kind == "gemma3":
        if text.get("model_type") != "gemma3_text":
            raise ConfigError(f"{where}: a gemma3 projector needs a Gemma 3 decoder, not {text.get('model_type')!r:.40}")
        side = v["image_size"] // v["patch_size"]
        scale = _int(f, "clip.vision.projector.scale_factor", 1, side, default=4)
        if side % scale:
            raise ConfigError(f"{where}: clip.vision.projector.scale_factor ({scale}) does not divide the {side} "
                              f"patches per side of the image")
        return {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "text_config": text,
                "vision_config": {**v, "vision_use_head": False}, "mm_tokens_per_image": (side // scale) ** 2,
                "tie_word_embeddings": text.get("tie_word_embeddings", True),
                "image_token_index": _token(tokens, "<image_soft_token>", where),
                "boi_token_index": _token(tokens, "<start_of_image>", where),
                "eoi_token_index": _token(tokens, "<end_of_image>", where), "mmproj_processor": processor}
    if text.get("model_type") == "gemma3_text" or "mrope_section" in (text.get("rope_parameters") or {}):
        raise ConfigError(f"{where}: a LLaVA ({kind!r}) projector does not go with a {text.get('model_type')} decoder "
                          f"{'with M-RoPE (Qwen2-VL: projector_type qwen2.5vl_merger)' if text.get('model_type') == 'qwen2' else '(Gemma 3: projector_type gemma3)'}")
    layers = f.metadata.get("clip.vision.feature_layer")
    n = v["num_hidden_layers"]
    if layers is None:
        layers = [n]  # the converter cut the tower after the feature layer: its last block's output
    if not isinstance(layers, list) or not layers or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i <= n for i in layers):
        raise ConfigError(f"{where}: clip.vision.feature_layer should be layer indices in [0, {n}], got {layers!r:.80}")
    gelu = f.metadata.get("clip.use_gelu", False) is True
    return {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"], "text_config": text,
            "vision_config": {"model_type": "clip_vision_model", **v, "hidden_act": "gelu" if gelu else "quick_gelu"},
            "vision_feature_layer": layers, "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
            "tie_word_embeddings": text.get("tie_word_embeddings", False),
            "image_token_index": _token(tokens, "<image>", where), "mmproj_processor": processor}


def _qwen_config(f, text: dict, tokens: list) -> dict:
    """Qwen2.5-VL: the tower's sizes, its window-attention pattern (every n_wa_pattern-th block
    attends over the whole image), window size (default 112 pixels, as libmtmd) and merge size."""
    where = f.path
    if text.get("model_type") != "qwen2" or "mrope_section" not in (text.get("rope_parameters") or {}):
        raise ConfigError(f"{where}: a qwen2.5vl_merger projector needs a Qwen2-VL decoder (GGUF architecture qwen2vl, with "
                          f"rope.dimension_sections), not {text.get('model_type')!r:.40}")
    hidden = _int(f, "clip.vision.embedding_length", 1, 1 << 16)
    depth = _int(f, "clip.vision.block_count", 1, MAX_VISION_LAYERS)
    pattern = _int(f, "clip.vision.n_wa_pattern", 1, depth)
    processor = {"image_mean": _floats(f, "clip.vision.image_mean", 3), "image_std": _floats(f, "clip.vision.image_std", 3)}
    vision = {"depth": depth, "hidden_size": hidden, "hidden_act": "silu",
              "intermediate_size": _int(f, "clip.vision.feed_forward_length", 1, 1 << 18),
              "num_heads": _int(f, "clip.vision.attention.head_count", 1, hidden),
              "patch_size": _int(f, "clip.vision.patch_size", 1, 1 << 10),
              "spatial_merge_size": _int(f, "clip.vision.spatial_merge_size", 1, 64, default=2),
              "window_size": _int(f, "clip.vision.window_size", 1, MAX_IMAGE_SIZE, default=112),
              "temporal_patch_size": 2, "out_hidden_size": text.get("hidden_size"),
              "fullatt_block_indexes": [i for i in range(depth) if (i + 1) % pattern == 0]}
    return {"model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"], "text_config": text,
            "vision_config": vision, "tie_word_embeddings": text.get("tie_word_embeddings", False),
            "image_token_id": _token(tokens, "<|image_pad|>", where),
            "vision_start_token_id": _token(tokens, "<|vision_start|>", where),
            "vision_end_token_id": _token(tokens, "<|vision_end|>", where),
            "video_token_id": tokens.index("<|video_pad|>") if "<|video_pad|>" in tokens else None,
            "mmproj_processor": processor}


def _check_width(f, kind: str, text: dict) -> None:
    """The projector's output width against the decoder's hidden size (a mismatched pair)."""
    name, dim = ("mm.input_projection.weight", 1) if kind == "gemma3" else ("mm.2.weight", 0)
    info = f.tensors.get(name)
    if info is None:
        raise CheckpointError(f"{f.path}: the {kind!r} projector's {name} is missing")
    if len(info.shape) != 2 or info.shape[dim] != text.get("hidden_size"):
        raise ConfigError(f"{f.path}: the projector gives {list(info.shape)} features ({name}) but the decoder's "
                          f"hidden size is {text.get('hidden_size')}: this mmproj file belongs to another model")


def refuse_alone(f) -> None:
    """An mmproj file given as the model: an UnsupportedModelError saying how it loads."""
    if f.architecture == "clip":
        kind = projector_type(f)
        raise UnsupportedModelError(f"{f.path} is a multimodal projector file (projector_type {kind!r}, a "
                                    f"{PROJECTORS[kind]} vision tower): load it beside its model, "
                                    f"ember.load(MODEL.gguf, mmproj=...) or --mmproj")


def attach(ckpt, path):
    """A loading.Checkpoint of a GGUF decoder → the image+text model's, the tower and projector read
    from the mmproj file at `path`."""
    from . import registry
    from .io.gguf import GGUFFile

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"mmproj file {str(path)!r:.200} does not exist")
    f = GGUFFile(p)
    try:
        kind = projector_type(f)
        for info in f.tensors.values():
            f.check_supported(info.name)
        text = ckpt.raw
        _check_width(f, kind, text)
        raw = multimodal_config(f, kind, text, _vocabulary(ckpt))
        entry = registry.lookup(raw)
    except Exception:
        f.close()
        raise
    decoder_source = ckpt.source

    def source(dtype, device, keep_quantized):
        src, extra = decoder_source(dtype, device, keep_quantized)
        return UnionSource(src, MmprojSource(f, kind)), extra

    return replace(ckpt, raw=raw, entry=entry, source=source)


def _vocabulary(ckpt) -> list:
    from .io.gguf import GGUFFile

    f = GGUFFile(ckpt.snapshot.weights[0])
    tokens = f.metadata.get("tokenizer.ggml.tokens")
    f.close()
    if not isinstance(tokens, list):
        raise ConfigError(f"{f.path}: the decoder GGUF has no tokenizer (tokenizer.ggml.tokens), which image "
                          f"prompts need")
    return tokens
