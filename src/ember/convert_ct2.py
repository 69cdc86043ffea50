"""CTranslate2 Whisper models (faster-whisper's format) → a Hugging Face folder ember and transformers load.

    from ember.convert_ct2 import whisper_from_ctranslate2
    whisper_from_ctranslate2("faster-whisper-tiny.en/", "whisper-tiny.en-hf/")
    asr = ember.load("whisper-tiny.en-hf/")

The input folder holds model.bin (ember.io.ctranslate2 reads it), config.json (CTranslate2's:
suppressed and language token ids) and tokenizer.json. The output has transformers' names and
layout: CTranslate2's fused q/k/v (and cross-attention k/v) projections are split, the zero key
biases CTranslate2 adds are dropped, the tied output projection stays tied; config.json,
generation_config.json (start, end, language, task and no-timestamps tokens from tokenizer.json;
the alignment heads word timestamps need, from CTranslate2's config.json) and
preprocessor_config.json are written beside model.safetensors. Weights keep their dtype.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np

from .errors import CheckpointError, ConfigError
from .io.ctranslate2 import CT2File

TASKS = ("translate", "transcribe")


def _ln(f: CT2File, src: str, dst: str, out: dict) -> None:
    out[f"{dst}.weight"] = f.array(f"{src}/gamma")
    out[f"{dst}.bias"] = f.array(f"{src}/beta")


def _layer(f: CT2File, src: str, dst: str, decoder: bool, out: dict) -> None:
    _ln(f, f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm", out)
    k = f"{dst}.self_attn.k_proj"
    qkv: list[str | None] = [f"{dst}.self_attn.q_proj", None, f"{dst}.self_attn.v_proj"]
    _split_keyed(f, f"{src}/self_attention/linear_0", qkv, k, out)
    _copy_linear(f, f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj", out)
    if decoder:
        _ln(f, f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm", out)
        _copy_linear(f, f"{src}/attention/linear_0", f"{dst}.encoder_attn.q_proj", out)
        _split_keyed(f, f"{src}/attention/linear_1", [None, f"{dst}.encoder_attn.v_proj"],
                     f"{dst}.encoder_attn.k_proj", out)
        _copy_linear(f, f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj", out)
    _ln(f, f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm", out)
    _copy_linear(f, f"{src}/ffn/linear_0", f"{dst}.fc1", out)
    _copy_linear(f, f"{src}/ffn/linear_1", f"{dst}.fc2", out)


def _copy_linear(f: CT2File, src: str, dst: str, out: dict) -> None:
    out[f"{dst}.weight"] = f.array(f"{src}/weight")
    if f"{src}/bias" in f:
        out[f"{dst}.bias"] = f.array(f"{src}/bias")


def _split_keyed(f: CT2File, src: str, dst: list[str | None], key_name: str, out: dict) -> None:
    """Split a fused projection whose None part is the key projection `key_name` (weight kept,
    zero bias dropped)."""
    w = f.array(f"{src}/weight")
    if w.shape[0] % len(dst):
        raise CheckpointError(f"{f.path}: {src}/weight has {w.shape[0]} rows, not {len(dst)} equal parts")
    b = f.array(f"{src}/bias") if f"{src}/bias" in f else None
    for i, (name, pw) in enumerate(zip(dst, np.split(w, len(dst)))):
        pb = np.split(b, len(dst))[i] if b is not None else None
        if name is None:
            out[f"{key_name}.weight"] = pw
            if pb is not None and np.any(pb != 0):
                raise CheckpointError(f"{f.path}: {src} has a non-zero key bias, which Whisper does not have")
            continue
        out[f"{name}.weight"] = pw
        if pb is not None:
            out[f"{name}.bias"] = pb


def _layers(f: CT2File, stack: str) -> int:
    idx = {int(m.group(1)) for n in f.variables if (m := re.match(rf"{stack}/layer_(\d+)/", n))}
    if not idx or idx != set(range(len(idx))):
        raise CheckpointError(f"{f.path}: {stack} layers are missing or not numbered 0..n-1")
    return len(idx)


def _token_ids(tokenizer_json: Path) -> dict[str, int]:
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    return {t["content"]: t["id"] for t in data.get("added_tokens", []) if isinstance(t, dict)}


def whisper_from_ctranslate2(src: str | Path, dst: str | Path) -> Path:
    """Convert the CTranslate2 Whisper folder `src` into a Hugging Face folder `dst` (see the module
    docstring); returns `dst`."""
    src, dst = Path(src), Path(dst)
    f = CT2File(src / "model.bin")
    if f.spec != "WhisperSpec":
        raise CheckpointError(f"{f.path}: a {f.spec!r:.40} model, not a Whisper one (WhisperSpec)")
    out: dict[str, np.ndarray] = {}
    for n, hf in (("conv1", "conv1"), ("conv2", "conv2")):
        _copy_linear(f, f"encoder/{n}", f"model.encoder.{hf}", out)
    out["model.encoder.embed_positions.weight"] = f.array("encoder/position_encodings/encodings")
    enc_layers, dec_layers = _layers(f, "encoder"), _layers(f, "decoder")
    for i in range(enc_layers):
        _layer(f, f"encoder/layer_{i}", f"model.encoder.layers.{i}", False, out)
    _ln(f, "encoder/layer_norm", "model.encoder.layer_norm", out)
    out["model.decoder.embed_tokens.weight"] = emb = f.array("decoder/embeddings/weight")
    out["model.decoder.embed_positions.weight"] = f.array("decoder/position_encodings/encodings")
    for i in range(dec_layers):
        _layer(f, f"decoder/layer_{i}", f"model.decoder.layers.{i}", True, out)
    _ln(f, "decoder/layer_norm", "model.decoder.layer_norm", out)
    tied = f.aliases.get("decoder/projection/weight") == "decoder/embeddings/weight"
    if not tied:
        out["proj_out.weight"] = f.array("decoder/projection/weight")

    vocab, d = emb.shape
    mels = f.array("encoder/conv1/weight").shape[1]
    ffn = f.array("encoder/layer_0/ffn/linear_0/weight").shape[0]
    config = {
        "model_type": "whisper", "architectures": ["WhisperForConditionalGeneration"], "vocab_size": int(vocab),
        "num_mel_bins": int(mels), "d_model": int(d), "encoder_layers": enc_layers, "decoder_layers": dec_layers,
        "encoder_attention_heads": f.scalar("encoder/num_heads"), "decoder_attention_heads": f.scalar("decoder/num_heads"),
        "encoder_ffn_dim": int(ffn), "decoder_ffn_dim": int(f.array("decoder/layer_0/ffn/linear_0/weight").shape[0]),
        "max_source_positions": int(out["model.encoder.embed_positions.weight"].shape[0]),
        "max_target_positions": int(out["model.decoder.embed_positions.weight"].shape[0]),
        "scale_embedding": bool(f.scalar("decoder/scale_embeddings")) if "decoder/scale_embeddings" in f else False,
        "tie_word_embeddings": tied, "torch_dtype": {"float16": "float16", "float32": "float32"}.get(emb.dtype.name),
    }
    tok = src / "tokenizer.json"
    if not tok.is_file():
        raise ConfigError(f"{src}: no tokenizer.json (its special tokens give the decoder prompt)")
    ids = _token_ids(tok)
    need = ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>")
    missing = [t for t in need if t not in ids]
    if missing:
        raise ConfigError(f"{tok}: no {', '.join(missing)} token")
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    config.update(bos_token_id=eot, eos_token_id=eot, pad_token_id=eot, decoder_start_token_id=sot)
    ct2_cfg = json.loads((src / "config.json").read_text()) if (src / "config.json").is_file() else {}
    multilingual = vocab >= 51865  # as openai-whisper decides
    gen = {"decoder_start_token_id": sot, "eos_token_id": eot, "pad_token_id": eot, "bos_token_id": eot,
           "no_timestamps_token_id": ids["<|notimestamps|>"], "max_length": config["max_target_positions"],
           "suppress_tokens": ct2_cfg.get("suppress_ids", []), "begin_suppress_tokens": ct2_cfg.get("suppress_ids_begin", []),
           "is_multilingual": multilingual, "max_initial_timestamp_index": 50}  # openai-whisper's 1 s
    heads = ct2_cfg.get("alignment_heads")  # [layer, head] pairs for word timestamps (CTranslate2 keeps OpenAI's)
    if isinstance(heads, list) and heads:
        gen["alignment_heads"] = heads
    if multilingual:
        by_id = {v: k for k, v in ids.items()}
        gen["lang_to_id"] = {by_id[i]: i for i in ct2_cfg.get("lang_ids", []) if i in by_id}
        gen["task_to_id"] = {t: ids[f"<|{t}|>"] for t in TASKS if f"<|{t}|>" in ids}

    import torch

    from .io.safetensors import save_file

    dst.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.from_numpy(np.array(v)) for k, v in out.items()}, dst / "model.safetensors")  # copies
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    (dst / "generation_config.json").write_text(json.dumps(gen, indent=2))
    (dst / "preprocessor_config.json").write_text(json.dumps({
        "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": int(mels), "sampling_rate": 16000,
        "hop_length": 160, "chunk_length": 30, "n_fft": 400, "padding_value": 0.0, "return_attention_mask": False}))
    shutil.copyfile(tok, dst / "tokenizer.json")
    (dst / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
                                                           "unk_token": "<|endoftext|>", "model_max_length": 1024}))
    return dst
