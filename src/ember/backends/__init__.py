"""Compute backends that transforms put behind a built model's layers: ember's native CPU kernels
(native.py), torch's int4 kernel (int4.py), oneDNN prepacking (onednn.py)."""
from __future__ import annotations


def replace_modules(model, want, make) -> int:
    """Every submodule `m` of `model` with `want(m)` becomes `make(m)`, in place. Returns how many."""
    n = 0
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if want(child):
                setattr(mod, name, make(child))
                n += 1
    return n
