"""A tokenizer built from GGUF metadata (`tokenizer.ggml.*`), as transformers builds it.

A GGUF has no tokenizer.json: it stores the vocabulary, merges or scores, token types and special
ids. This rebuilds the same `tokenizers.Tokenizer` that transformers' GGUF integration
(`AutoTokenizer.from_pretrained(folder, gguf_file=...)`) builds, so token ids are equal:

- `gpt2` (byte-level BPE: SmolLM2, Qwen, Llama 3): the vocabulary respelled into the byte alphabet
  where a token is not already, the file's merges, a split regex chosen by `tokenizer.ggml.pre` (as
  llama.cpp chooses it; a missing or unknown one is warned about by name, then split as GPT-2 does).
- `llama` (SentencePiece BPE with byte fallback): the file's merges or ones derived from the
  scores; Gemma's variant (spaces as "▁" by a normalizer, merges ordered by vocabulary position),
  Phi-3's (a prefix-space normalizer).

Control tokens (type 3) become special added tokens, user-defined ones (type 4) plain added tokens;
BOS/EOS are added by a post-processor when `tokenizer.ggml.add_bos_token`/`add_eos_token` say so
(SentencePiece vocabularies default to adding BOS, as llama.cpp does).
"""
from __future__ import annotations

import logging
import os
from functools import lru_cache
from typing import Any

from .errors import TokenizerError

log = logging.getLogger("ember")

CONTROL, USER_DEFINED = 3, 4
# the most work (sum over tokens of length², in characters) deriving merges from a vocabulary may take
MERGE_WORK_LIMIT = 1 << 25

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> the split regex its merges were learned with (llama.cpp's llama-vocab.cpp)
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open"),
                    _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}
# pre-tokenizers that are GPT-2's ByteLevel regex itself
GPT2_SPLIT_PRES = frozenset(("gpt-2", "gpt2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de",
                             "a.x-4.0", "mellum", "modern-bert", "jina-v1-en", "jina-v2-code", "roberta-bpe", "exaone4",
                             "mpt", "olmo", "jais", "trillion", "granite-docling"))
# ... and GPT-2's regex after a split of every digit (SmolLM's and StarCoder's tokenizer.json say the same)
DIGIT_SPLIT_PRES = frozenset(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b",
                              "mellum2"))

# Token texts llama.cpp treats as end-of-generation (llama-vocab.cpp), besides the eos/eot/eom ids.
EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>", "<|endoftext|>",
             "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def generate_merges(vocab: dict[str, int], vocab_scores: dict[str, float] | None = None) -> list[tuple[str, str]]:
    """BPE merges implied by a vocabulary: every split of a token into two tokens, best score first
    (transformers' `generate_merges`, same order).

    Bounded: a token of length L costs L slices of up to L characters, and may yield L - 1 merges
    that the tokenizers library copies (L characters each), so a vocabulary whose sum of L² passes
    MERGE_WORK_LIMIT is refused (TokenizerError) before any work: a hostile 1.3 MB list of ever longer
    tokens would otherwise take GBs (cubic in the longest token). Real SentencePiece vocabularies
    stay far below it (Llama 2: 1M, Gemma's 262k tokens: 11M). The halves of a merge are the
    vocabulary's own string objects, not fresh slices."""
    reverse = vocab_scores is not None
    scores = dict(vocab_scores) if reverse else vocab
    work = 0
    for piece in scores:
        work += len(piece) * len(piece)
        if work > MERGE_WORK_LIMIT:
            raise TokenizerError(f"the GGUF vocabulary has no tokenizer.ggml.merges, and deriving them from its tokens "
                                 f"would cost more than {MERGE_WORK_LIMIT} characters of work (tokens too long): refused")
    lengths = {len(t) for t in vocab}
    canon = {t: t for t in vocab}.get  # the vocabulary's own string objects
    merges: list[tuple[str, str, Any]] = []
    for piece, score in scores.items():
        local = []
        n = len(piece)
        for i in range(1, n):
            if i not in lengths or n - i not in lengths:
                continue
            left, right = canon(piece[:i]), canon(piece[i:])
            if left is not None and right is not None:
                local.append((left, right, score))
        if len(local) > 1:
            local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda v: (v[2], len(v[0]), len(v[1])), reverse=reverse)
    return [(a, b) for a, b, _ in merges]


def _merges(meta: dict, key: str = "tokenizer.ggml.merges") -> list[tuple[str, str]] | None:
    raw = meta.get(key)
    if raw is None:
        return None
    out = []
    for m in raw:
        parts = m.split(" ")
        if len(parts) != 2:
            raise TokenizerError(f"merge {m!r} is not two tokens separated by one space")
        out.append((parts[0], parts[1]))
    return out


def _byte_level(meta: dict, tokens: list[str], where: str = ""):
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {}
    for i, t in enumerate(tokens):
        vocab[t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))] = i
    merges = _merges(meta)
    if merges is None:
        raise TokenizerError("a byte-level (gpt2) GGUF vocabulary needs tokenizer.ggml.merges")
    tk = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
                       fuse_unk=False))
    pre = meta.get("tokenizer.ggml.pre")
    split = PRE_TOKENIZER_SPLITS.get(pre) if isinstance(pre, str) else None
    if split is not None:
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    elif pre in DIGIT_SPLIT_PRES:
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
    else:
        if pre not in GPT2_SPLIT_PRES:
            log.warning("%s: %s; ember splits its text with GPT-2's regex, so some text may tokenise differently "
                        "from how the model was trained (known to ember: %s)", where or "GGUF tokenizer",
                        "no tokenizer.ggml.pre is given" if pre is None else f"tokenizer.ggml.pre {pre!r:.80} is unknown",
                        ", ".join(sorted({*PRE_TOKENIZER_SPLITS, *GPT2_SPLIT_PRES, *DIGIT_SPLIT_PRES})))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return tk, alphabet


def _sentencepiece(meta: dict, tokens: list[str], arch: str):
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    gemma = arch in ("gemma", "gemma2", "gemma3")
    if gemma:
        # a token of spaces is stored as real spaces; GemmaTokenizer looks it up as "▁"s
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _merges(meta)
    if merges is None:
        if gemma:  # Gemma's scores do not follow its merge order; the vocabulary order does
            scores = {t: -i for i, t in enumerate(tokens)}
        else:
            raw = meta.get("tokenizer.ggml.scores")
            if not isinstance(raw, list) or len(raw) != len(tokens):
                raise TokenizerError("a SentencePiece (llama) GGUF vocabulary needs tokenizer.ggml.scores or merges")
            scores = dict(zip(tokens, raw))
        merges = generate_merges(vocab, scores)
    if gemma:
        unk = meta.get("tokenizer.ggml.unknown_token_id")
        unk_tok = tokens[unk] if isinstance(unk, int) and not isinstance(unk, bool) and 0 <= unk < len(tokens) else "<unk>"
        if unk_tok not in vocab:
            # no unknown token at all: a BPE naming a missing one fails on the first character it has
            # no token (nor byte token) for; without one, such characters are dropped, as the
            # tokenizers library does for any BPE without an unknown token
            unk_tok = None
        tk = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, unk_token=unk_tok, dropout=None, byte_fallback=True))
        tk.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
        tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
        tk.normalizer = normalizers.Replace(" ", "\u2581")
        return tk, vocab
    tk = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    if arch == "phi3":  # the prefix space comes from a normalizer, not Metaspace
        tk.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        tk.pre_tokenizer = None
    else:
        tk.normalizer = None
        tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(content=" ", left=1)])
    return tk, vocab


def _token(tokens: list[str], meta: dict, key: str) -> str | None:
    i = meta.get(f"tokenizer.ggml.{key}")
    if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(tokens):
        return tokens[i]
    return None


def eog_ids(meta: dict) -> list[int]:
    """End-of-generation ids as llama.cpp collects them: eos, eot, eom, and tokens with EOG texts."""
    tokens = meta.get("tokenizer.ggml.tokens")
    out: list[int] = []
    n = len(tokens) if isinstance(tokens, list) else None
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        i = meta.get(f"tokenizer.ggml.{key}")
        if isinstance(i, int) and not isinstance(i, bool) and i >= 0 and (n is None or i < n) and i not in out:
            out.append(i)
    if isinstance(tokens, list):
        want = set(EOG_TEXTS)
        for i, t in enumerate(tokens):
            if t in want and i not in out:
                out.append(i)
    return out


def _chat_template(meta: dict):
    default = meta.get("tokenizer.chat_template")
    named = {k[len("tokenizer.chat_template."):]: v for k, v in meta.items()
             if k.startswith("tokenizer.chat_template.") and isinstance(v, str)}
    if not named:
        return default if isinstance(default, str) else None
    out = [{"name": "default", "template": default}] if isinstance(default, str) else []
    return out + [{"name": n, "template": t} for n, t in named.items()]


def tokenizer_from_gguf(meta: dict, path: str | os.PathLike | None = None):
    """An `ember.tokenizer.Tokenizer` from a GGUF file's metadata dict."""
    from tokenizers import AddedToken, processors

    from .tokenizer import Tokenizer

    where = f"{path}: " if path else ""
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens[:16]):
        raise TokenizerError(f"{where}no tokenizer.ggml.tokens in the GGUF metadata")
    kind = meta.get("tokenizer.ggml.model")
    arch = meta.get("general.architecture") or ""
    types = meta.get("tokenizer.ggml.token_type")
    if not isinstance(types, list) or len(types) != len(tokens):
        types = [1] * len(tokens)
    try:
        if kind == "gpt2":
            tk, alphabet = _byte_level(meta, tokens, str(path or ""))
        elif kind == "llama":
            tk, vocab = _sentencepiece(meta, tokens, arch)
            alphabet = None
        else:
            raise TokenizerError(f"{where}GGUF tokenizer model {kind!r} is not supported (supported: gpt2, llama)")
    except TokenizerError:
        raise
    except Exception as e:  # the Rust library raises plain Exceptions on bad vocabularies
        raise TokenizerError(f"{where}cannot build the tokenizer from the GGUF metadata: {e}") from None
    except BaseException as e:  # and panics (pyo3's PanicException is a BaseException), e.g. on a merge
        if type(e).__name__ != "PanicException":  # naming a token longer than the vocabulary's
            raise
        raise TokenizerError(f"{where}cannot build the tokenizer from the GGUF metadata: {str(e)[:300]}") from None

    special = {name: _token(tokens, meta, key) for name, key in (
        ("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"))}
    if kind == "llama" and arch in ("gemma", "gemma2", "gemma3"):
        special["mask_token"] = "<mask>"  # GemmaTokenizer's default
    control = [t for t, ty in zip(tokens, types) if ty == CONTROL and (alphabet is None or set(t) <= alphabet)]
    extra = [v for v in special.values() if v is not None and v not in control]
    vocab_now = tk.get_vocab(with_added_tokens=True)
    specials = [AddedToken(t, normalized=False, special=True) for t in control + extra if t in vocab_now]
    if specials:
        tk.add_special_tokens(specials)
    vocab_now = tk.get_vocab(with_added_tokens=True)
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types)
            if ty == USER_DEFINED and t in vocab_now]
    if user:
        tk.add_tokens(user)

    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    add_eos = meta.get("tokenizer.ggml.add_eos_token")
    add_bos = bool(add_bos) if isinstance(add_bos, bool) else (kind == "llama")
    add_eos = bool(add_eos) if isinstance(add_eos, bool) else False
    bos, eos = special["bos_token"], special["eos_token"]
    add_bos = add_bos and bos is not None
    add_eos = add_eos and eos is not None
    single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
    pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
    pieces = []
    if add_bos:
        pieces.append((bos, tk.token_to_id(bos)))
    if add_eos and eos != bos:
        pieces.append((eos, tk.token_to_id(eos)))
    tk.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=pieces)
    return Tokenizer(tk, special_tokens={k: v for k, v in special.items() if v is not None},
                     chat_template=_chat_template(meta), add_bos_token=add_bos, add_eos_token=add_eos)
