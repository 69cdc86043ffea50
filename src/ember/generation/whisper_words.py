"""Whisper's text tokens grouped into words, as transformers' WhisperTokenizer does for
`return_timestamps="word"` (`_combine_tokens_into_words`, the same rules as openai-whisper):

- tokens are first joined until they decode to whole characters (a character split over byte-level
  tokens decodes to U+FFFD until its last byte);
- in languages written with spaces, a piece that starts with a space or is punctuation begins a
  new word, any other piece joins the word before it; in Chinese, Japanese, Thai, Lao, Burmese and
  Cantonese each whole-character piece is a word;
- opening punctuation (`"'“¡¿([{-` after a space) joins the next word, closing punctuation
  (`"'.。,，!！?？:：”)]}、`) the word before.

    words = timed_words(tokenizer.decode, text_tokens, starts, ends, language="en")   # -> [Word]

A word's start is its first token's start, its end its last token's end.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

NO_SPACES = {"zh", "ja", "th", "lo", "my", "yue"}  # language codes whose text has no spaces between words
PREPEND = "\"'“¡¿([{-"
APPEND = "\"'.。,，!！?？:：”)]}、"
PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
REPLACEMENT = "\ufffd"

Decode = Callable[[list[int]], str]


@dataclass
class Word:
    word: str  # its text, with the leading space the tokens decode to (" Hello")
    start: float  # seconds from the start of the audio
    end: float
    tokens: list[int] = field(default_factory=list)


def split_on_unicode(decode: Decode, tokens: Sequence[int]) -> tuple[list[str], list[list[int]]]:
    """Pieces of whole characters and the indices of their tokens (transformers' _split_tokens_on_unicode)."""
    full = decode(list(tokens))
    words: list[str] = []
    indices: list[list[int]] = []
    current: list[int] = []
    offset = 0
    for i in range(len(tokens)):
        current.append(i)
        text = decode([tokens[k] for k in current])
        bad = text.find(REPLACEMENT)
        if bad < 0 or offset + bad >= len(full) or full[offset + bad] == REPLACEMENT:
            words.append(text)
            indices.append(current)
            current = []
            offset += len(text)
    return words, indices


def split_on_spaces(decode: Decode, tokens: Sequence[int]) -> tuple[list[str], list[list[int]]]:
    """Words at spaces and punctuation (transformers' _split_tokens_on_spaces; its check for special
    tokens is left out: only text tokens come here)."""
    words: list[str] = []
    indices: list[list[int]] = []
    for piece, idx in zip(*split_on_unicode(decode, tokens)):
        # (`in` on a string, as transformers: an empty or all-space piece counts as punctuation)
        if piece.startswith(" ") or piece.strip() in PUNCTUATION or not words:
            words.append(piece)
            indices.append(idx)
        else:
            words[-1] += piece
            indices[-1] = indices[-1] + idx
    return words, indices


def merge_punctuations(words: list[str], indices: list[list[int]]) -> tuple[list[str], list[list[int]]]:
    """Opening punctuation joined to the next word, closing punctuation to the word before
    (transformers' _merge_punctuations)."""
    words, indices = list(words), [list(x) for x in indices]
    i, j = len(words) - 2, len(words) - 1
    while i >= 0:
        if words[i].startswith(" ") and words[i].strip() in PREPEND:
            words[j] = words[i] + words[j]
            indices[j] = indices[i] + indices[j]
            words[i], indices[i] = "", []
        else:
            j = i
        i -= 1
    i, j = 0, 1
    while j < len(words):
        if not words[i].endswith(" ") and words[j] in APPEND:
            words[i] += words[j]
            indices[i] += indices[j]
            words[j], indices[j] = "", []
        else:
            i = j
        j += 1
    return [w for w in words if w], [x for x in indices if x]


def group_words(decode: Decode, tokens: Sequence[int], language: str | None = None) -> tuple[list[str], list[list[int]]]:
    """The words of text `tokens` and the indices of each word's tokens (language: a code such as
    "en"; None is English, as transformers)."""
    split = split_on_unicode if language in NO_SPACES else split_on_spaces
    return merge_punctuations(*split(decode, tokens))


def timed_words(decode: Decode, tokens: Sequence[int], starts: Sequence[float], ends: Sequence[float],
                language: str | None = None) -> list[Word]:
    """`group_words` with each word's start and end from its tokens' (one start and end per token)."""
    words, indices = group_words(decode, tokens, language)
    return [Word(w, starts[idx[0]], ends[idx[-1]], [tokens[k] for k in idx]) for w, idx in zip(words, indices)]
