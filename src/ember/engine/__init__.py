"""The fast decode engine: a persistent preallocated KV cache and, on CUDA, the decode step
captured in CUDA graphs per batch bucket (optionally torch.compile'd first). It wraps the same
model modules as the plain path; greedy outputs are identical.

    llm = ember.load(...)                          # on CUDA the engine is on by default
    llm = ember.load(..., compile=True)            # or asked for: torch.compile'd decode step
    fast = llm.with_engine(max_batch=8, max_len=2048)   # the same model, an engine with these options
"""
from __future__ import annotations

from typing import Any

# Lazy: `ember --help` and `import ember.engine.cli` must not import torch.
_EXPORTS = {"Engine": ".core", "StaticDecoder": ".graphs",
            "DEFAULT_BUCKETS": ".graphs"}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
