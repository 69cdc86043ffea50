"""The interactive side of `ember chat` / `ember run MODEL`: reading turns (line editing and history
through readline on a terminal, multi-line input) and the chat loop."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

HELP = ('ember chat — /reset clears the history, /exit or Ctrl-D quits; """ starts and ends a multi-line '
        'message, a line ending in \\ continues; /image PATH attaches an image to the next message')
PROMPT, MORE = ">>> ", "... "
HISTORY_LINES = 1000


def read_message(read: Callable[[str], str], prompt: str = PROMPT, more: str = MORE) -> str:
    """One user message from `read(prompt)` (which raises EOFError at the end of input): a line; lines
    ending in a backslash joined with the next; or, as in ollama, everything between `\"\"\"` and `\"\"\"`."""
    first = read(prompt)
    if first.lstrip().startswith('"""'):
        body, lines = first.lstrip()[3:], []
        while True:
            if body.rstrip().endswith('"""'):
                lines.append(body.rstrip()[:-3])
                break
            lines.append(body)
            try:
                body = read(more)
            except EOFError:
                break
        return "\n".join(lines).strip("\n")
    lines = []
    while first.endswith("\\"):
        lines.append(first[:-1])
        try:
            first = read(more)
        except EOFError:
            first = ""
            break
    lines.append(first)
    return "\n".join(lines)


def user_message(text: str, images: list[str] | None = None) -> dict:
    """A user turn: the text alone, or (with image paths) OpenAI content parts, the images first. The
    paths are read when the model's processor takes them (a bad file is an ImageError then)."""
    if not images:
        return {"role": "user", "content": text}
    parts: list[dict] = [{"type": "image_url", "image_url": {"url": str(Path(p).expanduser())}} for p in images]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def history_file() -> Path:
    from .fixtures import cache_root

    return cache_root() / "chat_history"


def _readline():
    """readline with ember's history loaded (None where the module is missing, e.g. on Windows)."""
    try:
        import readline
    except ImportError:
        return None
    try:
        readline.read_history_file(history_file())
    except OSError:
        pass
    readline.set_history_length(HISTORY_LINES)
    return readline


def _save_history(readline) -> None:
    try:
        history_file().parent.mkdir(parents=True, exist_ok=True)
        readline.write_history_file(history_file())
    except OSError:
        pass


def chat_loop(llm, max_tokens: int, sampling: dict, system: str | None = None, verbose: bool = False,
              images: list[str] | None = None) -> int:
    """Read turns from stdin (a terminal: with a prompt, line editing and history), stream each reply
    with the conversation so far. /reset forgets it, /exit or end of input stops, /image PATH attaches
    an image to the next message (`images`: to the first one). A turn whose images cannot be read is
    reported and dropped; the chat goes on."""
    from .errors import EmberError

    tp = getattr(llm, "tp", None)  # tensor parallel: rank 0 reads the turns, the other ranks receive them
    leader = tp is None or tp.rank == 0
    interactive = leader and sys.stdin.isatty()
    readline = _readline() if interactive else None
    if interactive:
        print(HELP, file=sys.stderr)
    history = [{"role": "system", "content": system}] if system else []
    pending = list(images or [])  # images for the next message

    def read(prompt: str) -> str:
        return input(prompt if interactive else "")

    def next_message() -> str | None:  # None: end of input
        line = None
        if leader:
            try:
                line = read_message(read)
            except EOFError:
                line = None
            except KeyboardInterrupt:  # Ctrl-C at the prompt drops the line, as in a shell
                sys.stderr.write("\n")
                line = ""
        return tp.broadcast_object(line) if tp is not None else line

    try:
        while True:
            line = next_message()
            if line is None:
                break
            if not line.strip():
                continue
            if line.strip() in ("/exit", "/quit", "/bye"):
                break
            if line.strip() == "/reset":
                history = history[:1] if system else []
                pending = []
                continue
            if line.strip().startswith("/image"):
                path = line.strip()[len("/image"):].strip()
                if path:
                    pending.append(path)
                    if leader:
                        print(f"(image {path} goes with the next message)", file=sys.stderr)
                elif leader:
                    print("usage: /image PATH", file=sys.stderr)
                continue
            history.append(user_message(line, pending))
            pending = []
            reply, last = [], None
            try:
                for chunk in llm.chat(history, max_tokens, stream=True, details=True, **sampling):
                    last = chunk
                    if chunk.text:
                        reply.append(chunk.text)
                        sys.stdout.write(chunk.text)
                        sys.stdout.flush()
            except KeyboardInterrupt:
                sys.stdout.write(" [interrupted]")
            except EmberError as e:  # e.g. an unreadable image: this turn is dropped, the chat goes on
                history.pop()
                if leader:
                    print(f"ember: error: {e}", file=sys.stderr)
                continue
            sys.stdout.write("\n")
            sys.stdout.flush()
            if verbose and last is not None and last.completion is not None:
                print(speed_line(last.completion), file=sys.stderr)
            history.append({"role": "assistant", "content": "".join(reply)})
    finally:
        if readline is not None:
            _save_history(readline)
    return 0


def speed_line(c) -> str:
    """`-v`'s timing line for one Completion."""
    u = c.usage
    return (f"[{u.prompt_tokens} prompt tokens in {c.ttft_s:.2f}s ({c.prompt_tps:.1f} tok/s); "
            f"{u.completion_tokens} tokens generated at {c.generation_tps:.1f} tok/s; {c.total_s:.2f}s in all]")
