"""glibc's allocator, tuned for a process that holds a model and runs large temporary tensors.

glibc serves allocations over its mmap threshold with mmap (returned to the OS on free), but raises
that threshold to the largest block freed so far (up to 32 MiB): after the first prefill, the next
ones' activations come from the heap and stay resident when freed. A 1.5B model's 512-token prefill
left ~220 MB resident that way, and loading peaked 280 MB higher. `tune()` fixes the threshold at
1 MiB (a fixed value also turns the growth off); `trim()` hands freed heap pages back. No-ops
off glibc. EMBER_MALLOC_TUNING=0 leaves the allocator alone.
"""
from __future__ import annotations

import os

M_MMAP_THRESHOLD = -3
_done = False


def _libc():
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def tune(threshold: int = 1 << 20) -> bool:
    """Serve allocations of `threshold` bytes and more with mmap, for the rest of the process."""
    global _done
    if _done or os.environ.get("EMBER_MALLOC_TUNING", "1") == "0":
        return _done
    libc = _libc()
    try:
        _done = bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except AttributeError:
        _done = False
    return _done


def trim() -> None:
    """Hand the heap's free pages back to the OS (dequantising and repacking leave many freed
    temporaries behind that would otherwise stay in the process's resident memory)."""
    libc = _libc()
    try:
        if libc is not None:
            libc.malloc_trim(0)
    except AttributeError:
        pass
