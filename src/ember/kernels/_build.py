"""Build-on-first-use of the native kernels, cached per torch version and source hash.

The library is compiled once with `torch.utils.cpp_extension.load` into
`${EMBER_CACHE:-~/.cache/ember}/kernels/<torch-version>-<hash>/` under an exclusive file lock (so
concurrent processes build it once), and later processes load the cached `.so` directly (no
ninja run). Any failure (no compiler, no ninja, a compile error) is reported by one warning and
leaves the kernels unavailable: callers fall back to dequantise + F.linear.
"""
from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

CSRC = Path(__file__).parent / "csrc"
SOURCES = ("ember_kernels.cpp", "x86_impl.h", "bf16_gemv.h", "ops.cpp", "ops_impl.h", "int16_gemm.cpp", "avx2_math.h")
UNITS = ("ember_kernels.cpp", "ops.cpp", "int16_gemm.cpp")  # the translation units (the headers are included)
# -fopenmp: at::parallel_for is a header template that expands to `#pragma omp parallel` in
# torch's OpenMP builds; without it every op would run on one thread. (The library then needs
# libgomp.so.1, which torch has already loaded.)
CFLAGS = ("-O3", "-fno-math-errno", "-Wno-unused-function", "-fopenmp")
LDFLAGS = ("-fopenmp",)

_lock = threading.Lock()
_state: dict = {"loaded": None, "reason": None, "build_s": None, "load_s": None, "path": None}


def _digest() -> str:
    h = hashlib.sha256()
    for name in SOURCES:
        h.update(name.encode())
        h.update((CSRC / name).read_bytes())
    h.update(" ".join(CFLAGS + LDFLAGS).encode())
    h.update(f"{sys.version_info[:2]}{torch.__version__}{torch._C._GLIBCXX_USE_CXX11_ABI}".encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    """$EMBER_KERNELS_CACHE, else $EMBER_CACHE/kernels (default ~/.cache/ember/kernels), per build."""
    root = os.environ.get("EMBER_KERNELS_CACHE")
    base = Path(root) if root else Path(os.environ.get("EMBER_CACHE") or Path.home() / ".cache" / "ember") / "kernels"
    return base / f"{torch.__version__.replace('+', '_')}-{_digest()}"


def _so_name() -> str:
    return f"ember_kernels_{_digest()}"


def _ninja_on_path() -> None:
    """The `ninja` PyPI package's binary sits in the environment's bin dir, which is not on PATH
    when the environment isn't activated: put it there for cpp_extension."""
    import shutil

    if shutil.which("ninja"):
        return
    try:
        import ninja  # type: ignore[import-not-found]

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except Exception:
        pass  # cpp_extension will say ninja is missing


def _build(out: Path) -> Path:
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    so = out / f"{_so_name()}.so"
    with open(out / "build.lock", "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)  # the first process builds, the others wait, then load
        try:
            if not so.exists():
                from torch.utils import cpp_extension

                _ninja_on_path()
                t = time.perf_counter()
                cpp_extension.load(
                    name=_so_name(),
                    sources=[str(CSRC / u) for u in UNITS],
                    extra_cflags=list(CFLAGS),
                    extra_ldflags=list(LDFLAGS),
                    extra_include_paths=[str(CSRC)],
                    build_directory=str(out),
                    is_python_module=False,
                    verbose=os.environ.get("EMBER_KERNELS_VERBOSE") == "1",
                )
                _state["build_s"] = time.perf_counter() - t
                return so  # load() already loaded it into this process
        finally:
            fcntl.flock(lockf, fcntl.LOCK_UN)
    t = time.perf_counter()
    torch.ops.load_library(str(so))
    _state["load_s"] = time.perf_counter() - t
    return so


def cached() -> bool:
    """Whether load() would find the library without compiling it (loaded, or built in the cache)."""
    return bool(_state["loaded"]) or (cache_dir() / f"{_so_name()}.so").exists()


_background: list = []  # the thread of load_in_background(), once started
_background_lock = threading.Lock()  # not _lock: load() holds that for the whole build


def load_in_background() -> None:
    """Start load() on a daemon thread (once per process): a first build takes ~10 s on 2 cores."""
    with _background_lock:
        if not _background:
            _background.append(threading.Thread(target=load, name="ember-kernels-build", daemon=True))
            _background[0].start()


def load() -> bool:
    """Build (first time) and load the library; True when the ops are registered."""
    if _state["loaded"] is not None:
        return _state["loaded"]
    with _lock:
        if _state["loaded"] is not None:
            return _state["loaded"]
        if os.environ.get("EMBER_KERNELS", "1") == "0":
            _state["reason"] = "disabled by EMBER_KERNELS=0"
            _state["loaded"] = False
            return False
        try:
            if not hasattr(torch.ops.ember, "ggml_mm"):  # not already loaded by another path
                _state["path"] = str(_build(cache_dir()))
            _register_fakes()
            _state["loaded"] = True
        except Exception as e:  # no compiler / ninja / headers, a compile error, a bad cache dir
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            _state["reason"] = f"{type(e).__name__}: {first}"[:300]
            _state["loaded"] = False
            warnings.warn(f"ember.kernels: native kernels unavailable ({_state['reason']}); "
                          "using the PyTorch fallback", RuntimeWarning, stacklevel=3)
        return _state["loaded"]


def _register_fakes() -> None:
    if _state.get("fakes"):
        return

    @torch.library.register_fake("ember::ggml_mm")
    def _ggml_mm_fake(x, w, ggml_type, out_features, isa):
        return x.new_empty((*x.shape[:-1], out_features))

    @torch.library.register_fake("ember::bf16_mm")
    def _bf16_mm_fake(x, w, isa):
        return x.new_empty((*x.shape[:-1], w.shape[0]))

    @torch.library.register_fake("ember::int16_mm")
    def _int16_mm_fake(x, w, w_scale, bias, out_features, gelu, isa):
        return x.new_empty((*x.shape[:-1], out_features))

    @torch.library.register_fake("ember::rms_norm")
    def _rms_norm_fake(x, weight, eps, isa):
        both_bf16 = x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
        return x.new_empty(x.shape, dtype=torch.bfloat16 if both_bf16 else torch.float32)

    @torch.library.register_fake("ember::add_rms_norm")
    def _add_rms_norm_fake(x, delta, weight, eps, isa):
        both_bf16 = x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
        return x.new_empty(x.shape), x.new_empty(x.shape, dtype=torch.bfloat16 if both_bf16 else torch.float32)

    @torch.library.register_fake("ember::silu_mul")
    def _silu_mul_fake(gu, up, isa):
        if up is not None:
            return gu.new_empty(gu.shape)
        return gu.new_empty((*gu.shape[:-1], gu.shape[-1] // 2))

    @torch.library.register_fake("ember::decode_attention")
    def _decode_attention_fake(q, k, v, mask, scale, isa):
        return q.new_empty((q.shape[0], q.shape[1], 1, q.shape[3]))

    _state["fakes"] = True


def info() -> dict:
    """What happened: loaded, reason (when not), build_s / load_s (seconds), path of the library."""
    return {k: v for k, v in _state.items() if k != "fakes"}
