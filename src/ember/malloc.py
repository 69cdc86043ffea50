"""glibc's allocator, tuned for a process that holds a model and runs large temporary tensors.

glibc serves allocations over its mmap threshold with mmap (returned to the OS on free), but raises
that threshold to the largest block freed so far (up to 32 MiB): after the first prefill, the next
ones' activations come from the heap and stay resident when freed. A 1.5B model's 512-token prefill
left ~220 MB resident that way, and loading peaked 280 MB higher. `tune()` fixes the threshold at
1 MiB (a fixed value also turns the growth off); `trim()` hands freed heap pages back. No-ops
off glibc. EMBER_MALLOC_TUNING=0 leaves the allocator alone.

Once loaded, a model on ember's kernels wants the opposite for its prefill temporaries: over a
1 MiB threshold each is a fresh mapping that faults every page in, every layer of every prompt.
A plain-bf16 model's prefill matmuls make one as large as the weight per call (oneDNN's bf16 matmul
reorders it; on AVX2 it is widened to float32): 67k page faults a 512-token SmolLM2 prefill. A GGUF
model's activations: 780k faults (3.2 GB, ~1.5 s of CPU) a 512-token prefill of Qwen2.5 1.5B
Q4_K_M, whose MLP now runs in chunks of at most 8 MiB (backends.native.MLP_CHUNK_BYTES).
`reuse_temporaries()`, called once such a model is built, raises the thresholds (mmap at 16 MiB,
trim at 32 MiB): the temporaries are reused from the heap (~0 faults; the 1.5B prefill +28%),
while loading ran at 1 MiB. Measured on that model (bench_cpu's worker, 3 runs each): its peak RSS
1.27x the file with these, 1.28-1.31x with glibc's own maxima (32/64 MiB, 16 MiB chunks), 1.24-1.26x
left at 1 MiB.

Transparent huge pages: `huge_pages()` says whether an madvise'd region gets them here and
`advise_huge()` asks for them (ember.backends.native keeps the decode GEMV's bf16 weights in one
such region: streamed through 4 KiB pages, a core reads them ~30% slower, as the hardware
prefetcher stops at every page boundary and every page costs a TLB walk). EMBER_HUGEPAGES=0 says no.
"""
from __future__ import annotations

import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MADV_HUGEPAGE = 14
HUGE_PAGE = 2 << 20  # x86-64's transparent huge page
REUSE_MMAP, REUSE_TRIM = 16 << 20, 32 << 20  # reuse_temporaries (glibc's own maxima: 32 and 64 MiB)
DEFAULT_TRIM = 128 << 10  # glibc's M_TRIM_THRESHOLD
_done = False
_huge: list = []


def _libc():
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def tune(threshold: int = 1 << 20) -> bool:
    """Serve allocations of `threshold` bytes and more with mmap, and trim the heap's free top past
    glibc's default 128 KiB, until `reuse_temporaries()` (called again by every load: a second
    model loads at 1 MiB too, after a first one's reuse_temporaries)."""
    global _done
    if os.environ.get("EMBER_MALLOC_TUNING", "1") == "0":
        return _done
    libc = _libc()
    try:
        ok = bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, threshold)
                  and libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM))
    except AttributeError:
        ok = False
    _done = _done or ok
    return ok


def reuse_temporaries() -> bool:
    """Serve allocations under 16 MiB from the heap and keep up to 32 MiB of its free top, for the
    rest of the process (see the module's docstring)."""
    if not _done:  # not tuned (EMBER_MALLOC_TUNING=0, not glibc): the defaults already do this
        return False
    libc = _libc()
    try:
        return bool(libc.mallopt(M_MMAP_THRESHOLD, REUSE_MMAP) and libc.mallopt(M_TRIM_THRESHOLD, REUSE_TRIM))
    except AttributeError:
        return False


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
