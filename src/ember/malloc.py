"""glibc's allocator, tuned for a process that holds a model and runs large temporary tensors.

glibc serves allocations over its mmap threshold with mmap (returned to the OS on free), but raises
that threshold to the largest block freed so far (up to 32 MiB): after the first prefill, the next
ones' activations come from the heap and stay resident when freed. A 1.5B model's 512-token prefill
left ~220 MB resident that way, and loading peaked 280 MB higher. `tune()` fixes the threshold at
1 MiB (a fixed value also turns the growth off); `trim()` hands freed heap pages back. No-ops
off glibc. EMBER_MALLOC_TUNING=0 leaves the allocator alone.

Transparent huge pages: `huge_pages()` says whether an madvise'd region gets them here and
`advise_huge()` asks for them (ember.backends.native keeps the decode GEMV's bf16 weights in one
such region: streamed through 4 KiB pages, a core reads them ~30% slower, as the hardware
prefetcher stops at every page boundary and every page costs a TLB walk). EMBER_HUGEPAGES=0 says no.
"""
from __future__ import annotations

import os

M_MMAP_THRESHOLD = -3
MADV_HUGEPAGE = 14
HUGE_PAGE = 2 << 20  # x86-64's transparent huge page
_done = False
_huge: list = []


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


def huge_pages() -> bool:
    """Whether an madvise(MADV_HUGEPAGE)'d region gets transparent huge pages here: Linux with THP
    `always` or `madvise` (not `never`), and EMBER_HUGEPAGES not 0."""
    if os.environ.get("EMBER_HUGEPAGES", "1") == "0":
        return False
    if not _huge:
        try:
            with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
                mode = f.read()
            _huge.append("[never]" not in mode and "[" in mode)
        except OSError:
            _huge.append(False)
    return _huge[0]


def advise_huge(addr: int, length: int) -> bool:
    """madvise(MADV_HUGEPAGE) the whole huge pages inside [addr, addr + length) (before they are
    first touched: a page already faulted in stays small until khugepaged merges it)."""
    start = -(-addr // HUGE_PAGE) * HUGE_PAGE
    end = (addr + length) // HUGE_PAGE * HUGE_PAGE
    if end <= start:
        return False
    import ctypes

    libc = _libc()
    try:
        fn = libc.madvise
    except AttributeError:
        return False
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn(start, end - start, MADV_HUGEPAGE) == 0
