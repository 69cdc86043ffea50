"""Reasoning models: the `<think>…</think>` block (Qwen3, DeepSeek-R1 style) is split from the answer.

The reasoning goes to `message.reasoning_content` (and to `delta.reasoning_content` when streaming),
the rest to `content`. A block is recognised only at the very start of the output, or when the
prompt itself ends inside one (templates such as DeepSeek-R1's open `<think>` in the generation
prompt); a `<think>` later in an answer is text like any other.
"""
from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


def prompt_opens_think(prompt: str) -> bool:
    """Whether the rendered prompt leaves a think block open (the output starts inside it)."""
    tail = prompt.rstrip()
    return tail.endswith(OPEN)


class ReasoningSplitter:
    """Splits streamed text into ("reasoning", text) and ("content", text) pieces.

    Text that could still be the start of a tag is held back until the next piece (or `end`)."""

    def __init__(self, in_think: bool = False):
        self.state = "think" if in_think else "start"  # start: nothing but whitespace seen yet
        self.buf = ""

    def feed(self, text: str) -> list[tuple[str, str]]:
        self.buf += text
        out: list[tuple[str, str]] = []
        while self.buf:
            if self.state == "start":
                s = self.buf.lstrip()
                if s.startswith(OPEN):
                    self.state, self.buf = "think", s[len(OPEN):]
                    continue
                if OPEN.startswith(s):  # whitespace or a partial tag: wait for more
                    break
                self.state = "content"
                continue
            if self.state == "think":
                i = self.buf.find(CLOSE)
                if i >= 0:
                    if i:
                        out.append(("reasoning", self.buf[:i]))
                    self.state, self.buf = "after", self.buf[i + len(CLOSE):]
                    continue
                keep = _partial_suffix(self.buf, CLOSE)
                if len(self.buf) > keep:
                    out.append(("reasoning", self.buf[: len(self.buf) - keep]))
                    self.buf = self.buf[len(self.buf) - keep:]
                break
            if self.state == "after":  # the whitespace templates put between the block and the answer
                s = self.buf.lstrip()
                if not s:
                    break
                self.state, self.buf = "content", s
                continue
            out.append(("content", self.buf))
            self.buf = ""
        return out

    def end(self) -> list[tuple[str, str]]:
        """What is still held back (the output ended)."""
        buf, self.buf = self.buf, ""
        if not buf:
            return []
        if self.state == "think":
            return [("reasoning", buf)]
        if self.state == "after":
            return [("content", buf.lstrip())] if buf.strip() else []
        return [("content", buf)]


def split_reasoning(text: str, in_think: bool = False) -> tuple[str | None, str]:
    """(reasoning or None, content) of a whole output."""
    sp = ReasoningSplitter(in_think)
    parts = sp.feed(text) + sp.end()
    reasoning = "".join(t for k, t in parts if k == "reasoning")
    content = "".join(t for k, t in parts if k == "content")
    saw = in_think or sp.state in ("think", "after", "content") and text.lstrip().startswith(OPEN)
    return (reasoning if saw else None), content


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
