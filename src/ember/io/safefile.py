"""Reading the small files beside the weights without trusting their size, and writing model files
without ever changing one in place.

Side files (config.json, tokenizer_config.json, chat_template.jinja, an index) are read whole, so each
kind has a size limit checked with `stat` before anything is read (a 3 GiB sparse config.json is
refused at once instead of being read into memory). The limits are far above real files: configs and
templates are kilobytes, tokenizer.json reaches tens of MB (Gemma 3's is 33 MB).

Weights are memory-mapped, and a mapped file that shrinks under a loaded model kills the process with
SIGBUS on the next access. So every ember action that writes a model file writes a temporary file in
the same folder and `os.replace`s it over the target (`atomic_write`): a model loaded from the old
file keeps the old inode's pages, and the new file appears whole or not at all.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

MiB = 1 << 20

# the most bytes ember reads from each kind of side file
MAX_CONFIG_BYTES = 64 * MiB  # config.json, generation_config.json, tokenizer_config.json, *.index.json, ...
MAX_TEMPLATE_BYTES = 16 * MiB  # chat_template.jinja (real ones: a few KB to ~100 KB)
MAX_TOKENIZER_JSON_BYTES = 512 * MiB  # tokenizer.json (real ones: up to ~35 MB)


def check_size(path: str | os.PathLike, limit: int, error: type[Exception], what: str = "file") -> int:
    """The file's size, or `error` if it is over `limit` bytes (or cannot be stat'ed)."""
    try:
        size = os.stat(path).st_size
    except OSError as e:
        raise error(f"{path}: cannot read: {e.strerror or e}") from None
    if size > limit:
        raise error(f"{path}: {size} bytes is too large for a {what} (limit {limit // MiB} MiB); "
                    f"the file is corrupt or not what its name says")
    return size


def read_text(path: str | os.PathLike, limit: int, error: type[Exception], what: str = "file") -> str:
    """The file's text (UTF-8), read only if it is at most `limit` bytes; every failure is `error`.

    The read itself is bounded too (a file that grows between stat and read is cut at limit + 1 and
    refused)."""
    check_size(path, limit, error, what)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise error(f"{path}: cannot read: {e.strerror or e}") from None
    if len(data) > limit:
        raise error(f"{path}: more than {limit // MiB} MiB is too large for a {what}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


@contextmanager
def atomic_write(target: str | os.PathLike, mode: str = "wb"):
    """Open a temporary file beside `target` for writing; on success it replaces `target` atomically
    (`os.replace`), on failure it is removed and `target` is untouched. Never truncates `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def bad_file_name(name) -> str | None:
    """Why `name` (from a file such as a shard index) cannot be a plain file name in a folder, or None.

    Refused: non-strings, empty, `.`/`..`, path separators, NUL, names the OS cannot encode (lone
    surrogates), and names over 255 bytes (the OS would fail with ENAMETOOLONG, an OSError)."""
    if not isinstance(name, str):
        return f"{type(name).__name__} is not a file name"
    if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
        return "not a plain file name"
    try:
        n = len(os.fsencode(name))
    except (UnicodeError, ValueError):
        return "not encodable as a file name"
    if n > 255:
        return f"{n} bytes is longer than a file name can be (255)"
    return None
