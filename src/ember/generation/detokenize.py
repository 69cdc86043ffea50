"""Streaming detokenisation that never splits a multi-byte character.

Tokens are decoded in a sliding window: text is emitted only once the window's decoded string has
grown past what was already emitted and does not end in U+FFFD (a partial UTF-8 sequence), the
method used by text-generation-inference and vLLM. Decoding a window rather than single tokens keeps
SentencePiece's leading-space handling right.
"""
from __future__ import annotations


class StreamDecoder:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # start of the window
        self.read = 0  # tokens already turned into emitted text

    def push(self, token_id: int) -> str:
        """Add one token; return the new text it completes ('' while a character is incomplete)."""
        self.ids.append(int(token_id))
        prefix_text = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=self.skip)
        new_text = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=self.skip)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            out = new_text[len(prefix_text):]
            self.prefix, self.read = self.read, len(self.ids)
            return out
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        prefix_text = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=self.skip)
        new_text = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=self.skip)
        self.prefix = self.read = len(self.ids)
        return new_text[len(prefix_text):] if len(new_text) > len(prefix_text) else ""
