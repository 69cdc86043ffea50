"""Tokenizer: a `tokenizers.Tokenizer` plus what transformers keeps beside it (special tokens,
add_bos, the chat template), read from tokenizer.json / tokenizer_config.json /
special_tokens_map.json / chat_template.jinja, or built from GGUF metadata.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

from .errors import TokenizerError

T = TypeVar("T")

# ---- bounding what one request costs the tokenizer -------------------------------------------------
# The tokenizers library normalises a whole text in memory before anything else (with ~10 bytes of
# alignment bookkeeping per byte), and a tokenizer.json's normaliser can multiply a text's length: a
# `Replace` of "a" by 100,000 "b"s turns a 20 KB prompt into 2 G characters (20 GB). So:
#   * at load, each normaliser step's worst-case growth factor is read from its config (`_growth`:
#     Replace = content / pattern length, or content + 1 for a regex or empty pattern, which can match
#     between every two characters; Prepend = 1 + its length per piece; Unicode normal forms 18, the
#     longest NFKC expansion; Lowercase 3; ...), multiplied along Sequences. A tokenizer with a single
#     Replace/Prepend text over MAX_REPLACEMENT characters, or a total factor over MAX_GROWTH, is
#     refused (TokenizerError): no real tokenizer comes near either.
#   * per request (`check_input`), texts whose worst case (length x factor) fits the limits
#     go straight through (every real tokenizer on every real prompt); otherwise the normaliser runs
#     on bounded chunks of the text first (each chunk's output is at most a quarter of the cap) to
#     measure the real normalised length, and the request is refused past the cap before the full
#     encode runs. Peak memory stays bounded by the cap whatever the pipeline claims; the chunked
#     measure can miss a match straddling a chunk edge, an error of one replacement per chunk.
# Decoders: a `Replace` decoder over MAX_REPLACEMENT characters is refused at load the same way.
MAX_NORMALIZED_CHARS = 1 << 23  # 8M characters (~2M tokens) in one text after normalisation
MAX_BATCH_GROWTH = 4  # a batch may normalise to at most max(MAX_NORMALIZED_CHARS, 4 x its length)
MAX_REPLACEMENT = 1024  # characters a single Replace/Prepend step may insert
MAX_GROWTH = 1 << 16  # worst-case growth factor of a whole normaliser
_UNICODE_FORMS = ("NFC", "NFD", "NFKC", "NFKD")


def _growth(cfg: Any, where: str, depth: int = 0) -> int:
    """Worst-case factor by which a normaliser (its JSON config) can lengthen a text (see above)."""
    if not isinstance(cfg, dict) or depth > 64:
        return 32
    kind = cfg.get("type")
    if kind == "Sequence":
        out = 1
        for sub in cfg.get("normalizers") or []:
            out *= _growth(sub, where, depth + 1)
            out = min(out, MAX_GROWTH + 1)
        return out
    if kind == "Replace":
        content, pattern = cfg.get("content"), cfg.get("pattern")
        n = len(content) if isinstance(content, str) else 0
        if n > MAX_REPLACEMENT:
            raise TokenizerError(f"{where}: a Replace normaliser inserts {n} characters (limit {MAX_REPLACEMENT}): "
                                 f"a text would grow without bound")
        plain = pattern.get("String") if isinstance(pattern, dict) else None
        if isinstance(plain, str) and plain:
            return max(1, -(-n // len(plain)))
        return n + 1  # a regex (or an empty string) may match between every two characters
    if kind == "Prepend":
        n = len(cfg.get("prepend") or "")
        if n > MAX_REPLACEMENT:
            raise TokenizerError(f"{where}: a Prepend normaliser adds {n} characters (limit {MAX_REPLACEMENT})")
        return 1 + n
    if kind in _UNICODE_FORMS:
        return 18  # the longest expansion (U+FDFA under NFKC)
    if kind == "Lowercase":
        return 3
    if kind in ("Strip", "StripAccents", "Nmt"):
        return 1
    if kind == "BertNormalizer":
        return 3 * 3 * 18  # spaces around CJK, lowercasing, NFD for accents
    if kind == "ByteLevel":
        return 4
    return 32  # Precompiled (a SentencePiece charsmap) and anything newer: measured per request


def _pipeline_growth(tk: Any, where: str) -> int:
    """The normaliser's worst-case growth factor; refuses absurd normalisers and decoders."""
    for part, key in ((tk.decoder, "decoders"),):
        if part is not None:
            try:
                cfg = json.loads(part.__getstate__())
            except (ValueError, RecursionError, AttributeError, TypeError):
                cfg = None
            stack = [cfg]
            while stack:
                c = stack.pop()
                if isinstance(c, dict):
                    if c.get("type") == "Replace" and isinstance(c.get("content"), str) and len(c["content"]) > MAX_REPLACEMENT:
                        raise TokenizerError(f"{where}: a Replace decoder inserts {len(c['content'])} characters "
                                             f"(limit {MAX_REPLACEMENT})")
                    stack.extend(c.get(key) or [])
    norm = tk.normalizer
    if norm is None:
        return 1
    try:
        cfg = json.loads(norm.__getstate__())
    except (ValueError, RecursionError, AttributeError, TypeError):
        return 32
    g = _growth(cfg, where)
    if g > MAX_GROWTH:
        raise TokenizerError(f"{where}: the normaliser can lengthen a text more than {MAX_GROWTH}-fold "
                             f"(a chain of expanding steps): refused")
    return g


def _tokenizers_failure(e: BaseException, what: str) -> TokenizerError | None:
    """The TokenizerError for an exception out of the tokenizers library, or None if `e` is not one.

    The Rust library raises plain `Exception`s (e.g. an unknown token it needs) and, on a panic (an
    onig regex past its retry limit), pyo3's PanicException, which derives from BaseException only.
    Anything else (KeyboardInterrupt, a signal handler's exception) is not the tokenizer's, and passes."""
    if type(e) is Exception or type(e).__name__ == "PanicException":
        return TokenizerError(f"the tokenizer failed to {what}: {str(e).strip()[:300]}")
    return None


SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def _token_str(v: Any) -> str | None:
    """A special token as stored: a string, or an AddedToken dict {"content": ...}."""
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return v["content"]
    return None


def _read_json(path: Path) -> dict:
    from .io.safefile import MAX_CONFIG_BYTES, read_text

    text = read_text(path, MAX_CONFIG_BYTES, TokenizerError, "tokenizer side file")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:  # ValueError: UnicodeDecodeError, JSONDecodeError, digit limit
        raise TokenizerError(f"{path}: cannot read: {str(e)[:200]}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data


def _check_unicode(texts: Iterable[object]) -> None:
    """The tokenizers library refuses strings that are not valid Unicode (lone surrogates, e.g. from a
    JSON "\\ud800" escape) with a bare TypeError; say what is wrong instead."""
    for t in texts:
        if isinstance(t, str):
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as e:
                raise TokenizerError(f"text is not valid Unicode: {e.reason} at position {e.start} "
                                     f"({t[e.start:e.end]!r})") from None


class Tokenizer:
    """encode(str) -> list[int], decode(list[int]) -> str, and the chat template."""

    def __init__(
        self,
        tokenizer: Any,  # tokenizers.Tokenizer
        *,
        special_tokens: dict[str, str] | None = None,
        chat_template: str | dict | list | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        model_max_length: int | None = None,
    ) -> None:
        # Padding/truncation baked into tokenizer.json (sentence-transformers exports pad to 128) would
        # silently change prompts; batching and truncation are ember's job.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.tk = tokenizer
        self.refresh_limits()
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.model_max_length = model_max_length
        self._special_ids: set[int] | None = None

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, folder: str | os.PathLike, base: tuple | None = None) -> "Tokenizer":
        """From a Hugging Face folder: tokenizer.json and its companions. base: (tokenizers.Tokenizer,
        special tokens) to use instead of tokenizer.json (`spm_tokenizer.tokenizer_from_folder`)."""
        from tokenizers import Tokenizer as TkTokenizer

        folder = Path(folder)
        tj = folder / "tokenizer.json"
        spm_special: dict = {}
        if base is not None:  # a tokenizer converted from another file (spm_tokenizer: tokenizer.model)
            tk, spm_special = base
            tj = folder / "tokenizer.model"
        elif not tj.is_file():
            extra = " (only a slow-tokenizer file is present; convert it with transformers' save_pretrained)" if (
                (folder / "tokenizer.model").is_file() or (folder / "vocab.txt").is_file()
                or (folder / "vocab.json").is_file()) else ""
            raise TokenizerError(f"no tokenizer.json in {folder}{extra}")
        else:
            from .io.safefile import MAX_TOKENIZER_JSON_BYTES, check_size

            check_size(tj, MAX_TOKENIZER_JSON_BYTES, TokenizerError, "tokenizer.json")
            try:
                tk = TkTokenizer.from_file(str(tj))
            except Exception as e:  # the Rust library raises plain Exceptions
                raise TokenizerError(f"{tj}: cannot load: {str(e)[:300]}") from None
            except BaseException as e:  # a Rust panic on a malformed file (pyo3's PanicException is a BaseException)
                if isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit)):
                    raise
                raise TokenizerError(f"{tj}: cannot load: {type(e).__name__}: {str(e)[:300]}") from None
        cfg = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
        smap = _read_json(folder / "special_tokens_map.json") if (folder / "special_tokens_map.json").is_file() else {}
        special = dict(spm_special)
        for name in SPECIAL_NAMES:
            v = _token_str(cfg.get(name)) or _token_str(smap.get(name))
            if v is not None:
                special[name] = v
        template = cfg.get("chat_template")
        jinja = folder / "chat_template.jinja"
        if jinja.is_file():
            from .io.safefile import MAX_TEMPLATE_BYTES, read_text

            template = read_text(jinja, MAX_TEMPLATE_BYTES, TokenizerError, "chat template")
        elif template is None and (folder / "chat_template.json").is_file():
            template = _read_json(folder / "chat_template.json").get("chat_template")
        mml = cfg.get("model_max_length")
        _pipeline_growth(tk, str(tj))  # refuses absurd normalisers/decoders naming the file (see the top)
        return cls(
            tk,
            special_tokens=special,
            chat_template=template,
            add_bos_token=cfg.get("add_bos_token") if isinstance(cfg.get("add_bos_token"), bool) else None,
            add_eos_token=cfg.get("add_eos_token") if isinstance(cfg.get("add_eos_token"), bool) else None,
            model_max_length=mml if isinstance(mml, int) and mml < 1 << 40 else None,
        )

    # ---- limits ---------------------------------------------------------------------------------
    def refresh_limits(self, where: str = "tokenizer") -> None:
        """Re-read the pipeline's worst-case growth (after changing `self.tk.normalizer`)."""
        self._growth = _pipeline_growth(self.tk, where)

    def check_input(self, texts: Sequence[str]) -> None:
        """Refuse (TokenizerError) texts that are not valid Unicode, and texts the normaliser would
        grow past the limits, before the tokenizers library builds anything (see the notes at the
        top of this module): no text may normalise to more than MAX_NORMALIZED_CHARS, nor a batch to
        more than MAX_BATCH_GROWTH times its own length (so a large batch of plain texts passes, a
        small request cannot become a huge one). Free for every real tokenizer and prompt."""
        _check_unicode(texts)
        cap = MAX_NORMALIZED_CHARS
        growth = getattr(self, "_growth", 1)
        lengths = [len(t) for t in texts if isinstance(t, str)]
        total = sum(lengths)
        for n in lengths:
            if n > cap:
                raise TokenizerError(f"a text of {n} characters is longer than the tokenizer accepts ({cap})")
        batch_cap = max(cap, MAX_BATCH_GROWTH * total)
        if max(lengths, default=0) * growth <= cap and total * growth <= batch_cap:
            return
        norm = self.tk.normalizer
        chunk = max(1, cap // (4 * growth))
        made = 0
        for t in texts:
            if not isinstance(t, str):
                continue
            this = 0
            for i in range(0, len(t), chunk):
                try:
                    this += len(norm.normalize_str(t[i:i + chunk]))
                except BaseException as e:  # noqa: BLE001 - see _tokenizers_failure
                    err = _tokenizers_failure(e, "normalise the text")
                    if err is None:
                        raise
                    raise err from None
                if this > cap or made + this > batch_cap:
                    raise TokenizerError(f"this tokenizer's normaliser grows the text past {min(cap, batch_cap)} "
                                         f"characters (up to {growth}x its length): text refused")
            made += this

    def _run(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - only the tokenizers library's own failures are converted
            err = _tokenizers_failure(e, what)
            if err is None:
                raise
            raise err from None

    # ---- encoding -----------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode() needs a str, got {type(text).__name__}")
        self.check_input([text])
        ids = self._run("encode the text", self.tk.encode, text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens:
            ids = self._fix_bos_eos(ids)
        return ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        texts = list(texts)
        self.check_input(texts)
        encs = self._run("encode the texts", self.tk.encode_batch, texts, add_special_tokens=add_special_tokens)
        return [self._fix_bos_eos(e.ids) if add_special_tokens else e.ids for e in encs]

    def _fix_bos_eos(self, ids: list[int]) -> list[int]:
        # tokenizer_config's add_bos_token/add_eos_token win over tokenizer.json's post-processor, as in transformers.
        if self.add_bos_token is not None and self.bos_token_id is not None:
            has = bool(ids) and ids[0] == self.bos_token_id
            if self.add_bos_token and not has:
                ids = [self.bos_token_id] + ids
        if self.add_eos_token and self.eos_token_id is not None and (not ids or ids[-1] != self.eos_token_id):
            ids = ids + [self.eos_token_id]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._run("decode", self.tk.decode, list(ids), skip_special_tokens=skip_special_tokens)

    def __call__(self, text: str) -> list[int]:
        return self.encode(text)

    # ---- special tokens -----------------------------------------------------------------------
    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.tk.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.tk.id_to_token(i)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self.token_to_id(self.special_tokens.get("pad_token"))

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> set[int]:
        if self._special_ids is None:
            ids = {t for t in (self.token_to_id(v) for v in self.special_tokens.values()) if t is not None}
            for i, tok in self.tk.get_added_tokens_decoder().items():
                if tok.special:
                    ids.add(i)
            self._special_ids = ids
            return ids
        return self._special_ids

    # ---- chat ---------------------------------------------------------------------------------
    def template(self, name: str | None = None) -> str:
        t = self.chat_template
        if isinstance(t, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict) and isinstance(d.get("name"), str)}
            t = named.get(name or "default") or next(iter(named.values()), None)
        elif isinstance(t, dict):
            t = t.get(name or "default") or next(iter(t.values()), None)
        if not isinstance(t, str) or not t:
            from .errors import TemplateError

            raise TemplateError("this model has no chat template (tokenizer_config.json 'chat_template' or chat_template.jinja); "
                                "use generate() with a plain prompt instead")
        return t

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, documents: list[dict] | None = None,
                            template: str | None = None, **kwargs: Any) -> str:
        """Render messages to the prompt string exactly as transformers' apply_chat_template(tokenize=False)."""
        from .generation.chat_template import render

        kw = {**self.special_tokens, **kwargs}
        return render(template or self.template("tool_use" if tools else None), messages,
                      add_generation_prompt=add_generation_prompt, tools=tools, documents=documents, **kw)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
        """Token ids of the rendered chat (the template writes the special tokens itself)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs), add_special_tokens=False)
