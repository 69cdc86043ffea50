"""A tokenizers.Tokenizer from a SentencePiece `tokenizer.model`, for repositories without tokenizer.json.

The file is read with the `sentencepiece` library (an optional dependency: `pip install
'ember[sentencepiece]'`); its pieces, scores and types are what a llama.cpp GGUF stores, so the
GGUF tokenizer builder (`gguf_tokenizer`) makes the byte-fallback BPE, as transformers' LlamaConverter
does. The result is checked against sentencepiece itself on probe texts: a model the conversion does
not reproduce (a Unigram model, say) is refused rather than tokenised differently.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import TokenizerError

# texts on which the converted tokenizer must give sentencepiece's own ids
PROBES = ("Hello world", " leading space and  two", "line one\nline two\ttab", "Ünïcödé, ça va? 日本語 🎉",
          "x=12345.678; f(a, b)", "", "The quick brown fox jumps over the lazy dog. Paris is the capital of France.")
MAX_MODEL_BYTES = 256 << 20  # real tokenizer.model files are 0.5-5 MB


def _check_kind(path: Path, sp) -> None:
    """Refuse what the conversion does not reproduce: a model that is not BPE (Unigram, word, char),
    or one that normalises text (NFKC, collapsing spaces) or adds no dummy prefix. The model's
    settings are read with sentencepiece's protobuf schema (needs `protobuf`)."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:
        raise TokenizerError(f"{path}: reading a SentencePiece model's settings needs the protobuf package "
                             f"(pip install 'ember[sentencepiece]')") from None
    m = pb.ModelProto()
    try:
        m.ParseFromString(sp.serialized_model_proto())
    except Exception as e:  # google.protobuf.message.DecodeError
        raise TokenizerError(f"{path}: unreadable SentencePiece model ({str(e)[:200]})") from None
    t, n = m.trainer_spec, m.normalizer_spec
    why = []
    if t.model_type != t.BPE:
        why.append(f"it is a {pb.TrainerSpec.ModelType.Name(t.model_type)} model, not BPE")
    if n.precompiled_charsmap or n.name not in ("", "identity"):
        why.append(f"it normalises text ({n.name or 'a precompiled character map'})")
    if n.remove_extra_whitespaces:
        why.append("it collapses runs of spaces")
    if not n.add_dummy_prefix:
        why.append("it adds no dummy prefix")
    if why:
        raise TokenizerError(f"{path}: ember converts SentencePiece models as Llama's are (BPE with byte fallback, "
                             f"no normalisation), but {'; '.join(why)}; save a tokenizer.json with transformers")


def tokenizers_from_spm(path: str | os.PathLike):
    """(tokenizers.Tokenizer, special tokens {bos_token, eos_token, unk_token, pad_token}) from a
    SentencePiece BPE model file."""
    from .gguf_tokenizer import tokenizer_from_gguf
    from .io.safefile import check_size

    path = Path(path)
    try:
        import sentencepiece
    except ImportError:
        raise TokenizerError(f"{path}: this model has only a SentencePiece tokenizer.model; reading it needs the "
                             f"sentencepiece package (pip install 'ember[sentencepiece]'), or save a tokenizer.json "
                             f"with transformers") from None
    check_size(path, MAX_MODEL_BYTES, TokenizerError, "tokenizer.model")
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except Exception as e:  # OSError / RuntimeError from the C++ library on a bad file
        raise TokenizerError(f"{path}: not a SentencePiece model ({str(e)[:200]})") from None
    _check_kind(path, sp)
    n = sp.get_piece_size()
    tokens = [sp.id_to_piece(i) for i in range(n)]
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i) else 6 if sp.is_byte(i)
             else 1 for i in range(n)]
    meta = {"general.architecture": "llama", "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)], "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False}
    for key, i in (("bos_token_id", sp.bos_id()), ("eos_token_id", sp.eos_id()), ("unknown_token_id", sp.unk_id()),
                   ("padding_token_id", sp.pad_id())):
        if 0 <= i < n:
            meta[f"tokenizer.ggml.{key}"] = i
    tok = tokenizer_from_gguf(meta, path)
    # sentencepiece's dummy prefix goes before the text whatever it starts with (" a" -> "▁▁a"), which
    # a normaliser gives (as transformers' LlamaConverter writes it); Metaspace would skip it there
    from tokenizers import normalizers

    tok.tk.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.tk.pre_tokenizer = None
    tok.refresh_limits(str(path))
    for text in PROBES:
        want = sp.encode(text)
        got = tok.encode(text, add_special_tokens=False)
        if got != want:
            raise TokenizerError(f"{path}: ember's conversion of this SentencePiece model gives {got[:12]} for "
                                 f"{text!r} where sentencepiece gives {want[:12]} (ember converts BPE models with "
                                 f"byte fallback, as Llama's; a Unigram model is not one); save a tokenizer.json "
                                 f"with transformers")
    return tok.tk, tok.special_tokens


def tokenizer_from_folder(folder: str | os.PathLike):
    """An `ember.tokenizer.Tokenizer` for a folder whose tokenizer is a SentencePiece tokenizer.model,
    with its companions (tokenizer_config.json's special tokens and chat template)."""
    from .tokenizer import Tokenizer

    return Tokenizer.from_dir(folder, base=tokenizers_from_spm(Path(folder) / "tokenizer.model"))
