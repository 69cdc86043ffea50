"""Shared tools for the hostile-input tests (fuzzing with hypothesis).

Budgets: every fuzz target runs a fixed, derandomised number of examples in CI (a few seconds each).
A longer campaign runs the same targets with fresh randomness:

    EMBER_FUZZ_EXAMPLES=20000 PYTHONPATH=src pytest -q tests/test_fuzz_*.py -p no:cacheprovider

(`EMBER_FUZZ_EXAMPLES` replaces every target's example count and turns derandomisation off, so
each run explores new inputs; a failure prints the falsifying input and a `@reproduce_failure`
blob. Add pytest's `--hypothesis-seed=N` to make a long campaign repeatable.)

Guards used by every property:
  * `time_limit(s)`: SIGALRM interrupts an example that runs longer than `s` seconds (a hang
    becomes a `Hang` exception, which fails the property instead of blocking CI);
  * `memory_cap(bytes)`: lowers RLIMIT_DATA to the current data size plus `bytes` while a target
    runs, so a "wild" allocation (a list or tensor sized by a number a file claims) fails with
    MemoryError / RuntimeError, which fails the property, instead of eating the shared machine;
  * `peak_python_bytes(fn)`: tracemalloc's peak for one call (Python-level allocations).
"""
from __future__ import annotations

import os
import resource
import signal
import threading
import tracemalloc
from contextlib import contextmanager

from hypothesis import HealthCheck, settings

FUZZ_EXAMPLES = int(os.environ.get("EMBER_FUZZ_EXAMPLES", "0") or 0)
LONG_CAMPAIGN = FUZZ_EXAMPLES > 0


def fuzz_settings(examples: int, *, deadline_ms: int | None = None, **kw) -> settings:
    """CI: `examples` derandomised examples. Long campaign: EMBER_FUZZ_EXAMPLES random ones.

    No hypothesis deadline by default (timings on a shared CI machine are noisy): hangs are caught by
    `time_limit` inside the properties instead."""
    return settings(
        max_examples=FUZZ_EXAMPLES or examples,
        derandomize=not LONG_CAMPAIGN,
        deadline=deadline_ms,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                               HealthCheck.function_scoped_fixture, HealthCheck.large_base_example],
        **kw,
    )


class Hang(Exception):
    """An example ran past its time limit (not an EmberError: it fails the property)."""


@contextmanager
def time_limit(seconds: float):
    """Raise Hang in the main thread if the body runs longer than `seconds` (no-op off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise Hang(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _vm_data() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmData:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@contextmanager
def memory_cap(extra_bytes: int = 1 << 30):
    """While the body runs, the process may grow its data segment by at most `extra_bytes`.

    Linux only (RLIMIT_DATA counts heap and private anonymous mappings); elsewhere a no-op.
    """
    now = _vm_data()
    if now is None or not hasattr(resource, "RLIMIT_DATA"):
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    cap = now + extra_bytes
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def peak_python_bytes(fn, *args, **kw):
    """(fn's result or the exception it raised, peak bytes Python allocated during the call).

    tracemalloc runs only for the call (tracing everything, hypothesis included, is slow)."""
    was = tracemalloc.is_tracing()
    if not was:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        out = fn(*args, **kw)
    except BaseException as e:  # noqa: BLE001 - returned for the caller to judge
        out = e
    peak = tracemalloc.get_traced_memory()[1] - base
    if not was:
        tracemalloc.stop()
    return out, peak
