"""A spinner on stderr while something slow runs (the CLI's model loading), only on a terminal."""
from __future__ import annotations

import itertools
import sys
import threading
import time
from typing import TextIO

FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


class Spinner:
    """`with Spinner("loading X"):` draws `⠋ loading X (3s)` on stderr, redrawn every 0.1 s by a thread,
    and clears it on exit. Nothing is drawn when the stream is not a terminal (enabled=None) or with
    enabled=False."""

    def __init__(self, text: str, stream: TextIO | None = None, enabled: bool | None = None, interval: float = 0.1):
        self.text, self.stream, self.interval = text, stream or sys.stderr, interval
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = enabled if enabled is not None else bool(isatty and isatty())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._width = 0

    def _draw(self) -> None:
        t0 = time.monotonic()
        for frame in itertools.cycle(FRAMES):
            line = f"{frame} {self.text} ({time.monotonic() - t0:.0f}s)"
            self._width = max(self._width, len(line))
            self.stream.write("\r" + line)
            self.stream.flush()
            if self._stop.wait(self.interval):
                break

    def __enter__(self) -> "Spinner":
        if self.enabled:
            self._thread = threading.Thread(target=self._draw, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
